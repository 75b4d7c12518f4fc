//! Hostile tests from the adversarial review of the concurrency fixes. Each test names the
//! promise it attacks; those whose doc comment says "found" showed a defect of the first
//! version (fixed since), the others held and stay as regression tests.
#![cfg(feature = "notifiers")]
#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns: a failed lock or set-up is a test failure"
)]

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use pagetrack::{
    AsId, BackendError, Enforcement, Error, FrameRun, Gfn, Gpa, MemoryRegion, NoEnforcement,
    NotifierClass, NotifierHandle, PageLevel, PageTracker, SlotChange, SlotId, Source,
    TrackNotifier, TrackerConfig, WriteEvent,
};

use common::{spin, tracker_with_slot, watchdog, write};

/// Runs `f` on its own thread and says whether it finished within `secs` (a hang is left
/// behind, blocked, so that the test can report it instead of hanging the binary).
fn finishes_within(secs: u64, f: impl FnOnce() + Send + 'static) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(secs)).is_ok()
}

#[derive(Default)]
struct Count {
    writes: AtomicUsize,
    removed_regions: AtomicUsize,
}

impl TrackNotifier for Count {
    fn track_write(&self, _: &WriteEvent<'_>) {
        self.writes.fetch_add(1, Ordering::SeqCst);
    }
    fn track_remove_region(&self, _: AsId, _: Gfn, _: u64) {
        self.removed_regions.fetch_add(1, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// Backend before counts, Add direction.

/// A backend that models pagetrack-kvm: once `protect` made the fragment read-only (and let the
/// paused vCPUs run again, which `Backend::change` does before it returns), a guest store to the
/// frame exits and is reported. Here the "vCPU" is another thread that reports its trapped
/// write while `protect` is still returning.
struct TrapsDuringProtect {
    tracker: OnceLock<Weak<PageTracker>>,
    trapped: AtomicUsize,
}

impl Enforcement for TrapsDuringProtect {
    fn protect(&self, runs: &[FrameRun]) -> Result<(), BackendError> {
        // Enforcement is live from here on: a write to the frame now traps.
        let t = self.tracker.get().unwrap().upgrade().unwrap();
        let gpa = runs[0].first.gpa().0;
        let vcpu = std::thread::spawn(move || {
            // The trapped store, emulated and reported as pagetrack-kvm's `apply_write` does.
            write(&t, gpa, 8);
        });
        vcpu.join().unwrap();
        self.trapped.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn unprotect(&self, _: &[FrameRun]) -> Result<(), BackendError> {
        Ok(())
    }
}

/// Found by the review (fixed). A write that trapped because of the protection `add_gfn` asked for is reported and
/// then silently dropped: the change calls `protect` before it makes the count non-zero
/// ("backend before counts" in both directions), so the report sees the frame untracked. The
/// kernel (B16) and the previous version make the count non-zero first. With pagetrack-kvm the
/// vCPUs are unpaused inside `protect`, so a guest store in that window is applied to memory,
/// emulated in userspace because of the tracking, and never delivered.
#[test]
fn review_write_trapped_by_new_protection_is_delivered() {
    let backend = Arc::new(TrapsDuringProtect {
        tracker: OnceLock::new(),
        trapped: AtomicUsize::new(0),
    });
    let t = tracker_with_slot(16, backend.clone());
    backend.tracker.set(Arc::downgrade(&t)).unwrap();
    let n = Arc::new(Count::default());
    let _h = t.register(n.clone(), NotifierClass::Ordinary).unwrap();
    t.add_gfn(Gfn(3)).unwrap();
    assert_eq!(backend.trapped.load(Ordering::SeqCst), 1);
    assert_eq!(
        n.writes.load(Ordering::SeqCst),
        1,
        "the write that trapped on the new protection was dropped"
    );
}

/// A backend that owns an MMU, as `fault.rs` (B34–B41) is written for: per-frame write
/// permission, and a fault handler that asks the core and follows `classify_fault`. Its
/// `protect` write-protects the frame; a vCPU thread then write-faults on it (after the
/// protection is live), and the handler runs before `protect` returns.
struct MmuBackend {
    tracker: OnceLock<Weak<PageTracker>>,
    writable: Mutex<Vec<bool>>,
    seen: Mutex<Option<(bool, PageLevel)>>,
}

impl Enforcement for MmuBackend {
    fn protect(&self, runs: &[FrameRun]) -> Result<(), BackendError> {
        let g = runs[0].first;
        self.writable.lock().unwrap()[usize::try_from(g.0).unwrap()] = false;
        let t = self.tracker.get().unwrap().upgrade().unwrap();
        // The fault of a vCPU that hit the fresh write protection (another thread).
        let (tracked, level) = std::thread::spawn(move || {
            (
                t.is_write_tracked(AsId::NORMAL, g),
                t.max_mapping_level(AsId::NORMAL, g).unwrap(),
            )
        })
        .join()
        .unwrap();
        *self.seen.lock().unwrap() = Some((tracked, level));
        let fault = pagetrack::FaultInfo::from_error_code(0b11); // present write
        if pagetrack::classify_fault(tracked, fault) == pagetrack::FaultAction::Normal {
            // B41: not a page-track matter, so the handler makes the mapping writable.
            self.writable.lock().unwrap()[usize::try_from(g.0).unwrap()] = true;
        }
        Ok(())
    }
    fn unprotect(&self, runs: &[FrameRun]) -> Result<(), BackendError> {
        for (_, g) in FrameRun::pairs(runs) {
            self.writable.lock().unwrap()[usize::try_from(g.0).unwrap()] = true;
        }
        Ok(())
    }
}

/// Found by the review (fixed). The same window seen by a backend that owns an MMU: a write fault on the frame
/// being protected, handled while `add_gfn` runs, finds the frame untracked (and its 2 MiB
/// region still allowed as a huge page), so `classify_fault` says `Normal` and the handler
/// maps the frame writable. `add_gfn` then returns with the frame tracked but writable:
/// every later write is lost, which breaks "when add_gfn returns, enforcement is live". No
/// backend lock can close this, because the core changes counts and huge-page counts only
/// after `protect` returned (B16 orders them first for exactly this reason).
#[test]
fn review_fault_during_protect_sees_frame_tracked() {
    let backend = Arc::new(MmuBackend {
        tracker: OnceLock::new(),
        writable: Mutex::new(vec![true; 1024]),
        seen: Mutex::new(None),
    });
    let t = PageTracker::new(TrackerConfig::default(), backend.clone());
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 1024))
        .unwrap();
    t.enable_write_tracking().unwrap();
    backend.tracker.set(Arc::downgrade(&t)).unwrap();
    t.add_gfn(Gfn(5)).unwrap();
    let seen = backend.seen.lock().unwrap().unwrap();
    let writable = backend.writable.lock().unwrap()[5];
    assert!(t.is_write_tracked(AsId::NORMAL, Gfn(5)));
    assert_eq!(
        (seen, writable),
        ((true, PageLevel::K4), false),
        "a fault during protect saw (tracked, level) = {seen:?}; frame left writable: {writable}"
    );
}

// ---------------------------------------------------------------------------------------------
// Dropping another notifier's handle from a callback.

/// Holds the handle of the *other* notifier and drops it from its callback.
struct DropsOther {
    other: Mutex<Option<NotifierHandle>>,
    acts_for: Source,
    meet: Arc<Barrier>,
}

impl TrackNotifier for DropsOther {
    fn track_write(&self, e: &WriteEvent<'_>) {
        if e.source != self.acts_for {
            return;
        }
        let Some(h) = self.other.lock().unwrap().take() else {
            return;
        };
        // Both threads are now each inside one of the two notifiers.
        self.meet.wait();
        drop(h);
    }
}

/// Found by the review (it hung; the watchdog turns a hang into a failure). Thread A is inside notifier X and
/// drops Y's handle; thread B is inside Y and drops X's handle. Each drop waits for "the calls
/// of other threads", i.e. for the other's callback, which waits for it: both vCPU threads hang
/// forever with their read sections open, so every later last `remove_gfn` in the VM hangs too
/// (the failure mode of issue item 2, through two notifiers instead of one). The crate docs say
/// a handle may be dropped inside a callback and only document the self-drop case.
#[test]
fn review_cross_drop_of_two_handles_in_callbacks_returns() {
    let t = tracker_with_slot(16, Arc::new(NoEnforcement));
    t.add_gfn(Gfn(1)).unwrap();
    let meet = Arc::new(Barrier::new(2));
    let x = Arc::new(DropsOther {
        other: Mutex::new(None),
        acts_for: Source::Vcpu(0),
        meet: meet.clone(),
    });
    let y = Arc::new(DropsOther {
        other: Mutex::new(None),
        acts_for: Source::Vcpu(1),
        meet,
    });
    let hx = t.register(x.clone(), NotifierClass::Ordinary).unwrap();
    let hy = t.register(y.clone(), NotifierClass::Ordinary).unwrap();
    *x.other.lock().unwrap() = Some(hy);
    *y.other.lock().unwrap() = Some(hx);
    let writers: Vec<_> = (0..2u32)
        .map(|v| {
            let t = t.clone();
            move || {
                let bytes = [1u8; 8];
                t.report_write(&WriteEvent::new(Gpa(0x1000), &bytes, Source::Vcpu(v)));
            }
        })
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    for w in writers {
        let tx = tx.clone();
        std::thread::spawn(move || {
            w();
            let _ = tx.send(());
        });
    }
    let done = (0..2)
        .filter(|_| rx.recv_timeout(Duration::from_secs(10)).is_ok())
        .count();
    assert_eq!(
        done, 2,
        "two callbacks dropping each other's handle deadlocked"
    );
    // And a last remove still returns (no read section is stuck open).
    let t2 = t.clone();
    assert!(
        finishes_within(10, move || t2.remove_gfn(Gfn(1)).unwrap()),
        "a last remove hung behind the deadlocked callbacks"
    );
}

// ---------------------------------------------------------------------------------------------
// Panics at backend points of a memslot change.

struct PanicsInRegionRemoved;

impl Enforcement for PanicsInRegionRemoved {
    fn protect(&self, _: &[FrameRun]) -> Result<(), BackendError> {
        Ok(())
    }
    fn unprotect(&self, _: &[FrameRun]) -> Result<(), BackendError> {
        Ok(())
    }
    fn region_removed(&self, _: &MemoryRegion) {
        panic!("backend panics in region_removed");
    }
}

/// Found by the review (fixed). A panic in `Enforcement::region_removed` (called under `mmu_lock` after the new
/// memslot set is installed) leaves the DELETE committed but skips both the grace wait and
/// every `track_remove_region`: the notifier still believes its tracks on the slot exist (it
/// never learns they are gone), and the docs only describe a panic in `track_remove_region`.
/// Either the change is rolled back, or the remaining steps run (drop guard), or this is
/// documented.
#[test]
fn review_region_removed_panic_still_notifies_or_changes_nothing() {
    let t = PageTracker::new(TrackerConfig::default(), Arc::new(PanicsInRegionRemoved));
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 16))
        .unwrap();
    t.set_memory_region(MemoryRegion::new(SlotId(1), Gfn(16), 16))
        .unwrap();
    let n = Arc::new(Count::default());
    let _h = t.register(n.clone(), NotifierClass::Ordinary).unwrap();
    t.add_gfn(Gfn(17)).unwrap();
    let r = catch_unwind(AssertUnwindSafe(|| {
        t.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(1)))
    }));
    assert!(r.is_err(), "the backend panic propagates");
    let slot_gone = t.memslots().region_of(AsId::NORMAL, Gfn(17)).is_none();
    let notified = n.removed_regions.load(Ordering::SeqCst) == 1;
    // The tracker stays usable.
    t.add_gfn(Gfn(1)).unwrap();
    t.remove_gfn(Gfn(1)).unwrap();
    assert!(
        !slot_gone || notified,
        "DELETE committed (slot gone) but track_remove_region never delivered"
    );
}

