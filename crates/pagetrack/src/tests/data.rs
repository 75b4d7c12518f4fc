//! The data model and lazy allocation: B1, B2, B5–B13, K3, K5.

use super::support::{BackendCall, enabled_tracker, tracker};
use std::sync::Arc;

use crate::{
    AsId, Gfn, MemoryRegion, NoEnforcement, PageTracker, RegionFlags, SlotChange, SlotId,
    TrackerConfig,
};

/// B1, B2, K3: the count array is exactly 2 bytes per 4 KiB frame, in every address space.
#[test]
fn write_track_bytes_enabled_is_two_per_frame() {
    let (t, _) = tracker();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 4096))
        .unwrap();
    t.set_memory_region(
        MemoryRegion::new(SlotId(3), Gfn(0x10_0000), 77).in_address_space(AsId::SMM),
    )
    .unwrap();

    t.enable_write_tracking().unwrap();

    assert_eq!(t.write_track_bytes(), (4096 + 77) * 2);
}

/// B5, K5: before tracking is enabled no slot has a count array, and counts read as 0.
#[test]
fn write_track_bytes_before_enable_is_zero() {
    let (t, _) = tracker();

    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 4096))
        .unwrap();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 4096).in_address_space(AsId::SMM))
        .unwrap();

    assert!(!t.is_enabled());
    assert_eq!(t.write_track_bytes(), 0);
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(5)), Ok(0));
    assert!(!t.is_write_tracked(AsId::NORMAL, Gfn(5)));
}

/// B7, B12, K5: enabling allocates for every existing slot of every address space, after which
/// frames in each of them can be tracked.
#[test]
fn enable_existing_slots_all_address_spaces_get_counts() {
    let (t, _) = tracker();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 16))
        .unwrap();
    t.set_memory_region(MemoryRegion::new(SlotId(1), Gfn(100), 8))
        .unwrap();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(200), 4).in_address_space(AsId::SMM))
        .unwrap();

    t.enable_write_tracking().unwrap();

    assert!(t.is_enabled());
    assert_eq!(t.write_track_bytes(), (16 + 8 + 4) * 2);
    t.add_gfn(Gfn(3)).unwrap();
    t.add_gfns(AsId::NORMAL, &[Gfn(107)]).unwrap();
    t.add_gfns(AsId::SMM, &[Gfn(203)]).unwrap();
    assert!(t.is_write_tracked(AsId::NORMAL, Gfn(3)));
    assert!(t.is_write_tracked(AsId::NORMAL, Gfn(107)));
    assert!(t.is_write_tracked(AsId::SMM, Gfn(203)));
}

/// B7: an internal enable does not count as an external user, and enabling twice is a no-op.
#[test]
fn enable_write_tracking_internal_user_not_external_and_idempotent() {
    let (t, _) = enabled_tracker(8);
    let bytes = t.write_track_bytes();

    t.enable_write_tracking().unwrap();

    assert!(t.is_enabled());
    assert!(!t.external_tracking_enabled());
    assert!(!t.has_external_user());
    assert_eq!(t.write_track_bytes(), bytes);
}

/// B6: enablement is sticky: it survives the last unregistration and deleting every slot.
#[cfg(feature = "notifiers")]
#[test]
fn enabled_after_last_unregister_and_delete_stays_enabled() {
    let (t, _) = tracker();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 8))
        .unwrap();
    let h = t
        .register(super::support::Log::new(), crate::NotifierClass::Ordinary)
        .unwrap();

    drop(h);
    t.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(0)))
        .unwrap();

    assert!(t.is_enabled());
    assert!(t.external_tracking_enabled());
    assert!(!t.has_external_user());
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 8))
        .unwrap();
    assert_eq!(t.write_track_bytes(), 16);
    t.add_gfn(Gfn(1)).unwrap();
}

/// B8: a slot created before enabling has no array; B13: one created after gets it at creation.
#[test]
fn create_after_enable_slot_gets_counts_at_creation() {
    let (t, _) = tracker();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 10))
        .unwrap();
    assert_eq!(t.write_track_bytes(), 0);
    t.enable_write_tracking().unwrap();

    t.set_memory_region(MemoryRegion::new(SlotId(1), Gfn(64), 32))
        .unwrap();
    t.set_memory_region(MemoryRegion::new(SlotId(1), Gfn(64), 6).in_address_space(AsId::SMM))
        .unwrap();

    assert_eq!(t.write_track_bytes(), (10 + 32 + 6) * 2);
    t.add_gfn(Gfn(64 + 31)).unwrap();
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(95)), Ok(1));
}

/// B10, T10: FLAGS_ONLY keeps the same counts (and the same huge-page accounting).
#[test]
fn flags_only_tracked_frames_keep_counts() {
    let (t, _) = enabled_tracker(1024);
    t.add_gfns(AsId::NORMAL, &[Gfn(5), Gfn(5), Gfn(700)])
        .unwrap();
    let bytes = t.write_track_bytes();

    let change = t
        .set_memory_region(
            MemoryRegion::new(SlotId(0), Gfn(0), 1024).with_flags(RegionFlags::LOG_DIRTY_PAGES),
        )
        .unwrap();

    assert_eq!(change, SlotChange::FlagsOnly);
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(5)), Ok(2));
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(700)), Ok(1));
    assert_eq!(t.write_track_bytes(), bytes);
    assert_eq!(
        t.max_mapping_level(AsId::NORMAL, Gfn(5)),
        Ok(crate::PageLevel::K4)
    );
    // And the counts stay shared with the slot: removing works against the kept values.
    t.remove_gfns(AsId::NORMAL, &[Gfn(5), Gfn(5), Gfn(700)])
        .unwrap();
    assert_eq!(
        t.max_mapping_level(AsId::NORMAL, Gfn(5)),
        Ok(crate::PageLevel::M2)
    );
}

