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
//! The kernel's names for all of this, and the item here that plays each part, are in
//! [`kernel_names`].
//!
//! ## Walk-through
//!
//! Each step is a doc-test that runs (`cargo test --doc -p pagetrack`); none needs `/dev/kvm`.
//! They use the default `notifiers` feature.
//!
//! 1. **Create a tracker and describe guest memory.** The backend is an [`Enforcement`];
//!    [`NoEnforcement`] enforces nothing (a backend that sees every write itself, or a test).
//!    Memslots change by [`PageTracker::set_memory_region`], which says what kind of change a
//!    region asked for, as `KVM_SET_USER_MEMORY_REGION` does.
//!
//! ```
//! use std::sync::Arc;
//! use pagetrack::{Gfn, MemoryRegion, NoEnforcement, PageTracker, SlotChange, SlotId, TrackerConfig};
//!
//! let tracker = PageTracker::new(TrackerConfig::default(), Arc::new(NoEnforcement));
//! // 16 MiB of RAM at guest-physical 0, and 1 MiB more at 4 GiB.
//! let low = MemoryRegion::new(SlotId(0), Gfn(0), 4096);
//! assert_eq!(tracker.set_memory_region(low)?, SlotChange::Create);
//! tracker.set_memory_region(MemoryRegion::new(SlotId(1), Gfn(0x10_0000), 256))?;
//! assert_eq!(tracker.set_memory_region(low)?, SlotChange::Unchanged);
//! // Nothing is tracked, and no count array exists yet (allocated on enabling).
//! assert!(!tracker.is_enabled());
//! assert_eq!(tracker.write_track_bytes(), 0);
//! // Overlapping slots are refused, and change nothing.
//! let overlap = MemoryRegion::new(SlotId(2), Gfn(4000), 200);
//! assert!(matches!(tracker.set_memory_region(overlap), Err(pagetrack::Error::MemslotOverlap { .. })));
//! assert_eq!(tracker.memslots().len(pagetrack::AsId::NORMAL), 2);
//! # Ok::<(), pagetrack::Error>(())
//! ```
//!
//! 2. **Register a notifier.** A [`TrackNotifier`] gets [`TrackNotifier::track_write`] for each
//!    write to a tracked frame. Registering the first one enables tracking (count arrays for
//!    every slot, 2 bytes per frame); the returned [`NotifierHandle`] unregisters on drop.
//!
//! ```
//! # #[cfg(feature = "notifiers")] {
//! use std::sync::{Arc, Mutex};
//! use pagetrack::{Gfn, MemoryRegion, NoEnforcement, NotifierClass, PageTracker, SlotId};
//! use pagetrack::{TrackNotifier, TrackerConfig, WriteEvent};
//!
//! #[derive(Default)]
//! struct Log(Mutex<Vec<(u64, Vec<u8>)>>);
//! impl TrackNotifier for Log {
//!     fn track_write(&self, e: &WriteEvent<'_>) {
//!         self.0.lock().expect("not poisoned").push((e.gpa.0, e.new.to_vec()));
//!     }
//! }
//!
//! let tracker = PageTracker::new(TrackerConfig::default(), Arc::new(NoEnforcement));
//! tracker.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 4096))?;
//! let log = Arc::new(Log::default());
//! let handle = tracker.register(log.clone(), NotifierClass::Ordinary)?;
//! assert!(tracker.is_enabled() && tracker.has_external_user());
//! assert_eq!(tracker.write_track_bytes(), 2 * 4096);
//! drop(handle); // returns after any in-flight callback finished
//! assert_eq!(tracker.notifier_count(), 0);
//! # }
//! # Ok::<(), pagetrack::Error>(())
//! ```
//!
//! 3. **Track frames.** Tracks are reference counts: a frame is tracked while its count is
//!    non-zero, and a tracked frame is never mapped huge. Single frames, batches and ranges
//!    are all or nothing; a bad call is a typed error that changed nothing.
//!
//! ```
//! # #[cfg(feature = "notifiers")] {
//! # use std::sync::Arc;
//! use pagetrack::{AsId, Error, Gfn, MemoryRegion, NoEnforcement, PageLevel, PageTracker, SlotId};
//! # use pagetrack::{NotifierClass, TrackNotifier, TrackerConfig, WriteEvent};
//! # struct Quiet;
//! # impl TrackNotifier for Quiet { fn track_write(&self, _: &WriteEvent<'_>) {} }
//! # let tracker = PageTracker::new(TrackerConfig::default(), Arc::new(NoEnforcement));
//! # tracker.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 4096))?;
//! # let _handle = tracker.register(Arc::new(Quiet), NotifierClass::Ordinary)?;
//! tracker.add_gfn(Gfn(5))?;
//! tracker.add_gfn(Gfn(5))?; // a second user of the same frame
//! tracker.add_range(AsId::NORMAL, Gfn(0x200), 16)?;
//! assert_eq!(tracker.track_count(AsId::NORMAL, Gfn(5))?, 2);
//! assert!(tracker.is_write_tracked(AsId::NORMAL, Gfn(0x20f)));
//! assert!(!tracker.is_write_tracked(AsId::NORMAL, Gfn(0x210)));
//! // Frame 0x200 lies in the 2 MiB page 0x200..0x400: at most 4 KiB mappings there now.
//! assert_eq!(tracker.max_mapping_level(AsId::NORMAL, Gfn(0x3ff))?, PageLevel::K4);
//!
//! // Refused, with nothing changed: a frame outside every slot, a batch with such a frame,
//! // removing a track that is not there.
//! assert!(matches!(tracker.add_gfn(Gfn(9999)), Err(Error::UnknownGfn { .. })));
//! assert!(tracker.add_gfns(AsId::NORMAL, &[Gfn(6), Gfn(9999)]).is_err());
//! assert!(!tracker.is_write_tracked(AsId::NORMAL, Gfn(6)));
//! assert!(matches!(tracker.remove_gfn(Gfn(7)), Err(Error::NotTracked { .. })));
//!
//! tracker.remove_gfn(Gfn(5))?;
//! assert!(tracker.is_write_tracked(AsId::NORMAL, Gfn(5))); // one track left
//! tracker.remove_gfn(Gfn(5))?;
//! assert!(!tracker.is_write_tracked(AsId::NORMAL, Gfn(5)));
//! # }
//! # Ok::<(), pagetrack::Error>(())
//! ```
//!
//! 4. **Report writes.** A backend reports every write it applied (or trapped) with
//!    [`PageTracker::report_write`]; only the pieces that fall in tracked frames reach the
//!    notifiers, with their guest-physical address, new bytes and [`Source`].
//!
//! ```
//! # #[cfg(feature = "notifiers")] {
//! # use std::sync::{Arc, Mutex};
//! use pagetrack::{Gfn, Gpa, Source, WriteEvent};
//! # use pagetrack::{MemoryRegion, NoEnforcement, NotifierClass, PageTracker, SlotId};
//! # use pagetrack::{TrackNotifier, TrackerConfig};
//! # #[derive(Default)]
//! # struct Log(Mutex<Vec<(u64, Vec<u8>)>>);
//! # impl TrackNotifier for Log {
//! #     fn track_write(&self, e: &WriteEvent<'_>) {
//! #         self.0.lock().expect("not poisoned").push((e.gpa.0, e.new.to_vec()));
//! #     }
//! # }
//! # let tracker = PageTracker::new(TrackerConfig::default(), Arc::new(NoEnforcement));
//! # tracker.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 4096))?;
//! # let log = Arc::new(Log::default());
//! # let _handle = tracker.register(log.clone(), NotifierClass::Ordinary)?;
//! tracker.add_gfn(Gfn(5))?;
//! let bytes = [1u8; 8];
//! // Straddles frames 5 and 6: only the 4 bytes in frame 5 are delivered.
//! tracker.report_write(&WriteEvent::new(Gpa(0x5ffc), &bytes, Source::Vcpu(0)));
//! // An untracked frame: nothing.
//! tracker.report_write(&WriteEvent::new(Gpa(0x9000), &bytes, Source::Device));
//! assert_eq!(*log.0.lock().expect("not poisoned"), vec![(0x5ffc, vec![1u8; 4])]);
//! # }
//! # Ok::<(), pagetrack::Error>(())
//! ```
//!
//! 5. **Plug in a backend.** An [`Enforcement`] hears of frames when their tracked state
//!    changes (first add, last remove), as [`FrameRun`]s; a failure undoes the update.
//!    `pagetrack-kvm`'s enforcer is the real one: it removes the frames from KVM's writable
//!    memslots.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use pagetrack::{AsId, BackendError, Enforcement, Error, FrameRun, Gfn, MemoryRegion};
//! use pagetrack::{PageTracker, SlotId, TrackerConfig};
//!
//! #[derive(Default)]
//! struct Recorder(Mutex<Vec<(bool, FrameRun)>>);
//! impl Enforcement for Recorder {
//!     fn protect(&self, runs: &[FrameRun]) -> Result<(), BackendError> {
//!         if runs.iter().any(|r| r.first == Gfn(13)) {
//!             return Err(BackendError::msg("frame 13 cannot be protected"));
//!         }
//!         self.0.lock().expect("not poisoned").extend(runs.iter().map(|r| (true, *r)));
//!         Ok(())
//!     }
//!     fn unprotect(&self, runs: &[FrameRun]) -> Result<(), BackendError> {
//!         self.0.lock().expect("not poisoned").extend(runs.iter().map(|r| (false, *r)));
//!         Ok(())
//!     }
//! }
//!
//! let backend = Arc::new(Recorder::default());
//! let tracker = PageTracker::new(TrackerConfig::default(), backend.clone());
//! tracker.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 4096))?;
//! tracker.enable_write_tracking()?; // an internal user: no notifier needed
//! tracker.add_range(AsId::NORMAL, Gfn(8), 4)?;
//! tracker.add_gfn(Gfn(9))?; // already tracked: the backend hears nothing
//! tracker.remove_range(AsId::NORMAL, Gfn(8), 4)?; // frame 9 keeps one track
//! let run = |first, count| FrameRun { as_id: AsId::NORMAL, first: Gfn(first), count };
//! assert_eq!(
//!     *backend.0.lock().expect("not poisoned"),
//!     vec![(true, run(8, 4)), (false, run(8, 1)), (false, run(10, 2))],
//! );
//! // A failing backend: the add is undone and the error keeps the backend's.
//! assert!(matches!(tracker.add_gfn(Gfn(13)), Err(Error::Backend { .. })));
//! assert!(!tracker.is_write_tracked(AsId::NORMAL, Gfn(13)));
//! # Ok::<(), pagetrack::Error>(())
//! ```
//!
//! 6. **Delete a slot.** A DELETE drops the slot's counts, and every notifier hears
//!    [`TrackNotifier::track_remove_region`] once, after no write to the old slot can be
//!    delivered any more.
//!
//! ```
//! # #[cfg(feature = "notifiers")] {
//! use std::sync::{Arc, Mutex};
//! use pagetrack::{AsId, Gfn, MemoryRegion, NoEnforcement, NotifierClass, PageTracker};
//! use pagetrack::{SlotChange, SlotId, TrackNotifier, TrackerConfig, WriteEvent};
//!
//! #[derive(Default)]
//! struct Regions(Mutex<Vec<(u64, u64)>>);
//! impl TrackNotifier for Regions {
//!     fn track_write(&self, _: &WriteEvent<'_>) {}
//!     fn track_remove_region(&self, _: AsId, base: Gfn, npages: u64) {
//!         self.0.lock().expect("not poisoned").push((base.0, npages));
//!     }
//! }
//!
//! let tracker = PageTracker::new(TrackerConfig::default(), Arc::new(NoEnforcement));
//! tracker.set_memory_region(MemoryRegion::new(SlotId(3), Gfn(0x100), 64))?;
//! let regions = Arc::new(Regions::default());
//! let _handle = tracker.register(regions.clone(), NotifierClass::Ordinary)?;
//! tracker.add_gfn(Gfn(0x120))?;
//! let change = tracker.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(3)))?;
//! assert_eq!(change, SlotChange::Delete);
//! assert_eq!(*regions.0.lock().expect("not poisoned"), vec![(0x100, 64)]);
//! assert!(!tracker.is_write_tracked(AsId::NORMAL, Gfn(0x120)));
//! # }
//! # Ok::<(), pagetrack::Error>(())
//! ```
//!
//! ## Concurrency and callback guarantees
//!
//! - Readers never lock: the memslot set and the notifier list are `ArcSwap` snapshots (the
//!   kernel's SRCU); writers serialize on mutexes that stand in for `slots_lock` and
//!   `mmu_lock`. [`PageTracker::is_write_tracked`] is a snapshot load, a two-level binary
//!   search and one array load; [`SlotRef::is_write_tracked`] (a slot the caller already
//!   holds, as the kernel's callers do) is the array load alone.
//! - "Tracking enabled" is published with release/acquire after every slot has its counts, so
//!   a reader that sees it enabled always finds the arrays (B5).
//! - Every add/remove is validated before anything changes, and a failed call changes nothing
//!   (no count, no huge-page count, no backend state), even when the backend fails or panics.
//!   An add makes the counts non-zero before [`Enforcement::protect`] (the kernel's order,
//!   B16), so a write or fault while protection goes live finds the frame tracked; if protect
//!   fails the counts are undone (writes during the failed call may have been delivered, none
//!   after it returned). A remove calls [`Enforcement::unprotect`] before the counts drop, so
//!   while it runs, and if it fails, writes are still delivered. Batches and ranges are all
//!   or nothing; ranges are scanned in place, without per-frame temporaries. A range reserves
//!   its frames for the whole call (overlapping updates, and a DELETE or MOVE of a slot it
//!   touches, wait for it) and holds `mmu_lock` for at most 65,536 frames at a time, letting
//!   queued updates of other frames in between; lookups and dispatch never wait for it. Other
//!   threads may see some of a range's frames tracked before the call returns (as with any
//!   update: a lockless query is a snapshot, B19).
//! - When [`PageTracker::add_gfn`] returns, the backend has made enforcement live (the
//!   [`Enforcement::protect`] contract). When the last [`PageTracker::remove_gfn`] of a frame
//!   returns, no event for that frame is delivered any more, however many threads remove at
//!   once: it waits for the dispatches that may have seen the frame tracked. It never waits
//!   for a dispatch that began after its own wait started (a remover queued behind another
//!   one may wait for dispatches that began while it was queued), so a steady stream of
//!   dispatches cannot hold it. Called from inside a
//!   callback it cannot wait for its own dispatch, so there a dispatch already running on
//!   another thread may still deliver one. The wait covers every dispatch in progress, not
//!   only those for that frame: a callback must therefore never block on a thread that may be
//!   inside the last `remove_gfn` of a frame, or inside [`PageTracker::set_memory_region`]
//!   (each would wait for the callback, and the callback for it).
//! - A DELETE or MOVE of a slot waits the same way before it returns: no `track_write` for
//!   the old slot arrives after `set_memory_region` returned, nor after its
//!   `track_remove_region`. Memslot changes are serialized, and `track_remove_region` runs with
//!   no lock held that a callback's permitted operations take (only the lock that orders
//!   memslot changes, which callbacks may not make).
//! - Callbacks run on the writer's thread with no pagetrack lock held; they may sleep and may
//!   add and remove tracks and register notifiers. Dropping or [`NotifierHandle::unregister`]ing a
//!   handle returns only after every in-flight callback of that notifier finished, and it is
//!   never called again. Unregistering from inside its own callback returns [`UnregisterError`].
//!   Dropping a handle inside a callback (its own, or the one the error gives back) waits for
//!   the calls of other threads only, and only while no other thread is doing the same: two
//!   callbacks that drop each other's handles would wait for each other, so the second of
//!   them only stops new calls, and a call already running elsewhere may then end after its
//!   drop returned. Changing memslots from inside a callback returns [`Error::InCallback`];
//!   [`PageTracker::in_callback`] lets a VMM refuse such calls before taking locks of its own.
//! - A MOVE is refused once [`PageTracker::register`] has returned (K4): the check and the
//!   registration are serialized.
//! - Backend calls ([`Enforcement`]) never overlap: all of them run under `mmu_lock`.
//! - Panics: a panic in a callback or in the backend propagates to the caller after drop
//!   guards restored every in-flight count, read section and callback frame, so later
//!   unregistering and removing do not hang. A panicking `protect`/`unprotect` changed nothing.
//!   Notifiers after a panicking one in dispatch order do not see that one write piece, and a
//!   panic in `track_remove_region` leaves the (committed) DELETE done but the remaining
//!   notifiers unnotified. A panic in [`Enforcement::region_removed`] is re-raised after the
//!   DELETE's wait and notifications.
//! - Dispatch order: [`NotifierClass::Coherence`] notifiers first, then ordinary ones; newest
//!   first inside each class (B26).
//! - The hand-written protocols (the grace domain of removals and the in-flight accounting of
//!   unregistration) are model-checked with `loom` (`RUSTFLAGS="--cfg loom" cargo test -p
//!   pagetrack --lib loom`), and tested under races with several removers, writers,
//!   registrations and memslot changes at once (`tests/races.rs`, `tests/stress.rs`,
//!   `tests/linearizable.rs`).
//!
//! ## Address spaces
//!
//! Tracking is per address space: a frame is tracked in an address space when that address
//! space has a slot containing it and its count there is non-zero, and the backend is told
//! about `(address space, frame)` exactly when that answer changes. A consumer that wants the
//! writes of both x86 address spaces (normal and SMM, where they share RAM) tracks the frame in
//! both. (The kernel since K7 also treats a frame tracked in the other address space as
//! tracked, because its shadow MMU shares shadow pages between them; here that answer would
//! claim "tracked" where no backend enforces it.)
//!
//! ## Crate features
//!
//! - `notifiers` (default): the notifier registry. Without it, as with the kernel's
//!   `CONFIG_KVM_EXTERNAL_WRITE_TRACKING=n`, there is no `register`, `has_external_user` is
//!   always false, and tracking is enabled by [`PageTracker::enable_write_tracking`] only.
//!
//! ## Kernel names
//!
//! The map from the kernel's page-track API (`kvm_write_track_add_gfn`,
//! `kvm_page_track_register_notifier`, `kvm_page_track_write`, the memslot hooks, ...) to the
//! items here is the [`kernel_names`] module.
#![forbid(unsafe_code)]

mod addr;
mod context;
mod error;
mod fault;
mod grace;
pub mod kernel_names;
mod memslot;
mod notifier;
mod sync;
mod track;
mod tracking;

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
pub use tracking::Tracking;

#[cfg(test)]
#[cfg(not(loom))]
mod tests;

#[cfg(all(test, loom))]
mod loom;
