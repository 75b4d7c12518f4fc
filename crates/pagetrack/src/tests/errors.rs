//! Every error path, each with the full observable state compared before and after the failing
//! call ("a failed call changes nothing"): T3, T11, R1, R2, R7, spec §8 validation.

use std::sync::atomic::Ordering;

use super::support::{Recorder, State, capture, tracker, tracker_with};
use crate::{AsId, Error, Gfn, MemoryRegion, PageTracker, RegionFlags, SlotId, TrackerConfig};

/// A tracker with tracked frames in two slots of address space 0 and one of address space 1,
/// huge-page accounting in play and backend calls recorded: the state errors must not touch.
fn busy_tracker(config: TrackerConfig) -> (std::sync::Arc<PageTracker>, std::sync::Arc<Recorder>) {
    let (t, b) = tracker_with(config);
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 1024))
        .unwrap();
    t.set_memory_region(MemoryRegion::new(SlotId(1), Gfn(2048), 600))
        .unwrap();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(5000), 16).in_address_space(AsId::SMM))
        .unwrap();
    t.enable_write_tracking().unwrap();
    t.add_gfns(AsId::NORMAL, &[Gfn(1), Gfn(1), Gfn(600), Gfn(2100)])
        .unwrap();
    t.add_gfns(AsId::SMM, &[Gfn(5001)]).unwrap();
    (t, b)
}

fn busy() -> (std::sync::Arc<PageTracker>, std::sync::Arc<Recorder>) {
    busy_tracker(TrackerConfig::default())
}

/// Runs `op`, asserts it fails with `expected`, and that the observable state did not change.
#[track_caller]
fn assert_fails_unchanged<T: std::fmt::Debug>(
    t: &PageTracker,
    b: &Recorder,
    op: impl FnOnce(&PageTracker) -> crate::Result<T>,
    expected: &Error,
) {
    let before: State = capture(t, b);

    let res = op(t);

    match res {
        Err(e) => assert_eq!(&e, expected),
        Ok(v) => panic!("expected {expected:?}, got Ok({v:?})"),
    }
    assert_eq!(capture(t, b), before);
}

const NORMAL: AsId = AsId::NORMAL;

/// T3, R7: add/remove of a frame outside every slot fails with nothing changed.
#[test]
fn add_remove_unknown_gfn_errors_and_changes_nothing() {
    let (t, b) = busy();
    let unknown = |g| Error::UnknownGfn {
        as_id: NORMAL,
        gfn: Gfn(g),
    };

    assert_fails_unchanged(&t, &b, |t| t.add_gfn(Gfn(1024)), &unknown(1024));
    assert_fails_unchanged(&t, &b, |t| t.remove_gfn(Gfn(5001)), &unknown(5001));
    assert_fails_unchanged(&t, &b, |t| t.remove_gfn(Gfn(u64::MAX)), &unknown(u64::MAX));
}

/// T3: a batch with one unknown frame fails as a whole, naming the first unknown frame.
#[test]
fn add_gfns_one_unknown_errors_and_changes_nothing() {
    let (t, b) = busy();

    assert_fails_unchanged(
        &t,
        &b,
        |t| t.add_gfns(NORMAL, &[Gfn(2), Gfn(3), Gfn(1500), Gfn(1600)]),
        &Error::UnknownGfn {
            as_id: NORMAL,
            gfn: Gfn(1500),
        },
    );
    assert_fails_unchanged(
        &t,
        &b,
        |t| t.remove_gfns(NORMAL, &[Gfn(1), Gfn(9999)]),
        &Error::UnknownGfn {
            as_id: NORMAL,
            gfn: Gfn(9999),
        },
    );
}

