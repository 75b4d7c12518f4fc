//! Per-thread knowledge of which notifier callbacks are running, so that operations that
//! would deadlock from inside a callback are refused instead.

use std::cell::RefCell;

#[cfg(not(loom))]
thread_local! {
    /// (tracker id, entry id) of every callback running on this thread, innermost last.
    static FRAMES: RefCell<Vec<(u64, u64)>> = const { RefCell::new(Vec::new()) };
}

// Under loom, threads are loom's, so the list is loom's per-thread storage.
#[cfg(loom)]
loom::thread_local! {
    static FRAMES: RefCell<Vec<(u64, u64)>> = RefCell::new(Vec::new());
}

/// Marks one callback as running on this thread until dropped.
#[cfg(feature = "notifiers")]
#[derive(Debug)]
pub(crate) struct CallbackFrame(());

#[cfg(feature = "notifiers")]
impl CallbackFrame {
    pub(crate) fn enter(tracker: u64, entry: u64) -> CallbackFrame {
        FRAMES.with(|f| f.borrow_mut().push((tracker, entry)));
        CallbackFrame(())
    }
}

#[cfg(feature = "notifiers")]
impl Drop for CallbackFrame {
    fn drop(&mut self) {
        FRAMES.with(|f| f.borrow_mut().pop());
    }
}

/// How many callbacks of `entry` run on this thread.
#[cfg(feature = "notifiers")]
pub(crate) fn frames_of_entry(entry: u64) -> usize {
    FRAMES.with(|f| f.borrow().iter().filter(|(_, e)| *e == entry).count())
}

/// True if any callback of `tracker` runs on this thread.
pub(crate) fn in_callback_of(tracker: u64) -> bool {
    FRAMES.with(|f| f.borrow().iter().any(|(t, _)| *t == tracker))
}
