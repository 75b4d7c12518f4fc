//! Huge-page disallow accounting: B16, B17, B20, T5.

use super::support::{enabled_tracker, tracker};
use crate::{AsId, Gfn, MemoryRegion, PageLevel, SlotId};

const GIG: u64 = PageLevel::G1.frames();
const MEG2: u64 = PageLevel::M2.frames();

fn level(t: &crate::PageTracker, g: u64) -> PageLevel {
    t.max_mapping_level(AsId::NORMAL, Gfn(g)).unwrap()
}

/// B20: a 1 GiB-aligned slot of whole 1 GiB regions allows 1G mappings everywhere (counts are
/// not needed for this: huge-page counts exist before tracking is enabled).
#[test]
fn max_mapping_level_aligned_slot_allows_1g() {
    let (t, _) = tracker();

    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 2 * GIG))
        .unwrap();

    assert_eq!(level(&t, 0), PageLevel::G1);
    assert_eq!(level(&t, GIG + 12345), PageLevel::G1);
    assert_eq!(level(&t, 2 * GIG - 1), PageLevel::G1);
}

/// B20: regions only partly covered by the slot start at 1, at both edges; a slot starting at
/// frame 1 never allows 1G and allows 2M only on 2M regions wholly inside it.
#[test]
fn max_mapping_level_partial_regions_at_edges_disallowed() {
    let (t, _) = tracker();

    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(1), 3 * MEG2))
        .unwrap();

    assert_eq!(level(&t, 1), PageLevel::K4);
    assert_eq!(level(&t, MEG2 - 1), PageLevel::K4);
    assert_eq!(level(&t, MEG2), PageLevel::M2);
    assert_eq!(level(&t, 3 * MEG2 - 1), PageLevel::M2);
    assert_eq!(level(&t, 3 * MEG2), PageLevel::K4);
}

/// B20: a slot whose end is not 2M-aligned disallows its last (partial) region only.
#[test]
fn max_mapping_level_partial_tail_region_disallowed() {
    let (t, _) = tracker();

    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(GIG), GIG + 5))
        .unwrap();

    assert_eq!(level(&t, GIG), PageLevel::G1);
    assert_eq!(level(&t, 2 * GIG - 1), PageLevel::G1);
    assert_eq!(level(&t, 2 * GIG), PageLevel::K4);
    assert_eq!(level(&t, 2 * GIG + 4), PageLevel::K4);
}

/// B16, B20, T5: tracking a frame disallows the 2M region and the 1G region holding it, and
/// nothing else; B17: the matching remove allows them again.
#[test]
fn add_remove_tracked_frame_disallows_then_allows_huge_pages() {
    let (t, _) = enabled_tracker(2 * GIG);

    t.add_gfn(Gfn(700)).unwrap();
    let tracked = (
        level(&t, 700),
        level(&t, 512),
        level(&t, 100),
        level(&t, GIG + 5),
    );
    t.remove_gfn(Gfn(700)).unwrap();

    assert_eq!(
        tracked,
        (PageLevel::K4, PageLevel::K4, PageLevel::M2, PageLevel::G1)
    );
    assert_eq!(level(&t, 700), PageLevel::G1);
    assert_eq!(level(&t, 100), PageLevel::G1);
}

/// T5: two tracks in one 2M region keep it disallowed until both are removed.
#[test]
fn remove_one_of_two_tracks_in_region_keeps_disallowed() {
    let (t, _) = enabled_tracker(GIG);
    t.add_gfns(AsId::NORMAL, &[Gfn(3), Gfn(9), Gfn(9)]).unwrap();

    t.remove_gfns(AsId::NORMAL, &[Gfn(3), Gfn(9)]).unwrap();
    let one_left = level(&t, 0);
    t.remove_gfn(Gfn(9)).unwrap();

    assert_eq!(one_left, PageLevel::K4);
    assert_eq!(level(&t, 0), PageLevel::G1);
}

/// B20: huge-page accounting is per slot and per address space: tracking in address space 1
/// does not change address space 0's levels.
#[test]
fn add_in_smm_leaves_normal_levels() {
    let (t, _) = tracker();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), GIG))
        .unwrap();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), GIG).in_address_space(AsId::SMM))
        .unwrap();
    t.enable_write_tracking().unwrap();

    t.add_gfns(AsId::SMM, &[Gfn(5)]).unwrap();

    assert_eq!(level(&t, 5), PageLevel::G1);
    assert_eq!(t.max_mapping_level(AsId::SMM, Gfn(5)), Ok(PageLevel::K4));
}

/// B20: `max_mapping_level` of a frame outside every slot is an error.
#[test]
fn max_mapping_level_no_slot_is_unknown_gfn() {
    let (t, _) = enabled_tracker(16);

    let res = t.max_mapping_level(AsId::NORMAL, Gfn(16));
    let bad_as = t.max_mapping_level(AsId(2), Gfn(1));

    assert_eq!(
        res,
        Err(crate::Error::UnknownGfn {
            as_id: AsId::NORMAL,
            gfn: Gfn(16)
        })
    );
    assert_eq!(
        bad_as,
        Err(crate::Error::InvalidAddressSpace {
            as_id: AsId(2),
            count: 2
        })
    );
}