/// A range running past the end of its slot (or wrapping the frame space) fails as a whole.
#[test]
fn add_range_past_slot_or_wrapping_errors_and_changes_nothing() {
    let (t, b) = busy();

    assert_fails_unchanged(
        &t,
        &b,
        |t| t.add_range(NORMAL, Gfn(1020), 8),
        &Error::UnknownGfn {
            as_id: NORMAL,
            gfn: Gfn(1024),
        },
    );
    // Huge ranges are refused before anything is materialised for them.
    assert_fails_unchanged(
        &t,
        &b,
        |t| t.add_range(NORMAL, Gfn(0), 1 << 40),
        &Error::UnknownGfn {
            as_id: NORMAL,
            gfn: Gfn(1024),
        },
    );
    assert_fails_unchanged(
        &t,
        &b,
        |t| t.add_range(NORMAL, Gfn(5), u64::MAX),
        &Error::UnknownGfn {
            as_id: NORMAL,
            gfn: Gfn(1024),
        },
    );
    assert_fails_unchanged(
        &t,
        &b,
        |t| t.add_range(AsId(2), Gfn(5), 1),
        &Error::InvalidAddressSpace {
            as_id: AsId(2),
            count: 2,
        },
    );
    assert_fails_unchanged(
        &t,
        &b,
        |t| t.remove_range(NORMAL, Gfn(u64::MAX - 1), 4),
        &Error::UnknownGfn {
            as_id: NORMAL,
            gfn: Gfn(u64::MAX - 1),
        },
    );
}

/// R1: adding past 65535 fails with nothing changed (no count, no huge-page count, no backend).
#[test]
fn add_gfn_at_max_errors_and_changes_nothing() {
    let (t, b) = busy();
    t.add_gfns(NORMAL, &vec![Gfn(700); 65535]).unwrap();

    assert_fails_unchanged(
        &t,
        &b,
        |t| t.add_gfn(Gfn(700)),
        &Error::TrackCountOverflow {
            as_id: NORMAL,
            gfn: Gfn(700),
        },
    );
}

/// R1: a batch whose duplicates together would overflow fails as a whole, even though each
/// single add would fit and other frames in the batch are fine.
#[test]
fn add_gfns_duplicates_overflow_all_or_nothing() {
    let (t, b) = busy();
    t.add_gfns(NORMAL, &vec![Gfn(700); 65534]).unwrap();

    assert_fails_unchanged(
        &t,
        &b,
        |t| t.add_gfns(NORMAL, &[Gfn(3), Gfn(700), Gfn(4), Gfn(700)]),
        &Error::TrackCountOverflow {
            as_id: NORMAL,
            gfn: Gfn(700),
        },
    );
    assert_eq!(t.add_gfns(NORMAL, &[Gfn(3), Gfn(700)]), Ok(()));
}

/// R2: removing a track that is not there fails with nothing changed (no huge-page change).
#[test]
fn remove_gfn_at_zero_errors_and_changes_nothing() {
    let (t, b) = busy();

    assert_fails_unchanged(
        &t,
        &b,
        |t| t.remove_gfn(Gfn(2)),
        &Error::NotTracked {
            as_id: NORMAL,
            gfn: Gfn(2),
        },
    );
}

/// R2: a batch removing more references than a frame has fails as a whole.
#[test]
fn remove_gfns_duplicates_underflow_all_or_nothing() {
    let (t, b) = busy();

    assert_fails_unchanged(
        &t,
        &b,
        |t| t.remove_gfns(NORMAL, &[Gfn(600), Gfn(1), Gfn(600)]),
        &Error::NotTracked {
            as_id: NORMAL,
            gfn: Gfn(600),
        },
    );
    assert_fails_unchanged(
        &t,
        &b,
        |t| t.remove_gfns(NORMAL, &[Gfn(1), Gfn(1), Gfn(1)]),
        &Error::NotTracked {
            as_id: NORMAL,
            gfn: Gfn(1),
        },
    );
}

/// B15, T11: add/remove before tracking is enabled fail with nothing changed (no arrays are
/// allocated by the attempt).
#[test]
fn add_remove_tracking_disabled_errors_and_changes_nothing() {
    let (t, b) = tracker();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 16))
        .unwrap();

    assert_fails_unchanged(&t, &b, |t| t.add_gfn(Gfn(1)), &Error::TrackingDisabled);
    assert_fails_unchanged(&t, &b, |t| t.remove_gfn(Gfn(1)), &Error::TrackingDisabled);
    assert_fails_unchanged(
        &t,
        &b,
        |t| t.add_gfns(AsId(9), &[Gfn(99)]),
        &Error::TrackingDisabled,
    );
    assert_fails_unchanged(
        &t,
        &b,
        |t| t.add_range(NORMAL, Gfn(0), 4),
        &Error::TrackingDisabled,
    );
    assert_fails_unchanged(
        &t,
        &b,
        |t| t.remove_range(NORMAL, Gfn(0), 1 << 40),
        &Error::TrackingDisabled,
    );
}

