//! # Kernel names: Linux KVM/x86 page tracking → pagetrack
//!
//! The kernel's write-tracking API (`arch/x86/kvm/mmu/page_track.c`,
//! `arch/x86/kvm/mmu/page_track.h` and `arch/x86/include/asm/kvm_page_track.h`, v6.6+ unless
//! a row says otherwise) and the pagetrack item that plays each part. This module holds no
//! code: it is the map, with links rustdoc checks. `pagetrack-kvm`, `pagetrack-vmm`,
//! `pagetrack-testkit` and the CLI link here from their crate roots.
//!
//! ## Exported API (what KVMGT, the one in-tree external user, calls)
//!
//! | kernel | pagetrack |
//! |---|---|
//! | `kvm_write_track_add_gfn(kvm, gfn)` | [`PageTracker::add_gfn`] (address space 0) |
//! | `kvm_write_track_remove_gfn(kvm, gfn)` | [`PageTracker::remove_gfn`] (address space 0) |
//! | `-EINVAL` (no memslot holds `gfn`) | [`Error::UnknownGfn`] |
//! | `kvm_page_track_register_notifier(kvm, node)` | [`PageTracker::register`] → [`NotifierHandle`] |
//! | `-ESRCH` (wrong `mm`) | no counterpart: a [`PageTracker`] is owned by its VMM |
//! | `kvm_page_track_unregister_notifier(kvm, node)` | drop the handle / [`NotifierHandle::unregister`] |
//! | `struct kvm_page_track_notifier_node` | a [`TrackNotifier`] plus its [`RegisterOptions`] |
//! | `node->track_write(gpa, new, bytes, node)` | [`TrackNotifier::track_write`] with a [`WriteEvent`] |
//! | `node->track_remove_region(gfn, nr_pages, node)` | [`TrackNotifier::track_remove_region`] |
//! | `node->track_flush_slot` (until v6.5; removed) | none: a DELETE delivers [`TrackNotifier::track_remove_region`] once, after the slot is unreachable |
//!
//! ## KVM-internal API (what KVM's own shadow MMU calls)
//!
//! | kernel | pagetrack |
//! |---|---|
//! | `__kvm_write_track_add_gfn(kvm, slot, gfn)` | [`PageTracker::add_gfns`] with an [`AsId`] (the slot is found by address space and frame); [`PageTracker::add_range`] for runs |
//! | `__kvm_write_track_remove_gfn(kvm, slot, gfn)` | [`PageTracker::remove_gfns`], [`PageTracker::remove_range`] |
//! | `update_gfn_write_track` (`WARN_ON_ONCE` on over/underflow) | refused instead: [`Error::TrackCountOverflow`], [`Error::NotTracked`] |
//! | `kvm_gfn_is_write_tracked(kvm, slot, gfn)` | [`SlotRef::is_write_tracked`] (a slot the caller holds), [`Memslots::is_write_tracked`], [`PageTracker::is_write_tracked`], [`TrackReader::is_write_tracked`] |
//! | `gfn_write_track` (`unsigned short[]` per slot) | per-slot `u16` counts, read by [`PageTracker::track_count`]; their size is [`PageTracker::write_track_bytes`] |
//! | `kvm_page_track_write(vcpu, gpa, new, bytes)` / `__kvm_page_track_write` | [`PageTracker::report_write`], [`TrackReader::report_write`] |
//! | `kvm_page_track_has_external_user(kvm)` | [`PageTracker::has_external_user`] |
//! | `kvm_page_track_write_tracking_enabled(kvm)` | [`PageTracker::is_enabled`] |
//! | `kvm_enable_external_write_tracking` (on-demand, first registration) | [`PageTracker::register`], sticky: [`PageTracker::external_tracking_enabled`] |
//! | `kvm_page_track_write_tracking_alloc` (first shadow root; `kvm_page_track_enable_mmu_write_tracking` in v5.16–v6.5) | [`PageTracker::enable_write_tracking`] |
//! | `KVM_BUG_ON(!write_tracking_enabled)` in add/remove | [`Error::TrackingDisabled`] |
//! | `kvm_page_track_init` / `kvm_page_track_cleanup` (the SRCU head) | [`PageTracker::new`] / drop |
//! | `CONFIG_KVM_EXTERNAL_WRITE_TRACKING` | the `notifiers` crate feature |
//!
//! ## Memslot hooks
//!
//! | kernel | pagetrack |
//! |---|---|
//! | `KVM_SET_USER_MEMORY_REGION` and its change kinds (`KVM_MR_CREATE`, `_DELETE`, `_MOVE`, `_FLAGS_ONLY`) | [`PageTracker::set_memory_region`] with a [`MemoryRegion`] → [`SlotChange`] |
//! | `kvm_page_track_create_memslot(kvm, slot, npages)` | the CREATE/MOVE branch of [`PageTracker::set_memory_region`] (counts allocated only once [`PageTracker::is_enabled`]) |
//! | `kvm_page_track_free_memslot(slot)` | dropping the slot's counts when the last [`Memslots`] snapshot holding it goes |
//! | `kvm_page_track_delete_slot(kvm, slot)` (v6.6+; `kvm_page_track_flush_slot` before) | the DELETE branch of [`PageTracker::set_memory_region`]: waits for in-flight dispatch, then [`TrackNotifier::track_remove_region`] and [`Enforcement::region_removed`] |
//! | MOVE rejected while external users exist (`kvm_arch_prepare_memory_region`) | [`Error::MoveWithNotifiers`] |
//! | `KVM_MEM_LOG_DIRTY_PAGES` | [`RegionFlags`] |
//! | address spaces (`kvm_arch_nr_memslot_as_ids`, SMM) | [`AsId`], [`TrackerConfig::with_address_spaces`] |
//!
//! ## MMU side
//!
//! | kernel | pagetrack |
//! |---|---|
//! | `kvm_mmu_gfn_disallow_lpage` / `kvm_mmu_gfn_allow_lpage` (`disallow_lpage` counts) | kept on every add/remove; read by [`PageTracker::max_mapping_level`] → [`PageLevel`] |
//! | `kvm_mmu_slot_gfn_write_protect` + `kvm_flush_remote_tlbs` | [`Enforcement::protect`] (pagetrack-kvm: the frames move into read-only KVM memslot fragments before `add_gfn` returns) |
//! | dropping write protection (lazily, on the next fault) | [`Enforcement::unprotect`] |
//! | `page_fault_handle_page_track` | [`classify_fault`] with a [`FaultInfo`] → [`FaultAction`] |
//! | `kvm_mmu_track_write` (KVM's own shadow-page coherence, v6.6+) | a [`NotifierClass::Coherence`] notifier, dispatched before ordinary ones |
//! | `mmu_lock` / `slots_lock` / `kvm->srcu` | internal mutexes and `ArcSwap` snapshots (see the crate doc's concurrency section) |

// The links above resolve against the crate root's items.
#[allow(unused_imports)]
use crate::*;
