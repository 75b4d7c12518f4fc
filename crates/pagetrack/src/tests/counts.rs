//! Counts, queries and limits: B3, B14–B23, B19, K7, T1, T2, T4.

use super::support::{BackendCall, enabled_tracker, tracker, tracker_with};
use crate::{AsId, Gfn, LimitMode, MemoryRegion, PageLevel, SlotId, TrackerConfig};

/// B3, B19: a frame is tracked exactly while its count is non-zero.
#[test]
fn is_write_tracked_count_nonzero_is_tracked() {
    let (t, _) = enabled_tracker(16);
    assert!(!t.is_write_tracked(AsId::NORMAL, Gfn(2)));

    t.add_gfn(Gfn(2)).unwrap();

    assert!(t.is_write_tracked(AsId::NORMAL, Gfn(2)));
    assert!(!t.is_write_tracked(AsId::NORMAL, Gfn(3)));
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(2)), Ok(1));
}

/// B19: frames outside every slot, and address spaces that do not exist, are not tracked.
#[test]
fn is_write_tracked_no_slot_or_bad_address_space_is_false() {
    let (t, _) = enabled_tracker(16);
    t.add_gfn(Gfn(2)).unwrap();

    assert!(!t.is_write_tracked(AsId::NORMAL, Gfn(16)));
    assert!(!t.is_write_tracked(AsId(7), Gfn(2)));
}

/// T1: n adds then n removes untrack; n adds then n - 1 removes keep the frame tracked.
#[test]
fn remove_after_n_adds_tracked_until_last() {
    let (t, _) = enabled_tracker(16);
    for _ in 0..5 {
        t.add_gfn(Gfn(7)).unwrap();
    }

    for _ in 0..4 {
        t.remove_gfn(Gfn(7)).unwrap();
    }
    let after_four = t.is_write_tracked(AsId::NORMAL, Gfn(7));
    t.remove_gfn(Gfn(7)).unwrap();

    assert!(after_four);
    assert!(!t.is_write_tracked(AsId::NORMAL, Gfn(7)));
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(7)), Ok(0));
}

/// B22: re-adding a tracked frame increments the count and asks the backend for nothing.
#[test]
fn add_already_tracked_increments_without_backend_call() {
    let (t, b) = enabled_tracker(16);
    t.add_gfn(Gfn(7)).unwrap();
    let calls = b.calls();

    t.add_gfn(Gfn(7)).unwrap();

    assert_eq!(t.track_count(AsId::NORMAL, Gfn(7)), Ok(2));
    assert_eq!(b.calls(), calls);
}

/// T4: protect runs on 0 → 1 only and unprotect on 1 → 0 only, once per frame per batch.
#[test]
fn add_remove_backend_called_on_transitions_only() {
    let (t, b) = enabled_tracker(16);
    let n = |g| (AsId::NORMAL, Gfn(g));

    t.add_gfn(Gfn(1)).unwrap();
    t.add_gfn(Gfn(1)).unwrap();
    t.add_gfns(AsId::NORMAL, &[Gfn(2), Gfn(1), Gfn(2), Gfn(3)])
        .unwrap();
    t.remove_gfn(Gfn(1)).unwrap();
    t.remove_gfns(AsId::NORMAL, &[Gfn(1), Gfn(2), Gfn(3)])
        .unwrap();
    t.remove_gfns(AsId::NORMAL, &[Gfn(1), Gfn(2)]).unwrap();

    assert_eq!(
        b.calls(),
        vec![
            BackendCall::Protect(vec![n(1)]),
            BackendCall::Protect(vec![n(2), n(3)]),
            BackendCall::Unprotect(vec![n(3)]),
            BackendCall::Unprotect(vec![n(1), n(2)]),
        ]
    );
}

/// B23: `add_gfn`/`remove_gfn` look in address space 0 only; the `AsId` forms reach SMM.
#[test]
fn add_gfn_frame_only_in_smm_is_unknown() {
    let (t, b) = tracker();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(50), 4).in_address_space(AsId::SMM))
        .unwrap();
    t.enable_write_tracking().unwrap();

    let plain = t.add_gfn(Gfn(51));
    let smm = t.add_gfns(AsId::SMM, &[Gfn(51)]);

    assert_eq!(
        plain,
        Err(crate::Error::UnknownGfn {
            as_id: AsId::NORMAL,
            gfn: Gfn(51)
        })
    );
    assert_eq!(smm, Ok(()));
    assert_eq!(t.track_count(AsId::SMM, Gfn(51)), Ok(1));
    assert_eq!(
        b.calls(),
        vec![BackendCall::Protect(vec![(AsId::SMM, Gfn(51))])]
    );
}

