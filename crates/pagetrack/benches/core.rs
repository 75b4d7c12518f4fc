//! Criterion benchmarks of the core's hot paths: "is tracked?", gfn → slot lookup, add+remove,
//! and write dispatch (tracked, to 1/8/64 notifiers; untracked, with tracking off and on).
//! Results and targets: `docs/PERFORMANCE.md`.

use std::hint::black_box;
use std::sync::Arc;
#[cfg(feature = "notifiers")]
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use pagetrack::{
    AsId, Gfn, Gpa, MemoryRegion, NoEnforcement, PageTracker, SlotId, Source, TrackerConfig,
    WriteEvent,
};
#[cfg(feature = "notifiers")]
use pagetrack::{NotifierClass, TrackNotifier};

/// 1 GiB of guest RAM in one slot, tracking enabled, frame 5 tracked.
fn one_slot_tracker(enable: bool) -> Arc<PageTracker> {
    let t = PageTracker::new(TrackerConfig::default(), Arc::new(NoEnforcement));
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 1 << 18))
        .expect("fresh tracker");
    if enable {
        t.enable_write_tracking().expect("small allocation");
        t.add_gfn(Gfn(5)).expect("frame in slot");
    }
    t
}

fn is_write_tracked(c: &mut Criterion) {
    let t = one_slot_tracker(true);
    let snap = t.memslots();
    let mut reader = t.reader();
    let mut g = c.benchmark_group("is_write_tracked");
    for (name, gfn) in [("untracked", Gfn(7)), ("tracked", Gfn(5))] {
        g.bench_function(BenchmarkId::new("tracker", name), |b| {
            b.iter(|| t.is_write_tracked(black_box(AsId::NORMAL), black_box(gfn)))
        });
        g.bench_function(BenchmarkId::new("snapshot", name), |b| {
            b.iter(|| snap.is_write_tracked(black_box(AsId::NORMAL), black_box(gfn)))
        });
        g.bench_function(BenchmarkId::new("reader", name), |b| {
            b.iter(|| reader.is_write_tracked(black_box(AsId::NORMAL), black_box(gfn)))
        });
        // The kernel's shape: the backend already holds the slot.
        let slot = snap.slot(AsId::NORMAL, gfn).expect("frame in slot");
        g.bench_function(BenchmarkId::new("slot", name), |b| {
            b.iter(|| black_box(slot).is_write_tracked(black_box(gfn)))
        });
    }
    g.finish();
}

/// `n` one-page slots, each followed by a one-page hole (so lookups also miss).
fn many_slots(n: u16) -> Arc<PageTracker> {
    let t = PageTracker::new(TrackerConfig::default(), Arc::new(NoEnforcement));
    for i in 0..n {
        t.set_memory_region(MemoryRegion::new(SlotId(i), Gfn(u64::from(i) * 2), 1))
            .expect("valid slot");
    }
    t
}

fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("region_of");
    for n in [1u16, 512, 32_764] {
        let t = many_slots(n);
        let snap = t.memslots();
        // A fixed pseudo-random walk over the slots' frames (and the holes between them).
        let span = u64::from(n) * 2;
        let gfns: Vec<Gfn> = (0..4096u64)
            .map(|i| Gfn(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) % span))
            .collect();
        g.bench_with_input(BenchmarkId::from_parameter(n), &gfns, |b, gfns| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 1) & 4095;
                snap.region_of(AsId::NORMAL, black_box(gfns[i]))
            })
        });
    }
    g.finish();
}

fn add_remove(c: &mut Criterion) {
    let t = one_slot_tracker(true);
    c.bench_function("add_remove_one_frame", |b| {
        b.iter(|| {
            t.add_gfn(black_box(Gfn(9))).expect("frame in slot");
            t.remove_gfn(black_box(Gfn(9))).expect("just added");
        })
    });
    // The whole 1 GiB slot (2^18 frames) as one range: mmu_lock hold time per frame.
    c.bench_function("add_remove_range_2_pow_18_frames", |b| {
        b.iter(|| {
            t.add_range(AsId::NORMAL, Gfn(0), black_box(1 << 18))
                .expect("frames in slot");
            t.remove_range(AsId::NORMAL, Gfn(0), black_box(1 << 18))
                .expect("just added");
        })
    });
}

/// Counts the writes it is told about.
#[cfg(feature = "notifiers")]
#[derive(Default)]
struct Count(AtomicU64);

#[cfg(feature = "notifiers")]
impl TrackNotifier for Count {
    fn track_write(&self, _: &WriteEvent<'_>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Tracked writes to frame 5, delivered to 1, 8 and 64 notifiers.
#[cfg(feature = "notifiers")]
fn dispatch_tracked(c: &mut Criterion) {
    let bytes = [0u8; 8];
    let mut g = c.benchmark_group("report_write_tracked");
    for n in [1usize, 8, 64] {
        let t = one_slot_tracker(true);
        let counter = Arc::new(Count::default());
        let handles: Vec<_> = (0..n)
            .map(|_| {
                t.register(counter.clone(), NotifierClass::Ordinary)
                    .expect("enabled")
            })
            .collect();
        let event = WriteEvent::new(Gpa(0x5008), &bytes, Source::Vcpu(0));
        g.bench_with_input(BenchmarkId::new("notifiers", n), &event, |b, e| {
            b.iter(|| t.report_write(black_box(e)))
        });
        drop(handles);
    }
    g.finish();
}

#[cfg(not(feature = "notifiers"))]
fn dispatch_tracked(_: &mut Criterion) {}

/// Writes to an untracked frame, with tracking disabled and enabled.
fn dispatch_untracked(c: &mut Criterion) {
    let bytes = [0u8; 8];
    let mut g = c.benchmark_group("report_write_untracked");
    for (name, enabled) in [("disabled", false), ("enabled", true)] {
        let t = one_slot_tracker(enabled);
        let event = WriteEvent::new(Gpa(0x9008), &bytes, Source::Vcpu(0));
        g.bench_with_input(BenchmarkId::new("tracker", name), &event, |b, e| {
            b.iter(|| t.report_write(black_box(e)))
        });
        let mut reader = t.reader();
        g.bench_with_input(BenchmarkId::new("reader", name), &event, |b, e| {
            b.iter(|| reader.report_write(black_box(e)))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    targets = is_write_tracked, lookup, add_remove, dispatch_tracked, dispatch_untracked
}
criterion_main!(benches);
