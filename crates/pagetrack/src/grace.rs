//! A small sleepable read-copy-update domain (the kernel's `track_srcu`): write dispatch is a
//! read section, and removing a frame's last track (or deleting a slot) waits for the sections
//! that may still have seen it tracked. This gives "when the last remove returns, events for
//! that frame stop".
//!
//! The protocol, with every ordering argument in one place:
//! - A reader reads the epoch, increments that epoch's counter (by parity), issues a SeqCst
//!   fence (`F_r`) and re-reads the epoch; if the value moved at all it backs out and retries.
//!   Its section's loads (the frame's count, the memslot snapshot) come after `F_r`.
//! - A synchronizer made its stores (the count that untracked the frame, the new snapshot)
//!   before calling. Callers are serialized by `serial`, held for the whole call, so two
//!   synchronizers never flip the epoch under each other (the flaw of an earlier version: a
//!   second remover flipped again and checked only the other counter).
//! - Fast path: a SeqCst fence (`F_1`), then both counters read 0: any section the loads miss
//!   has its `F_r` after `F_1`, so its loads see the caller's stores.
//! - Slow path: flip the epoch (`e` to `e + 1`), SeqCst fence (`F_2`), wait for the counter
//!   of `e`'s parity to reach 0. A reader that entered with epoch `e` and whose `F_r` precedes
//!   `F_2` has its increment seen; one whose `F_r` follows `F_2` re-reads `e + 1` or later and
//!   backs out. A reader that entered with an earlier epoch was waited for by the synchronizer
//!   that flipped away from it (serialized before this one), or else would have seen that
//!   flip. A reader that entered with a later epoch read a flip made after this caller's `F_1`,
//!   so (C++20's fence rule for a load that reads a store made after a fence) its `F_r`
//!   follows `F_1` and its loads see the caller's stores. Sections that begin after the flip
//!   are never waited for, so a steady stream of dispatches cannot hold a remover (one queued
//!   on `serial` behind another also waits for sections that began while it was queued:
//!   bounded, since those end).
//! - Wake-ups: the waiter sets `waiting` and checks the counter under `park`; a reader
//!   decrements and, if it sees `waiting`, notifies under `park`. This is a Dekker pair whose
//!   four accesses are `SeqCst` (outside loom; see `sync::dekker`), so one of the two sees the
//!   other, and the check-then-wait under `park` cannot miss the notify.
//! - Why the reader keeps `F_r` as a fence while the wake-up pair needs none: the wake-up pair
//!   involves only its two atomics, so `SeqCst` accesses order it (C++20 [atomics.order]
//!   p4.1). The read side must also make the section's *ordinary* loads (the frame's count, the
//!   memslot snapshot) see the synchronizer's ordinary stores; for two non-`SeqCst` accesses
//!   only the fence-to-fence rule (p4.4) gives that, so `F_r` and `F_1`/`F_2` stay fences.
//!
//! The protocol is model-checked with `loom` (`src/loom.rs`).

use crate::sync::{
    AtomicBool, AtomicUsize, Condvar, Mutex, dekker, dekker_fence, fence, lock, wait,
};
use std::sync::atomic::Ordering;

#[derive(Debug)]
pub(crate) struct Grace {
    epoch: AtomicUsize,
    readers: [AtomicUsize; 2],
    waiting: AtomicBool,
    /// Serializes synchronizers; held across the whole wait.
    serial: Mutex<()>,
    /// Protects the check-then-wait of the single waiter against a reader's notify.
    park: Mutex<()>,
    cv: Condvar,
}

/// A read section; ends when dropped (also when a callback inside it panics).
#[derive(Debug)]
pub(crate) struct ReadGuard<'a> {
    grace: &'a Grace,
    idx: usize,
}

impl Grace {
    pub(crate) fn new() -> Grace {
        Grace {
            epoch: AtomicUsize::new(0),
            readers: [AtomicUsize::new(0), AtomicUsize::new(0)],
            waiting: AtomicBool::new(false),
            serial: Mutex::new(()),
            park: Mutex::new(()),
            cv: Condvar::new(),
        }
    }

    #[inline]
    pub(crate) fn read(&self) -> ReadGuard<'_> {
        loop {
            // Relaxed: the re-read after the fence decides.
            let epoch = self.epoch.load(Ordering::Relaxed);
            let idx = epoch & 1;
            // Relaxed increment; ordered before the section's loads by the fence below.
            self.readers[idx].fetch_add(1, Ordering::Relaxed);
            // F_r: pairs with F_1 and F_2 in `synchronize` (see the module docs).
            fence(Ordering::SeqCst);
            // The whole epoch, not its parity: a first load that was two flips stale would
            // otherwise match again and count this section in what is by now the new epoch
            // (found by the loom model).
            if self.epoch.load(Ordering::Relaxed) == epoch {
                return ReadGuard { grace: self, idx };
            }
            self.release(idx);
        }
    }

    fn release(&self, idx: usize) {
        // Release (at least): the section's effects (a delivered callback) happen before the
        // waiter's Acquire load that sees the counter drop. Dekker with `waiting` (see
        // `sync::dekker`): the waiter sees this decrement, or this thread sees `waiting`.
        let before = self.readers[idx].fetch_sub(1, dekker(Ordering::Release));
        dekker_fence();
        if before == 1 && self.waiting.load(dekker(Ordering::Relaxed)) {
            let _g = lock(&self.park);
            self.cv.notify_all();
        }
    }

    /// Returns once every read section that began before the call has ended.
    pub(crate) fn synchronize(&self) {
        // F_1: pairs with F_r (see the module docs).
        fence(Ordering::SeqCst);
        if self.readers[0].load(Ordering::Acquire) == 0
            && self.readers[1].load(Ordering::Acquire) == 0
        {
            return;
        }
        let _serial = lock(&self.serial);
        // Relaxed RMW: `serial` orders flips; F_2 orders it against readers.
        let old = self.epoch.fetch_add(1, Ordering::Relaxed) & 1;
        // F_2: pairs with F_r.
        fence(Ordering::SeqCst);
        if self.readers[old].load(Ordering::Acquire) == 0 {
            return;
        }
        // Dekker with `release` (see `sync::dekker`); the fence is the loom form's.
        self.waiting.store(true, dekker(Ordering::Relaxed));
        fence(Ordering::SeqCst);
        let mut g = lock(&self.park);
        // Acquire (at least) pairs with `release`'s decrement.
        while self.readers[old].load(dekker(Ordering::Acquire)) != 0 {
            g = wait(&self.cv, g);
        }
        drop(g);
        self.waiting.store(false, Ordering::Relaxed);
    }
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        self.grace.release(self.idx);
    }
}
