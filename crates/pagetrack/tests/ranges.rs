//! Item 9 of the concurrency review: large ranges work in bounded memory. `add_range` used to
//! build 32 bytes of temporaries per frame (16 times the counts themselves) and aborted the
//! process at 1 TiB; now it scans the counts in place and hands the backend runs of frames.
//! A counting global allocator measures what each call allocates on the calling thread.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns: a failed lock or set-up is a test failure"
)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::{Arc, Mutex};

use pagetrack::{
    AsId, BackendError, Enforcement, Error, FrameRun, Gfn, MemoryRegion, PageTracker, SlotId,
    TrackerConfig,
};

/// Counts the bytes allocated by the current thread (frees are not subtracted: a temporary
/// counts in full).
struct Counting;

thread_local! {
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded to `System` with the same arguments; the bookkeeping only
// touches a thread-local `Cell` with a const initialiser and no destructor, which allocates
// nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.with(|a| a.set(a.get() + layout.size()));
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this `layout` (see `alloc`).
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Bytes the current thread allocates while running `f`.
fn allocated_by<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOCATED.with(Cell::get);
    let r = f();
    (r, ALLOCATED.with(Cell::get) - before)
}

/// Records the runs it is given.
#[derive(Default)]
struct Runs(Mutex<Vec<(bool, Vec<FrameRun>)>>);

impl Enforcement for Runs {
    fn protect(&self, runs: &[FrameRun]) -> Result<(), BackendError> {
        self.0.lock().unwrap().push((true, runs.to_vec()));
        Ok(())
    }
    fn unprotect(&self, runs: &[FrameRun]) -> Result<(), BackendError> {
        self.0.lock().unwrap().push((false, runs.to_vec()));
        Ok(())
    }
}

fn tracker(npages: u64) -> (Arc<PageTracker>, Arc<Runs>) {
    let b = Arc::new(Runs::default());
    let t = PageTracker::new(TrackerConfig::default(), b.clone());
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), npages))
        .unwrap();
    t.enable_write_tracking().unwrap();
    (t, b)
}

/// 2^24 frames (64 GiB of guest memory, 32 MiB of counts): add and remove allocate a few
/// hundred bytes, not 512 MiB, and the backend hears of one run each way.
#[test]
fn add_range_2_pow_24_frames_bounded_temporaries() {
    const N: u64 = 1 << 24;
    let (t, b) = tracker(N);

    let (r, add_bytes) = allocated_by(|| t.add_range(AsId::NORMAL, Gfn(0), N));
    r.unwrap();
    let (r, remove_bytes) = allocated_by(|| t.remove_range(AsId::NORMAL, Gfn(0), N));
    r.unwrap();

    assert!(add_bytes < 4096, "add_range allocated {add_bytes} bytes");
    assert!(
        remove_bytes < 4096,
        "remove_range allocated {remove_bytes} bytes"
    );
    let run = FrameRun {
        as_id: AsId::NORMAL,
        first: Gfn(0),
        count: N,
    };
    assert_eq!(
        *b.0.lock().unwrap(),
        vec![(true, vec![run]), (false, vec![run])]
    );
}

/// Frames already tracked inside the range split the backend's runs: only frames whose state
/// flips are named.
#[test]
fn add_range_over_tracked_frames_runs_skip_them() {
    let (t, b) = tracker(64);
    t.add_gfns(AsId::NORMAL, &[Gfn(10), Gfn(11), Gfn(20)])
        .unwrap();
    b.0.lock().unwrap().clear();

    t.add_range(AsId::NORMAL, Gfn(8), 16).unwrap();

    let run = |first, count| FrameRun {
        as_id: AsId::NORMAL,
        first: Gfn(first),
        count,
    };
    assert_eq!(
        *b.0.lock().unwrap(),
        vec![(true, vec![run(8, 2), run(12, 8), run(21, 3)])]
    );
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(10)), Ok(2));
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(9)), Ok(1));
}

/// 1 TiB (2^28 frames) in one slot: the range add and remove work (they used to abort the
/// process with "memory allocation failed"), in bounded extra memory.
#[test]
fn add_range_one_tib_works_in_bounded_memory() {
    const N: u64 = 1 << 28;
    let (t, b) = tracker(N);

    let (r, bytes) = allocated_by(|| t.add_range(AsId::NORMAL, Gfn(0), N));
    r.unwrap();
    assert!(bytes < 4096, "add_range allocated {bytes} bytes");
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(N - 1)), Ok(1));
    t.remove_range(AsId::NORMAL, Gfn(0), N).unwrap();
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(N - 1)), Ok(0));
    assert_eq!(b.0.lock().unwrap().len(), 2);
}

/// A range that is refused changes nothing, wherever in it the problem is: a frame past the
/// slot, a range that wraps, a frame at the count limit.
#[test]
fn add_range_refused_anywhere_changes_nothing() {
    let (t, b) = tracker(64);
    t.add_gfns(AsId::NORMAL, &vec![Gfn(40); 65535]).unwrap();
    b.0.lock().unwrap().clear();

    let past = t.add_range(AsId::NORMAL, Gfn(60), 8);
    let wraps = t.add_range(AsId::NORMAL, Gfn(1), u64::MAX);
    let limit = t.add_range(AsId::NORMAL, Gfn(0), 64);

    assert_eq!(
        past,
        Err(Error::UnknownGfn {
            as_id: AsId::NORMAL,
            gfn: Gfn(64)
        })
    );
    assert!(matches!(wraps, Err(Error::UnknownGfn { .. })));
    assert_eq!(
        limit,
        Err(Error::TrackCountOverflow {
            as_id: AsId::NORMAL,
            gfn: Gfn(40)
        })
    );
    assert!(b.0.lock().unwrap().is_empty());
    for g in (0..64).filter(|&g| g != 40) {
        assert_eq!(t.track_count(AsId::NORMAL, Gfn(g)), Ok(0));
    }
}
