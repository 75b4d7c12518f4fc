//! Hostile tests of the review of issue 9 that need no notifiers (they also run in the
//! `--no-default-features` build): failed calls change nothing, with duplicates, ranges across
//! slots, huge-page levels and KernelCompat's B18. All held.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns: a failed lock or set-up is a test failure"
)]

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use pagetrack::{
    AsId, BackendError, Enforcement, Error, FrameRun, Gfn, LimitMode, MemoryRegion, PageLevel,
    PageTracker, SlotId, TrackerConfig,
};

// ---------------------------------------------------------------------------------------------
// Failed calls change nothing: batches with duplicates, huge-page counts, KernelCompat.

struct FailingBackend {
    fail: AtomicBool,
    calls: Mutex<Vec<(bool, Vec<FrameRun>)>>,
}

impl Enforcement for FailingBackend {
    fn protect(&self, runs: &[FrameRun]) -> Result<(), BackendError> {
        self.calls.lock().unwrap().push((true, runs.to_vec()));
        if self.fail.load(Ordering::SeqCst) {
            return Err(BackendError::msg("no"));
        }
        Ok(())
    }
    fn unprotect(&self, runs: &[FrameRun]) -> Result<(), BackendError> {
        self.calls.lock().unwrap().push((false, runs.to_vec()));
        if self.fail.load(Ordering::SeqCst) {
            return Err(BackendError::msg("no"));
        }
        Ok(())
    }
}

fn state(t: &PageTracker, frames: &[u64]) -> Vec<(u16, PageLevel)> {
    frames
        .iter()
        .map(|&g| {
            (
                t.track_count(AsId::NORMAL, Gfn(g)).unwrap(),
                t.max_mapping_level(AsId::NORMAL, Gfn(g)).unwrap(),
            )
        })
        .collect()
}

/// Held: every failing batch, range and backend call leaves counts and huge-page levels as
/// they were, in both limit modes; duplicates count as several steps.
#[test]
fn review_failed_batches_change_nothing_in_both_modes() {
    for mode in [LimitMode::Strict, LimitMode::KernelCompat] {
        let backend = Arc::new(FailingBackend {
            fail: AtomicBool::new(false),
            calls: Mutex::new(Vec::new()),
        });
        let t = PageTracker::new(TrackerConfig::default().with_limits(mode), backend.clone());
        // Two slots, 2 MiB aligned, adjacent, then a gap.
        t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 512))
            .unwrap();
        t.set_memory_region(MemoryRegion::new(SlotId(1), Gfn(512), 512))
            .unwrap();
        t.enable_write_tracking().unwrap();
        let probe = [0u64, 1, 511, 512, 513, 1023];
        let s0 = state(&t, &probe);
        assert_eq!(s0[0].1, PageLevel::M2);
        // Unknown frame anywhere in the batch.
        assert!(
            t.add_gfns(AsId::NORMAL, &[Gfn(1), Gfn(1), Gfn(5000)])
                .is_err()
        );
        // Range into the gap.
        assert!(t.add_range(AsId::NORMAL, Gfn(1000), 100).is_err());
        // Backend failure.
        backend.fail.store(true, Ordering::SeqCst);
        assert!(matches!(
            t.add_gfns(AsId::NORMAL, &[Gfn(1), Gfn(513), Gfn(1)]),
            Err(Error::Backend { .. })
        ));
        assert!(t.add_range(AsId::NORMAL, Gfn(500), 24).is_err());
        assert_eq!(state(&t, &probe), s0, "{mode:?}: failed adds changed state");
        backend.fail.store(false, Ordering::SeqCst);
        // A range crossing the slot boundary: one backend call.
        let before = backend.calls.lock().unwrap().len();
        t.add_range(AsId::NORMAL, Gfn(510), 4).unwrap();
        assert_eq!(backend.calls.lock().unwrap().len(), before + 1);
        t.add_gfns(AsId::NORMAL, &[Gfn(1), Gfn(1)]).unwrap();
        let s1 = state(&t, &probe);
        assert_eq!(s1[1], (2, PageLevel::K4));
        assert_eq!(s1[4], (1, PageLevel::K4));
        assert_eq!(s1[5], (0, PageLevel::K4)); // 1023 untracked, its 2M region is not
        if mode == LimitMode::Strict {
            // Removing three tracks of a frame that has two.
            assert!(matches!(
                t.remove_gfns(AsId::NORMAL, &[Gfn(1), Gfn(511), Gfn(1), Gfn(1)]),
                Err(Error::NotTracked { .. })
            ));
            assert_eq!(state(&t, &probe), s1);
        }
        backend.fail.store(true, Ordering::SeqCst);
        assert!(t.remove_range(AsId::NORMAL, Gfn(510), 4).is_err());
        assert!(t.remove_gfns(AsId::NORMAL, &[Gfn(1), Gfn(1)]).is_err());
        assert_eq!(
            state(&t, &probe),
            s1,
            "{mode:?}: failed removes changed state"
        );
        // While failing, writes to the frames are still delivered (they stay tracked).
        backend.fail.store(false, Ordering::SeqCst);
        t.remove_range(AsId::NORMAL, Gfn(510), 4).unwrap();
        t.remove_gfns(AsId::NORMAL, &[Gfn(1), Gfn(1)]).unwrap();
        assert_eq!(
            state(&t, &probe),
            s0,
            "{mode:?}: balanced ops do not restore"
        );
    }
}

/// Held: KernelCompat's B18 with a batch of duplicates: 70,000 adds of one frame keep the
/// count at 65535 and the huge-page count at +70,000; the backend is told once each way; the
/// 65,535th remove untracks; 70,000 removes restore the huge-page level.
#[test]
fn review_kernel_compat_duplicates_past_the_limit() {
    let backend = Arc::new(FailingBackend {
        fail: AtomicBool::new(false),
        calls: Mutex::new(Vec::new()),
    });
    let t = PageTracker::new(
        TrackerConfig::default().with_limits(LimitMode::KernelCompat),
        backend.clone(),
    );
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 1024))
        .unwrap();
    t.enable_write_tracking().unwrap();
    let many = vec![Gfn(7); 70_000];
    t.add_gfns(AsId::NORMAL, &many).unwrap();
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(7)).unwrap(), u16::MAX);
    assert_eq!(t.stats().limit_warnings, 70_000 - 65_535);
    assert_eq!(
        t.max_mapping_level(AsId::NORMAL, Gfn(7)).unwrap(),
        PageLevel::K4
    );
    t.remove_gfns(AsId::NORMAL, &many[..65_534]).unwrap();
    assert!(t.is_write_tracked(AsId::NORMAL, Gfn(7)));
    t.remove_gfn(Gfn(7)).unwrap();
    assert!(!t.is_write_tracked(AsId::NORMAL, Gfn(7)));
    t.remove_gfns(AsId::NORMAL, &many[..70_000 - 65_535])
        .unwrap();
    assert_eq!(
        t.max_mapping_level(AsId::NORMAL, Gfn(7)).unwrap(),
        PageLevel::M2
    );
    let calls = backend.calls.lock().unwrap();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls[0].0 && !calls[1].0);
}
