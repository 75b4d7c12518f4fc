//! Review 9: hostile tests against the fence-less read sections (b7d6aa5, 400d35b) and the
//! chunked, reserved range updates (359a005). Each test states the promise it attacks. Hangs
//! become failures through `watchdog`; no assertion depends on timing (bounded waits inside
//! callbacks only give a wrong order the chance to show, they cannot make a correct
//! implementation fail).
#![cfg(feature = "notifiers")]
#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns: a failed lock or set-up is a test failure"
)]

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use common::{Finish, SEQ, tracker_with_slot, watchdog, write};
use pagetrack::{
    AsId, BackendError, Enforcement, Error, FrameRun, GFN_LIMIT, Gfn, Gpa, LimitMode, MemoryRegion,
    NoEnforcement, NotifierClass, PageLevel, PageTracker, RegionFlags, SlotId, Source,
    TrackNotifier, TrackerConfig, WriteEvent,
};

/// How a [`Gate`] backend's `protect` ends once a callback for the gated frame has begun.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    Panic,
    Fail,
}

/// A backend whose armed `protect` waits until a `track_write` for the frame being added is
/// running (the count is already non-zero while protect runs), then panics or fails.
struct Gate {
    armed: AtomicBool,
    outcome: Outcome,
    entered: Arc<AtomicBool>,
}

impl Enforcement for Gate {
    fn protect(&self, _: &[FrameRun]) -> Result<(), BackendError> {
        if !self.armed.load(Ordering::SeqCst) {
            return Ok(());
        }
        while !self.entered.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        match self.outcome {
            Outcome::Panic => panic!("protect panics (test)"),
            Outcome::Fail => Err(BackendError::msg("protect refused (test)")),
        }
    }

    fn unprotect(&self, _: &[FrameRun]) -> Result<(), BackendError> {
        Ok(())
    }
}

/// Flags a callback that runs, or is still running, after the failed add came back.
struct LateWatcher {
    frame: Gfn,
    entered: Arc<AtomicBool>,
    add_returned: AtomicBool,
    late: AtomicBool,
}

impl TrackNotifier for LateWatcher {
    fn track_write(&self, e: &WriteEvent<'_>) {
        if e.gfn() != self.frame {
            return;
        }
        if self.add_returned.load(Ordering::SeqCst) {
            self.late.store(true, Ordering::SeqCst);
        }
        self.entered.store(true, Ordering::SeqCst);
        // Stay inside for a bounded while: a failed add that waits for this section (as the
        // `Error::Backend` path does) returns only after this loop; one that does not wait is
        // seen returning from in here.
        for _ in 0..20_000 {
            if self.add_returned.load(Ordering::SeqCst) {
                self.late.store(true, Ordering::SeqCst);
                return;
            }
            std::thread::yield_now();
        }
    }
}

/// Promise 4 with promise 1's wording for adds (`Enforcement::protect` docs: "Writes reported
/// while the failing call ran may have been delivered; none is once the add returned"): a
/// writer keeps reporting writes to the frame being added while `protect` fails or panics.
/// Once the add came back (error or unwind), no `track_write` for the frame may still be
/// running or start. `range` selects `add_range` over several chunks instead of `add_gfn`.
fn failed_add_leaves_no_callback_behind(outcome: Outcome, range: bool) {
    watchdog(120, move || {
        let entered = Arc::new(AtomicBool::new(false));
        let b = Arc::new(Gate {
            armed: AtomicBool::new(true),
            outcome,
            entered: entered.clone(),
        });
        let frames = if range { 3 * 65_536 + 7 } else { 16 };
        let t = tracker_with_slot(frames, b.clone());
        let frame = Gfn(if range { 65_536 * 2 + 3 } else { 4 });
        let w = Arc::new(LateWatcher {
            frame,
            entered,
            add_returned: AtomicBool::new(false),
            late: AtomicBool::new(false),
        });
        let _h = t.register(w.clone(), NotifierClass::Ordinary).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (t, stop) = (t.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    write(&t, frame.0 * 0x1000, 8);
                }
            })
        };
        let r = catch_unwind(AssertUnwindSafe(|| {
            if range {
                t.add_range(AsId::NORMAL, Gfn(0), frames)
            } else {
                t.add_gfn(frame)
            }
        }));
        w.add_returned.store(true, Ordering::SeqCst);
        match outcome {
            Outcome::Panic => assert!(r.is_err(), "protect's panic propagates"),
            Outcome::Fail => assert!(matches!(r, Ok(Err(Error::Backend { .. }))), "{r:?}"),
        }
        // Keep writing for a little: none of these may be delivered either.
        for _ in 0..1000 {
            write(&t, frame.0 * 0x1000, 8);
        }
        stop.store(true, Ordering::SeqCst);
        writer.join().unwrap();
        assert_eq!(t.track_count(AsId::NORMAL, frame), Ok(0));
        assert!(
            !w.late.load(Ordering::SeqCst),
            "a track_write for {frame:?} ran after the failed add ({outcome:?}) came back"
        );
        b.armed.store(false, Ordering::SeqCst);
        t.add_gfn(frame).unwrap();
        t.remove_gfn(frame).unwrap();
    });
}

