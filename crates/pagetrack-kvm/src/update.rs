//! Page-table updates against userspace completions: the address-space lock.
//!
//! A store to a tracked frame exits `KVM_RUN`, and pagetrack completes it in userspace *after*
//! `KVM_RUN` returned: it translates (KVM's own walk, whose result is the exit's GPA, or a
//! software walk of the guest page tables in [`crate::walk`]), then writes guest memory and
//! reports the event. The gate ([`crate::gate`]) pauses only vCPUs inside `KVM_RUN`, so
//! without more, a VMM thread that edits guest page tables and frees the frame behind them
//! (a process VM's `munmap`) could run in between, and the frame, handed to a new mapping
//! and zero-filled, would receive the old store. Natively the store lands in the old page
//! before the unmap, or faults after it.
//!
//! The address-space lock makes the two mutually exclusive:
//!
//! - **Completions hold it shared** ([`Updates::completing`], one acquisition per exit in
//!   [`crate::Vcpu::run`]) from the moment `KVM_RUN` returns, *before the vCPU leaves the
//!   gate*, until the exit has been handled: plain trapped stores, locked read-modify-writes
//!   re-executed, `rep` string continuations, SIMD/x87 and other emulated stores, the
//!   decision to inject a #PF, RAM loads served from guest memory, and the stall check. It is
//!   released before an exit goes back to the VMM and before the VMM's [`crate::IoHandler`]
//!   callbacks run.
//! - **A VMM that changes guest page tables from userspace, or frees or repurposes frames a
//!   translation led to, holds it exclusive** ([`crate::Vm::page_table_update`]), which first
//!   pauses every vCPU (closes the gate and waits until none is inside `KVM_RUN`), then takes
//!   the lock.
//!
//! ## Why a completion is then entirely before or entirely after an update
//!
//! Take an update U and an exit C of some vCPU. C's `KVM_RUN` is entered through the gate at
//! `e`; its translations happen from `e` on (KVM's inside `KVM_RUN`, the software walks
//! after); it takes the shared lock at `a`, still inside the gate (`e < a`), and releases it at
//! `r`, after its last guest-memory write. U holds the pause over `[p, q]`, with no vCPU
//! inside the gate in between, and the lock exclusive over `[x, y]`, `p <= x < y <= q` (the
//! guard releases the lock before it reopens the gate); U edits tables and frees frames only
//! within `[x, y]`, including dropping KVM's cached translations.
//!
//! - The lock orders C and U: `r < x` or `y < a`.
//! - If `r < x`, C translated and wrote before U changed anything: it went through the old
//!   tables into a frame still behind them. Native: the store happened before the unmap.
//! - If `y < a`: the vCPU is inside the gate over `[e, a]`, which cannot meet `[p, q]`; as
//!   `a > y >= p`, it follows that `e > q`. Every translation of C, KVM's included, sees U's
//!   tables, in which U's freed frames are unreachable. Native: the access came after the
//!   unmap (a #PF if nothing is mapped there now).
//! - KVM translates afresh at each entry but in one case: a store or load it splits into
//!   several MMIO exits is translated once, before the first exit, and its later fragments
//!   arrive at later entries with GPAs from before. U's pause also waits until no vCPU has
//!   such a half-done instruction ([`crate::gate`], continuations), so every exit of one
//!   instruction falls on the same side of U.
//!
//! So a store is never applied to a frame through a translation that an update removed
//! before the store's write.
//!
//! ## Why it cannot deadlock
//!
//! A writer waits for or holds the lock only while it holds a pause, and while a pause is
//! held no vCPU is inside the gate. Readers acquire only while inside the gate. So a reader
//! never waits for the lock (it never meets a writer), and the only wait is a writer's, for
//! completions in progress. A completion holding the lock shared may pause vCPUs (a notifier
//! adding tracks, a page-table store that invalidates shadows): a pause waits only for vCPUs
//! inside `KVM_RUN` to leave, and leaving never blocks. It takes the frame locks and the
//! fragment table, never the gate's entry, and never any lock a VMM holds while it takes a
//! [`PageTableUpdate`]. What is left to the VMM, documented on
//! [`crate::Vm::page_table_update`]: a notifier (which runs inside completions) must not take
//! a `PageTableUpdate` or wait for a thread that is taking one, and a VMM must not take one
//! while it holds a lock its notifiers take.

use std::sync::{Condvar, Mutex, MutexGuard};

use crate::gate::{Gate, Kick, Paused};

/// The address-space lock (see the module docs): a shared/exclusive lock whose shared side
/// can also be held without a borrow ([`Updates::acquire_shared`], for the completion an
/// [`crate::ExitHandler`] hands its VMM between `run` and `handle`).
#[derive(Debug, Default)]
pub(crate) struct Updates {
    state: Mutex<LockState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct LockState {
    readers: usize,
    writer: bool,
    /// Threads waiting in `acquire_shared` or `update`: only then is a wake-up sent (a
    /// condvar notification is a system call, and completions release once per exit).
    waiting: usize,
}

/// A completion in progress: the lock held shared (the unit tests' form; the vCPUs'
/// is [`crate::ExitHandler`]'s, which holds it without a borrow).
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct Completing<'a> {
    updates: &'a Updates,
}

