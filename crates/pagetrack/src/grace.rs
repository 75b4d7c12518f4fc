//! A small sleepable read-copy-update domain: write dispatch is a read section, and removing a
//! frame's last track waits for the sections that may still have seen it tracked. This gives
//! "when the last remove returns, events for that frame stop".

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

#[derive(Debug, Default)]
pub(crate) struct Grace {
    epoch: AtomicUsize,
    readers: [AtomicUsize; 2],
    waiting: AtomicBool,
    sync: Mutex<()>,
    cv: Condvar,
}

/// A read section; ends when dropped.
#[derive(Debug)]
pub(crate) struct ReadGuard<'a> {
    grace: &'a Grace,
    idx: usize,
}

impl Grace {
    #[inline]
    pub(crate) fn read(&self) -> ReadGuard<'_> {
        loop {
            // SeqCst pairs with `synchronize`'s flip and counter loads: a reader that saw the
            // old epoch after incrementing is counted by the writer that flipped it.
            let idx = self.epoch.load(Ordering::SeqCst) & 1;
            self.readers[idx].fetch_add(1, Ordering::SeqCst);
            if self.epoch.load(Ordering::SeqCst) & 1 == idx {
                // Pairs with the fence in `synchronize`'s fast path: either the writer sees this
                // section, or this section's later loads see the writer's earlier stores.
                fence(Ordering::SeqCst);
                return ReadGuard { grace: self, idx };
            }
            self.release(idx);
        }
    }

    fn release(&self, idx: usize) {
        let before = self.readers[idx].fetch_sub(1, Ordering::SeqCst);
        if before == 1 && self.waiting.load(Ordering::SeqCst) {
            let _g = self.sync_wait_lock();
            self.cv.notify_all();
        }
    }

    fn sync_wait_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.sync.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns once every read section that began before the call has ended.
    pub(crate) fn synchronize(&self) {
        // Lock-free fast path: no section open at all. The fence pairs with the one in `read`
        // (Dekker): a section that this load misses began after it, and sees every store the
        // caller made before calling (the count that untracked the frame).
        fence(Ordering::SeqCst);
        if self.readers[0].load(Ordering::SeqCst) == 0
            && self.readers[1].load(Ordering::SeqCst) == 0
        {
            return;
        }
        let mut g = self.sync_wait_lock();
        let old = self.epoch.fetch_add(1, Ordering::SeqCst) & 1;
        if self.readers[old].load(Ordering::SeqCst) == 0 {
            // No section of the old epoch: nothing to wait for (the common case).
            return;
        }
        self.waiting.store(true, Ordering::SeqCst);
        while self.readers[old].load(Ordering::SeqCst) != 0 {
            // The timeout only bounds a wake-up lost to a reader that decremented before
            // `waiting` was visible; correctness rests on the counter.
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(1))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        self.waiting.store(false, Ordering::SeqCst);
    }
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        self.grace.release(self.idx);
    }
}