#[test]
fn review9_failed_add_gfn_leaves_no_callback_behind() {
    failed_add_leaves_no_callback_behind(Outcome::Fail, false);
}

#[test]
fn review9_failed_add_range_leaves_no_callback_behind() {
    failed_add_leaves_no_callback_behind(Outcome::Fail, true);
}

#[test]
fn review9_panicking_add_gfn_leaves_no_callback_behind() {
    failed_add_leaves_no_callback_behind(Outcome::Panic, false);
}

#[test]
fn review9_panicking_add_range_leaves_no_callback_behind() {
    failed_add_leaves_no_callback_behind(Outcome::Panic, true);
}

/// A backend that fails or panics on request, for many-chunk ranges.
#[derive(Default)]
struct Switch {
    fail_protect: AtomicBool,
    panic_protect: AtomicBool,
    fail_unprotect: AtomicBool,
    panic_unprotect: AtomicBool,
    /// Only calls for more than this many frames are affected (0: every call).
    above: AtomicU64,
}

impl Switch {
    fn hit(&self, runs: &[FrameRun]) -> bool {
        FrameRun::total(runs) > self.above.load(Ordering::SeqCst)
    }
}

impl Enforcement for Switch {
    fn protect(&self, runs: &[FrameRun]) -> Result<(), BackendError> {
        if self.hit(runs) {
            assert!(!self.panic_protect.load(Ordering::SeqCst), "protect panics");
            if self.fail_protect.load(Ordering::SeqCst) {
                return Err(BackendError::msg("protect refused"));
            }
        }
        Ok(())
    }

    fn unprotect(&self, runs: &[FrameRun]) -> Result<(), BackendError> {
        if self.hit(runs) {
            assert!(
                !self.panic_unprotect.load(Ordering::SeqCst),
                "unprotect panics"
            );
            if self.fail_unprotect.load(Ordering::SeqCst) {
                return Err(BackendError::msg("unprotect refused"));
            }
        }
        Ok(())
    }
}

fn levels(t: &PageTracker, frames: u64) -> Vec<PageLevel> {
    (0..frames >> 9)
        .map(|r| t.max_mapping_level(AsId::NORMAL, Gfn(r << 9)).unwrap())
        .collect()
}

