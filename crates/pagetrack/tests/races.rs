//! Threaded regression tests for the core's three promises under races, one per way each was
//! found broken: "when the last remove of a frame returns, no event for it is delivered any
//! more", "when a notifier handle is dropped, that notifier is never called again", and "a
//! failed call changes nothing" — with several removers, self-unregistering callbacks,
//! panicking callbacks and backends, memslot changes racing dispatch and registration, and a
//! backend failing while writes arrive. Synchronisation uses barriers, channels and atomics;
//! timeouts only turn a hang into a failure (and, where noted, give a buggy order the chance to
//! show).
#![cfg(feature = "notifiers")]
#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns: a failed lock or set-up is a test failure"
)]

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, mpsc};
use std::time::Duration;

use pagetrack::{
    AsId, BackendError, Enforcement, Error, FrameRun, Gfn, Gpa, MemoryRegion, NoEnforcement,
    NotifierClass, NotifierHandle, PageTracker, SlotId, Source, TrackNotifier, TrackerConfig,
    WriteEvent,
};

use common::{Finish, SEQ, spin, tracker_with_slot, watchdog, write};

/// Item 1 (two concurrent last removes): three removers each remove their own frame at the
/// same moment while two writers keep callbacks running on all three and on a frame that stays
/// tracked (so read sections are always open). After each remove returns no callback for its
/// frame may finish later (checked through `SEQ`, as in `stress.rs`). Before the fix, with
/// three removers, hundreds of events per thousand rounds came after the remove returned; a
/// remover could also wait for sections that began after it was called.
#[test]
fn last_remove_three_concurrent_removers_no_event_after_return() {
    const ROUNDS: u64 = 600;
    const REMOVERS: u64 = 3;
    watchdog(600, || {
        let frames = ROUNDS * REMOVERS + 1;
        let hot = ROUNDS * REMOVERS; // always tracked
        let t = tracker_with_slot(frames, Arc::new(NoEnforcement));
        let n = Finish::new(frames, 300);
        let _h = t.register(n.clone(), NotifierClass::Ordinary).unwrap();
        t.add_gfn(Gfn(hot)).unwrap();
        let round = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let (t, round, stop) = (t.clone(), round.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let r = round.load(Ordering::SeqCst);
                        for k in 0..REMOVERS {
                            write(&t, (r * REMOVERS + k) * 0x1000 + 8 * w, 8);
                        }
                        write(&t, hot * 0x1000, 8);
                    }
                })
            })
            .collect();
        let start = Arc::new(Barrier::new(usize::try_from(REMOVERS).unwrap() + 1));
        let done = Arc::new(Barrier::new(usize::try_from(REMOVERS).unwrap() + 1));
        let removed_at: Arc<Vec<AtomicU64>> =
            Arc::new((0..frames).map(|_| AtomicU64::new(u64::MAX)).collect());
        let removers: Vec<_> = (0..REMOVERS)
            .map(|k| {
                let (t, start, done, removed_at) =
                    (t.clone(), start.clone(), done.clone(), removed_at.clone());
                std::thread::spawn(move || {
                    for r in 0..ROUNDS {
                        start.wait();
                        let g = r * REMOVERS + k;
                        t.remove_gfn(Gfn(g)).unwrap();
                        removed_at[usize::try_from(g).unwrap()]
                            .store(SEQ.fetch_add(1, Ordering::SeqCst), Ordering::SeqCst);
                        done.wait();
                    }
                })
            })
            .collect();
        for r in 0..ROUNDS {
            let first = r * REMOVERS;
            t.add_range(AsId::NORMAL, Gfn(first), REMOVERS).unwrap();
            round.store(r, Ordering::SeqCst);
            for g in first..first + REMOVERS {
                while n.hits[usize::try_from(g).unwrap()].load(Ordering::SeqCst) == 0 {
                    std::thread::yield_now();
                }
            }
            start.wait();
            done.wait();
        }
        stop.store(true, Ordering::SeqCst);
        for h in writers.into_iter().chain(removers) {
            h.join().unwrap();
        }
        let late: Vec<u64> = (0..hot)
            .filter(|&g| {
                let i = usize::try_from(g).unwrap();
                n.last[i].load(Ordering::SeqCst) > removed_at[i].load(Ordering::SeqCst)
            })
            .collect();
        assert!(
            late.is_empty(),
            "{} frames had a callback finish after their last remove returned: {late:?}",
            late.len()
        );
    });
}