/// Item 8 of the concurrency review (K7 resolved per address space): a frame is tracked in the
/// address space whose count holds it, and only there, so the query and the backend's
/// transitions (told per address space) always agree. The kernel's K7 cross-address-space
/// answer is not reproduced: a backend that protects only address space 0 would have seen a
/// frame "tracked" in address space 1 with no enforcement there. A frame in an address space
/// without a slot is never tracked (B19).
#[test]
fn is_write_tracked_per_address_space_agrees_with_backend() {
    let (t, b) = tracker();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 64))
        .unwrap();
    t.set_memory_region(MemoryRegion::new(SlotId(5), Gfn(32), 64).in_address_space(AsId::SMM))
        .unwrap();
    t.enable_write_tracking().unwrap();

    t.add_gfn(Gfn(40)).unwrap();
    t.add_gfns(AsId::SMM, &[Gfn(90)]).unwrap();

    assert!(t.is_write_tracked(AsId::NORMAL, Gfn(40)));
    assert!(!t.is_write_tracked(AsId::SMM, Gfn(40)));
    assert!(!t.memslots().is_write_tracked(AsId::SMM, Gfn(40)));
    assert!(t.is_write_tracked(AsId::SMM, Gfn(90)));
    // No slot of address space 0 holds frame 90.
    assert!(!t.is_write_tracked(AsId::NORMAL, Gfn(90)));
    assert_eq!(
        b.calls(),
        vec![
            BackendCall::Protect(vec![(AsId::NORMAL, Gfn(40))]),
            BackendCall::Protect(vec![(AsId::SMM, Gfn(90))]),
        ]
    );
    // Tracking the frame in the other address space too is an explicit, separate track.
    t.add_gfns(AsId::SMM, &[Gfn(40)]).unwrap();
    assert!(t.is_write_tracked(AsId::SMM, Gfn(40)));
    t.remove_gfn(Gfn(40)).unwrap();
    assert!(!t.is_write_tracked(AsId::NORMAL, Gfn(40)));
    assert!(t.is_write_tracked(AsId::SMM, Gfn(40)));
}

/// K7 applies to the two x86 address spaces only: with one address space, address space 1
/// does not exist and reports nothing.
#[test]
fn is_write_tracked_single_address_space_no_cross_check() {
    let (t, _) = tracker_with(TrackerConfig::default().with_address_spaces(1));
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 8))
        .unwrap();
    t.enable_write_tracking().unwrap();

    t.add_gfn(Gfn(1)).unwrap();

    assert!(t.is_write_tracked(AsId::NORMAL, Gfn(1)));
    assert!(!t.is_write_tracked(AsId::SMM, Gfn(1)));
}

/// Batches and ranges: duplicates add several references; ranges cover every frame.
#[test]
fn add_range_remove_range_every_frame_counted() {
    let (t, _) = enabled_tracker(16);

    t.add_range(AsId::NORMAL, Gfn(4), 4).unwrap();
    t.add_gfns(AsId::NORMAL, &[Gfn(5), Gfn(5)]).unwrap();
    t.remove_range(AsId::NORMAL, Gfn(4), 4).unwrap();

    let counts: Vec<u16> = (3..9)
        .map(|g| t.track_count(AsId::NORMAL, Gfn(g)).unwrap())
        .collect();
    assert_eq!(counts, vec![0, 0, 2, 0, 0, 0]);
}

/// An empty batch or range succeeds and changes nothing (once tracking is enabled).
#[test]
fn add_gfns_empty_batch_is_noop() {
    let (t, b) = enabled_tracker(16);
    let before = super::support::capture(&t, &b);

    t.add_gfns(AsId::NORMAL, &[]).unwrap();
    t.remove_range(AsId::NORMAL, Gfn(0), 0).unwrap();

    assert_eq!(super::support::capture(&t, &b), before);
}