/// Promise 4 for ranges, attacked through every early exit of `update_range` (unknown frame
/// mid-range, a range past the top of the gfn space, a count at a limit mid-range, a failing
/// and a panicking backend on both directions): each call fails, changes no count and no
/// huge-page level, and leaves no reservation behind: a single-frame update inside the range,
/// an overlapping range and a DELETE of the slot all still complete (a leaked reservation
/// would block them forever; the watchdog turns that into a failure).
#[test]
fn review9_every_failed_range_changes_nothing_and_releases_its_frames() {
    watchdog(300, || {
        let b = Arc::new(Switch::default());
        let n = 3 * 65_536 + 100;
        let t = tracker_with_slot(n, b.clone());
        // A second slot after a hole, and one in the other address space.
        t.set_memory_region(MemoryRegion::new(SlotId(1), Gfn(n + 10), 64))
            .unwrap();
        t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 64).in_address_space(AsId::SMM))
            .unwrap();
        let pre = [Gfn(5), Gfn(65_535), Gfn(65_536), Gfn(2 * 65_536 + 9)];
        t.add_gfns(AsId::NORMAL, &pre).unwrap();
        // One frame at the limit, near the end of the range.
        let full = Gfn(3 * 65_536 + 50);
        t.add_gfns(AsId::NORMAL, &vec![full; 65_535]).unwrap();
        let before = levels(&t, n);
        let check = |what: &str| {
            for g in 0..n {
                let want = if Gfn(g) == full {
                    65_535
                } else {
                    u16::from(pre.contains(&Gfn(g)))
                };
                assert_eq!(
                    t.track_count(AsId::NORMAL, Gfn(g)).unwrap(),
                    want,
                    "{what}: frame {g}"
                );
            }
            assert_eq!(levels(&t, n), before, "{what}: huge-page levels");
            // No reservation left behind: overlapping updates complete.
            t.add_gfn(Gfn(7)).unwrap();
            t.remove_gfn(Gfn(7)).unwrap();
            t.add_range(AsId::NORMAL, Gfn(100), 10).unwrap();
            t.remove_range(AsId::NORMAL, Gfn(100), 10).unwrap();
        };
        // Unknown frame in the hole, after many chunks' worth of valid frames.
        assert!(matches!(
            t.add_range(AsId::NORMAL, Gfn(0), n + 20),
            Err(Error::UnknownGfn { gfn, .. }) if gfn == Gfn(n)
        ));
        check("unknown gfn mid-range");
        assert!(matches!(
            t.remove_range(AsId::NORMAL, Gfn(0), n + 20),
            Err(Error::UnknownGfn { .. } | Error::NotTracked { .. })
        ));
        check("remove across the hole");
        // Past the top of the gfn space, and wrapping.
        assert!(t.add_range(AsId::NORMAL, Gfn(u64::MAX - 3), 10).is_err());
        assert!(t.add_range(AsId::NORMAL, Gfn(GFN_LIMIT - 1), 2).is_err());
        assert!(t.add_range(AsId::NORMAL, Gfn(n - 1), u64::MAX).is_err());
        check("wrap-around");
        // A count at its limit near the end of a many-chunk range (strict mode).
        assert!(matches!(
            t.add_range(AsId::NORMAL, Gfn(0), n),
            Err(Error::TrackCountOverflow { gfn, .. }) if gfn == full
        ));
        check("overflow mid-range");
        // An untracked frame mid-range for a remove.
        assert!(matches!(
            t.remove_range(AsId::NORMAL, Gfn(5), 65_600),
            Err(Error::NotTracked { .. })
        ));
        check("not tracked mid-range");
        // Bad address space.
        assert!(matches!(
            t.add_range(AsId(7), Gfn(0), 10),
            Err(Error::InvalidAddressSpace { .. })
        ));
        check("bad address space");
        // The backend failing and panicking, both directions, after all chunks were applied.
        let range = (Gfn(0), 3 * 65_536 + 40);
        b.fail_protect.store(true, Ordering::SeqCst);
        assert!(matches!(
            t.add_range(AsId::NORMAL, range.0, range.1),
            Err(Error::Backend { .. })
        ));
        b.fail_protect.store(false, Ordering::SeqCst);
        check("failed protect");
        b.panic_protect.store(true, Ordering::SeqCst);
        assert!(
            catch_unwind(AssertUnwindSafe(|| t.add_range(
                AsId::NORMAL,
                range.0,
                range.1
            )))
            .is_err()
        );
        b.panic_protect.store(false, Ordering::SeqCst);
        check("panicking protect");
        t.add_range(AsId::NORMAL, range.0, range.1).unwrap();
        b.fail_unprotect.store(true, Ordering::SeqCst);
        assert!(matches!(
            t.remove_range(AsId::NORMAL, range.0, range.1),
            Err(Error::Backend { .. })
        ));
        b.fail_unprotect.store(false, Ordering::SeqCst);
        b.panic_unprotect.store(true, Ordering::SeqCst);
        assert!(
            catch_unwind(AssertUnwindSafe(|| t.remove_range(
                AsId::NORMAL,
                range.0,
                range.1
            )))
            .is_err()
        );
        b.panic_unprotect.store(false, Ordering::SeqCst);
        assert_eq!(t.track_count(AsId::NORMAL, Gfn(3)), Ok(1));
        assert_eq!(t.track_count(AsId::NORMAL, Gfn(5)), Ok(2));
        t.remove_range(AsId::NORMAL, range.0, range.1).unwrap();
        check("after the failed removes");
        // The slot can still be deleted (no reservation holds it).
        t.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(0)))
            .unwrap();
        assert!(matches!(
            t.track_count(AsId::NORMAL, Gfn(5)),
            Err(Error::UnknownGfn { .. })
        ));
    });
}