/// Held: a panicking `track_remove_region` of the first notifier propagates, the DELETE is
/// done, and afterwards memslot changes, removes and unregistering all still return.
#[test]
fn review_track_remove_region_panic_leaves_tracker_usable() {
    struct Boom;
    impl TrackNotifier for Boom {
        fn track_remove_region(&self, _: AsId, _: Gfn, _: u64) {
            panic!("track_remove_region panics");
        }
    }
    watchdog(30, || {
        let t = tracker_with_slot(16, Arc::new(NoEnforcement));
        t.set_memory_region(MemoryRegion::new(SlotId(1), Gfn(16), 16))
            .unwrap();
        let n = Arc::new(Count::default());
        let hn = t.register(n.clone(), NotifierClass::Ordinary).unwrap();
        let hb = t
            .register(Arc::new(Boom), NotifierClass::Coherence)
            .unwrap();
        t.add_gfn(Gfn(17)).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            t.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(1)))
        }));
        assert!(r.is_err());
        assert!(t.memslots().region_of(AsId::NORMAL, Gfn(17)).is_none());
        t.set_memory_region(MemoryRegion::new(SlotId(1), Gfn(32), 16))
            .unwrap();
        t.add_gfn(Gfn(33)).unwrap();
        write(&t, 33 * 0x1000, 8);
        assert_eq!(n.writes.load(Ordering::SeqCst), 1);
        t.remove_gfn(Gfn(33)).unwrap();
        drop(hb);
        drop(hn);
        assert_eq!(t.notifier_count(), 0);
    });
}