/// T2, R1: in Strict mode the 65536th add is refused, 65535 stays, and nothing else happens.
#[test]
fn b18_add_at_max_strict_errors_and_changes_nothing() {
    let (t, b) = enabled_tracker(1024);
    t.add_gfns(AsId::NORMAL, &vec![Gfn(3); 65535]).unwrap();
    let before = super::support::capture(&t, &b);

    let err = t.add_gfn(Gfn(3));

    assert_eq!(
        err,
        Err(crate::Error::TrackCountOverflow {
            as_id: AsId::NORMAL,
            gfn: Gfn(3)
        })
    );
    assert_eq!(super::support::capture(&t, &b), before);
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(3)), Ok(65535));
    assert_eq!(t.stats().limit_warnings, 0);
}

/// B18, KernelCompat: add at 65535 succeeds, keeps the count, still disallows huge pages; the
/// reference is "lost": 65535 removes untrack the frame while huge pages stay disallowed, and the
/// final (underflowing) remove restores the huge-page count.
#[test]
fn b18_kernel_compat_add_at_max_keeps_count_applies_side_effects() {
    let (t, b) = tracker_with(TrackerConfig::default().with_limits(LimitMode::KernelCompat));
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 1024))
        .unwrap();
    t.enable_write_tracking().unwrap();
    t.add_gfns(AsId::NORMAL, &vec![Gfn(3); 65535]).unwrap();
    let calls = b.calls();

    let over = t.add_gfn(Gfn(3));
    assert_eq!(over, Ok(()));
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(3)), Ok(65535));
    assert_eq!(t.stats().limit_warnings, 1);
    assert_eq!(b.calls(), calls);

    t.remove_gfns(AsId::NORMAL, &vec![Gfn(3); 65535]).unwrap();
    assert!(!t.is_write_tracked(AsId::NORMAL, Gfn(3)));
    assert_eq!(t.max_mapping_level(AsId::NORMAL, Gfn(3)), Ok(PageLevel::K4));

    let under = t.remove_gfn(Gfn(3));
    assert_eq!(under, Ok(()));
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(3)), Ok(0));
    assert_eq!(t.stats().limit_warnings, 2);
    assert_eq!(t.max_mapping_level(AsId::NORMAL, Gfn(3)), Ok(PageLevel::M2));
}

/// B18, KernelCompat: an unbalanced remove at 0 keeps the count but lowers the huge-page count,
/// so a 2M region that still holds a tracked frame is reported mappable (the kernel's bug).
#[test]
fn b18_kernel_compat_remove_at_zero_lowers_huge_page_count() {
    let (t, b) = tracker_with(TrackerConfig::default().with_limits(LimitMode::KernelCompat));
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 1024))
        .unwrap();
    t.enable_write_tracking().unwrap();
    t.add_gfn(Gfn(10)).unwrap();
    let calls = b.calls();

    let res = t.remove_gfn(Gfn(11));

    assert_eq!(res, Ok(()));
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(11)), Ok(0));
    assert!(t.is_write_tracked(AsId::NORMAL, Gfn(10)));
    assert_eq!(
        t.max_mapping_level(AsId::NORMAL, Gfn(10)),
        Ok(PageLevel::M2)
    );
    assert_eq!(t.stats().limit_warnings, 1);
    assert_eq!(b.calls(), calls);
}

/// KernelCompat with a failing backend: the backend is asked before any count changes, so
/// nothing changed at all (the count kept at 65535 stays 65535, huge-page counts are as they
/// were, and no limit warning was counted for a step that never happened).
#[test]
fn kernel_compat_backend_failure_changes_nothing() {
    let (t, b) = tracker_with(TrackerConfig::default().with_limits(LimitMode::KernelCompat));
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 1024))
        .unwrap();
    t.enable_write_tracking().unwrap();
    t.add_gfns(AsId::NORMAL, &vec![Gfn(3); 65535]).unwrap();
    b.fail_protect
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let before = super::support::capture(&t, &b);

    let res = t.add_gfns(AsId::NORMAL, &[Gfn(3), Gfn(600)]);

    assert!(matches!(
        res,
        Err(crate::Error::Backend { op: "protect", .. })
    ));
    assert_eq!(t.stats().limit_warnings, 0);
    assert_eq!(
        super::support::capture(&t, &b).ignoring_stats(),
        before.ignoring_stats()
    );
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(3)), Ok(65535));
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(600)), Ok(0));
    assert_eq!(
        t.max_mapping_level(AsId::NORMAL, Gfn(600)),
        Ok(PageLevel::M2)
    );
}