/// An address space the tracker does not have fails everywhere it is named.
#[test]
fn invalid_address_space_errors_and_changes_nothing() {
    let (t, b) = busy();
    let bad = Error::InvalidAddressSpace {
        as_id: AsId(2),
        count: 2,
    };

    assert_fails_unchanged(&t, &b, |t| t.add_gfns(AsId(2), &[Gfn(1)]), &bad);
    assert_fails_unchanged(&t, &b, |t| t.remove_gfns(AsId(2), &[Gfn(1)]), &bad);
    assert_fails_unchanged(&t, &b, |t| t.track_count(AsId(2), Gfn(1)), &bad);
    assert_fails_unchanged(
        &t,
        &b,
        |t| t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 4).in_address_space(AsId(2))),
        &bad,
    );
}

/// A slot id at or above the per-address-space limit is refused.
#[test]
fn set_memory_region_invalid_slot_errors_and_changes_nothing() {
    let (t, b) = busy_tracker(TrackerConfig::default().with_max_slots(8));

    assert_fails_unchanged(
        &t,
        &b,
        |t| t.set_memory_region(MemoryRegion::new(SlotId(8), Gfn(9000), 4)),
        &Error::InvalidSlot {
            slot: SlotId(8),
            max: 8,
        },
    );
    assert_fails_unchanged(
        &t,
        &b,
        |t| t.set_memory_region(MemoryRegion::delete(NORMAL, SlotId(u16::MAX))),
        &Error::InvalidSlot {
            slot: SlotId(u16::MAX),
            max: 8,
        },
    );
}

/// Deleting a slot that does not exist fails (and, K8, notifies nobody: see `memslots`).
#[test]
fn delete_unknown_slot_errors_and_changes_nothing() {
    let (t, b) = busy();

    assert_fails_unchanged(
        &t,
        &b,
        |t| t.set_memory_region(MemoryRegion::delete(AsId::SMM, SlotId(1))),
        &Error::UnknownSlot {
            as_id: AsId::SMM,
            slot: SlotId(1),
        },
    );
}

/// EEXIST: a new slot may not overlap another, at either end or by containing it.
#[test]
fn create_overlapping_errors_and_changes_nothing() {
    let (t, b) = busy();
    let overlap = |existing| Error::MemslotOverlap {
        as_id: NORMAL,
        new: SlotId(5),
        existing: SlotId(existing),
    };

    for (base, n, existing) in [
        (1023, 2, 0),
        (2047, 2, 1),
        (2647, 10, 1),
        (0, 1, 0),
        (500, 3000, 1),
        (10, 10, 0),
    ] {
        assert_fails_unchanged(
            &t,
            &b,
            |t| t.set_memory_region(MemoryRegion::new(SlotId(5), Gfn(base), n)),
            &overlap(existing),
        );
    }
    // Adjacent is fine, and another address space does not collide.
    assert!(
        t.set_memory_region(MemoryRegion::new(SlotId(5), Gfn(1024), 1024))
            .is_ok()
    );
    assert!(
        t.set_memory_region(MemoryRegion::new(SlotId(5), Gfn(0), 16).in_address_space(AsId::SMM))
            .is_ok()
    );
}

/// EEXIST: a moved slot may not land on another; it may overlap its own old place.
#[test]
fn move_onto_other_slot_errors_and_changes_nothing() {
    let (t, b) = busy();

    assert_fails_unchanged(
        &t,
        &b,
        |t| t.set_memory_region(MemoryRegion::new(SlotId(1), Gfn(1000), 600)),
        &Error::MemslotOverlap {
            as_id: NORMAL,
            new: SlotId(1),
            existing: SlotId(0),
        },
    );
    assert_eq!(
        t.set_memory_region(MemoryRegion::new(SlotId(1), Gfn(2050), 600)),
        Ok(crate::SlotChange::Move)
    );
}