/// A notifier that holds its own handle; on the first write from vCPU 0 it drops (or, with
/// `via_unregister`, unregisters, gets the handle back, and drops) it while vCPU 1 is inside
/// the same notifier.
struct SelfDrop {
    handle: Mutex<Option<NotifierHandle>>,
    both_inside: Barrier,
    armed: AtomicBool,
    other_done: AtomicBool,
    other_done_at_drop: AtomicBool,
    via_unregister: bool,
}

impl TrackNotifier for SelfDrop {
    fn track_write(&self, e: &WriteEvent<'_>) {
        if !self.armed.load(Ordering::SeqCst) {
            return;
        }
        self.both_inside.wait();
        if e.source == Source::Vcpu(0) {
            self.armed.store(false, Ordering::SeqCst);
            let h = self.handle.lock().unwrap().take().expect("handle stored");
            if self.via_unregister {
                let err = h.unregister().expect_err("from its own callback");
                drop(err.handle);
            } else {
                drop(h);
            }
            // The drop waited for the other thread's call of this notifier.
            self.other_done_at_drop
                .store(self.other_done.load(Ordering::SeqCst), Ordering::SeqCst);
        } else {
            spin(20_000);
            self.other_done.store(true, Ordering::SeqCst);
        }
    }
}

fn self_drop_while_other_inside(via_unregister: bool) {
    watchdog(60, move || {
        for _ in 0..50 {
            let t = tracker_with_slot(16, Arc::new(NoEnforcement));
            let n = Arc::new(SelfDrop {
                handle: Mutex::new(None),
                both_inside: Barrier::new(2),
                armed: AtomicBool::new(true),
                other_done: AtomicBool::new(false),
                other_done_at_drop: AtomicBool::new(false),
                via_unregister,
            });
            let h = t.register(n.clone(), NotifierClass::Ordinary).unwrap();
            *n.handle.lock().unwrap() = Some(h);
            t.add_gfn(Gfn(3)).unwrap();
            let writers: Vec<_> = (0..2u32)
                .map(|v| {
                    let t = t.clone();
                    std::thread::spawn(move || {
                        t.report_write(&WriteEvent::new(Gpa(0x3000), &[1], Source::Vcpu(v)));
                    })
                })
                .collect();
            for w in writers {
                w.join().unwrap();
            }
            assert!(n.other_done_at_drop.load(Ordering::SeqCst));
            assert_eq!(t.notifier_count(), 0);
            // The read sections of both writers are closed: a last remove returns.
            t.remove_gfn(Gfn(3)).unwrap();
        }
    });
}

/// Item 2: dropping a handle inside its own callback while another thread is inside the same
/// notifier returns once that thread's call finished (it hung forever: only the in-flight
/// count reaching 0 woke the waiter), and later last removes are not held up.
#[test]
fn drop_handle_in_own_callback_other_thread_inside_returns() {
    self_drop_while_other_inside(false);
}

/// Item 2, the documented `UnregisterError` path: the handle that comes back is dropped inside
/// the callback, with the same result.
#[test]
fn unregister_error_handle_dropped_in_callback_returns() {
    self_drop_while_other_inside(true);
}

/// A notifier that panics on every write.
struct Panics;
impl TrackNotifier for Panics {
    fn track_write(&self, _: &WriteEvent<'_>) {
        panic!("notifier panics");
    }
}