/// Promise 4 against the huge-page counts, which a range shares with frames outside it: while
/// a many-chunk `add_range` whose protect panics (then one whose protect fails) is applying
/// and undoing its chunks, other threads add and remove frames just outside the range in the
/// same 2 MiB and 1 GiB regions, and a range in the other address space runs. Afterwards every
/// count and level is as before.
#[test]
fn review9_failed_range_with_neighbours_in_same_huge_regions_restores_levels() {
    watchdog(300, || {
        let b = Arc::new(Switch::default());
        b.above.store(1000, Ordering::SeqCst);
        let n: u64 = 1 << 20;
        let t = PageTracker::new(TrackerConfig::default(), b.clone());
        t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), n))
            .unwrap();
        t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), n).in_address_space(AsId::SMM))
            .unwrap();
        t.enable_write_tracking().unwrap();
        let first = 300u64;
        let len = 4 * 65_536 + 123;
        let end = first + len;
        let before = levels(&t, n);
        let stop = Arc::new(AtomicBool::new(false));
        let neighbours: Vec<_> = [vec![0, 1, 299], vec![end, end + 1, end + 511]]
            .into_iter()
            .map(|frames| {
                let (t, stop) = (t.clone(), stop.clone());
                std::thread::spawn(move || {
                    let frames: Vec<Gfn> = frames.into_iter().map(Gfn).collect();
                    let mut rounds = 0u64;
                    while !stop.load(Ordering::SeqCst) || rounds < 50 {
                        for &g in &frames {
                            t.add_gfn(g).unwrap();
                        }
                        t.add_gfns(AsId::NORMAL, &frames).unwrap();
                        t.remove_gfns(AsId::NORMAL, &frames).unwrap();
                        for &g in &frames {
                            t.remove_gfn(g).unwrap();
                        }
                        rounds += 1;
                    }
                })
            })
            .collect();
        let other_as = {
            let (t, stop) = (t.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    t.add_range(AsId::SMM, Gfn(first), 1000).unwrap();
                    t.remove_range(AsId::SMM, Gfn(first), 1000).unwrap();
                }
            })
        };
        for round in 0..6 {
            if round % 2 == 0 {
                b.panic_protect.store(true, Ordering::SeqCst);
                let r = catch_unwind(AssertUnwindSafe(|| {
                    t.add_range(AsId::NORMAL, Gfn(first), len)
                }));
                assert!(r.is_err());
                b.panic_protect.store(false, Ordering::SeqCst);
            } else {
                b.fail_protect.store(true, Ordering::SeqCst);
                assert!(matches!(
                    t.add_range(AsId::NORMAL, Gfn(first), len),
                    Err(Error::Backend { .. })
                ));
                b.fail_protect.store(false, Ordering::SeqCst);
            }
        }
        stop.store(true, Ordering::SeqCst);
        for h in neighbours.into_iter().chain([other_as]) {
            h.join().unwrap();
        }
        for g in 0..n {
            assert_eq!(t.track_count(AsId::NORMAL, Gfn(g)), Ok(0), "frame {g}");
        }
        assert_eq!(levels(&t, n), before);
        for r in 0..n >> 9 {
            assert_eq!(
                t.max_mapping_level(AsId::SMM, Gfn(r << 9)).unwrap(),
                before[usize::try_from(r).unwrap()],
                "SMM region {r}"
            );
        }
    });
}

/// KernelCompat (B18) with counts at 65535 inside a many-chunk range: a failed and a panicking
/// protect leave those counts and the warning counter as they were; a successful add absorbs
/// the steps (one warning each) and its remove takes them one below the limit.
#[test]
fn review9_kernel_compat_failed_range_at_the_limit_changes_nothing() {
    let b = Arc::new(Switch::default());
    b.above.store(1000, Ordering::SeqCst);
    let n = 2 * 65_536 + 77;
    let t = PageTracker::new(
        TrackerConfig::default().with_limits(LimitMode::KernelCompat),
        b.clone(),
    );
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), n))
        .unwrap();
    t.enable_write_tracking().unwrap();
    let full = [Gfn(0), Gfn(65_535), Gfn(65_536), Gfn(n - 1)];
    for g in full {
        t.add_gfns(AsId::NORMAL, &vec![g; 65_535]).unwrap();
    }
    let warnings = t.stats().limit_warnings;
    let before = levels(&t, n);
    b.fail_protect.store(true, Ordering::SeqCst);
    assert!(matches!(
        t.add_range(AsId::NORMAL, Gfn(0), n),
        Err(Error::Backend { .. })
    ));
    b.fail_protect.store(false, Ordering::SeqCst);
    b.panic_protect.store(true, Ordering::SeqCst);
    assert!(catch_unwind(AssertUnwindSafe(|| t.add_range(AsId::NORMAL, Gfn(0), n))).is_err());
    b.panic_protect.store(false, Ordering::SeqCst);
    for g in [0, 1, 65_534, 65_535, 65_536, 65_537, n - 2, n - 1] {
        let want = if full.contains(&Gfn(g)) { 65_535 } else { 0 };
        assert_eq!(t.track_count(AsId::NORMAL, Gfn(g)), Ok(want), "frame {g}");
    }
    assert_eq!(t.stats().limit_warnings, warnings);
    assert_eq!(levels(&t, n), before);
    t.add_range(AsId::NORMAL, Gfn(0), n).unwrap();
    assert_eq!(t.stats().limit_warnings, warnings + 4);
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(65_536)), Ok(65_535));
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(1)), Ok(1));
    t.remove_range(AsId::NORMAL, Gfn(0), n).unwrap();
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(65_536)), Ok(65_534));
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(1)), Ok(0));
}

/// A notifier whose callback runs range and list updates on the tracker (overlapping the
/// ranges of other threads) and counts what it did.
struct Reentrant {
    tracker: Mutex<Weak<PageTracker>>,
    calls: AtomicUsize,
}