/// A live slot cannot change size.
#[test]
fn resize_live_slot_errors_and_changes_nothing() {
    let (t, b) = busy();

    let before = capture(&t, &b);
    let res = t.set_memory_region(MemoryRegion::new(SlotId(1), Gfn(2048), 601));

    assert!(
        matches!(res, Err(Error::InvalidRegion { slot: SlotId(1), reason }) if reason.contains("size"))
    );
    assert_eq!(capture(&t, &b), before);
}

/// KVM_MEM_READONLY cannot be toggled on a live slot, in either direction.
#[test]
fn readonly_toggle_errors_and_changes_nothing() {
    let (t, b) = busy();
    t.set_memory_region(
        MemoryRegion::new(SlotId(3), Gfn(4000), 4).with_flags(RegionFlags::READONLY),
    )
    .unwrap();
    let before = capture(&t, &b);

    let on = t.set_memory_region(
        MemoryRegion::new(SlotId(0), Gfn(0), 1024).with_flags(RegionFlags::READONLY),
    );
    let off = t.set_memory_region(MemoryRegion::new(SlotId(3), Gfn(4000), 4));

    for res in [on, off] {
        assert!(
            matches!(res, Err(Error::InvalidRegion { reason, .. }) if reason.contains("READONLY"))
        );
    }
    assert_eq!(capture(&t, &b), before);
}

/// Unknown flag bits are refused, for every kind of change (delete included).
#[test]
fn unknown_flags_errors_and_changes_nothing() {
    let (t, b) = busy();
    let before = capture(&t, &b);
    let weird = RegionFlags::from_bits_retain(1 << 7);

    let create = t.set_memory_region(MemoryRegion::new(SlotId(6), Gfn(9000), 4).with_flags(weird));
    let flags = t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 1024).with_flags(weird));
    let delete = t.set_memory_region(MemoryRegion::delete(NORMAL, SlotId(0)).with_flags(weird));

    for res in [create, flags, delete] {
        assert!(
            matches!(res, Err(Error::InvalidRegion { reason, .. }) if reason.contains("flags"))
        );
    }
    assert_eq!(capture(&t, &b), before);
}

/// A region wrapping past the end of the frame space, reaching past the 64-bit
/// guest-physical space (frame 2^52), or too large for one slot, is refused.
#[test]
fn wraparound_or_too_large_region_errors_and_changes_nothing() {
    let (t, b) = busy();
    let before = capture(&t, &b);

    let wraps = t.set_memory_region(MemoryRegion::new(SlotId(6), Gfn(u64::MAX - 2), 4));
    let past = t.set_memory_region(MemoryRegion::new(SlotId(6), Gfn(crate::GFN_LIMIT - 2), 4));
    let huge = t.set_memory_region(MemoryRegion::new(SlotId(6), Gfn(1 << 40), 1 << 31));

    for r in [wraps, past] {
        assert!(
            matches!(r, Err(Error::InvalidRegion { reason, .. }) if reason.contains("past the end"))
        );
    }
    assert!(
        matches!(huge, Err(Error::InvalidRegion { reason, .. }) if reason.contains("too many"))
    );
    assert_eq!(capture(&t, &b), before);
    // The largest region that fits exactly at the top is fine.
    assert!(
        t.set_memory_region(MemoryRegion::new(SlotId(6), Gfn(crate::GFN_LIMIT - 4), 4))
            .is_ok()
    );
}

/// An unvalidated region's `end` saturates instead of overflowing; `checked_end` says so.
#[test]
fn region_end_overflow_saturates_and_checked_end_none() {
    let r = MemoryRegion::new(SlotId(0), Gfn(u64::MAX - 1), 4);

    assert_eq!(r.end(), Gfn(u64::MAX));
    assert_eq!(r.checked_end(), None);
    assert_eq!(
        MemoryRegion::new(SlotId(0), Gfn(8), 4).checked_end(),
        Some(Gfn(12))
    );
}

