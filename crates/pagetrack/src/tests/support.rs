//! Fakes and helpers shared by the unit tests: a recording (and optionally failing) backend,
//! recording notifiers, a full snapshot of the tracker's observable state, and a watchdog that
//! turns a deadlock into a test failure.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::{
    AsId, BackendError, Enforcement, FrameRun, Gfn, MemoryRegion, PageLevel, PageTracker, SlotId,
    Source, TrackerConfig, TrackerStats, WriteEvent,
};

#[cfg(feature = "notifiers")]
mod notify;
#[cfg(feature = "notifiers")]
pub(in crate::tests) use notify::*;

/// One call the core made on the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum BackendCall {
    Protect(Vec<(AsId, Gfn)>),
    Unprotect(Vec<(AsId, Gfn)>),
    RegionRemoved(MemoryRegion),
}

/// A backend that records every successful call and can be told to fail.
#[derive(Debug, Default)]
pub(super) struct Recorder {
    calls: Mutex<Vec<BackendCall>>,
    pub(super) fail_protect: AtomicBool,
    pub(super) fail_unprotect: AtomicBool,
    /// protect/unprotect calls including failed ones.
    pub(super) attempts: AtomicUsize,
    /// `before_unregister` calls.
    pub(super) unregisters: AtomicUsize,
}

impl Recorder {
    pub(super) fn calls(&self) -> Vec<BackendCall> {
        self.calls.lock().unwrap().clone()
    }

    fn record(&self, call: BackendCall) {
        self.calls.lock().unwrap().push(call);
    }
}

impl Enforcement for Recorder {
    fn protect(&self, frames: &[FrameRun]) -> Result<(), BackendError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if self.fail_protect.load(Ordering::SeqCst) {
            return Err(BackendError::msg("injected protect failure"));
        }
        self.record(BackendCall::Protect(FrameRun::pairs(frames).collect()));
        Ok(())
    }

    fn unprotect(&self, frames: &[FrameRun]) -> Result<(), BackendError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if self.fail_unprotect.load(Ordering::SeqCst) {
            return Err(BackendError::msg("injected unprotect failure"));
        }
        self.record(BackendCall::Unprotect(FrameRun::pairs(frames).collect()));
        Ok(())
    }

    fn region_removed(&self, region: &MemoryRegion) {
        self.record(BackendCall::RegionRemoved(*region));
    }

    fn before_unregister(&self) {
        self.unregisters.fetch_add(1, Ordering::SeqCst);
    }
}

/// A tracker with the default configuration and a recording backend.
pub(super) fn tracker() -> (Arc<PageTracker>, Arc<Recorder>) {
    tracker_with(TrackerConfig::default())
}

pub(super) fn tracker_with(config: TrackerConfig) -> (Arc<PageTracker>, Arc<Recorder>) {
    let backend = Arc::new(Recorder::default());
    let t = PageTracker::new(config, backend.clone());
    (t, backend)
}

/// A tracker with slot 0 = `[0, npages)` in address space 0, tracking enabled.
pub(super) fn enabled_tracker(npages: u64) -> (Arc<PageTracker>, Arc<Recorder>) {
    let (t, b) = tracker();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), npages))
        .unwrap();
    t.enable_write_tracking().unwrap();
    (t, b)
}

/// Everything a caller can observe about a tracker (and its recording backend).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct State {
    regions: Vec<Vec<MemoryRegion>>,
    /// Every frame of every slot: (address space, frame, count).
    counts: Vec<(AsId, Gfn, u16)>,
    /// Every 512th frame of every slot and its last frame: the largest allowed mapping.
    levels: Vec<(AsId, Gfn, PageLevel)>,
    tracked: Vec<(AsId, Gfn)>,
    notifiers: usize,
    has_external_user: bool,
    enabled: bool,
    external_enabled: bool,
    write_track_bytes: usize,
    stats: TrackerStats,
    backend: Vec<BackendCall>,
}

impl State {
    /// The same state with the statistics counters zeroed, for calls that legitimately count.
    pub(super) fn ignoring_stats(mut self) -> State {
        self.stats = TrackerStats::default();
        self
    }
}

/// Captures the full observable state.
pub(super) fn capture(t: &PageTracker, backend: &Recorder) -> State {
    let snap = t.memslots();
    let spaces = t.config().address_spaces;
    let mut state = State {
        regions: Vec::new(),
        counts: Vec::new(),
        levels: Vec::new(),
        tracked: Vec::new(),
        notifiers: t.notifier_count(),
        has_external_user: t.has_external_user(),
        enabled: t.is_enabled(),
        external_enabled: t.external_tracking_enabled(),
        write_track_bytes: t.write_track_bytes(),
        stats: t.stats(),
        backend: backend.calls(),
    };
    for a in 0..spaces {
        let as_id = AsId(a);
        let regions: Vec<MemoryRegion> = snap.regions(as_id).collect();
        for r in &regions {
            for g in r.base.0..r.end().0 {
                let gfn = Gfn(g);
                state
                    .counts
                    .push((as_id, gfn, t.track_count(as_id, gfn).unwrap()));
                if t.is_write_tracked(as_id, gfn) {
                    state.tracked.push((as_id, gfn));
                }
            }
            let probes = (r.base.0..r.end().0)
                .step_by(512)
                .chain(std::iter::once(r.end().0 - 1));
            for g in probes {
                let level = t.max_mapping_level(as_id, Gfn(g)).unwrap();
                state.levels.push((as_id, Gfn(g), level));
            }
        }
        state.regions.push(regions);
    }
    state
}

/// A device write of `len` bytes of `0xab` at the start of `gfn`.
pub(super) fn write_frame(t: &PageTracker, gfn: Gfn, len: usize) {
    let bytes = vec![0xab_u8; len];
    t.report_write(&WriteEvent::new(gfn.gpa(), &bytes, Source::Device));
}