impl TrackNotifier for Reentrant {
    fn track_write(&self, e: &WriteEvent<'_>) {
        let Some(t) = self.tracker.lock().unwrap().upgrade() else {
            return;
        };
        if e.gfn() != Gfn(5) {
            return;
        }
        self.calls.fetch_add(1, Ordering::SeqCst);
        t.add_range(AsId::NORMAL, Gfn(60_000), 70_000).unwrap();
        t.add_gfns(AsId::NORMAL, &[Gfn(60_001), Gfn(129_999)])
            .unwrap();
        t.remove_gfns(AsId::NORMAL, &[Gfn(60_001), Gfn(129_999)])
            .unwrap();
        t.remove_range(AsId::NORMAL, Gfn(60_000), 70_000).unwrap();
    }

    fn track_remove_region(&self, _: AsId, _: Gfn, _: u64) {
        // From inside a DELETE's notification (which holds `changes`): a range update.
        if let Some(t) = self.tracker.lock().unwrap().upgrade() {
            t.add_range(AsId::NORMAL, Gfn(100_000), 70_000).unwrap();
            t.remove_range(AsId::NORMAL, Gfn(100_000), 70_000).unwrap();
        }
    }
}

/// Deadlock hunt: callbacks run overlapping multi-chunk range updates from inside dispatch and
/// from inside `track_remove_region`, while other threads run overlapping ranges and lists,
/// last removes (grace waits), registrations, and a DELETE/CREATE loop of another slot (which
/// waits for reservations while holding `changes` and `slots_lock`). Everything finishes and
/// every count is back to its start.
#[test]
fn review9_range_updates_from_callbacks_and_racing_slot_changes_do_not_deadlock() {
    watchdog(300, || {
        let n = 200_000;
        let t = tracker_with_slot(n, Arc::new(NoEnforcement));
        let r = Arc::new(Reentrant {
            tracker: Mutex::new(Weak::new()),
            calls: AtomicUsize::new(0),
        });
        *r.tracker.lock().unwrap() = Arc::downgrade(&t);
        let _h = t.register(r.clone(), NotifierClass::Ordinary).unwrap();
        t.add_gfn(Gfn(5)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for w in 0..2u64 {
            let (t, stop) = (t.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut reader = t.reader();
                let bytes = [1u8; 8];
                while !stop.load(Ordering::SeqCst) {
                    reader.report_write(&WriteEvent::new(
                        Gpa(5 * 0x1000 + 8 * w),
                        &bytes,
                        Source::Vcpu(u32::try_from(w).unwrap()),
                    ));
                }
            }));
        }
        {
            let (t, stop) = (t.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) || i < 20 {
                    let a = 40_000 + (i % 7) * 9_000;
                    t.add_range(AsId::NORMAL, Gfn(a), 80_000).unwrap();
                    t.add_gfn(Gfn(a + 3)).unwrap();
                    t.remove_gfn(Gfn(a + 3)).unwrap();
                    t.remove_range(AsId::NORMAL, Gfn(a), 80_000).unwrap();
                    i += 1;
                }
            }));
        }
        {
            let (t, stop) = (t.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) || i < 20 {
                    t.set_memory_region(MemoryRegion::new(SlotId(1), Gfn(n + 64), 70_000))
                        .unwrap();
                    t.add_range(AsId::NORMAL, Gfn(n + 64), 70_000).unwrap();
                    let (t2, done) = (t.clone(), Arc::new(AtomicBool::new(false)));
                    let d2 = done.clone();
                    // A DELETE of the slot while a range on it may be half-way.
                    let ranger = std::thread::spawn(move || {
                        let _ = t2.remove_range(AsId::NORMAL, Gfn(n + 64), 70_000);
                        d2.store(true, Ordering::SeqCst);
                    });
                    t.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(1)))
                        .unwrap();
                    ranger.join().unwrap();
                    assert!(done.load(Ordering::SeqCst));
                    // Sized for frame 5, which the writers keep reporting while it is
                    // registered (a one-frame notifier panicked on it, killing both writers
                    // and leaving the loop below waiting for the watchdog).
                    let h = t.register(
                        Finish::new(6, 0) as Arc<dyn TrackNotifier>,
                        NotifierClass::Coherence,
                    );
                    drop(h);
                    i += 1;
                }
            }));
        }
        // A thread that ends before `stop` panicked: stop waiting and let the join report it.
        while r.calls.load(Ordering::SeqCst) < 200 && !threads.iter().any(|h| h.is_finished()) {
            std::thread::yield_now();
        }
        stop.store(true, Ordering::SeqCst);
        for h in threads {
            h.join().unwrap();
        }
        for g in 0..n {
            let want = u16::from(g == 5);
            assert_eq!(t.track_count(AsId::NORMAL, Gfn(g)), Ok(want), "frame {g}");
        }
    });
}

