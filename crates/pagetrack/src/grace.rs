//! A small sleepable read-copy-update domain (the kernel's `track_srcu`): write dispatch is a
//! read section, and removing a frame's last track (or deleting a slot) waits for the sections
//! that may still have seen it tracked. This gives "when the last remove returns, events for
//! that frame stop".
//!
//! The protocol, with every ordering argument in one place. Rule numbers are C++20
//! [atomics.order] p4 (Rust's model): `S` is the single total order of the `SeqCst` operations
//! *and fences*; for two accesses `A`, `B` of one object where `A` is coherence-ordered before
//! `B` (e.g. `A` is a load that misses the store `B`): (4.1) both `SeqCst` ⇒ `A` before `B` in
//! `S`; (4.2) `A` `SeqCst` and `B` happens before a `SeqCst` fence `Y` ⇒ `A` before `Y`;
//! (4.3) a `SeqCst` fence `X` happens before `A` and `B` `SeqCst` ⇒ `X` before `B`; (4.4)
//! two fences ⇒ `X` before `Y`.
//! - A reader reads the epoch, increments that epoch's counter (by parity) with a `SeqCst`
//!   RMW (`R`) and re-reads the epoch with a `SeqCst` load; if the value moved at all it backs
//!   out and retries. The section's *decisive* loads (the frame's count and its slot's `gone`
//!   flag, `Memslots::is_tracked_in_section`) are `SeqCst` loads after `R`. No fence: on x86
//!   `R` is one locked instruction and the loads are plain loads.
//! - A synchronizer made its stores `W` (the count that untracked the frame, the `gone` flag of
//!   a deleted or moved slot; any ordering) before calling. Callers are serialized by `serial`,
//!   held for the whole call, so two synchronizers never flip the epoch under each other (the
//!   flaw of an earlier version: a second remover flipped again and checked only the other
//!   counter).
//! - Fast path: a `SeqCst` fence `F_1`, then both counters read 0. If that read missed `R`,
//!   then `F_1` precedes `R` in `S` (4.3), so it precedes the section's decisive load `C`
//!   (`R` is sequenced before `C`, both `SeqCst`). Were `C` to miss `W`, 4.2 would put `C`
//!   before `F_1` (`W` happens before `F_1`): a cycle. So the section sees `W`.
//! - Slow path: flip the epoch (`e` to `e + 1`), `SeqCst` fence `F_2`, wait for the counter of
//!   `e`'s parity to reach 0. A reader that entered with epoch `e` and whose `R` that read
//!   missed has `F_2` before `R` (4.3); its re-read follows `R`, so missing the flip would put
//!   it before `F_2` (4.2): a cycle, so it re-reads `e + 1` or later and backs out. A reader
//!   whose first epoch read saw a flip made after `F_1` has `F_1` before that re-read in `S`
//!   (4.3: `F_1` happens before the flip), hence before its decisive loads, which see `W` as
//!   in the fast path. A reader that entered with an earlier epoch was waited for by the
//!   synchronizer that flipped away from it (serialized before this one), or else would have
//!   seen that flip. Sections that begin after the flip are never waited for, so a steady
//!   stream of dispatches cannot hold a remover (one queued on `serial` behind another also
//!   waits for sections that began while it was queued: bounded, since those end).
//! - A section may use any snapshot of the slots, even a stale cached one: a slot deleted or
//!   moved away is `gone` (a `W` above), and its counts stay allocated while the snapshot lives.
//! - Wake-ups: the waiter sets `waiting` and checks the counter under `park`; a reader
//!   decrements and, if it sees `waiting`, notifies under `park`. This is a Dekker pair whose
//!   four accesses are `SeqCst` (4.1; see `sync::dekker`), so one of the two sees the other, and
//!   the check-then-wait under `park` cannot miss the notify.
//! - Under loom (which models `SeqCst` accesses only as `AcqRel`, but fences exactly) the
//!   reader's accesses are Relaxed with a `SeqCst` fence `F_r` after `R`, and the wake-up pair
//!   has fences too (`sync::dekker_fence`); the same argument holds with 4.4 in place of 4.2
//!   and 4.3, and that form is what the models check.
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
            // Relaxed: the re-read decides.
            let epoch = self.epoch.load(Ordering::Relaxed);
            let idx = epoch & 1;
            // `R`: a SeqCst increment (outside loom), or Relaxed plus the fence `F_r` under
            // loom; either pairs with F_1 and F_2 in `synchronize` (see the module docs).
            self.readers[idx].fetch_add(1, dekker(Ordering::Relaxed));
            dekker_fence();
            // The whole epoch, not its parity: a first load that was two flips stale would
            // otherwise match again and count this section in what is by now the new epoch
            // (found by the loom model).
            if self.epoch.load(dekker(Ordering::Relaxed)) == epoch {
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