/// A frame number past the 64-bit space has no address: `checked_gpa` is `None` (and `gpa`
/// panics rather than truncating).
#[test]
fn gfn_past_physical_space_checked_gpa_none() {
    assert_eq!(
        Gfn(crate::GFN_LIMIT - 1).checked_gpa(),
        Some(crate::Gpa(u64::MAX - 0xfff))
    );
    assert_eq!(Gfn(crate::GFN_LIMIT).checked_gpa(), None);
    assert!(std::panic::catch_unwind(|| Gfn(crate::GFN_LIMIT).gpa()).is_err());
}

/// An empty batch or range names an address space too: a nonexistent one is an error.
#[test]
fn empty_batch_in_nonexistent_address_space_errors() {
    let (t, b) = busy();
    let before = capture(&t, &b);

    let errs = [
        t.add_gfns(AsId(7), &[]),
        t.remove_gfns(AsId(7), &[]),
        t.add_range(AsId(7), Gfn(0), 0),
        t.remove_range(AsId(7), Gfn(0), 0),
    ];

    for e in errs {
        assert!(
            matches!(e, Err(Error::InvalidAddressSpace { as_id: AsId(7), .. })),
            "{e:?}"
        );
    }
    assert_eq!(capture(&t, &b), before);
}

/// A backend failing protect: the add fails with `Backend` and every count (and huge-page
/// count) is rolled back, including the duplicates and the already-tracked frames of a batch.
#[test]
fn add_backend_protect_fails_counts_rolled_back() {
    let (t, b) = busy();
    b.fail_protect.store(true, Ordering::SeqCst);
    let attempts = b.attempts.load(Ordering::SeqCst);

    assert_fails_unchanged(
        &t,
        &b,
        |t| t.add_gfns(NORMAL, &[Gfn(1), Gfn(700), Gfn(700), Gfn(2049)]),
        &Error::Backend {
            op: "protect",
            source: crate::BackendError::msg("injected protect failure"),
        },
    );
    assert_eq!(b.attempts.load(Ordering::SeqCst), attempts + 1);
    b.fail_protect.store(false, Ordering::SeqCst);
    assert_eq!(t.add_gfns(NORMAL, &[Gfn(700)]), Ok(()));
}

/// A backend failing unprotect: the last remove fails with `Backend` and the frame stays
/// tracked with its count and huge-page accounting intact.
#[test]
fn remove_backend_unprotect_fails_counts_rolled_back() {
    let (t, b) = busy();
    b.fail_unprotect.store(true, Ordering::SeqCst);

    assert_fails_unchanged(
        &t,
        &b,
        |t| t.remove_gfns(NORMAL, &[Gfn(1), Gfn(600)]),
        &Error::Backend {
            op: "unprotect",
            source: crate::BackendError::msg("injected unprotect failure"),
        },
    );
    // Removes that untrack nothing do not ask the backend, so they still work.
    assert_eq!(t.remove_gfn(Gfn(1)), Ok(()));
}

#[cfg(feature = "notifiers")]
mod with_notifiers {
    use std::sync::{Arc, Mutex, OnceLock, Weak};

    use super::{NORMAL, assert_fails_unchanged, busy};
    use crate::tests::support::{Hook, Log, Recorder, capture, within_watchdog, write_frame};
    use crate::{Error, Gfn, MemoryRegion, NotifierClass, NotifierHandle, PageTracker, SlotId};

    /// B47: MOVE with a notifier registered is refused with nothing changed.
    #[test]
    fn move_with_notifier_errors_and_changes_nothing() {
        let (t, b) = busy();
        let _h = t.register(Log::new(), NotifierClass::Ordinary).unwrap();

        assert_fails_unchanged(
            &t,
            &b,
            |t| t.set_memory_region(MemoryRegion::new(SlotId(1), Gfn(3000), 600)),
            &Error::MoveWithNotifiers {
                as_id: NORMAL,
                slot: SlotId(1),
            },
        );
    }