/// Counts writes.
#[derive(Default)]
struct Count(AtomicUsize);
impl TrackNotifier for Count {
    fn track_write(&self, _: &WriteEvent<'_>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Item 3: a panic in a callback propagates to the caller of `report_write` after every count
/// and section it held is released: the panicking notifier's handle drops, the last remove of
/// the frame returns, and other notifiers keep receiving later writes. (Notifiers after the
/// panicking one in dispatch order miss the write that panicked; documented.)
#[test]
fn panicking_callback_propagates_accounting_restored() {
    watchdog(30, || {
        let t = tracker_with_slot(16, Arc::new(NoEnforcement));
        let count = Arc::new(Count::default());
        let _c = t.register(count.clone(), NotifierClass::Ordinary).unwrap();
        let p = t
            .register(Arc::new(Panics), NotifierClass::Ordinary)
            .unwrap();
        t.add_gfn(Gfn(2)).unwrap();

        let r = catch_unwind(AssertUnwindSafe(|| write(&t, 0x2000, 4)));

        assert!(r.is_err(), "the callback's panic reaches the writer");
        drop(p);
        assert_eq!(t.notifier_count(), 1);
        write(&t, 0x2000, 4);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        t.remove_gfn(Gfn(2)).unwrap();
        write(&t, 0x2000, 4);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
    });
}

/// A backend that can panic or fail on request, and records what it enforces.
#[derive(Default)]
struct Flaky {
    panic_protect: AtomicBool,
    panic_unprotect: AtomicBool,
    protected: Mutex<Vec<(AsId, Gfn)>>,
}

impl Enforcement for Flaky {
    fn protect(&self, runs: &[FrameRun]) -> Result<(), BackendError> {
        assert!(!self.panic_protect.load(Ordering::SeqCst), "protect panics");
        self.protected.lock().unwrap().extend(FrameRun::pairs(runs));
        Ok(())
    }
    fn unprotect(&self, runs: &[FrameRun]) -> Result<(), BackendError> {
        assert!(
            !self.panic_unprotect.load(Ordering::SeqCst),
            "unprotect panics"
        );
        self.protected
            .lock()
            .unwrap()
            .retain(|p| !FrameRun::pairs(runs).any(|q| q == *p));
        Ok(())
    }
}

/// Item 3: a panic in the backend's `protect` leaves nothing changed (the count stayed 1 with
/// the frame never protected); the tracker stays usable and the next add works.
#[test]
fn backend_protect_panic_changes_nothing() {
    let b = Arc::new(Flaky::default());
    let t = tracker_with_slot(16, b.clone());
    b.panic_protect.store(true, Ordering::SeqCst);

    let r = catch_unwind(AssertUnwindSafe(|| t.add_gfn(Gfn(4))));

    assert!(r.is_err());
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(4)), Ok(0));
    assert!(!t.is_write_tracked(AsId::NORMAL, Gfn(4)));
    b.panic_protect.store(false, Ordering::SeqCst);
    t.add_gfn(Gfn(4)).unwrap();
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(4)), Ok(1));
    assert_eq!(*b.protected.lock().unwrap(), vec![(AsId::NORMAL, Gfn(4))]);
}

/// Item 3: a panic in `unprotect` leaves the frame tracked and protected, and events flowing.
#[test]
fn backend_unprotect_panic_changes_nothing() {
    let b = Arc::new(Flaky::default());
    let t = tracker_with_slot(16, b.clone());
    let count = Arc::new(Count::default());
    let _h = t.register(count.clone(), NotifierClass::Ordinary).unwrap();
    t.add_gfn(Gfn(4)).unwrap();
    b.panic_unprotect.store(true, Ordering::SeqCst);

    let r = catch_unwind(AssertUnwindSafe(|| t.remove_gfn(Gfn(4))));

    assert!(r.is_err());
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(4)), Ok(1));
    assert_eq!(*b.protected.lock().unwrap(), vec![(AsId::NORMAL, Gfn(4))]);
    write(&t, 0x4000, 1);
    assert_eq!(count.0.load(Ordering::SeqCst), 1);
    b.panic_unprotect.store(false, Ordering::SeqCst);
    t.remove_gfn(Gfn(4)).unwrap();
    assert!(b.protected.lock().unwrap().is_empty());
}

/// Logs callback ends and region removals with their `SEQ` number.
struct Ordered {
    inside: Mutex<Option<mpsc::Sender<()>>>,
    release: Mutex<Option<mpsc::Receiver<()>>>,
    write_end: AtomicU64,
    region_removed: AtomicU64,
}

impl TrackNotifier for Ordered {
    fn track_write(&self, _: &WriteEvent<'_>) {
        let Some(tx) = self.inside.lock().unwrap().take() else {
            return;
        };
        tx.send(()).unwrap();
        // A fixed tracker waits for this callback, so nothing arrives and the wait times out;
        // a broken one let the memslot change return, and the release comes at once.
        let rx = self.release.lock().unwrap().take().expect("armed once");
        let _ = rx.recv_timeout(Duration::from_millis(300));
        self.write_end
            .store(SEQ.fetch_add(1, Ordering::SeqCst), Ordering::SeqCst);
    }

    fn track_remove_region(&self, _: AsId, _: Gfn, _: u64) {
        self.region_removed
            .store(SEQ.fetch_add(1, Ordering::SeqCst), Ordering::SeqCst);
    }
}

