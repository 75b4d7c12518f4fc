//! Tracker lifetime: K1, K5 (no leak, nothing left behind), B29.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::support::{Hook, Log, write_frame};
use crate::{
    AsId, Gfn, MemoryRegion, NoEnforcement, NotifierClass, PageTracker, SlotId, TrackerConfig,
};

/// K1, K5: many trackers created and dropped, with and without registrations (and with
/// dispatch and removal in between), leave nothing alive: the tracker, its notifiers and its
/// backend are all freed once the last handle is gone.
#[test]
fn drop_many_trackers_with_and_without_notifiers_no_leak() {
    let backend = Arc::new(NoEnforcement);
    let notifier = Log::new();

    for i in 0..200u64 {
        let t = PageTracker::new(TrackerConfig::default(), backend.clone());
        let weak = Arc::downgrade(&t);
        t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 64))
            .unwrap();
        let handles: Vec<_> = (0..i % 4)
            .map(|_| {
                t.register(notifier.clone(), NotifierClass::Ordinary)
                    .unwrap()
            })
            .collect();
        if i % 3 == 0 {
            t.enable_write_tracking().unwrap();
        }
        if t.is_enabled() {
            t.add_gfn(Gfn(i % 64)).unwrap();
            write_frame(&t, Gfn(i % 64), 8);
            t.remove_gfn(Gfn(i % 64)).unwrap();
        }

        drop(t);
        let alive_with_handles = weak.upgrade().is_some();
        drop(handles);

        assert_eq!(alive_with_handles, i % 4 != 0);
        assert!(weak.upgrade().is_none(), "tracker {i} leaked");
    }
    assert_eq!(Arc::strong_count(&notifier), 1);
    assert_eq!(Arc::strong_count(&backend), 1);
}

/// K1: a tracker dropped while a slot still exists (and notifiers were registered) never calls
/// `track_remove_region` (B29: no notification at teardown) and frees its notifiers.
#[test]
fn drop_tracker_with_slots_no_remove_region() {
    let removed = Arc::new(AtomicUsize::new(0));
    let r = removed.clone();
    let hook = Hook::on_remove(move |_, _, _| {
        r.fetch_add(1, Ordering::SeqCst);
    });
    let t = PageTracker::new(TrackerConfig::default(), Arc::new(NoEnforcement));
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 64).in_address_space(AsId::SMM))
        .unwrap();
    let h = t.register(hook.clone(), NotifierClass::Ordinary).unwrap();
    let weak = Arc::downgrade(&t);

    drop(h);
    drop(t);

    assert!(weak.upgrade().is_none());
    assert_eq!(removed.load(Ordering::SeqCst), 0);
    assert_eq!(Arc::strong_count(&hook), 1);
}
