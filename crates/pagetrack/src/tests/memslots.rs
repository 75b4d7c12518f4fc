//! The memslot change protocol with notifiers: B46–B48, K4, K8, T10.

use std::sync::{Arc, Mutex, Weak};

use super::support::{
    BackendCall, Hook, Log, Seen, Sink, capture, enabled_tracker, tracker, within_watchdog,
};
use crate::{
    AsId, Error, Gfn, MemoryRegion, NotifierClass, PageTracker, RegionFlags, SlotChange, SlotId,
};

/// B46, T10, R3: DELETE delivers `track_remove_region` exactly once per notifier, with the
/// address space, base and size of the deleted slot, in dispatch order.
#[test]
fn delete_notifies_each_notifier_once_with_address_space() {
    let (t, _) = tracker();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 16))
        .unwrap();
    t.set_memory_region(MemoryRegion::new(SlotId(2), Gfn(64), 8).in_address_space(AsId::SMM))
        .unwrap();
    let sink = Sink::default();
    let _a = t
        .register(Log::shared(1, &sink), NotifierClass::Ordinary)
        .unwrap();
    let _b = t
        .register(Log::shared(2, &sink), NotifierClass::Coherence)
        .unwrap();

    let change = t
        .set_memory_region(MemoryRegion::delete(AsId::SMM, SlotId(2)))
        .unwrap();

    assert_eq!(change, SlotChange::Delete);
    let removed = Seen::RemoveRegion {
        as_id: AsId::SMM,
        base: Gfn(64),
        npages: 8,
    };
    assert_eq!(
        *sink.lock().unwrap(),
        vec![(2, removed.clone()), (1, removed)]
    );
}

/// B46, K8: the notification comes after the slot is unreachable: inside the callback the
/// frames are unknown, while lockless queries work (they take no lock the delete holds).
#[test]
fn delete_callback_sees_slot_already_gone() {
    let (t, _) = enabled_tracker(16);
    t.add_gfn(Gfn(3)).unwrap();
    let weak: Weak<PageTracker> = Arc::downgrade(&t);
    let inside = Arc::new(Mutex::new(None));
    let i = inside.clone();
    let hook = Hook::on_remove(move |_, base, _| {
        let t = weak.upgrade().unwrap();
        *i.lock().unwrap() = Some((
            t.is_write_tracked(AsId::NORMAL, Gfn(3)),
            t.track_count(AsId::NORMAL, base),
            t.memslots().len(AsId::NORMAL),
        ));
    });
    let _h = t.register(hook, NotifierClass::Ordinary).unwrap();

    let t2 = t.clone();
    within_watchdog(move || t2.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(0))))
        .unwrap();

    assert_eq!(
        *inside.lock().unwrap(),
        Some((
            false,
            Err(Error::UnknownGfn {
                as_id: AsId::NORMAL,
                gfn: Gfn(0)
            }),
            0
        ))
    );
}

/// B46: CREATE, FLAGS_ONLY and unchanged regions deliver no `track_remove_region`.
#[test]
fn create_and_flags_only_no_remove_region() {
    let (t, _) = tracker();
    let log = Log::new();
    let _h = t.register(log.clone(), NotifierClass::Ordinary).unwrap();

    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 16))
        .unwrap();
    t.set_memory_region(
        MemoryRegion::new(SlotId(0), Gfn(0), 16).with_flags(RegionFlags::LOG_DIRTY_PAGES),
    )
    .unwrap();
    t.set_memory_region(
        MemoryRegion::new(SlotId(0), Gfn(0), 16).with_flags(RegionFlags::LOG_DIRTY_PAGES),
    )
    .unwrap();

    assert!(log.seen().is_empty());
}

/// K4, B47: MOVE succeeds with no notifier, is refused (changing nothing) with one, and
/// succeeds again after the last unregistration.
#[test]
fn move_notifier_registered_refused_else_allowed() {
    let (t, b) = enabled_tracker(16);
    let first = t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(32), 16));
    let log = Log::new();
    let h = t.register(log.clone(), NotifierClass::Ordinary).unwrap();
    t.add_gfn(Gfn(33)).unwrap();
    let before = capture(&t, &b);

    let refused = t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(64), 16));
    let after_refusal = capture(&t, &b);
    drop(h);
    let again = t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(64), 16));

    assert_eq!(first, Ok(SlotChange::Move));
    assert_eq!(
        refused,
        Err(Error::MoveWithNotifiers {
            as_id: AsId::NORMAL,
            slot: SlotId(0)
        })
    );
    assert_eq!(after_refusal, before);
    assert!(log.seen().is_empty());
    assert_eq!(again, Ok(SlotChange::Move));
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(65)), Ok(0));
}