/// Promise 1 for `remove_range`, through `TrackReader`s (cached snapshots) and across slots:
/// three removers each drop the last track of a block of frames that spans a slot boundary
/// (with `remove_range`, the other blocks' frames still tracked) while writers keep callbacks
/// running on every block. After each remove returns, no callback for its frames finishes.
#[test]
fn review9_last_remove_range_across_slots_no_event_after_return() {
    const ROUNDS: u64 = 300;
    const REMOVERS: u64 = 3;
    const BLOCK: u64 = 4;
    watchdog(600, || {
        let frames = ROUNDS * REMOVERS * BLOCK + 2;
        let t = PageTracker::new(TrackerConfig::default(), Arc::new(NoEnforcement));
        // Slots of 6 frames each, so blocks of 4 often straddle two slots.
        let mut slot = 0u16;
        let mut base = 0u64;
        while base < frames {
            let len = 6.min(frames - base);
            t.set_memory_region(MemoryRegion::new(SlotId(slot), Gfn(base), len))
                .unwrap();
            base += len;
            slot += 1;
        }
        t.enable_write_tracking().unwrap();
        let hot = frames - 1;
        let n = Finish::new(frames, 200);
        let _h = t.register(n.clone(), NotifierClass::Ordinary).unwrap();
        t.add_gfn(Gfn(hot)).unwrap();
        let round = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let (t, round, stop) = (t.clone(), round.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut reader = t.reader();
                    let bytes = [7u8; 8];
                    while !stop.load(Ordering::SeqCst) {
                        let r = round.load(Ordering::SeqCst);
                        for g in r * REMOVERS * BLOCK..(r + 1) * REMOVERS * BLOCK {
                            reader.report_write(&WriteEvent::new(
                                Gpa(g * 0x1000 + 8 * w),
                                &bytes,
                                Source::Vcpu(u32::try_from(w).unwrap()),
                            ));
                        }
                        reader.report_write(&WriteEvent::new(
                            Gpa(hot * 0x1000),
                            &bytes,
                            Source::Vcpu(u32::try_from(w).unwrap()),
                        ));
                    }
                })
            })
            .collect();
        let start = Arc::new(std::sync::Barrier::new(
            usize::try_from(REMOVERS).unwrap() + 1,
        ));
        let done = Arc::new(std::sync::Barrier::new(
            usize::try_from(REMOVERS).unwrap() + 1,
        ));
        let removed_at: Arc<Vec<AtomicU64>> =
            Arc::new((0..frames).map(|_| AtomicU64::new(u64::MAX)).collect());
        let removers: Vec<_> = (0..REMOVERS)
            .map(|k| {
                let (t, start, done, removed_at) =
                    (t.clone(), start.clone(), done.clone(), removed_at.clone());
                std::thread::spawn(move || {
                    for r in 0..ROUNDS {
                        start.wait();
                        let first = (r * REMOVERS + k) * BLOCK;
                        t.remove_range(AsId::NORMAL, Gfn(first), BLOCK).unwrap();
                        let at = SEQ.fetch_add(1, Ordering::SeqCst);
                        for g in first..first + BLOCK {
                            removed_at[usize::try_from(g).unwrap()].store(at, Ordering::SeqCst);
                        }
                        done.wait();
                    }
                })
            })
            .collect();
        for r in 0..ROUNDS {
            let first = r * REMOVERS * BLOCK;
            t.add_range(AsId::NORMAL, Gfn(first), REMOVERS * BLOCK)
                .unwrap();
            round.store(r, Ordering::SeqCst);
            for g in first..first + REMOVERS * BLOCK {
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
            "{} frames had a callback finish after their last remove_range returned: {late:?}",
            late.len()
        );
    });
}

/// Records, per frame, the `SEQ` number at the end of its latest `track_write`, tagged with
/// the slot generation the test had installed (the notifier cannot tell slots apart).
struct ByRound {
    last: Vec<AtomicU64>,
    hits: Vec<AtomicUsize>,
}

impl TrackNotifier for ByRound {
    fn track_write(&self, e: &WriteEvent<'_>) {
        let i = usize::try_from(e.gfn().0).unwrap();
        common::spin(200);
        self.hits[i].fetch_add(1, Ordering::SeqCst);
        let at = SEQ.fetch_add(1, Ordering::SeqCst);
        self.last[i].fetch_max(at, Ordering::SeqCst);
    }

    fn track_remove_region(&self, _: AsId, _: Gfn, _: u64) {}
}