// ---------------------------------------------------------------------------------------------
// "No call after a handle drop returns", with removers inside callbacks and re-registration.

/// Counts calls and flags any that starts after its handle's drop returned.
struct Watched {
    dropped: AtomicBool,
    late: Arc<AtomicUsize>,
    tracker: Weak<PageTracker>,
    calls: AtomicU64,
}

impl TrackNotifier for Watched {
    fn track_write(&self, e: &WriteEvent<'_>) {
        if self.dropped.load(Ordering::SeqCst) {
            self.late.fetch_add(1, Ordering::SeqCst);
        }
        let c = self.calls.fetch_add(1, Ordering::Relaxed);
        // Every so often, churn tracks from inside the callback (remove inside a callback
        // skips the grace wait; add takes mmu_lock).
        if c.is_multiple_of(7)
            && let Some(t) = self.tracker.upgrade()
        {
            let g = Gfn(8 + (e.gfn().0 + c) % 8);
            if t.add_gfn(g).is_ok() {
                let _ = t.remove_gfn(g);
            }
        }
        spin(200);
        if self.dropped.load(Ordering::SeqCst) {
            self.late.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Held: four writers (page-crossing writes through TrackReaders), two threads that register
/// and drop or unregister notifiers in a loop, callbacks that add and remove tracks: no callback of
/// a notifier runs after its handle's drop returned, nothing hangs.
#[test]
fn review_no_call_after_drop_with_churning_registrations() {
    watchdog(120, || {
        let t = tracker_with_slot(16, Arc::new(NoEnforcement));
        for g in 0..8 {
            t.add_gfn(Gfn(g)).unwrap();
        }
        let late = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..4u64)
            .map(|w| {
                let (t, stop) = (t.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut r = t.reader();
                    let bytes = [7u8; 16];
                    let mut i = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let gpa = ((i + w) % 8) * 0x1000 + 0xff8; // crosses into the next frame
                        r.report_write(&WriteEvent::new(
                            Gpa(gpa),
                            &bytes,
                            Source::Vcpu(u32::try_from(w).unwrap()),
                        ));
                        i += 1;
                    }
                })
            })
            .collect();
        let churners: Vec<_> = (0..2)
            .map(|_| {
                let (t, late) = (t.clone(), late.clone());
                std::thread::spawn(move || {
                    for i in 0..300u32 {
                        let n = Arc::new(Watched {
                            dropped: AtomicBool::new(false),
                            late: late.clone(),
                            tracker: Arc::downgrade(&t),
                            calls: AtomicU64::new(0),
                        });
                        let class = if i % 2 == 0 {
                            NotifierClass::Ordinary
                        } else {
                            NotifierClass::Coherence
                        };
                        let h = t.register(n.clone(), class).unwrap();
                        while n.calls.load(Ordering::Relaxed) == 0 {
                            std::thread::yield_now();
                        }
                        if i % 3 == 0 {
                            h.unregister().unwrap();
                        } else {
                            drop(h);
                        }
                        n.dropped.store(true, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for c in churners {
            c.join().unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        for w in writers {
            w.join().unwrap();
        }
        assert_eq!(late.load(Ordering::SeqCst), 0, "calls after drop returned");
        assert_eq!(t.notifier_count(), 0);
        for g in 8..16 {
            assert_eq!(t.track_count(AsId::NORMAL, Gfn(g)).unwrap(), 0);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// DELETE / MOVE / FLAGS_ONLY / CREATE against dispatch through TrackReaders.

/// Flags a `track_write` for a frame of a region whose DELETE already returned. Round `r`'s
/// region is `[1024 + 4r, 1024 + 4r + 4)`; `deleted` counts the rounds whose DELETE returned.
struct RegionWatch {
    deleted: AtomicU64,
    late: AtomicUsize,
    delivered: AtomicUsize,
    region_calls: AtomicUsize,
}

impl RegionWatch {
    fn is_late(&self, g: u64) -> bool {
        g >= 1024 && (g - 1024) / 4 < self.deleted.load(Ordering::SeqCst)
    }
}

impl TrackNotifier for RegionWatch {
    fn track_write(&self, e: &WriteEvent<'_>) {
        let g = e.gfn().0;
        if self.is_late(g) {
            self.late.fetch_add(1, Ordering::SeqCst);
        }
        self.delivered.fetch_add(1, Ordering::SeqCst);
        spin(100);
        if self.is_late(g) {
            self.late.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn track_remove_region(&self, _: AsId, _: Gfn, _: u64) {
        self.region_calls.fetch_add(1, Ordering::SeqCst);
    }
}

/// Held: a slot is created at a fresh base, its frames tracked, FLAGS_ONLY toggled twice while
/// TrackReader writers hit it (counts kept: writes keep arriving), then deleted; after the
/// DELETE returned no `track_write` for it arrives. 200 rounds, each region at a new base.
#[test]
fn review_delete_after_flags_only_no_write_after_return_through_readers() {
    const N: u64 = 4;
    watchdog(120, || {
        let t = tracker_with_slot(16, Arc::new(NoEnforcement));
        let n = Arc::new(RegionWatch {
            deleted: AtomicU64::new(0),
            late: AtomicUsize::new(0),
            delivered: AtomicUsize::new(0),
            region_calls: AtomicUsize::new(0),
        });
        let _h = t.register(n.clone(), NotifierClass::Ordinary).unwrap();
        let current = Arc::new(AtomicU64::new(u64::MAX));
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..2)
            .map(|_| {
                let (t, current, stop) = (t.clone(), current.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut r = t.reader();
                    let bytes = [3u8; 8];
                    while !stop.load(Ordering::SeqCst) {
                        let first = current.load(Ordering::SeqCst);
                        if first == u64::MAX {
                            std::thread::yield_now();
                            continue;
                        }
                        for g in first..first + N {
                            r.report_write(&WriteEvent::new(Gfn(g).gpa(), &bytes, Source::Device));
                        }
                    }
                })
            })
            .collect();
        for round in 0..200u64 {
            let first = 1024 + round * N;
            let region = MemoryRegion::new(SlotId(1), Gfn(first), N);
            assert_eq!(t.set_memory_region(region).unwrap(), SlotChange::Create);
            t.add_range(AsId::NORMAL, Gfn(first), N).unwrap();
            current.store(first, Ordering::SeqCst);
            let before = n.delivered.load(Ordering::SeqCst);
            for flags in [
                pagetrack::RegionFlags::LOG_DIRTY_PAGES,
                pagetrack::RegionFlags::NONE,
            ] {
                assert_eq!(
                    t.set_memory_region(region.with_flags(flags)).unwrap(),
                    SlotChange::FlagsOnly
                );
                assert_eq!(t.track_count(AsId::NORMAL, Gfn(first)).unwrap(), 1);
            }
            while n.delivered.load(Ordering::SeqCst) < before + 2 {
                std::thread::yield_now();
            }
            assert_eq!(
                t.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(1)))
                    .unwrap(),
                SlotChange::Delete
            );
            n.deleted.store(round + 1, Ordering::SeqCst);
            assert_eq!(
                n.region_calls.load(Ordering::SeqCst),
                usize::try_from(round + 1).unwrap()
            );
        }
        stop.store(true, Ordering::SeqCst);
        for w in writers {
            w.join().unwrap();
        }
        assert_eq!(
            n.late.load(Ordering::SeqCst),
            0,
            "track_write after DELETE returned"
        );
    });
}

// ---------------------------------------------------------------------------------------------
// Re-entrancy: what callbacks (track_write and track_remove_region) may do.

struct Reentrant {
    tracker: Weak<PageTracker>,
    extra: Mutex<Vec<NotifierHandle>>,
    in_remove_region: Mutex<Vec<Result<(), String>>>,
}

impl TrackNotifier for Reentrant {
    fn track_write(&self, e: &WriteEvent<'_>) {
        let Some(t) = self.tracker.upgrade() else {
            return;
        };
        if e.gfn() == Gfn(2) {
            // Register from a callback, nested dispatch, add/remove, last remove.
            let h = t
                .register(Arc::new(Count::default()), NotifierClass::Coherence)
                .unwrap();
            self.extra.lock().unwrap().push(h);
            t.add_gfn(Gfn(3)).unwrap();
            write(&t, 0x3000, 4); // nested dispatch
            t.remove_gfn(Gfn(3)).unwrap();
            assert!(matches!(
                t.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(1))),
                Err(Error::InCallback { .. })
            ));
            // Drop one of the handles registered earlier from inside the callback.
            let old = self.extra.lock().unwrap().remove(0);
            drop(old);
        }
    }
    fn track_remove_region(&self, as_id: AsId, base: Gfn, _: u64) {
        let Some(t) = self.tracker.upgrade() else {
            return;
        };
        let mut log = self.in_remove_region.lock().unwrap();
        log.push(t.add_gfn(Gfn(4)).map_err(|e| e.to_string()));
        log.push(t.remove_gfn(Gfn(4)).map_err(|e| e.to_string()));
        // The deleted slot's frames are gone.
        log.push(match t.add_gfns(as_id, &[base]) {
            Err(Error::UnknownGfn { .. }) => Ok(()),
            other => Err(format!("{other:?}")),
        });
        let h = t
            .register(Arc::new(Count::default()), NotifierClass::Ordinary)
            .unwrap();
        drop(h);
        log.push(
            match t.set_memory_region(MemoryRegion::new(SlotId(5), Gfn(100), 1)) {
                Err(Error::InCallback { .. }) => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
        let _ = t.is_write_tracked(as_id, Gfn(2));
        let _ = t.max_mapping_level(AsId::NORMAL, Gfn(2));
    }
}

/// Held: callbacks register notifiers, dispatch nested writes, add and remove (the last
/// remove too), drop handles, and are refused memslot changes; `track_remove_region` adds,
/// removes, registers and unregisters. Nothing deadlocks.
#[test]
fn review_reentrant_callbacks_do_not_deadlock() {
    watchdog(30, || {
        let t = tracker_with_slot(16, Arc::new(NoEnforcement));
        t.set_memory_region(MemoryRegion::new(SlotId(1), Gfn(16), 16))
            .unwrap();
        let n = Arc::new(Reentrant {
            tracker: Arc::downgrade(&t),
            extra: Mutex::new(Vec::new()),
            in_remove_region: Mutex::new(Vec::new()),
        });
        let _h = t.register(n.clone(), NotifierClass::Ordinary).unwrap();
        let pre = t
            .register(Arc::new(Count::default()), NotifierClass::Ordinary)
            .unwrap();
        n.extra.lock().unwrap().push(pre);
        t.add_gfn(Gfn(2)).unwrap();
        let writers: Vec<_> = (0..2)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        write(&t, 0x2000, 8);
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        t.add_gfn(Gfn(17)).unwrap();
        t.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(1)))
            .unwrap();
        let log = n.in_remove_region.lock().unwrap().clone();
        assert_eq!(log, vec![Ok(()), Ok(()), Ok(()), Ok(())]);
        assert_eq!(t.track_count(AsId::NORMAL, Gfn(3)).unwrap(), 0);
    });
}

// ---------------------------------------------------------------------------------------------
// Address spaces.

struct Pairs(Mutex<Vec<(bool, AsId, Gfn)>>);

impl Enforcement for Pairs {
    fn protect(&self, runs: &[FrameRun]) -> Result<(), BackendError> {
        let mut v = self.0.lock().unwrap();
        v.extend(FrameRun::pairs(runs).map(|(a, g)| (true, a, g)));
        Ok(())
    }
    fn unprotect(&self, runs: &[FrameRun]) -> Result<(), BackendError> {
        let mut v = self.0.lock().unwrap();
        v.extend(FrameRun::pairs(runs).map(|(a, g)| (false, a, g)));
        Ok(())
    }
}

/// Held (behaviour): tracking is per address space; the query, dispatch and backend agree.
/// Doc defect: `PageTracker::is_write_tracked`'s own doc comment still says "in `as_id` or in
/// the other x86 address space (B19, K7)", contradicting the crate docs' "Address spaces".
#[test]
fn review_address_spaces_query_dispatch_backend_agree() {
    let backend = Arc::new(Pairs(Mutex::new(Vec::new())));
    let t = PageTracker::new(TrackerConfig::default(), backend.clone());
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 16))
        .unwrap();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 8).in_address_space(AsId(1)))
        .unwrap();
    let n = Arc::new(Count::default());
    let _h = t.register(n.clone(), NotifierClass::Ordinary).unwrap();
    t.add_gfns(AsId(1), &[Gfn(3)]).unwrap();
    assert!(t.is_write_tracked(AsId(1), Gfn(3)));
    assert!(!t.is_write_tracked(AsId::NORMAL, Gfn(3)));
    write(&t, 0x3000, 8);
    assert_eq!(n.writes.load(Ordering::SeqCst), 0);
    let bytes = [0u8; 8];
    t.report_write(&WriteEvent::new(Gpa(0x3000), &bytes, Source::Device).in_address_space(AsId(1)));
    assert_eq!(n.writes.load(Ordering::SeqCst), 1);
    // AS 1 has no slot at frame 12: unknown there, even though AS 0 has one.
    assert!(matches!(
        t.add_gfns(AsId(1), &[Gfn(12)]),
        Err(Error::UnknownGfn { .. })
    ));
    assert!(!t.is_write_tracked(AsId(1), Gfn(12)));
    t.add_gfn(Gfn(3)).unwrap();
    t.remove_gfns(AsId(1), &[Gfn(3)]).unwrap();
    assert!(t.is_write_tracked(AsId::NORMAL, Gfn(3)));
    assert_eq!(
        *backend.0.lock().unwrap(),
        vec![
            (true, AsId(1), Gfn(3)),
            (true, AsId::NORMAL, Gfn(3)),
            (false, AsId(1), Gfn(3))
        ]
    );
    assert!(matches!(
        t.add_gfns(AsId(2), &[]),
        Err(Error::InvalidAddressSpace { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Large ranges hold mmu_lock for the whole range.

// ---------------------------------------------------------------------------------------------
// Last removes racing each other, DELETE/CREATE (another synchronizer) and a steady stream.

static SEQ: AtomicU64 = AtomicU64::new(1);

/// Records, per frame, the sequence number taken when its latest `track_write` finished.
struct Finish {
    last: Vec<AtomicU64>,
}

impl TrackNotifier for Finish {
    fn track_write(&self, e: &WriteEvent<'_>) {
        spin(500);
        if let Some(l) = self.last.get(usize::try_from(e.gfn().0).unwrap()) {
            l.fetch_max(SEQ.fetch_add(1, Ordering::SeqCst), Ordering::SeqCst);
        }
    }
}

/// Held: two removers of frames of slot 0 per round, a third thread deleting and re-creating
/// slot 1 (whose frames are tracked and written, so its DELETE synchronizes too), and three
/// writers through TrackReaders: no callback for a removed frame finishes after its remove
/// returned (frames are never re-added).
#[test]
fn review_last_removes_race_delete_create_synchronizers() {
    const ROUNDS: u64 = 400;
    watchdog(300, || {
        let frames = ROUNDS * 2;
        let t = tracker_with_slot(frames, Arc::new(NoEnforcement));
        let n = Arc::new(Finish {
            last: (0..frames).map(|_| AtomicU64::new(0)).collect(),
        });
        let _h = t.register(n.clone(), NotifierClass::Ordinary).unwrap();
        t.add_range(AsId::NORMAL, Gfn(0), frames).unwrap();
        let removed_at: Arc<Vec<AtomicU64>> =
            Arc::new((0..frames).map(|_| AtomicU64::new(u64::MAX)).collect());
        let round = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for w in 0..3u64 {
            let (t, round, stop) = (t.clone(), round.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut r = t.reader();
                let bytes = [1u8; 8];
                while !stop.load(Ordering::SeqCst) {
                    let k = round.load(Ordering::SeqCst);
                    for g in [2 * k, 2 * k + 1, frames + 1 + w] {
                        r.report_write(&WriteEvent::new(Gfn(g).gpa(), &bytes, Source::Device));
                    }
                }
            }));
        }
        {
            let (t, stop) = (t.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let region = MemoryRegion::new(SlotId(1), Gfn(frames), 8);
                while !stop.load(Ordering::SeqCst) {
                    t.set_memory_region(region).unwrap();
                    t.add_range(AsId::NORMAL, Gfn(frames), 8).unwrap();
                    std::thread::sleep(Duration::from_micros(200));
                    t.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(1)))
                        .unwrap();
                }
            }));
        }
        let start = Arc::new(Barrier::new(3));
        let done = Arc::new(Barrier::new(3));
        let removers: Vec<_> = (0..2u64)
            .map(|k| {
                let (t, start, done, removed_at) =
                    (t.clone(), start.clone(), done.clone(), removed_at.clone());
                std::thread::spawn(move || {
                    for r in 0..ROUNDS {
                        start.wait();
                        let g = 2 * r + k;
                        t.remove_gfn(Gfn(g)).unwrap();
                        removed_at[usize::try_from(g).unwrap()]
                            .store(SEQ.fetch_add(1, Ordering::SeqCst), Ordering::SeqCst);
                        done.wait();
                    }
                })
            })
            .collect();
        for r in 0..ROUNDS {
            round.store(r, Ordering::SeqCst);
            std::thread::sleep(Duration::from_micros(100));
            start.wait();
            done.wait();
        }
        for h in removers {
            h.join().unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        for h in threads {
            h.join().unwrap();
        }
        let late: Vec<u64> = (0..frames)
            .filter(|&g| {
                let i = usize::try_from(g).unwrap();
                n.last[i].load(Ordering::SeqCst) > removed_at[i].load(Ordering::SeqCst)
            })
            .collect();
        assert!(
            late.is_empty(),
            "callbacks finished after the last remove returned: {late:?}"
        );
    });
}

/// Held: a steady stream of long dispatches on a frame that stays tracked (four writers, each
/// callback ~100 µs) does not hold a last remove: 200 removes, the slowest within 1 s.
#[test]
fn review_last_remove_not_starved_by_steady_dispatch() {
    struct Slow;
    impl TrackNotifier for Slow {
        fn track_write(&self, _: &WriteEvent<'_>) {
            spin(50_000);
        }
    }
    watchdog(120, || {
        let t = tracker_with_slot(512, Arc::new(NoEnforcement));
        let _h = t.register(Arc::new(Slow), NotifierClass::Ordinary).unwrap();
        t.add_gfn(Gfn(511)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..4)
            .map(|_| {
                let (t, stop) = (t.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        write(&t, 511 * 0x1000, 8);
                    }
                })
            })
            .collect();
        let mut worst = Duration::ZERO;
        for g in 0..200 {
            t.add_gfn(Gfn(g)).unwrap();
            let at = Instant::now();
            t.remove_gfn(Gfn(g)).unwrap();
            worst = worst.max(at.elapsed());
        }
        stop.store(true, Ordering::SeqCst);
        for w in writers {
            w.join().unwrap();
        }
        assert!(
            worst < Duration::from_secs(1),
            "a last remove waited {worst:?}"
        );
    });
}
