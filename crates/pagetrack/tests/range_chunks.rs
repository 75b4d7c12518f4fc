//! Item 9 of the concurrency review, the lock half: a large range update holds `mmu_lock` for
//! one bounded chunk at a time (it used to hold it for the whole call, about 1 s per 2^24
//! frames), while its frames stay reserved: overlapping updates and a DELETE of its slot wait
//! for it, and it is still all or nothing.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns: a failed lock or set-up is a test failure"
)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::{tracker_with_slot, watchdog};
use pagetrack::{
    AsId, BackendError, Enforcement, Error, FrameRun, Gfn, MemoryRegion, NoEnforcement, PageLevel,
    SlotId,
};

const BIG: u64 = 1 << 24;

/// Another thread's single-frame add, outside the range, completes while a 2^24-frame
/// `add_range` is still applying its counts (its last frame not yet tracked). With one lock
/// hold for the whole range it never can. Each round is a race the other thread may lose (it
/// may be descheduled until the range is done), so a few rounds are tried.
#[test]
fn other_updates_complete_between_the_chunks_of_a_large_range() {
    watchdog(300, || {
        let t = tracker_with_slot(BIG + 16, Arc::new(NoEnforcement));
        let outside = Gfn(BIG + 1);
        let mut between = 0;
        for _round in 0..5 {
            let adder = {
                let t = t.clone();
                std::thread::spawn(move || t.add_range(AsId::NORMAL, Gfn(0), BIG))
            };
            while !t.is_write_tracked(AsId::NORMAL, Gfn(0)) {
                std::hint::spin_loop();
            }
            t.add_gfn(outside).unwrap();
            if !t.is_write_tracked(AsId::NORMAL, Gfn(BIG - 1)) {
                between += 1;
            }
            adder.join().unwrap().unwrap();
            assert!(t.is_write_tracked(AsId::NORMAL, Gfn(BIG - 1)));
            t.remove_range(AsId::NORMAL, Gfn(0), BIG).unwrap();
            t.remove_gfn(outside).unwrap();
        }
        assert!(
            between > 0,
            "no add completed inside a range update in 5 rounds"
        );
        assert_eq!(t.track_count(AsId::NORMAL, Gfn(7)).unwrap(), 0);
    });
}

/// What the backend was asked, in order.
#[derive(Debug, Clone, PartialEq)]
enum Call {
    Protect(Vec<FrameRun>),
    Unprotect(Vec<FrameRun>),
    Removed(SlotId),
}

#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<Call>>,
    fail_protect: AtomicBool,
}

impl Enforcement for Recorder {
    fn protect(&self, runs: &[FrameRun]) -> Result<(), BackendError> {
        if self.fail_protect.load(Ordering::SeqCst) {
            return Err(BackendError::msg("refused by the test"));
        }
        self.calls
            .lock()
            .unwrap()
            .push(Call::Protect(runs.to_vec()));
        Ok(())
    }

    fn unprotect(&self, runs: &[FrameRun]) -> Result<(), BackendError> {
        self.calls
            .lock()
            .unwrap()
            .push(Call::Unprotect(runs.to_vec()));
        Ok(())
    }

    fn region_removed(&self, region: &MemoryRegion) {
        self.calls.lock().unwrap().push(Call::Removed(region.slot));
    }
}

/// A DELETE of the slot, issued while a range update on it is half-way, waits for the update:
/// the update succeeds, and the backend hears of its protect before of the slot's removal.
#[test]
fn delete_of_a_slot_waits_for_a_range_update_on_it() {
    watchdog(300, || {
        let rec = Arc::new(Recorder::default());
        let t = tracker_with_slot(BIG, rec.clone());
        let adder = {
            let t = t.clone();
            std::thread::spawn(move || t.add_range(AsId::NORMAL, Gfn(0), BIG))
        };
        while !t.is_write_tracked(AsId::NORMAL, Gfn(0)) {
            std::hint::spin_loop();
        }
        t.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(0)))
            .unwrap();
        adder.join().unwrap().unwrap();
        let calls = rec.calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert!(
            matches!(&calls[0], Call::Protect(r) if r.len() == 1),
            "{calls:?}"
        );
        assert_eq!(calls[1], Call::Removed(SlotId(0)));
        assert!(matches!(
            t.track_count(AsId::NORMAL, Gfn(0)),
            Err(Error::UnknownGfn { .. })
        ));
    });
}

/// A range of many chunks whose protect fails changes nothing: every count and huge-page
/// level is as before, including frames tracked before and those at the chunk edges.
#[test]
fn a_failed_protect_after_many_chunks_changes_nothing() {
    let rec = Arc::new(Recorder::default());
    let n = 1u64 << 20;
    let t = tracker_with_slot(n + 4096, rec.clone());
    let first = Gfn(3);
    let pre = [Gfn(3), Gfn(65_538), Gfn(65_539), Gfn(600_000)];
    for g in pre {
        t.add_gfn(g).unwrap();
    }
    let levels = |t: &pagetrack::PageTracker| -> Vec<PageLevel> {
        (0..(n + 4096) >> 9)
            .map(|r| t.max_mapping_level(AsId::NORMAL, Gfn(r << 9)).unwrap())
            .collect()
    };
    let before = levels(&t);
    rec.fail_protect.store(true, Ordering::SeqCst);
    assert!(matches!(
        t.add_range(AsId::NORMAL, first, n),
        Err(Error::Backend { .. })
    ));
    for g in 0..n + 4096 {
        let want = u16::from(pre.contains(&Gfn(g)));
        assert_eq!(
            t.track_count(AsId::NORMAL, Gfn(g)).unwrap(),
            want,
            "frame {g}"
        );
    }
    assert_eq!(levels(&t), before);
    // And it works once the backend does: the overlapping single-frame updates still work too.
    rec.fail_protect.store(false, Ordering::SeqCst);
    t.add_range(AsId::NORMAL, first, n).unwrap();
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(65_538)).unwrap(), 2);
    t.remove_range(AsId::NORMAL, first, n).unwrap();
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(65_538)).unwrap(), 1);
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(600_000)).unwrap(), 1);
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(n + 2)).unwrap(), 0);
}
