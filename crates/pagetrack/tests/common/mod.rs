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
