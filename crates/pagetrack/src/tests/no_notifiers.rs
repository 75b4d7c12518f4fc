//! Feature `notifiers` off (the kernel's `CONFIG_KVM_EXTERNAL_WRITE_TRACKING=n`): no external
//! user can exist and tracking is enabled by internal users only (B28, B7).

use super::support::{tracker, write_frame};
use crate::{AsId, Gfn, MemoryRegion, SlotId};

/// B28: without the registry there is never an external user.
#[test]
fn has_external_user_without_registry_is_false() {
    let (t, _) = tracker();

    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 16))
        .unwrap();
    t.enable_write_tracking().unwrap();

    assert!(!t.has_external_user());
    assert!(!t.external_tracking_enabled());
    assert_eq!(t.notifier_count(), 0);
}

/// B7: `enable_write_tracking` enables, allocates, and add/remove/query then work; writes to
/// tracked frames are counted (there is nobody to deliver them to).
#[test]
fn enable_write_tracking_without_registry_tracks() {
    let (t, b) = tracker();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 16))
        .unwrap();

    t.enable_write_tracking().unwrap();
    t.add_gfn(Gfn(3)).unwrap();
    write_frame(&t, Gfn(3), 8);

    assert!(t.is_enabled());
    assert_eq!(t.write_track_bytes(), 32);
    assert!(t.is_write_tracked(AsId::NORMAL, Gfn(3)));
    assert_eq!(t.stats().writes_tracked, 1);
    t.remove_gfn(Gfn(3)).unwrap();
    assert_eq!(b.calls().len(), 2);
}

/// MOVE is always allowed without the registry (no external user can exist, B47).
#[test]
fn move_without_registry_allowed() {
    let (t, _) = tracker();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 16))
        .unwrap();
    t.enable_write_tracking().unwrap();

    let change = t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(64), 16));

    assert_eq!(change, Ok(crate::SlotChange::Move));
}