fn change_during_dispatch(change: MemoryRegion) {
    watchdog(30, move || {
        let t = tracker_with_slot(16, Arc::new(NoEnforcement));
        t.set_memory_region(MemoryRegion::new(SlotId(1), Gfn(100), 16))
            .unwrap();
        let (inside_tx, inside_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel();
        let n = Arc::new(Ordered {
            inside: Mutex::new(Some(inside_tx)),
            release: Mutex::new(Some(release_rx)),
            write_end: AtomicU64::new(u64::MAX),
            region_removed: AtomicU64::new(u64::MAX),
        });
        t.add_gfn(Gfn(101)).unwrap();
        // MOVE is refused while a notifier is registered (K4); for the MOVE case the notifier
        // is "registered" through a handle dropped below, so register only for DELETE.
        let is_move = change.npages != 0;
        let h = t.register(n.clone(), NotifierClass::Ordinary).unwrap();
        let writer = {
            let t = t.clone();
            std::thread::spawn(move || write(&t, 101 * 0x1000, 8))
        };
        inside_rx.recv().unwrap();
        if is_move {
            // The callback holds its in-flight count, so dropping must wait: do it on a
            // thread, and change memslots once the notifier list is empty.
            let dropper = std::thread::spawn(move || drop(h));
            while t.notifier_count() != 0 {
                std::thread::yield_now();
            }
            let r = t.set_memory_region(change);
            let returned = SEQ.fetch_add(1, Ordering::SeqCst);
            let _ = release_tx.send(());
            r.unwrap();
            writer.join().unwrap();
            dropper.join().unwrap();
            let end = n.write_end.load(Ordering::SeqCst);
            assert!(
                end < returned,
                "MOVE returned ({returned}) before a dispatch for the old slot ended ({end})"
            );
        } else {
            let r = t.set_memory_region(change);
            let returned = SEQ.fetch_add(1, Ordering::SeqCst);
            let _ = release_tx.send(());
            r.unwrap();
            writer.join().unwrap();
            let end = n.write_end.load(Ordering::SeqCst);
            let removed = n.region_removed.load(Ordering::SeqCst);
            assert!(
                end < removed,
                "track_remove_region ({removed}) before the dispatch ended ({end})"
            );
            assert!(
                removed < returned,
                "DELETE returned ({returned}) before track_remove_region ({removed})"
            );
            drop(h);
        }
    });
}

/// Item 4: DELETE waits for dispatches that found the slot tracked: their `track_write` ends
/// before `track_remove_region`, which comes before `set_memory_region` returns.
#[test]
fn delete_waits_for_running_dispatch_before_remove_region() {
    change_during_dispatch(MemoryRegion::delete(AsId::NORMAL, SlotId(1)));
}

/// Item 4: MOVE waits for dispatches that found the old slot tracked.
#[test]
fn move_waits_for_running_dispatch() {
    change_during_dispatch(MemoryRegion::new(SlotId(1), Gfn(200), 16));
}

/// Item 5: MOVE races `register`. Once `register` has returned, no MOVE may commit (K4): a
/// thread moves a slot back and forth while another registers; the slot's base seen right
/// after `register` returned is its final base. Before the fix the check and the commit were
/// not under the lock `register` takes, and a MOVE could commit after `register` returned.
#[test]
fn move_after_register_returned_never_commits() {
    watchdog(120, || {
        for _ in 0..400 {
            let t = tracker_with_slot(4, Arc::new(NoEnforcement));
            t.set_memory_region(MemoryRegion::new(SlotId(1), Gfn(64), 4))
                .unwrap();
            let go = Arc::new(Barrier::new(2));
            let mover = {
                let (t, go) = (t.clone(), go.clone());
                std::thread::spawn(move || {
                    go.wait();
                    for i in 0u64.. {
                        let base = if i % 2 == 0 { 128 } else { 64 };
                        match t.set_memory_region(MemoryRegion::new(SlotId(1), Gfn(base), 4)) {
                            Ok(_) => {}
                            Err(Error::MoveWithNotifiers { .. }) => return,
                            Err(e) => panic!("unexpected {e}"),
                        }
                    }
                })
            };
            go.wait();
            let h = t
                .register(Arc::new(Count::default()), NotifierClass::Ordinary)
                .unwrap();
            let base_after_register = slot1_base(&t);
            mover.join().unwrap();
            assert_eq!(
                slot1_base(&t),
                base_after_register,
                "a MOVE committed after register returned"
            );
            drop(h);
        }
    });
}

fn slot1_base(t: &PageTracker) -> Gfn {
    t.memslots()
        .regions(AsId::NORMAL)
        .find(|r| r.slot == SlotId(1))
        .expect("slot 1 exists")
        .base
}

/// A backend that counts calls that overlap another of its calls.
#[derive(Default)]
struct Exclusive {
    busy: AtomicBool,
    overlaps: AtomicUsize,
    calls: AtomicUsize,
}

impl Exclusive {
    fn enter(&self) {
        if self.busy.swap(true, Ordering::SeqCst) {
            self.overlaps.fetch_add(1, Ordering::SeqCst);
        }
        self.calls.fetch_add(1, Ordering::SeqCst);
        spin(2_000);
        self.busy.store(false, Ordering::SeqCst);
    }
}

impl Enforcement for Exclusive {
    fn protect(&self, _: &[FrameRun]) -> Result<(), BackendError> {
        self.enter();
        Ok(())
    }
    fn unprotect(&self, _: &[FrameRun]) -> Result<(), BackendError> {
        self.enter();
        Ok(())
    }
    fn region_removed(&self, _: &MemoryRegion) {
        self.enter();
    }
}

/// Item 6: backend calls never overlap, as `Enforcement` documents (`region_removed` ran under
/// a different lock than `protect`). Two threads add and remove, a third creates and deletes a
/// slot.
#[test]
fn backend_calls_never_overlap() {
    watchdog(120, || {
        let b = Arc::new(Exclusive::default());
        let t = tracker_with_slot(64, b.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads: Vec<_> = (0..2u64)
            .map(|k| {
                let (t, stop) = (t.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        t.add_gfn(Gfn(k)).unwrap();
                        t.remove_gfn(Gfn(k)).unwrap();
                    }
                })
            })
            .collect();
        threads.push({
            let t = t.clone();
            std::thread::spawn(move || {
                for _ in 0..2_000 {
                    t.set_memory_region(MemoryRegion::new(SlotId(1), Gfn(1000), 8))
                        .unwrap();
                    t.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(1)))
                        .unwrap();
                }
            })
        });
        let slots = threads.pop().unwrap();
        slots.join().unwrap();
        stop.store(true, Ordering::SeqCst);
        for h in threads {
            h.join().unwrap();
        }
        assert!(b.calls.load(Ordering::SeqCst) > 2_000);
        assert_eq!(b.overlaps.load(Ordering::SeqCst), 0);
    });
}