impl Updates {
    fn lock(&self) -> MutexGuard<'_, LockState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds the lock shared until the guard drops. Call only inside the gate (right after
    /// `KVM_RUN` returned, before the [`crate::gate::Inside`] guard drops), and at most once
    /// per thread: then it never waits (module docs).
    #[cfg(test)]
    pub(crate) fn completing(&self) -> Completing<'_> {
        self.acquire_shared();
        Completing { updates: self }
    }

    /// Holds the lock shared until [`Updates::release_shared`]; as [`Updates::completing`].
    pub(crate) fn acquire_shared(&self) {
        let mut s = self.lock();
        while s.writer {
            s.waiting += 1;
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
            s.waiting -= 1;
        }
        s.readers += 1;
    }

    /// Ends one [`Updates::acquire_shared`].
    pub(crate) fn release_shared(&self) {
        let mut s = self.lock();
        s.readers -= 1;
        let wake = s.readers == 0 && s.waiting > 0;
        drop(s);
        if wake {
            self.cv.notify_all();
        }
    }

    /// Pauses every vCPU of `gate`, then holds the lock exclusive: waits for the completions
    /// in progress.
    pub(crate) fn update<'a, K: Kick>(&'a self, gate: &'a Gate<K>) -> Update<'a, K> {
        let paused = gate.pause_all();
        let mut s = self.lock();
        while s.writer || s.readers > 0 {
            s.waiting += 1;
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
            s.waiting -= 1;
        }
        s.writer = true;
        drop(s);
        Update {
            updates: self,
            _paused: paused,
        }
    }
}

#[cfg(test)]
impl Drop for Completing<'_> {
    fn drop(&mut self) {
        self.updates.release_shared();
    }
}

/// The lock held exclusive, with the vCPUs paused. The lock is released (in `drop`) before
/// the gate reopens (the field drops after).
#[derive(Debug)]
pub(crate) struct Update<'a, K: Kick> {
    updates: &'a Updates,
    _paused: Paused<'a, K>,
}

impl<K: Kick> Drop for Update<'_, K> {
    fn drop(&mut self) {
        let mut s = self.updates.lock();
        s.writer = false;
        let wake = s.waiting > 0;
        drop(s);
        if wake {
            self.updates.cv.notify_all();
        }
    }
}

/// A page-table update in progress ([`crate::Vm::page_table_update`]): every vCPU is outside
/// `KVM_RUN` and no store completion is in progress until it drops.
#[derive(Debug)]
#[must_use = "the update ends when the guard drops"]
pub struct PageTableUpdate<'a> {
    _update: Update<'a, crate::sys::VcpuKick>,
}

impl<'a> PageTableUpdate<'a> {
    pub(crate) fn new(update: Update<'a, crate::sys::VcpuKick>) -> PageTableUpdate<'a> {
        PageTableUpdate { _update: update }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::{Arc, mpsc};

    use super::*;

    #[derive(Debug)]
    struct NoKick(mpsc::Sender<()>);
    impl Kick for NoKick {
        fn kick(&self) {
            self.0.send(()).ok();
        }
        fn reset(&self) {}
    }

    /// A vCPU that took the lock before leaving the gate keeps an update waiting until its
    /// completion is over, and the update sees everything the completion wrote.
    #[test]
    fn update_waits_for_a_completion_that_left_the_gate() {
        let gate = Gate::<NoKick>::default();
        let updates = Updates::default();
        let stop = AtomicBool::new(false);
        let written = AtomicU32::new(0);
        let (kick_tx, _kick_rx) = mpsc::channel();
        let (left_tx, left) = mpsc::channel();
        let (go_tx, go) = mpsc::channel::<()>();
        let (done_tx, done) = mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let go = go; // moved: a Receiver is not Sync
                let inside = gate.enter(0, &stop, NoKick(kick_tx)).expect("not stopped");
                // "KVM_RUN" returned with a trapped store.
                let completing = updates.completing();
                drop(inside);
                left_tx.send(()).expect("test thread waits");
                go.recv().expect("test thread says go");
                written.store(1, Ordering::SeqCst); // the completion's write
                drop(completing);
            });
            left.recv().expect("the vCPU left the gate");
            s.spawn(|| {
                let u = updates.update(&gate);
                done_tx
                    .send(written.load(Ordering::SeqCst))
                    .expect("test thread waits");
                drop(u);
            });
            go_tx.send(()).expect("vCPU waits");
            assert_eq!(
                done.recv().expect("the update ends"),
                1,
                "the update ran before the completion finished"
            );
        });
    }

    /// An update in progress never blocks a vCPU's completion lock (the vCPU cannot be inside
    /// the gate), and a vCPU that enters afterwards finds the lock free.
    #[test]
    fn completion_after_an_update_takes_the_lock_at_once() {
        let gate = Arc::new(Gate::<NoKick>::default());
        let updates = Updates::default();
        let stop = AtomicBool::new(false);
        let u = updates.update(&*gate);
        let (entered_tx, entered) = mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let (tx, _rx) = mpsc::channel();
                let inside = gate.enter(0, &stop, NoKick(tx)).expect("not stopped");
                let c = updates.completing();
                drop(inside);
                drop(c);
                entered_tx.send(()).expect("test thread waits");
            });
            assert!(entered.try_recv().is_err(), "entered during an update");
            drop(u);
            entered.recv().expect("enters once the update is over");
        });
    }
}