/// Promise 3 with cached snapshots and a shared `SlotMeta`: each round creates the slot, tracks
/// its frames, flips LOG_DIRTY (FLAGS_ONLY: the old and new `Slot` share their counts and
/// `gone` flag), lets `TrackReader` writers (whose caches may hold either) hit it, then DELETEs
/// it and at once CREATEs a slot at the same base with nothing tracked. No `track_write` may
/// finish after the DELETE returned (the new slot tracks nothing, so every such event is one
/// for the deleted slot).
#[test]
fn review9_delete_after_flags_only_then_create_same_base_no_late_event() {
    const ROUNDS: u64 = 300;
    const FRAMES: u64 = 8;
    watchdog(600, || {
        let t = PageTracker::new(TrackerConfig::default(), Arc::new(NoEnforcement));
        t.enable_write_tracking().unwrap();
        let n = Arc::new(ByRound {
            last: (0..FRAMES).map(|_| AtomicU64::new(0)).collect(),
            hits: (0..FRAMES).map(|_| AtomicUsize::new(0)).collect(),
        });
        let _h = t.register(n.clone(), NotifierClass::Ordinary).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let (t, stop) = (t.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut reader = t.reader();
                    let bytes = [3u8; 16];
                    while !stop.load(Ordering::SeqCst) {
                        for g in 0..FRAMES {
                            reader.report_write(&WriteEvent::new(
                                Gpa(g * 0x1000 + 16 * w),
                                &bytes,
                                Source::Vcpu(u32::try_from(w).unwrap()),
                            ));
                        }
                    }
                })
            })
            .collect();
        let mut late = Vec::new();
        for r in 0..ROUNDS {
            let region = MemoryRegion::new(SlotId(0), Gfn(0), FRAMES);
            if r == 0 {
                t.set_memory_region(region).unwrap();
            }
            t.add_range(AsId::NORMAL, Gfn(0), FRAMES).unwrap();
            let flags = if r % 2 == 0 {
                RegionFlags::LOG_DIRTY_PAGES
            } else {
                RegionFlags::NONE
            };
            t.set_memory_region(region.with_flags(flags)).unwrap();
            let seen: Vec<usize> = n.hits.iter().map(|h| h.load(Ordering::SeqCst)).collect();
            for (g, h) in n.hits.iter().enumerate() {
                while h.load(Ordering::SeqCst) == seen[g] {
                    std::thread::yield_now();
                }
            }
            t.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(0)))
                .unwrap();
            let at = SEQ.fetch_add(1, Ordering::SeqCst);
            t.set_memory_region(region).unwrap();
            // Give late events from cached readers a chance to show before checking.
            for _ in 0..200 {
                std::thread::yield_now();
            }
            for (g, l) in n.last.iter().enumerate() {
                if l.load(Ordering::SeqCst) > at {
                    late.push((r, g));
                }
            }
        }
        stop.store(true, Ordering::SeqCst);
        for h in writers {
            h.join().unwrap();
        }
        assert!(
            late.is_empty(),
            "track_write finished after the DELETE returned (round, frame): {late:?}"
        );
    });
}

/// Ranges over the same frame numbers in the two address spaces, each with list updates in
/// between, run at the same time and all complete with the counts back to zero.
#[test]
fn review9_ranges_in_two_address_spaces_are_independent() {
    watchdog(120, || {
        let t = PageTracker::new(TrackerConfig::default(), Arc::new(NoEnforcement));
        let n = 3 * 65_536;
        for a in [AsId::NORMAL, AsId::SMM] {
            t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), n).in_address_space(a))
                .unwrap();
        }
        t.enable_write_tracking().unwrap();
        let smm = {
            let t = t.clone();
            std::thread::spawn(move || {
                for _ in 0..20 {
                    t.add_range(AsId::SMM, Gfn(0), n).unwrap();
                    t.remove_range(AsId::SMM, Gfn(0), n).unwrap();
                }
            })
        };
        for _ in 0..20 {
            t.add_range(AsId::NORMAL, Gfn(0), n).unwrap();
            t.add_gfns(AsId::NORMAL, &[Gfn(1), Gfn(n - 1)]).unwrap();
            t.remove_gfns(AsId::NORMAL, &[Gfn(1), Gfn(n - 1)]).unwrap();
            t.remove_range(AsId::NORMAL, Gfn(0), n).unwrap();
        }
        smm.join().unwrap();
        t.set_memory_region(MemoryRegion::delete(AsId::SMM, SlotId(0)))
            .unwrap();
        assert_eq!(t.track_count(AsId::NORMAL, Gfn(1)), Ok(0));
    });
}

/// Runs `f` on its own thread and says whether it finished within `secs` (a hang is left
/// behind, blocked, so that the test can report it instead of hanging the binary).
fn finishes_within(secs: u64, f: impl FnOnce() + Send + 'static) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .is_ok()
}

