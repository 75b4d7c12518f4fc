//! Fault classification against real tracker state: B34–B41 (the pure cases are in `fault.rs`).

use super::support::enabled_tracker;
use crate::{AsId, FaultAction, FaultInfo, Gfn, PageLevel, classify_fault};

const PRESENT_WRITE: u64 = 0b11;
const NOT_PRESENT_WRITE: u64 = 0b10;
const READ: u64 = 0b00;
const FETCH: u64 = 0b1_0000;

fn action(t: &crate::PageTracker, g: u64, code: u64) -> FaultAction {
    classify_fault(
        t.is_write_tracked(AsId::NORMAL, Gfn(g)),
        FaultInfo::from_error_code(code),
    )
}

/// The error-code bits the classifier reads (present 0, write 1, reserved 3, fetch 4).
#[test]
fn from_error_code_each_bit_decoded() {
    let all = FaultInfo::from_error_code(0b1_1011);

    assert_eq!(
        all,
        FaultInfo {
            present: true,
            write: true,
            fetch: true,
            reserved: true
        }
    );
    assert_eq!(FaultInfo::from_error_code(0b100), FaultInfo::default());
}

/// B34: a present write to a tracked frame is emulated; to an untracked frame it is not ours.
#[test]
fn classify_present_write_tracked_emulates_untracked_normal() {
    let (t, _) = enabled_tracker(16);

    t.add_gfn(Gfn(4)).unwrap();

    assert_eq!(action(&t, 4, PRESENT_WRITE), FaultAction::Emulate);
    assert_eq!(action(&t, 5, PRESENT_WRITE), FaultAction::Normal);
}

/// B35: a not-present write to a tracked frame maps read-only, then emulates.
#[test]
fn classify_not_present_write_tracked_maps_readonly_then_emulates() {
    let (t, _) = enabled_tracker(16);

    t.add_gfn(Gfn(4)).unwrap();

    assert_eq!(
        action(&t, 4, NOT_PRESENT_WRITE),
        FaultAction::MapReadOnlyThenEmulate
    );
}

/// B36, B37, B38: reads, fetches and prefetch-like non-write faults on a tracked frame map it
/// present but never writable, whether or not a translation existed.
#[test]
fn classify_read_or_fetch_tracked_maps_readonly() {
    let (t, _) = enabled_tracker(16);

    t.add_gfn(Gfn(4)).unwrap();

    for code in [READ, FETCH, READ | 1, FETCH | 1] {
        assert_eq!(
            action(&t, 4, code),
            FaultAction::MapReadOnly,
            "code {code:#b}"
        );
    }
}

/// B39: inside a huge region holding a newly tracked frame, the huge level is disallowed, a
/// write to an untracked neighbour is normal (mapped writable at 4K) and one to the tracked
/// frame is emulated.
#[test]
fn classify_huge_region_with_tracked_frame_splits_per_frame() {
    let (t, _) = enabled_tracker(1024);

    t.add_gfn(Gfn(600)).unwrap();

    assert_eq!(
        t.max_mapping_level(AsId::NORMAL, Gfn(601)),
        Ok(PageLevel::K4)
    );
    assert_eq!(action(&t, 601, PRESENT_WRITE), FaultAction::Normal);
    assert_eq!(action(&t, 600, PRESENT_WRITE), FaultAction::Emulate);
}

/// B40: while another reference remains, dropping one (the backend's "unprotect and retry")
/// leaves the frame tracked, so the retried write is emulated again.
#[test]
fn classify_after_partial_remove_still_emulates() {
    let (t, _) = enabled_tracker(16);
    t.add_gfn(Gfn(4)).unwrap();
    t.add_gfn(Gfn(4)).unwrap();

    t.remove_gfn(Gfn(4)).unwrap();

    assert_eq!(action(&t, 4, PRESENT_WRITE), FaultAction::Emulate);
}

/// B41: after the last remove the next write fault is a normal one (no emulation).
#[test]
fn classify_after_last_remove_is_normal() {
    let (t, _) = enabled_tracker(16);
    t.add_gfn(Gfn(4)).unwrap();

    t.remove_gfn(Gfn(4)).unwrap();

    assert_eq!(action(&t, 4, PRESENT_WRITE), FaultAction::Normal);
    assert_eq!(action(&t, 4, NOT_PRESENT_WRITE), FaultAction::Normal);
}

/// B34: a reserved-bit (MMIO) fault is never a page-track matter.
#[test]
fn classify_reserved_fault_tracked_is_normal() {
    let (t, _) = enabled_tracker(16);

    t.add_gfn(Gfn(4)).unwrap();

    assert_eq!(action(&t, 4, PRESENT_WRITE | 0b1000), FaultAction::Normal);
}