/// A backend whose `unprotect` lets a write in while it runs, then fails.
struct FailingUnprotect {
    inside: Mutex<mpsc::Sender<()>>,
    written: Mutex<mpsc::Receiver<()>>,
}

impl Enforcement for FailingUnprotect {
    fn protect(&self, _: &[FrameRun]) -> Result<(), BackendError> {
        Ok(())
    }
    fn unprotect(&self, _: &[FrameRun]) -> Result<(), BackendError> {
        self.inside.lock().unwrap().send(()).unwrap();
        self.written.lock().unwrap().recv().unwrap();
        Err(BackendError::msg("injected unprotect failure"))
    }
}

/// Item 7: a write reported while a failing `unprotect` runs is delivered: the frame stays
/// tracked throughout (the count used to be 0 during the call, then rolled back, and the write
/// was lost).
#[test]
fn write_during_failing_unprotect_delivered() {
    watchdog(30, || {
        let (inside_tx, inside_rx) = mpsc::channel();
        let (written_tx, written_rx) = mpsc::channel();
        let b = Arc::new(FailingUnprotect {
            inside: Mutex::new(inside_tx),
            written: Mutex::new(written_rx),
        });
        let t = PageTracker::new(TrackerConfig::default(), b);
        t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 16))
            .unwrap();
        let count = Arc::new(Count::default());
        let _h = t.register(count.clone(), NotifierClass::Ordinary).unwrap();
        t.add_gfn(Gfn(5)).unwrap();
        let writer = {
            let t = t.clone();
            std::thread::spawn(move || {
                inside_rx.recv().unwrap();
                write(&t, 0x5000, 8);
                written_tx.send(()).unwrap();
            })
        };

        let r = t.remove_gfn(Gfn(5));

        writer.join().unwrap();
        assert!(matches!(
            r,
            Err(Error::Backend {
                op: "unprotect",
                ..
            })
        ));
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(t.track_count(AsId::NORMAL, Gfn(5)), Ok(1));
    });
}

/// Item 10: a write at the top of the 64-bit space does not wrap around to gpa 0.
#[test]
fn write_at_top_of_address_space_not_delivered_at_zero() {
    let t = tracker_with_slot(16, Arc::new(NoEnforcement));
    let count = Arc::new(Count::default());
    let _h = t.register(count.clone(), NotifierClass::Ordinary).unwrap();
    t.add_gfn(Gfn(0)).unwrap();

    t.report_write(&WriteEvent::new(
        Gpa(u64::MAX - 3),
        &[7; 8],
        Source::Vcpu(0),
    ));

    assert_eq!(count.0.load(Ordering::SeqCst), 0);
}

/// Item 10: old bytes of another length than the write are refused, not silently dropped.
#[test]
fn with_old_wrong_length_panics() {
    let r = catch_unwind(|| {
        let _ = WriteEvent::new(Gpa(0), &[1, 2], Source::Device).with_old(&[0]);
    });
    assert!(r.is_err());
}