/// B11, T10: an allowed MOVE (no notifier) starts with zero counts; the old range is gone and
/// the backend hears that the old region went away.
#[test]
fn move_without_notifiers_counts_restart_at_zero() {
    let (t, b) = enabled_tracker(16);
    t.add_gfn(Gfn(3)).unwrap();
    let bytes = t.write_track_bytes();

    let change = t
        .set_memory_region(MemoryRegion::new(SlotId(0), Gfn(100), 16))
        .unwrap();

    assert_eq!(change, SlotChange::Move);
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(103)), Ok(0));
    assert!(!t.is_write_tracked(AsId::NORMAL, Gfn(103)));
    assert!(t.track_count(AsId::NORMAL, Gfn(3)).is_err());
    assert_eq!(t.write_track_bytes(), bytes);
    assert_eq!(
        b.calls().last(),
        Some(&BackendCall::RegionRemoved(MemoryRegion::new(
            SlotId(0),
            Gfn(0),
            16
        )))
    );
}

/// B9: DELETE frees the slot's counts; a slot re-created in the same place starts at zero.
#[test]
fn delete_then_recreate_counts_freed_and_zero() {
    let (t, _) = enabled_tracker(16);
    t.add_gfn(Gfn(3)).unwrap();

    t.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(0)))
        .unwrap();
    let after_delete = t.write_track_bytes();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 16))
        .unwrap();

    assert_eq!(after_delete, 0);
    assert_eq!(t.write_track_bytes(), 32);
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(3)), Ok(0));
}

/// Setting a region identical to the existing one is reported as unchanged and changes nothing.
#[test]
fn set_memory_region_identical_is_unchanged() {
    let (t, b) = enabled_tracker(16);
    t.add_gfn(Gfn(3)).unwrap();
    let before = super::support::capture(&t, &b);

    let change = t
        .set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 16))
        .unwrap();

    assert_eq!(change, SlotChange::Unchanged);
    assert_eq!(super::support::capture(&t, &b), before);
}

/// B19: a held `Memslots` snapshot answers queries without the tracker and keeps its view.
#[test]
fn memslots_snapshot_held_across_delete_keeps_view() {
    let (t, _) = enabled_tracker(16);
    t.add_gfn(Gfn(3)).unwrap();
    let snap = t.memslots();

    t.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(0)))
        .unwrap();

    assert!(snap.is_write_tracked(AsId::NORMAL, Gfn(3)));
    assert!(!snap.is_write_tracked(AsId::NORMAL, Gfn(4)));
    assert_eq!(snap.len(AsId::NORMAL), 1);
    assert!(t.memslots().is_empty());
    assert!(!t.is_write_tracked(AsId::NORMAL, Gfn(3)));
}

/// The gfn → slot lookup (a two-level search) agrees with a linear scan over 1000 slots of
/// varying sizes and gaps, for every frame of every slot edge and hole, in both address
/// spaces, including slot removal in the middle of an index block.
#[test]
fn region_of_many_slots_matches_linear_scan() {
    let (t, _) = tracker();
    let mut regions = Vec::new();
    let mut next = 3u64;
    // Slot ids in a scrambled order, so creation order differs from address order.
    for k in 0..1000u16 {
        let id = SlotId((k * 7) % 1000);
        let npages = 1 + u64::from(k % 5);
        let r = MemoryRegion::new(id, Gfn(next), npages);
        regions.push(r);
        next += npages + u64::from(k % 3);
    }
    for r in regions.iter().rev() {
        t.set_memory_region(*r).unwrap();
    }
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(1), 1).in_address_space(AsId::SMM))
        .unwrap();
    for gone in [64usize, 128, 500] {
        t.set_memory_region(MemoryRegion::delete(AsId::NORMAL, regions[gone].slot))
            .unwrap();
    }
    let mut expected = regions.clone();
    for gone in [500usize, 128, 64] {
        expected.remove(gone);
    }

    let snap = t.memslots();

    assert_eq!(snap.len(AsId::NORMAL), 997);
    for g in 0..next + 2 {
        let want = expected.iter().find(|r| r.contains(Gfn(g))).copied();
        assert_eq!(snap.region_of(AsId::NORMAL, Gfn(g)), want, "gfn {g}");
        assert_eq!(t.track_count(AsId::NORMAL, Gfn(g)).is_ok(), want.is_some());
    }
    assert_eq!(
        snap.region_of(AsId::SMM, Gfn(1)).map(|r| r.slot),
        Some(SlotId(0))
    );
    assert_eq!(snap.region_of(AsId::SMM, Gfn(3)), None);
    assert_eq!(snap.region_of(AsId(2), Gfn(3)), None);
}

/// A `TrackReader` keeps the snapshot it last used (with a deleted slot's arrays) until its
/// next call; `refresh` lets it go at once.
#[test]
fn reader_refresh_after_delete_releases_old_snapshot() {
    let t = PageTracker::new(TrackerConfig::default(), Arc::new(NoEnforcement));
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 1 << 16))
        .unwrap();
    t.enable_write_tracking().unwrap();
    let mut reader = t.reader();
    assert!(!reader.is_write_tracked(AsId::NORMAL, Gfn(1)));
    let old = Arc::downgrade(&t.memslots());

    t.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(0)))
        .unwrap();
    let held_before_refresh = old.upgrade().is_some();
    reader.refresh();

    assert!(
        held_before_refresh,
        "the reader's cache held the old snapshot"
    );
    assert!(old.upgrade().is_none());
}