/// Liveness of the reservation waiters: two threads back-to-back run overlapping range
/// updates over a slot (its reservation is free only between two calls, and it is notified
/// after it can take `mmu_lock` straight back). Another thread's single-frame updates inside
/// the range (`lists`) or DELETE/CREATE cycles of the slot (otherwise) must still make
/// progress: they wait on `mmu_cv` with no fairness, so each is woken only to find the next
/// reservation. 100 list updates or 10 DELETEs must finish while the stream runs (the bound
/// only turns starvation into a failure: each needs a free moment, not a fast one).
fn waiters_not_starved_by_back_to_back_ranges(lists: bool) {
    let n: u64 = 1 << 17;
    let t = tracker_with_slot(n, Arc::new(NoEnforcement));
    let stop = Arc::new(AtomicBool::new(false));
    let rangers: Vec<_> = (0..2)
        .map(|_| {
            let (t, stop) = (t.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut ops = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    // Fails (UnknownGfn) while the slot is deleted; that is fine.
                    // A DELETE/CREATE in between leaves fresh counts: NotTracked.
                    if t.add_range(AsId::NORMAL, Gfn(0), n).is_ok() {
                        let r = t.remove_range(AsId::NORMAL, Gfn(0), n);
                        assert!(
                            matches!(
                                r,
                                Ok(()) | Err(Error::NotTracked { .. } | Error::UnknownGfn { .. })
                            ),
                            "{r:?}"
                        );
                    }
                    ops += 1;
                }
                ops
            })
        })
        .collect();
    // Start once a range update is under way.
    while !t.is_write_tracked(AsId::NORMAL, Gfn(0)) {
        std::thread::yield_now();
    }
    let victim = {
        let t = t.clone();
        move || {
            for _ in 0..if lists { 100 } else { 10 } {
                if lists {
                    t.add_gfn(Gfn(n / 2)).unwrap();
                    t.remove_gfn(Gfn(n / 2)).unwrap();
                } else {
                    t.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(0)))
                        .unwrap();
                    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), n))
                        .unwrap();
                }
            }
        }
    };
    let done = finishes_within(60, victim);
    stop.store(true, Ordering::SeqCst);
    let ops: u64 = rangers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(
        done,
        "starved: the {} did not finish in 60 s while {ops} back-to-back range updates ran",
        if lists {
            "single-frame updates"
        } else {
            "DELETE/CREATE cycles"
        }
    );
}

#[test]
fn review9_list_updates_not_starved_by_back_to_back_ranges() {
    waiters_not_starved_by_back_to_back_ranges(true);
}

#[test]
fn review9_delete_not_starved_by_back_to_back_ranges() {
    waiters_not_starved_by_back_to_back_ranges(false);
}

/// A slot that ends at the top of the gfn space (2^52): ranges up to and past its end, the
/// overlap test of a reservation ending at `u64::MAX`, and single-frame updates at the last
/// frame all behave, and a failed one releases its frames.
#[test]
fn review9_ranges_at_the_top_of_the_gfn_space() {
    watchdog(120, || {
        let n = 3 * 65_536 + 5;
        let base = GFN_LIMIT - n;
        let t = PageTracker::new(TrackerConfig::default(), Arc::new(NoEnforcement));
        t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(base), n))
            .unwrap();
        t.enable_write_tracking().unwrap();
        let top_level = t.max_mapping_level(AsId::NORMAL, Gfn(GFN_LIMIT - 1));
        t.add_range(AsId::NORMAL, Gfn(base), n).unwrap();
        assert_eq!(
            t.max_mapping_level(AsId::NORMAL, Gfn(GFN_LIMIT - 1)),
            Ok(PageLevel::K4)
        );
        assert!(t.add_range(AsId::NORMAL, Gfn(base), n + 1).is_err());
        assert!(t.add_range(AsId::NORMAL, Gfn(base + 1), u64::MAX).is_err());
        assert!(t.add_gfn(Gfn(u64::MAX)).is_err());
        t.add_gfn(Gfn(GFN_LIMIT - 1)).unwrap();
        assert_eq!(t.track_count(AsId::NORMAL, Gfn(GFN_LIMIT - 1)), Ok(2));
        assert_eq!(t.track_count(AsId::NORMAL, Gfn(base)), Ok(1));
        t.remove_gfn(Gfn(GFN_LIMIT - 1)).unwrap();
        assert!(t.remove_range(AsId::NORMAL, Gfn(base), n + 7).is_err());
        t.remove_range(AsId::NORMAL, Gfn(base), n).unwrap();
        assert_eq!(
            t.max_mapping_level(AsId::NORMAL, Gfn(GFN_LIMIT - 1)),
            top_level
        );
        for g in [base, base + 65_536, GFN_LIMIT - 1] {
            assert_eq!(t.track_count(AsId::NORMAL, Gfn(g)), Ok(0));
        }
        t.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(0)))
            .unwrap();
    });
}
