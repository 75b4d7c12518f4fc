//! Helpers shared by the threaded test binaries.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::sync::{Arc, mpsc};
use std::time::Duration;

use pagetrack::{Enforcement, Gfn, MemoryRegion, PageTracker, SlotId, TrackerConfig};

/// Runs `f` on its own thread; fails if it has not finished after `secs` seconds.
pub fn watchdog(secs: u64, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .expect("stress scenario deadlocked or panicked");
}

/// A bounded busy wait, to keep a callback running for a little while without sleeping.
#[cfg(feature = "notifiers")]
pub fn spin(iterations: u32) {
    for _ in 0..iterations {
        std::hint::spin_loop();
    }
}

pub fn tracker_with_slot(npages: u64, backend: Arc<dyn Enforcement>) -> Arc<PageTracker> {
    let t = PageTracker::new(TrackerConfig::default(), backend);
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), npages))
        .expect("fresh tracker");
    t.enable_write_tracking().expect("small allocation");
    t
}

/// A vCPU write of `len` (at most 64) bytes at `gpa`.
#[cfg(feature = "notifiers")]
pub fn write(t: &PageTracker, gpa: u64, len: usize) {
    use pagetrack::{Gpa, Source, WriteEvent};
    let bytes = [0x5a_u8; 64];
    t.report_write(&WriteEvent::new(Gpa(gpa), &bytes[..len], Source::Vcpu(1)));
}

/// Global order of callback completions and remove returns (one modification order).
#[cfg(feature = "notifiers")]
pub static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Records, per frame, the `SEQ` number taken when its latest `track_write` finished, after
/// spinning `spin` iterations (to keep callbacks in flight while removes race them).
#[cfg(feature = "notifiers")]
pub struct Finish {
    pub last: Vec<std::sync::atomic::AtomicU64>,
    pub hits: Vec<std::sync::atomic::AtomicUsize>,
    spin: u32,
}

#[cfg(feature = "notifiers")]
impl Finish {
    pub fn new(frames: u64, spin: u32) -> Arc<Finish> {
        use std::sync::atomic::{AtomicU64, AtomicUsize};
        Arc::new(Finish {
            last: (0..frames).map(|_| AtomicU64::new(0)).collect(),
            hits: (0..frames).map(|_| AtomicUsize::new(0)).collect(),
            spin,
        })
    }
}

#[cfg(feature = "notifiers")]
impl pagetrack::TrackNotifier for Finish {
    fn track_write(&self, e: &pagetrack::WriteEvent<'_>) {
        use std::sync::atomic::Ordering;
        spin(self.spin);
        let i = usize::try_from(e.gfn().0).expect("small frame");
        self.hits[i].fetch_add(1, Ordering::SeqCst);
        let done = SEQ.fetch_add(1, Ordering::SeqCst);
        self.last[i].fetch_max(done, Ordering::SeqCst);
    }
}