/// K8: a failing DELETE (unknown slot), and every other failing change, delivers nothing and
/// calls nothing on the backend.
#[test]
fn delete_unknown_slot_delivers_nothing() {
    let (t, b) = enabled_tracker(16);
    let log = Log::new();
    let _h = t.register(log.clone(), NotifierClass::Ordinary).unwrap();
    let before = capture(&t, &b);

    let unknown = t.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(9)));
    let unknown_smm = t.set_memory_region(MemoryRegion::delete(AsId::SMM, SlotId(0)));
    let bad_as = t.set_memory_region(MemoryRegion::delete(AsId(2), SlotId(0)));

    assert_eq!(
        unknown,
        Err(Error::UnknownSlot {
            as_id: AsId::NORMAL,
            slot: SlotId(9)
        })
    );
    assert_eq!(
        unknown_smm,
        Err(Error::UnknownSlot {
            as_id: AsId::SMM,
            slot: SlotId(0)
        })
    );
    assert!(matches!(bad_as, Err(Error::InvalidAddressSpace { .. })));
    assert!(log.seen().is_empty());
    assert_eq!(capture(&t, &b), before);
}

/// DELETE and MOVE tell the backend that the old region's protection is gone; CREATE and
/// FLAGS_ONLY do not.
#[test]
fn delete_and_move_backend_hears_region_removed() {
    let (t, b) = tracker();
    let r0 = MemoryRegion::new(SlotId(0), Gfn(0), 16);
    let r1 = MemoryRegion::new(SlotId(1), Gfn(100), 4);

    t.set_memory_region(r0).unwrap();
    t.set_memory_region(r1).unwrap();
    t.set_memory_region(r1.with_flags(RegionFlags::LOG_DIRTY_PAGES))
        .unwrap();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(50), 16))
        .unwrap();
    t.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(1)))
        .unwrap();

    assert_eq!(
        b.calls(),
        vec![
            BackendCall::RegionRemoved(r0),
            BackendCall::RegionRemoved(r1.with_flags(RegionFlags::LOG_DIRTY_PAGES)),
        ]
    );
}

/// T10: a slot deleted while its frames are tracked is gone, with its tracks; a new slot in its
/// place starts untracked and the notifier hears of the deletion once.
#[test]
fn delete_tracked_slot_tracks_discarded() {
    let (t, _) = enabled_tracker(16);
    let log = Log::new();
    let _h = t.register(log.clone(), NotifierClass::Ordinary).unwrap();
    t.add_gfns(AsId::NORMAL, &[Gfn(1), Gfn(1), Gfn(2)]).unwrap();

    t.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(0)))
        .unwrap();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 16))
        .unwrap();

    assert!(!t.is_write_tracked(AsId::NORMAL, Gfn(1)));
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(1)), Ok(0));
    assert_eq!(
        log.seen(),
        vec![Seen::RemoveRegion {
            as_id: AsId::NORMAL,
            base: Gfn(0),
            npages: 16
        }]
    );
}

/// A `track_remove_region` callback may not change memslots (it would deadlock): it gets
/// `InCallback`, and the nested change does not happen.
#[test]
fn set_memory_region_inside_remove_region_is_in_callback() {
    let (t, _) = enabled_tracker(16);
    let weak: Weak<PageTracker> = Arc::downgrade(&t);
    let nested = Arc::new(Mutex::new(None));
    let n = nested.clone();
    let hook = Hook::on_remove(move |_, _, _| {
        let t = weak.upgrade().unwrap();
        *n.lock().unwrap() = Some(t.set_memory_region(MemoryRegion::new(SlotId(7), Gfn(500), 1)));
    });
    let _h = t.register(hook, NotifierClass::Ordinary).unwrap();

    let t2 = t.clone();
    within_watchdog(move || t2.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(0))))
        .unwrap();

    assert_eq!(
        *nested.lock().unwrap(),
        Some(Err(Error::InCallback {
            op: "set_memory_region"
        }))
    );
    assert!(t.memslots().is_empty());
}