    /// A `track_write` callback may not change memslots: `InCallback`, nothing changed.
    #[test]
    fn set_memory_region_inside_track_write_errors_and_changes_nothing() {
        let (t, b) = busy();
        let weak: Weak<PageTracker> = Arc::downgrade(&t);
        let backend: Arc<Recorder> = b.clone();
        let outcome = Arc::new(Mutex::new(None));
        let o = outcome.clone();
        let hook = Hook::on_write(move |_| {
            let t = weak.upgrade().unwrap();
            let before = capture(&t, &backend);
            let create = t.set_memory_region(MemoryRegion::new(SlotId(9), Gfn(9000), 1));
            let delete = t.set_memory_region(MemoryRegion::delete(NORMAL, SlotId(0)));
            let unchanged = capture(&t, &backend) == before;
            *o.lock().unwrap() = Some((create, delete, unchanged));
        });
        let _h = t.register(hook, NotifierClass::Ordinary).unwrap();

        let t2 = t.clone();
        within_watchdog(move || write_frame(&t2, Gfn(1), 1));

        let in_cb = Err(Error::InCallback {
            op: "set_memory_region",
        });
        assert_eq!(
            outcome.lock().unwrap().take(),
            Some((in_cb.clone(), in_cb, true))
        );
    }

    /// R4: unregistering from inside its own callback returns `UnregisterError` carrying the
    /// (still registered) handle, changes nothing, and dropping that handle inside the callback
    /// then completes without deadlock; afterwards the notifier is gone.
    #[test]
    fn unregister_inside_own_callback_errors_then_drop_completes() {
        let (t, b) = busy();
        let weak: Weak<PageTracker> = Arc::downgrade(&t);
        let backend: Arc<Recorder> = b.clone();
        let slot: Arc<OnceLock<Mutex<Option<NotifierHandle>>>> = Arc::default();
        let outcome = Arc::new(Mutex::new(None));
        let (s, o) = (slot.clone(), outcome.clone());
        let hook = Hook::on_write(move |_| {
            let Some(handle) = s.get().unwrap().lock().unwrap().take() else {
                return;
            };
            let t = weak.upgrade().unwrap();
            let before = capture(&t, &backend);
            let err = handle.unregister().unwrap_err();
            let unchanged = capture(&t, &backend) == before;
            let still_registered = t.notifier_count();
            drop(err.handle);
            *o.lock().unwrap() = Some((unchanged, still_registered, t.notifier_count()));
        });
        let h = t.register(hook, NotifierClass::Ordinary).unwrap();
        slot.set(Mutex::new(Some(h))).unwrap();

        let t2 = t.clone();
        within_watchdog(move || write_frame(&t2, Gfn(1), 1));

        assert_eq!(outcome.lock().unwrap().take(), Some((true, 1, 0)));
        assert!(!t.has_external_user());
    }
}

/// A backend's own error survives as the `source` of `Error::Backend`, with its errno.
#[test]
fn add_backend_error_kept_as_source_with_its_errno() {
    #[derive(Debug)]
    struct Refusing;
    impl crate::Enforcement for Refusing {
        fn protect(&self, _: &[crate::FrameRun]) -> Result<(), crate::BackendError> {
            Err(crate::BackendError::new(std::io::Error::from_raw_os_error(
                12,
            )))
        }
        fn unprotect(&self, _: &[crate::FrameRun]) -> Result<(), crate::BackendError> {
            Ok(())
        }
    }
    let t = PageTracker::new(TrackerConfig::default(), std::sync::Arc::new(Refusing));
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 16))
        .unwrap();
    t.enable_write_tracking().unwrap();

    let err = t.add_gfn(Gfn(3)).unwrap_err();

    assert_eq!(err.to_string(), "backend could not protect");
    let source = std::error::Error::source(&err).expect("the backend's error");
    let io = source
        .downcast_ref::<crate::BackendError>()
        .and_then(|b| b.0.downcast_ref::<std::io::Error>())
        .expect("an io::Error inside");
    assert_eq!(io.raw_os_error(), Some(12));
    assert!(!t.is_write_tracked(AsId::NORMAL, Gfn(3)));
}
