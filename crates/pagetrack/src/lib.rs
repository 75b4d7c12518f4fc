//! # pagetrack: exact, page-granular guest write tracking
//!
//! The guest write-tracking machinery of Linux KVM/x86 (`arch/x86/kvm/mmu/page_track.c`,
//! `arch/x86/include/asm/kvm_page_track.h`, v6.6+) as a safe, backend-neutral library for
//! userspace VMMs. A VMM says "tell me about every write to guest frame G" with
//! [`PageTracker::add_gfn`]; from then on every write to G that a backend reports through
//! [`PageTracker::report_write`] reaches the registered [`TrackNotifier`]s with its address,
//! new bytes, old bytes and source, until the last [`PageTracker::remove_gfn`].
//!
//! This crate holds the semantics: memslots in several address spaces and their change
//! protocol, per-frame `u16` reference counts (2 bytes per 4 KiB frame, allocated only once
//! tracking is enabled), huge-page disallow counts, the notifier registry and fault
//! classification. It has no KVM dependency and no `unsafe`. Enforcement on a real KVM guest
//! lives in `pagetrack-kvm`, which implements [`Enforcement`].
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use pagetrack::{
//!     Gfn, Gpa, MemoryRegion, NoEnforcement, NotifierClass, PageTracker, SlotId, Source,
//!     TrackNotifier, TrackerConfig, WriteEvent,
//! };
//!
//! #[derive(Default)]
//! struct Log(Mutex<Vec<(u64, Vec<u8>)>>);
//! impl TrackNotifier for Log {
//!     fn track_write(&self, e: &WriteEvent<'_>) {
//!         self.0.lock().expect("not poisoned").push((e.gpa.0, e.new.to_vec()));
//!     }
//! }
//!
//! # #[cfg(feature = "notifiers")] // the example needs the default `notifiers` feature
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let tracker = PageTracker::new(TrackerConfig::default(), Arc::new(NoEnforcement));
//! // 16 MiB of RAM at guest-physical 0.
//! tracker.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 4096))?;
//! let log = Arc::new(Log::default());
//! let handle = tracker.register(log.clone(), NotifierClass::Ordinary)?; // enables tracking
//! tracker.add_gfn(Gfn(5))?;
//!
//! // A backend reports writes; only the tracked frame's piece is delivered.
//! let bytes = [1u8; 8];
//! tracker.report_write(&WriteEvent::new(Gpa(0x5ffc), &bytes, Source::Vcpu(0)));
//! tracker.report_write(&WriteEvent::new(Gpa(0x9000), &bytes, Source::Device));
//! assert_eq!(*log.0.lock().expect("not poisoned"), vec![(0x5ffc, vec![1u8; 4])]);
//!
//! tracker.remove_gfn(Gfn(5))?;
//! drop(handle); // unregisters; returns after any in-flight callback finished
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "notifiers"))]
//! # fn main() {}
//! ```
//!
//! ## Concurrency and callback guarantees
//!
//! - Readers never lock: the memslot set and the notifier list are `ArcSwap` snapshots (the
//!   kernel's SRCU); writers serialize on two mutexes that stand in for `slots_lock` and
//!   `mmu_lock`. [`PageTracker::is_write_tracked`] is a snapshot load, a two-level binary
//!   search and one array load.
//! - "Tracking enabled" is published with release/acquire after every slot has its counts, so
//!   a reader that sees it enabled always finds the arrays (B5).
//! - Every add/remove is validated before anything changes; a failed call changes nothing
//!   (no count, no huge-page count, no backend call). Batches are all or nothing.
//! - When [`PageTracker::add_gfn`] returns, the backend has made enforcement live (the
//!   [`Enforcement::protect`] contract). When the last [`PageTracker::remove_gfn`] of a frame
//!   returns, no event for that frame is delivered any more: it waits for dispatches that may
//!   have seen the frame tracked. (Called from inside a callback it cannot wait for its own
//!   dispatch, so there a dispatch already running on another thread may still deliver one.)
//!   The wait covers every dispatch in progress, not only those for that frame: a callback
//!   must therefore never block on a thread that may be inside the last `remove_gfn` of a
//!   frame (it would wait for the callback, and the callback for it).
//! - Callbacks run on the writer's thread with no pagetrack lock held; they may sleep and may
//!   add and remove tracks. Dropping or [`NotifierHandle::unregister`]ing a handle returns only
//!   after every in-flight callback of that notifier finished, and it is never called again.
//!   Unregistering from inside its own callback returns [`UnregisterError`] instead of
//!   deadlocking; changing memslots from inside a callback returns [`Error::InCallback`].
//! - Dispatch order: [`NotifierClass::Coherence`] notifiers first, then ordinary ones; newest
//!   first inside each class (B26).
//!
//! ## Deliberate differences from the kernel
//!
//! - R1/R2: overflow past 65535 and removal at 0 are errors with no side effect
//!   ([`LimitMode::KernelCompat`] reproduces B18 for differential tests).
//! - R3: `track_remove_region` carries the address space.
//! - R4/R5: RAII handles; unregister from inside the callback is an error.
//! - R7: every gfn is bounds-checked against its slot ([`Error::UnknownGfn`]).
//! - Events are delivered only for tracked frames (the kernel delivers every emulated write and
//!   leaves filtering to each consumer), carry old bytes and their [`Source`], and
//!   `track_write` runs after memory was updated, as in the kernel.
//! - K7 (2026): a frame tracked in either x86 address space counts as tracked in both.
//!
//! ## Crate features
//!
//! - `notifiers` (default): the notifier registry. Without it, as with the kernel's
//!   `CONFIG_KVM_EXTERNAL_WRITE_TRACKING=n`, there is no `register`, `has_external_user` is
//!   always false, and tracking is enabled by [`PageTracker::enable_write_tracking`] only.
//!
//! ## Kernel names
//!
//! | kernel | pagetrack |
//! |---|---|
//! | `struct kvm` page-track state | [`PageTracker`] |
//! | `kvm_write_track_add_gfn` / `_remove_gfn` | [`PageTracker::add_gfn`] / [`PageTracker::remove_gfn`] |
//! | `__kvm_write_track_add_gfn(kvm, slot, gfn)` | [`PageTracker::add_gfns`] with an [`AsId`] |
//! | `kvm_gfn_is_write_tracked` | [`PageTracker::is_write_tracked`], [`Memslots::is_write_tracked`] |
//! | `kvm_page_track_register_notifier` | [`PageTracker::register`] → [`NotifierHandle`] |
//! | `kvm_page_track_unregister_notifier` | drop / [`NotifierHandle::unregister`] |
//! | `kvm_page_track_has_external_user` | [`PageTracker::has_external_user`] |
//! | `kvm_page_track_write` | [`PageTracker::report_write`] |
//! | `track_write` / `track_remove_region` | [`TrackNotifier`] methods |
//! | `kvm_page_track_write_tracking_enabled` | [`PageTracker::is_enabled`] |
//! | `kvm_page_track_enable_external` / first shadow root | [`PageTracker::enable_write_tracking`] |
//! | `gfn_write_track` (`unsigned short[]`) | per-slot `u16` counts ([`PageTracker::track_count`]) |
//! | `disallow_lpage` | [`PageTracker::max_mapping_level`] |
//! | `KVM_SET_USER_MEMORY_REGION` change kinds | [`PageTracker::set_memory_region`] → [`SlotChange`] |
//! | `page_fault_handle_page_track` | [`classify_fault`] |
//! | write-protecting SPTEs, flushing TLBs | [`Enforcement::protect`] |
#![forbid(unsafe_code)]

mod addr;
mod context;
mod error;
mod fault;
mod grace;
mod memslot;
mod notifier;
mod sync;
mod track;

pub use addr::{AsId, GFN_LIMIT, Gfn, Gpa, PAGE_SHIFT, PAGE_SIZE, PageLevel, SlotId};
pub use error::{Error, Result};
pub use fault::{FaultAction, FaultInfo, classify_fault};
pub use memslot::{MemoryRegion, Memslots, RegionFlags, SlotChange, SlotRef};
pub use notifier::{Delivery, NotifierClass, RegisterOptions, Source, TrackNotifier, WriteEvent};
pub use track::{
    BackendError, Enforcement, FrameRun, LimitMode, NoEnforcement, PageTracker, TrackReader,
    TrackerConfig, TrackerStats,
};
#[cfg(feature = "notifiers")]
pub use track::{NotifierHandle, UnregisterError};

#[cfg(test)]
#[cfg(not(loom))]
mod tests;

#[cfg(all(test, loom))]
mod loom;
