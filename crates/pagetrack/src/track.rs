//! The VM-wide tracker: memslots, write-track counts, huge-page accounting, enforcement and
//! write dispatch (the kernel's `struct kvm` page-track state).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use arc_swap::ArcSwap;

use crate::addr::{AsId, Gfn, Gpa, PAGE_SIZE, PageLevel};
use crate::error::{Error, Result};
use crate::grace::Grace;
use crate::memslot::{self, LPAGE_LEVELS, MemoryRegion, Memslots, Slot, SlotChange};
use crate::notifier::WriteEvent;
#[cfg(feature = "notifiers")]
use crate::notifier::{Entry, RegisterOptions, Registry, TrackNotifier};

/// What the core asks of an enforcement backend (for example pagetrack-kvm's read-only memslot
/// fragments).
///
/// Calls are serialized by the tracker (all three run under its `mmu_lock`), so no two of them
/// overlap; they must not call back into the tracker. Tracking is per address space: the
/// backend is told about an `(address space, frame)` pair when [`PageTracker::is_write_tracked`]
/// for that pair changes, so a backend keyed by guest-physical address that serves several
/// address spaces must keep its own union of them.
pub trait Enforcement: Send + Sync {
    /// The frames of `runs` go from untracked to tracked. Return once no write to them can
    /// land without reaching [`PageTracker::report_write`] (the kernel flushes remote TLBs
    /// before returning). The counts are already non-zero during the call (the kernel's
    /// order, B16), so a write trapped or a fault classified meanwhile finds the frames
    /// tracked.
    ///
    /// # Errors
    /// On failure enforcement must be as before the call; the core undoes the counts and the
    /// caller gets [`Error::Backend`]. Writes reported while the failing call ran may have been
    /// delivered; none is once the add returned.
    fn protect(&self, runs: &[FrameRun]) -> std::result::Result<(), BackendError>;

    /// The last track of the frames of `runs` is about to go away; writes to them may run at
    /// full speed again once this returns. The counts are still non-zero during the call, so a
    /// write reported meanwhile is delivered.
    ///
    /// # Errors
    /// On failure enforcement must be as before the call (the frames stay protected); the
    /// caller gets [`Error::Backend`] and no count changed.
    fn unprotect(&self, runs: &[FrameRun]) -> std::result::Result<(), BackendError>;

    /// A slot was deleted or moved away; its counts (and so its frames' protection) are gone.
    /// Called once the new memslot set is installed, before dispatches that may still see the
    /// old slot have finished.
    fn region_removed(&self, region: &MemoryRegion) {
        let _ = region;
    }

    /// An untrack of the frames of `runs` (one track each; not yet validated, so it may still
    /// fail or leave some frames tracked) is about to take the tracker's lock. Called on the
    /// caller's thread with no lock of the tracker held (it may be inside a notifier's
    /// callback), so the backend may report writes here: one that holds writes it has not
    /// reported yet (a backend coalescing writes) reports those to the frames now, while they
    /// are still tracked, and stops holding new ones for them until
    /// [`Enforcement::after_untrack`]. Default: nothing.
    fn before_untrack(&self, runs: &[FrameRun]) {
        let _ = runs;
    }

    /// The untrack [`Enforcement::before_untrack`] announced has returned (successfully or
    /// not), with no lock of the tracker held. Default: nothing.
    fn after_untrack(&self, runs: &[FrameRun]) {
        let _ = runs;
    }

    /// A notifier that accepts coalesced events is about to be unregistered (its handle
    /// dropped), with no lock of the tracker held: a backend holding writes it has not
    /// reported yet (coalescing them) reports them now, so the leaving notifier gets every
    /// write made before its unregistration began. Not called from inside a callback of the
    /// tracker (a notifier dropped there gets the writes reported by then). Default: nothing.
    fn before_unregister(&self) {}

    /// A notifier with `delivery` is about to be registered: called on the registering
    /// thread with no lock of the tracker held, before the notifier can receive anything
    /// (so writes the backend reports during the call reach only the notifiers registered
    /// already), and followed by [`Enforcement::after_register`] once it is registered. A
    /// backend holding writes it has not reported yet (coalescing them) that the new
    /// notifier must not get coalesced reports them now and holds no new ones until
    /// `after_register` (where it sees the new notifier registered). Not called from inside
    /// a callback of the tracker (neither is `after_register`): a notifier registered there
    /// may get writes the backend held before, reported at its next report point.
    /// Default: nothing.
    fn before_register(&self, delivery: crate::Delivery) {
        let _ = delivery;
    }

    /// The registration [`Enforcement::before_register`] announced has ended (the notifier
    /// is registered, or the registration unwound). Default: nothing.
    fn after_register(&self, delivery: crate::Delivery) {
        let _ = delivery;
    }
}

/// Consecutive frames of one address space whose tracked state changes together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrameRun {
    /// The address space.
    pub as_id: AsId,
    /// The first frame.
    pub first: Gfn,
    /// Number of frames (at least 1).
    pub count: u64,
}

impl FrameRun {
    /// The frames of the run, in order.
    pub fn frames(&self) -> impl Iterator<Item = Gfn> + use<> {
        let first = self.first.0;
        (first..first + self.count).map(Gfn)
    }

    /// Every `(address space, frame)` pair of `runs`, in order (for backends keyed by frame).
    pub fn pairs(runs: &[FrameRun]) -> impl Iterator<Item = (AsId, Gfn)> + '_ {
        runs.iter()
            .flat_map(|r| r.frames().map(move |g| (r.as_id, g)))
    }

    /// Total number of frames of `runs`.
    pub fn total(runs: &[FrameRun]) -> u64 {
        runs.iter().map(|r| r.count).sum()
    }
}

/// A backend failure, kept whole (its own source chain included) as the `source` of the
/// core's [`Error::Backend`]. Shared, so that [`Error`] stays `Clone`; two are equal when
/// their messages are.
#[derive(Debug, Clone, thiserror::Error)]
#[error(transparent)]
pub struct BackendError(pub std::sync::Arc<dyn std::error::Error + Send + Sync>);

impl BackendError {
    /// Wraps a backend's error.
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> BackendError {
        BackendError(std::sync::Arc::new(e))
    }

    /// A failure described by a message only (for backends without an error type, and tests).
    pub fn msg(message: impl Into<String>) -> BackendError {
        let boxed: Box<dyn std::error::Error + Send + Sync> = message.into().into();
        BackendError(std::sync::Arc::from(boxed))
    }
}

impl PartialEq for BackendError {
    fn eq(&self, other: &BackendError) -> bool {
        self.0.to_string() == other.0.to_string()
    }
}

impl Eq for BackendError {}

/// A backend that enforces nothing: for cores driven by an emulator that consults
/// [`PageTracker::is_write_tracked`] itself, and for tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoEnforcement;

impl Enforcement for NoEnforcement {
    fn protect(&self, _: &[FrameRun]) -> std::result::Result<(), BackendError> {
        Ok(())
    }
    fn unprotect(&self, _: &[FrameRun]) -> std::result::Result<(), BackendError> {
        Ok(())
    }
}

/// What happens when a count would leave `0..=65535`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LimitMode {
    /// Return an error and change nothing at all (R1, R2).
    #[default]
    Strict,
    /// The kernel's B18: keep the count, still apply the huge-page side effects, report success.
    /// For differential tests against the kernel only.
    KernelCompat,
}

/// Construction parameters of a [`PageTracker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct TrackerConfig {
    /// Number of memslot address spaces (x86 with SMM: 2).
    pub address_spaces: u16,
    /// Slots per address space (`KVM_CAP_NR_MEMSLOTS`: 32764).
    pub max_slots: u16,
    /// Pages per slot (KVM: 2^31 - 1).
    pub max_pages: u64,
    /// Behaviour at the count limits.
    pub limits: LimitMode,
}

impl Default for TrackerConfig {
    fn default() -> TrackerConfig {
        TrackerConfig {
            address_spaces: 2,
            max_slots: 32764,
            max_pages: (1 << 31) - 1,
            limits: LimitMode::Strict,
        }
    }
}

impl TrackerConfig {
    /// The same configuration with `n` address spaces (at least 1).
    pub fn with_address_spaces(mut self, n: u16) -> TrackerConfig {
        self.address_spaces = n.max(1);
        self
    }

    /// The same configuration with another limit mode.
    pub fn with_limits(mut self, limits: LimitMode) -> TrackerConfig {
        self.limits = limits;
        self
    }

    /// The same configuration with another slot limit.
    pub fn with_max_slots(mut self, max_slots: u16) -> TrackerConfig {
        self.max_slots = max_slots;
        self
    }
}

/// Counters kept by the tracker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TrackerStats {
    /// Writes (page-sized pieces) given to [`PageTracker::report_write`].
    pub writes_reported: u64,
    /// Of those, pieces that hit a tracked frame.
    pub writes_tracked: u64,
    /// Bytes in tracked pieces.
    pub bytes_tracked: u64,
    /// Count updates absorbed at a limit in [`LimitMode::KernelCompat`] (the kernel's B18
    /// warnings). Strict-mode refusals are errors and, like every failed call, change nothing.
    pub limit_warnings: u64,
}

static NEXT_TRACKER: AtomicU64 = AtomicU64::new(1);

/// Frames a range update handles per hold of `mmu_lock` (about 0.4 ms on this project's
/// test host, against ~0.1 s for 2^24 frames in one hold).
const RANGE_CHUNK: u64 = 1 << 16;

/// What `mmu_lock` guards.
#[derive(Debug)]
struct Mmu {
    /// The installed snapshot.
    snap: Arc<Memslots>,
    /// Frame ranges that range updates hold between their chunks.
    reserved: Vec<Reserved>,
}

/// Frames `[first, end)` of `as_id`, held by one range update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reserved {
    as_id: AsId,
    first: u64,
    end: u64,
}

impl Reserved {
    fn overlaps(&self, as_id: AsId, first: u64, end: u64) -> bool {
        self.as_id == as_id && self.first < end && first < self.end
    }
}

/// The VM-wide write tracker. Create it with [`PageTracker::new`]; share it as `Arc`.
pub struct PageTracker {
    id: u64,
    config: TrackerConfig,
    backend: Arc<dyn Enforcement>,
    slots: Arc<ArcSwap<Memslots>>,
    /// `write_tracking_enabled`: set (Release) only after every slot has its counts (B5).
    enabled: AtomicBool,
    /// The sticky `external_write_tracking_enabled` flag (B6).
    external_enabled: AtomicBool,
    /// Serializes memslot changes, including their grace wait and `track_remove_region`
    /// notifications (so notifications arrive in change order). Outermost lock; no callback
    /// operation takes it (`set_memory_region` from a callback is refused).
    changes: Mutex<()>,
    /// `slots_lock` + `slots_arch_lock`: the prepare/commit of a memslot change, and enabling.
    /// Never held while a callback runs.
    slots_lock: Mutex<()>,
    /// `mmu_lock`: count and huge-page updates, backend calls and snapshot installation. It
    /// holds the installed snapshot (the same as `slots`, both written under it), so an update
    /// under the lock reads it without an `ArcSwap` load, and the ranges being updated.
    mmu_lock: Mutex<Mmu>,
    /// Signalled when a range reservation ends.
    mmu_cv: Condvar,
    /// Threads blocked acquiring `mmu_lock`: a range update lets them in between chunks.
    mmu_waiting: AtomicU64,
    grace: Grace,
    #[cfg(feature = "notifiers")]
    registry: Registry,
    /// Held by the one thread that, from inside a callback, waits for a dropped notifier's
    /// other calls (see `NotifierHandle::retire`).
    #[cfg(feature = "notifiers")]
    callback_retire: Mutex<()>,
    writes_reported: AtomicU64,
    writes_tracked: AtomicU64,
    bytes_tracked: AtomicU64,
    limit_warnings: AtomicU64,
}

impl std::fmt::Debug for PageTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageTracker")
            .field("config", &self.config)
            .field("enabled", &self.is_enabled())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dir {
    Add,
    Remove,
}

/// The frames one add/remove names.
#[derive(Clone, Copy, Debug)]
enum Frames<'a> {
    /// A batch; duplicates count once each.
    List(&'a [Gfn]),
    /// `[first, first + n)`.
    Range { first: Gfn, n: u64 },
}

/// The frames an untrack names, as ascending runs (duplicates once), for
/// [`Enforcement::before_untrack`].
fn untrack_runs(as_id: AsId, frames: Frames<'_>) -> Vec<FrameRun> {
    match frames {
        Frames::Range { n: 0, .. } => Vec::new(),
        Frames::Range { first, n } => vec![FrameRun {
            as_id,
            first,
            count: n,
        }],
        Frames::List(gfns) => {
            let mut sorted: Vec<u64> = gfns.iter().map(|g| g.0).collect();
            sorted.sort_unstable();
            sorted.dedup();
            let mut runs: Vec<FrameRun> = Vec::new();
            for g in sorted {
                match runs.last_mut() {
                    Some(r) if r.first.0 + r.count == g => r.count += 1,
                    _ => runs.push(FrameRun {
                        as_id,
                        first: Gfn(g),
                        count: 1,
                    }),
                }
            }
            runs
        }
    }
}

/// Collects ascending frames into runs for the backend (one run without touching the heap),
/// failing instead of aborting when memory is short.
#[derive(Debug)]
struct Runs {
    as_id: AsId,
    runs: OneOrMore<FrameRun>,
}

impl Runs {
    fn new(as_id: AsId) -> Runs {
        Runs {
            as_id,
            runs: OneOrMore::with_capacity(0),
        }
    }

    fn push(&mut self, gfn: Gfn) -> Result<()> {
        if let Some(last) = self.runs.last_mut()
            && last.first.0 + last.count == gfn.0
        {
            last.count += 1;
            return Ok(());
        }
        self.runs.try_push(FrameRun {
            as_id: self.as_id,
            first: gfn,
            count: 1,
        })
    }

    fn finish(&self) -> &[FrameRun] {
        self.runs.as_slice()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in a backend or allocation while holding the lock leaves no torn state: every
    // update is validated first and rolled back on error, so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PageTracker {
    /// A tracker with no memslots and tracking not yet enabled.
    pub fn new(config: TrackerConfig, backend: Arc<dyn Enforcement>) -> Arc<PageTracker> {
        let config = config.with_address_spaces(config.address_spaces);
        let empty = Arc::new(Memslots::new(config.address_spaces));
        Arc::new(PageTracker {
            id: NEXT_TRACKER.fetch_add(1, Ordering::Relaxed),
            config,
            backend,
            slots: Arc::new(ArcSwap::new(Arc::clone(&empty))),
            enabled: AtomicBool::new(false),
            external_enabled: AtomicBool::new(false),
            changes: Mutex::new(()),
            slots_lock: Mutex::new(()),
            mmu_lock: Mutex::new(Mmu {
                snap: empty,
                reserved: Vec::new(),
            }),
            mmu_cv: Condvar::new(),
            mmu_waiting: AtomicU64::new(0),
            grace: Grace::new(),
            #[cfg(feature = "notifiers")]
            registry: Registry::default(),
            #[cfg(feature = "notifiers")]
            callback_retire: Mutex::new(()),
            writes_reported: AtomicU64::new(0),
            writes_tracked: AtomicU64::new(0),
            bytes_tracked: AtomicU64::new(0),
            limit_warnings: AtomicU64::new(0),
        })
    }

    /// The configuration the tracker was built with.
    pub fn config(&self) -> TrackerConfig {
        self.config
    }

    /// The current memslot snapshot (cheap; consistent for as long as you hold it).
    pub fn memslots(&self) -> Arc<Memslots> {
        self.slots.load_full()
    }

    /// Applies a memslot change the way `KVM_SET_USER_MEMORY_REGION` does (spec §8): derives
    /// CREATE/DELETE/MOVE/FLAGS_ONLY from the old and new slot, validates everything, then
    /// commits. DELETE then calls every notifier's `track_remove_region` once.
    ///
    /// # Errors
    /// Unknown address space or slot, overlap, size change, READONLY toggle, overflow, MOVE
    /// while a notifier is registered, allocation failure, or a call from inside a callback.
    /// On error nothing changed.
    pub fn set_memory_region(&self, region: MemoryRegion) -> Result<SlotChange> {
        if crate::context::in_callback_of(self.id) {
            return Err(Error::InCallback {
                op: "set_memory_region",
            });
        }
        let _changes = lock(&self.changes);
        let plan = {
            let _slots = lock(&self.slots_lock);
            let current = self.slots.load_full();
            let plan = memslot::plan(
                &current,
                &region,
                self.config.max_slots,
                self.config.max_pages,
            )?;
            // Prepare: allocations happen here and may fail with nothing changed. Under
            // slots_lock, so `enabled` cannot flip between this read and the install (B13).
            let with_counts = self.enabled.load(Ordering::Acquire);
            let next = Arc::new(memslot::apply(&current, &region, &plan, with_counts)?);
            // A DELETE or MOVE waits until no range update holds frames of the old slot.
            let old_region = plan
                .old
                .as_ref()
                .filter(|_| matches!(plan.change, SlotChange::Delete | SlotChange::Move))
                .map(|o| o.region);
            let mut installed = self.lock_mmu_clear(|r| {
                old_region.is_some_and(|o| r.overlaps(o.as_id, o.base.0, o.end().0))
            });
            // K4/B47, checked under mmu_lock, which `register` holds while it inserts: a MOVE
            // either commits before a registration or is refused after it.
            if plan.change == SlotChange::Move && self.has_external_user() {
                return Err(Error::MoveWithNotifiers {
                    as_id: region.as_id,
                    slot: region.slot,
                });
            }
            self.slots.store(Arc::clone(&next));
            installed.snap = next;
            if let Some(old) = plan.old.as_ref()
                && matches!(plan.change, SlotChange::Delete | SlotChange::Move)
            {
                // Before the wait below (which orders it before later sections' loads): a
                // section holding an older snapshot sees the slot gone.
                old.meta.gone.store(true, Ordering::Relaxed);
            }
            let mut backend_panic = None;
            if let Some(old) = plan.old.as_ref()
                && matches!(plan.change, SlotChange::Delete | SlotChange::Move)
            {
                // Under mmu_lock, so it never overlaps protect/unprotect. The change is
                // committed: a panic here is re-raised once the wait and the notifications
                // below are done, so notifiers still learn that the slot went away.
                backend_panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.backend.region_removed(&old.region);
                }))
                .err();
            }
            (plan, backend_panic)
        };
        let (plan, backend_panic) = plan;
        if let Some(old) = plan.old.as_ref()
            && matches!(plan.change, SlotChange::Delete | SlotChange::Move)
        {
            // Dispatches that found the old slot tracked finish before the change returns
            // (and before `track_remove_region`): no `track_write` for it arrives later.
            self.grace.synchronize();
            if plan.change == SlotChange::Delete {
                // Commit: the slot is unreachable and the change cannot fail any more (K8).
                // No pagetrack lock but `changes` is held, and no callback operation takes it.
                self.notify_remove_region(&old.region);
            }
        }
        if let Some(payload) = backend_panic {
            std::panic::resume_unwind(payload);
        }
        Ok(plan.change)
    }

    #[cfg(feature = "notifiers")]
    fn notify_remove_region(&self, r: &MemoryRegion) {
        for entry in self.registry.snapshot().iter() {
            entry.call(self.id, |n| {
                n.track_remove_region(r.as_id, r.base, r.npages)
            });
        }
    }

    #[cfg(not(feature = "notifiers"))]
    fn notify_remove_region(&self, _: &MemoryRegion) {}

    /// True if the calling thread is inside a notifier callback of this tracker: a backend or
    /// VMM can refuse, before taking locks of its own, what the core would refuse there
    /// (memslot changes) or what must not wait for dispatches.
    pub fn in_callback(&self) -> bool {
        crate::context::in_callback_of(self.id)
    }

    /// True once write tracking is enabled (sticky; B6). Counts exist for every slot then.
    pub fn is_enabled(&self) -> bool {
        // Acquire pairs with the Release in `enable_write_tracking`.
        self.enabled.load(Ordering::Acquire)
    }

    /// Enables write tracking for an internal user (the kernel's first-shadow-root path, B7):
    /// allocates counts for every slot of every address space, then publishes the flag.
    /// Registering the first notifier does this too.
    ///
    /// # Errors
    /// [`Error::OutOfMemory`]: arrays allocated so far are kept, tracking stays disabled.
    pub fn enable_write_tracking(&self) -> Result<()> {
        if self.is_enabled() {
            return Ok(());
        }
        let _slots = lock(&self.slots_lock);
        if self.is_enabled() {
            return Ok(());
        }
        let current = self.slots.load();
        for space in &current.spaces {
            for slot in space.iter() {
                if slot.meta.counts.get().is_none() {
                    let counts = memslot::alloc_counts(slot.region.npages)?;
                    // Only this thread (holding slots_lock) initialises counts after creation.
                    let _ = slot.meta.counts.set(counts);
                }
            }
        }
        // Release: every array above is visible to whoever reads `enabled == true` (B5).
        self.enabled.store(true, Ordering::Release);
        Ok(())
    }

    /// Bytes held by write-track counts: exactly 2 per frame of every slot once enabled, 0 before.
    pub fn write_track_bytes(&self) -> usize {
        let snap = self.slots.load();
        snap.spaces
            .iter()
            .flat_map(|s| s.iter())
            .filter_map(|s| s.meta.counts.get())
            // The slice, not the `Box` (whose size is that of a fat pointer).
            .map(|counts| std::mem::size_of_val::<[_]>(counts))
            .sum()
    }

    /// Adds one track to `gfn` in address space 0, like `kvm_write_track_add_gfn`.
    ///
    /// # Errors
    /// [`Error::TrackingDisabled`], [`Error::UnknownGfn`], [`Error::TrackCountOverflow`],
    /// [`Error::Backend`]; on error nothing changed.
    pub fn add_gfn(&self, gfn: Gfn) -> Result<()> {
        self.update(AsId::NORMAL, Frames::List(&[gfn]), Dir::Add)
    }

    /// Removes one track from `gfn` in address space 0, like `kvm_write_track_remove_gfn`.
    ///
    /// # Errors
    /// [`Error::TrackingDisabled`], [`Error::UnknownGfn`], [`Error::NotTracked`],
    /// [`Error::Backend`]; on error nothing changed.
    pub fn remove_gfn(&self, gfn: Gfn) -> Result<()> {
        self.update(AsId::NORMAL, Frames::List(&[gfn]), Dir::Remove)
    }

    /// Adds one track to each of `gfns` in `as_id` (duplicates add several), all or nothing,
    /// with one round of backend work.
    ///
    /// # Errors
    /// As [`add_gfn`](Self::add_gfn), plus [`Error::InvalidAddressSpace`].
    pub fn add_gfns(&self, as_id: AsId, gfns: &[Gfn]) -> Result<()> {
        self.update(as_id, Frames::List(gfns), Dir::Add)
    }

    /// Removes one track from each of `gfns` in `as_id`, all or nothing.
    ///
    /// # Errors
    /// As [`remove_gfn`](Self::remove_gfn), plus [`Error::InvalidAddressSpace`].
    pub fn remove_gfns(&self, as_id: AsId, gfns: &[Gfn]) -> Result<()> {
        self.update(as_id, Frames::List(gfns), Dir::Remove)
    }

    /// Adds one track to every frame of `[first, first + n)` in `as_id`, all or nothing.
    ///
    /// # Errors
    /// As [`add_gfns`](Self::add_gfns).
    pub fn add_range(&self, as_id: AsId, first: Gfn, n: u64) -> Result<()> {
        self.update(as_id, Frames::Range { first, n }, Dir::Add)
    }

    /// Removes one track from every frame of `[first, first + n)` in `as_id`, all or nothing.
    ///
    /// # Errors
    /// As [`remove_gfns`](Self::remove_gfns).
    pub fn remove_range(&self, as_id: AsId, first: Gfn, n: u64) -> Result<()> {
        self.update(as_id, Frames::Range { first, n }, Dir::Remove)
    }

    /// The frame's current count in `as_id` (0 if tracking is disabled).
    ///
    /// # Errors
    /// [`Error::UnknownGfn`] or [`Error::InvalidAddressSpace`].
    pub fn track_count(&self, as_id: AsId, gfn: Gfn) -> Result<u16> {
        let snap = self.slots.load();
        let slot = self.find(&snap, as_id, gfn)?;
        // Relaxed: a snapshot read (B19).
        Ok(slot.count(gfn).map_or(0, |c| c.load(Ordering::Relaxed)))
    }

    /// Whether `gfn` is write-tracked in `as_id` (B19; per address space, see the crate docs on
    /// address spaces). Lock-free: one snapshot load, a two-level binary search, one array load.
    #[inline]
    pub fn is_write_tracked(&self, as_id: AsId, gfn: Gfn) -> bool {
        self.is_enabled() && self.slots.load().is_write_tracked(as_id, gfn)
    }

    /// The largest mapping level a backend may use for `gfn` (B20): a huge level is allowed only
    /// where no frame of that region is tracked and the region lies wholly inside the slot.
    ///
    /// # Errors
    /// [`Error::UnknownGfn`] or [`Error::InvalidAddressSpace`].
    pub fn max_mapping_level(&self, as_id: AsId, gfn: Gfn) -> Result<PageLevel> {
        let snap = self.slots.load();
        let slot = self.find(&snap, as_id, gfn)?;
        for (i, level) in LPAGE_LEVELS.iter().enumerate().rev() {
            // Relaxed: advisory, like the kernel's lockless read of disallow_lpage.
            if slot.meta.lpage[i][slot.lpage_index(gfn, i)].load(Ordering::Relaxed) == 0 {
                return Ok(*level);
            }
        }
        Ok(PageLevel::K4)
    }

    /// Reports a write that already reached guest memory. It is split at frame boundaries and
    /// each piece on a tracked frame goes to every notifier (coherence class first, newest
    /// first within a class). An untracked write costs a flag load while tracking is disabled,
    /// and one snapshot load plus one lookup per piece once it is enabled.
    pub fn report_write(&self, event: &WriteEvent<'_>) {
        if !event.new.is_empty() && self.is_enabled() {
            self.report_with(&self.slots.load(), event, &mut 0);
        } else {
            self.count_reported(event);
        }
    }

    /// A per-thread handle for the hot paths (a backend's vCPU thread): it caches the memslot
    /// snapshot, so [`TrackReader::is_write_tracked`] is one pointer check, one binary search
    /// and one array load, and untracked writes cost about as little.
    pub fn reader(self: &Arc<Self>) -> TrackReader {
        TrackReader {
            cache: arc_swap::Cache::new(Arc::clone(&self.slots)),
            tracker: Arc::clone(self),
            hint: 0,
        }
    }

    #[inline]
    fn count_reported(&self, event: &WriteEvent<'_>) {
        let len = event.new.len();
        if len == 0 {
            return;
        }
        // One piece per frame touched, up to the end of the 64-bit space (as `pieces_of`).
        let last = event.gpa.0.saturating_add(len as u64 - 1);
        let pieces =
            (last >> crate::addr::PAGE_SHIFT) - (event.gpa.0 >> crate::addr::PAGE_SHIFT) + 1;
        self.writes_reported.fetch_add(pieces, Ordering::Relaxed);
    }

    /// `report_write` with a snapshot the caller already holds (current or about to be
    /// revalidated; the counts it points at are live).
    #[inline]
    fn report_with(&self, snap: &Memslots, event: &WriteEvent<'_>, hint: &mut usize) {
        self.count_reported(event);
        let len = event.new.len();
        // Lock-free pre-check outside any read section, since most writes hit no tracked frame.
        if !pieces_of(event.gpa, len)
            .any(|(gpa, _)| snap.is_write_tracked_hinted(event.as_id, gpa.gfn(), hint))
        {
            return;
        }
        let _section = self.grace.read();
        // Check again inside the section: a frame whose last remove returned before the section
        // began is seen untracked here (and a slot deleted or moved before it is seen gone, in
        // this snapshot too), and removes that may still race wait for the section.
        for (gpa, range) in pieces_of(event.gpa, len) {
            if snap.is_tracked_in_section(event.as_id, gpa.gfn(), hint) {
                let piece = WriteEvent {
                    as_id: event.as_id,
                    gpa,
                    new: &event.new[range.clone()],
                    old: event.old.and_then(|o| o.get(range.clone())),
                    source: event.source,
                    coalesced: event.coalesced,
                    first_writer: event.first_writer,
                };
                self.writes_tracked.fetch_add(1, Ordering::Relaxed);
                self.bytes_tracked
                    .fetch_add(range.len() as u64, Ordering::Relaxed);
                self.dispatch(&piece);
            }
        }
    }

    #[cfg(feature = "notifiers")]
    #[inline]
    fn dispatch(&self, event: &WriteEvent<'_>) {
        for entry in self.registry.snapshot().iter() {
            entry.call(self.id, |n| n.track_write(event));
        }
    }

    #[cfg(not(feature = "notifiers"))]
    #[inline]
    fn dispatch(&self, _: &WriteEvent<'_>) {}

    /// Counters so far.
    pub fn stats(&self) -> TrackerStats {
        TrackerStats {
            writes_reported: self.writes_reported.load(Ordering::Relaxed),
            writes_tracked: self.writes_tracked.load(Ordering::Relaxed),
            bytes_tracked: self.bytes_tracked.load(Ordering::Relaxed),
            limit_warnings: self.limit_warnings.load(Ordering::Relaxed),
        }
    }

    fn check_as(&self, as_id: AsId) -> Result<()> {
        if as_id.0 >= self.config.address_spaces {
            return Err(Error::InvalidAddressSpace {
                as_id,
                count: self.config.address_spaces,
            });
        }
        Ok(())
    }

    fn find<'s>(&self, snap: &'s Memslots, as_id: AsId, gfn: Gfn) -> Result<&'s Arc<Slot>> {
        self.check_as(as_id)?;
        snap.find(as_id, gfn)
            .ok_or(Error::UnknownGfn { as_id, gfn })
    }

    /// add/remove under `mmu_lock`: validate every frame (nothing changes on an error) and find
    /// the frames whose tracked state flips. An add then updates the counts and huge-page
    /// counts and asks the backend to protect (the kernel's order, B16: a write or fault while
    /// protect runs finds the frame tracked), undoing the counts if it fails or panics. A
    /// remove asks the backend to unprotect first and drops the counts after (while unprotect
    /// runs, and if it fails, writes are still delivered). After a removal that untracked a
    /// frame, or an undone add, wait for dispatches that may still have seen it tracked.
    fn update(&self, as_id: AsId, frames: Frames<'_>, dir: Dir) -> Result<()> {
        if !self.is_enabled() {
            return Err(Error::TrackingDisabled);
        }
        self.check_as(as_id)?;
        // An add whose protect panics is undone by the guards inside (counts, reservation),
        // which run first; this one then waits for dispatches that saw the transient counts, as
        // after a failed protect, before the panic reaches the caller.
        let unwinding_add = Defer::new(|| {
            if dir == Dir::Add && !crate::context::in_callback_of(self.id) {
                self.grace.synchronize();
            }
        });
        // A backend holding unreported writes reports them before the frames can go
        // untracked (`Enforcement::before_untrack`), outside the tracker's lock.
        let announced = (dir == Dir::Remove).then(|| untrack_runs(as_id, frames));
        if let Some(runs) = &announced {
            self.backend.before_untrack(runs);
        }
        let _announced = Defer::new(|| {
            if let Some(runs) = &announced {
                self.backend.after_untrack(runs);
            }
        });
        let res = match frames {
            Frames::List(gfns) => {
                // The installed snapshot, stable while mmu_lock is held; frames a range
                // update holds are waited for.
                let mmu = self.lock_mmu_clear(|r| {
                    gfns.iter()
                        .any(|g| r.overlaps(as_id, g.0, g.0.saturating_add(1)))
                });
                self.update_list(&mmu.snap, as_id, gfns, dir)
            }
            Frames::Range { first, n } => self.update_range(as_id, first, n, dir),
        };
        unwinding_add.cancel();
        // After a last remove, and after an add that was undone (its frames counted as tracked
        // while protect ran), wait for dispatches that may still see them tracked. From inside
        // a callback the wait could include the caller's own section (or a peer waiting on
        // ours), so it is skipped there; documented in the crate docs.
        let wait = match (&res, dir) {
            (Ok(flipped), Dir::Remove) => *flipped,
            (Err(Error::Backend { .. }), Dir::Add) => true,
            _ => false,
        };
        if wait && !crate::context::in_callback_of(self.id) {
            self.grace.synchronize();
        }
        res.map(|_| ())
    }

    /// Locks `mmu_lock`, counted in `mmu_waiting` while blocked.
    fn lock_mmu(&self) -> MutexGuard<'_, Mmu> {
        if let Ok(g) = self.mmu_lock.try_lock() {
            return g;
        }
        self.mmu_waiting.fetch_add(1, Ordering::Relaxed);
        let g = lock(&self.mmu_lock);
        self.mmu_waiting.fetch_sub(1, Ordering::Relaxed);
        g
    }

    /// Locks `mmu_lock` once no range reservation `conflicts` (waiting on `mmu_cv` meanwhile).
    fn lock_mmu_clear(&self, conflicts: impl Fn(&Reserved) -> bool) -> MutexGuard<'_, Mmu> {
        let mut g = self.lock_mmu();
        while g.reserved.iter().any(&conflicts) {
            g = self.mmu_cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g
    }

    /// The value after one step of `dir` from `v`, or `None` at a limit.
    fn step(v: u16, dir: Dir) -> Option<u16> {
        match dir {
            Dir::Add => v.checked_add(1),
            Dir::Remove => v.checked_sub(1),
        }
    }

    /// Checks `k` steps of `dir` on a frame whose count is `v` and says whether its tracked
    /// state flips. Strict mode refuses a step past a limit; KernelCompat absorbs it (B18).
    fn plan_frame(&self, as_id: AsId, gfn: Gfn, v: u16, k: u64, dir: Dir) -> Result<bool> {
        if self.config.limits == LimitMode::KernelCompat {
            // Steps at a limit keep the count; the flip happens at most once (one direction).
            return Ok(match dir {
                Dir::Add => v == 0 && k > 0,
                Dir::Remove => v != 0 && k >= u64::from(v),
            });
        }
        match dir {
            Dir::Add if u64::from(v) + k > u64::from(u16::MAX) => {
                Err(Error::TrackCountOverflow { as_id, gfn })
            }
            Dir::Remove if u64::from(v) < k => Err(Error::NotTracked { as_id, gfn }),
            Dir::Add => Ok(v == 0 && k > 0),
            Dir::Remove => Ok(v != 0 && u64::from(v) == k),
        }
    }

    /// Applies one step to a validated frame: its count (kept at a limit in KernelCompat mode,
    /// with a warning) and its huge-page counts.
    fn apply_frame(&self, slot: &Slot, gfn: Gfn, dir: Dir) {
        self.step_count(
            slot.count(gfn)
                .expect("enabled implies arrays present (B5)"),
            dir,
        );
        self.account_lpage(slot, gfn, dir);
    }

    /// One step of `dir` on a validated count, kept at a limit (with a warning) in
    /// KernelCompat mode.
    fn step_count(&self, c: &std::sync::atomic::AtomicU16, dir: Dir) {
        // Relaxed: all writers hold mmu_lock; readers tolerate staleness (B19), and removals
        // are ordered before later dispatches by the grace fences.
        match Self::step(c.load(Ordering::Relaxed), dir) {
            Some(n) => c.store(n, Ordering::Relaxed),
            // Only reachable in KernelCompat mode (validated otherwise): keep the count (B18).
            None => {
                self.limit_warnings.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn backend_call(&self, dir: Dir, runs: &[FrameRun]) -> Result<()> {
        if runs.is_empty() {
            return Ok(());
        }
        let (op, res) = match dir {
            Dir::Add => ("protect", self.backend.protect(runs)),
            Dir::Remove => ("unprotect", self.backend.unprotect(runs)),
        };
        res.map_err(|source| Error::Backend { op, source })
    }

    /// A batch (duplicates add or remove several tracks). Returns whether a frame flipped.
    fn update_list(&self, snap: &Memslots, as_id: AsId, gfns: &[Gfn], dir: Dir) -> Result<bool> {
        let mut found = OneOrMore::with_capacity(gfns.len());
        for &gfn in gfns {
            found.push(self.find(snap, as_id, gfn)?);
        }
        let slots = found.as_slice();
        let current = |i: usize| {
            slots[i]
                .count(gfns[i])
                .expect("enabled implies arrays present (B5)")
                .load(Ordering::Relaxed)
        };
        let compat_add = dir == Dir::Add && self.config.limits == LimitMode::KernelCompat;
        let mut runs = Runs::new(as_id);
        // KernelCompat adds only: the positions of the steps a limit absorbs (B18), so that
        // undoing a failed add leaves those counts where they were.
        let mut absorbed: Vec<usize> = Vec::new();
        if let [gfn] = gfns {
            let v = current(0);
            if self.plan_frame(as_id, *gfn, v, 1, dir)? {
                runs.push(*gfn)?;
            }
            if compat_add && v == u16::MAX {
                absorbed.push(0);
            }
        } else {
            // Group duplicates (stable, so a frame's steps keep their order) and plan each
            // frame's net effect; flipped frames come out ascending, so runs merge.
            let mut order: Vec<usize> = Vec::new();
            order
                .try_reserve_exact(gfns.len())
                .map_err(|_| Error::OutOfMemory {
                    bytes: gfns.len().saturating_mul(std::mem::size_of::<usize>()),
                })?;
            order.extend(0..gfns.len());
            order.sort_by_key(|&i| gfns[i]);
            for run in order.chunk_by(|&a, &b| gfns[a] == gfns[b]) {
                let gfn = gfns[run[0]];
                let v = current(run[0]);
                if self.plan_frame(as_id, gfn, v, run.len() as u64, dir)? {
                    runs.push(gfn)?;
                }
                if compat_add {
                    // The steps past 65535 are the frame's last ones.
                    let room = usize::from(u16::MAX - v);
                    absorbed.extend(run.iter().skip(room));
                }
            }
            absorbed.sort_unstable();
        }
        let runs = runs.finish();
        let flipped = !runs.is_empty();
        if dir == Dir::Remove {
            // Unprotect before the counts drop: while it runs (and if it fails) the frames are
            // still tracked and their writes delivered (review item 7).
            self.backend_call(dir, runs)?;
            for (&gfn, slot) in gfns.iter().zip(slots) {
                self.apply_frame(slot, gfn, dir);
            }
            return Ok(flipped);
        }
        // Counts before protect (the kernel's B16 order): a write trapped, or a fault taken,
        // while protect runs already finds the frame tracked. A failing or panicking protect
        // is undone by the guard.
        for (&gfn, slot) in gfns.iter().zip(slots) {
            self.apply_frame(slot, gfn, dir);
        }
        let undo = Defer::new(|| {
            for (i, (&gfn, slot)) in gfns.iter().zip(slots).enumerate() {
                self.account_lpage(slot, gfn, Dir::Remove);
                if absorbed.binary_search(&i).is_ok() {
                    self.limit_warnings.fetch_sub(1, Ordering::Relaxed);
                } else {
                    Self::unstep(slot, gfn);
                }
            }
        });
        self.backend_call(dir, runs)?;
        undo.cancel();
        Ok(flipped)
    }

    /// Undoes one applied add step of a frame (its count is at least 1).
    fn unstep(slot: &Slot, gfn: Gfn) {
        let c = slot
            .count(gfn)
            .expect("enabled implies arrays present (B5)");
        // Relaxed: under mmu_lock, as every count write.
        let v = c.load(Ordering::Relaxed);
        c.store(v.saturating_sub(1), Ordering::Relaxed);
    }

    /// `[first, first + n)`, without per-frame temporaries: the slots it crosses, a validating
    /// scan of their counts, then the backend call and the update scan in the same order as
    /// [`update_list`](Self::update_list).
    fn update_range(&self, as_id: AsId, first: Gfn, n: u64, dir: Dir) -> Result<bool> {
        // Slots end at most at frame 2^52, so a range that wraps meets an unknown frame.
        let end = first.0.saturating_add(n);
        let me = Reserved {
            as_id,
            first: first.0,
            end,
        };
        // Reserve the range: overlapping updates, and DELETE or MOVE of a slot it touches, wait
        // until this call ends, so it holds `mmu_lock` only for one chunk at a time and its
        // frames' counts change only here meanwhile (all or nothing still holds).
        let snap = {
            let mut mmu = self.lock_mmu_clear(|r| r.overlaps(as_id, first.0, end));
            mmu.reserved
                .try_reserve(1)
                .map_err(|_| Error::OutOfMemory {
                    bytes: std::mem::size_of::<Reserved>(),
                })?;
            mmu.reserved.push(me);
            Arc::clone(&mmu.snap)
        };
        let _reservation = Defer::new(|| {
            let mut mmu = self.lock_mmu();
            if let Some(i) = mmu.reserved.iter().position(|r| *r == me) {
                mmu.reserved.swap_remove(i);
            }
            drop(mmu);
            self.mmu_cv.notify_all();
        });
        let mut pieces: Vec<(&Arc<Slot>, u64, u64)> = Vec::new();
        let mut next = first.0;
        while next < end {
            let slot = self.find(&snap, as_id, Gfn(next))?;
            let stop = slot.region.end().0.min(end);
            pieces.try_reserve(1).map_err(|_| Error::OutOfMemory {
                bytes: std::mem::size_of::<(&Slot, u64, u64)>(),
            })?;
            pieces.push((slot, next, stop));
            next = stop;
        }
        let compat_add = dir == Dir::Add && self.config.limits == LimitMode::KernelCompat;
        let mut runs = Runs::new(as_id);
        // KernelCompat adds only: frames at 65535 whose step is absorbed (B18), ascending.
        let mut absorbed: Vec<Gfn> = Vec::new();
        // Validation needs no lock: the reservation keeps every other writer off these counts.
        for &(slot, a, b) in &pieces {
            for gfn in (a..b).map(Gfn) {
                let v = slot
                    .count(gfn)
                    .expect("enabled implies arrays present (B5)")
                    .load(Ordering::Relaxed);
                if self.plan_frame(as_id, gfn, v, 1, dir)? {
                    runs.push(gfn)?;
                }
                if compat_add && v == u16::MAX {
                    absorbed.try_reserve(1).map_err(|_| Error::OutOfMemory {
                        bytes: (absorbed.len() + 1).saturating_mul(std::mem::size_of::<Gfn>()),
                    })?;
                    absorbed.push(gfn);
                }
            }
        }
        let runs = runs.finish();
        let flipped = !runs.is_empty();
        if dir == Dir::Remove {
            {
                let _mmu = self.lock_mmu();
                self.backend_call(dir, runs)?;
            }
            self.in_chunks(&pieces, |slot, a, b| {
                self.apply_pieces(&[(slot, a, b)], dir)
            });
            return Ok(flipped);
        }
        self.in_chunks(&pieces, |slot, a, b| {
            self.apply_pieces(&[(slot, a, b)], dir)
        });
        let undo = Defer::new(|| {
            self.in_chunks(&pieces, |slot, a, b| {
                for gfn in (a..b).map(Gfn) {
                    if absorbed.binary_search(&gfn).is_ok() {
                        self.limit_warnings.fetch_sub(1, Ordering::Relaxed);
                    } else {
                        Self::unstep(slot, gfn);
                    }
                }
                self.account_lpage_pieces(slot, a, b, Dir::Remove);
            });
        });
        {
            let _mmu = self.lock_mmu();
            self.backend_call(dir, runs)?;
        }
        undo.cancel();
        Ok(flipped)
    }

    /// Runs `f` over `pieces` in chunks of at most [`RANGE_CHUNK`] frames, each under
    /// `mmu_lock` (huge-page counts are shared with frames outside the range).
    fn in_chunks(
        &self,
        pieces: &[(&Arc<Slot>, u64, u64)],
        mut f: impl FnMut(&Arc<Slot>, u64, u64),
    ) {
        for &(slot, a, b) in pieces {
            let mut x = a;
            while x < b {
                let y = x.saturating_add(RANGE_CHUNK).min(b);
                {
                    let _mmu = self.lock_mmu();
                    f(slot, x, y);
                }
                x = y;
                // Let threads queued on the lock in (a mutex lets the releasing thread take it
                // straight back), boundedly: this call's own progress is not held up for long.
                let mut spins = 0;
                while x < b && self.mmu_waiting.load(Ordering::Relaxed) > 0 && spins < 1000 {
                    std::thread::yield_now();
                    spins += 1;
                }
            }
        }
    }

    /// One step of `dir` on every frame of validated `pieces`, huge-page counts per region.
    fn apply_pieces(&self, pieces: &[(&Arc<Slot>, u64, u64)], dir: Dir) {
        for &(slot, a, b) in pieces {
            let counts = slot
                .meta
                .counts
                .get()
                .expect("enabled implies arrays present (B5)");
            for gfn in (a..b).map(Gfn) {
                // As `apply_frame`, with the huge-page counts done per region below.
                self.step_count(&counts[slot.index(gfn)], dir);
            }
            self.account_lpage_pieces(slot, a, b, dir);
        }
    }

    /// One step of `dir` on the huge-page counts of every frame of `[a, b)` in `slot`.
    fn account_lpage_pieces(&self, slot: &Slot, a: u64, b: u64, dir: Dir) {
        for (i, level) in LPAGE_LEVELS.iter().enumerate() {
            let mut at = a;
            while at < b {
                let region_end = ((at >> level.frame_shift()) + 1) << level.frame_shift();
                let stop = region_end.min(b);
                self.account_lpage_level(slot, Gfn(at), i, stop - at, dir);
                at = stop;
            }
        }
    }

    fn account_lpage(&self, slot: &Slot, gfn: Gfn, dir: Dir) {
        for i in 0..LPAGE_LEVELS.len() {
            self.account_lpage_level(slot, gfn, i, 1, dir);
        }
    }

    /// `k` steps of `dir` on the huge-page count of level `i` over `gfn`.
    fn account_lpage_level(&self, slot: &Slot, gfn: Gfn, i: usize, k: u64, dir: Dir) {
        let c = &slot.meta.lpage[i][slot.lpage_index(gfn, i)];
        // Wrapping like the kernel's signed count (reachable only in KernelCompat mode, B18);
        // `k` is at most one region's frames (2^18), so the truncation keeps its value.
        #[expect(
            clippy::cast_possible_truncation,
            reason = "k <= 2^18, one huge region's frames"
        )]
        let k = k as i32;
        // Relaxed load and store, no read-modify-write: every writer holds mmu_lock, and
        // readers (`max_mapping_level`) are advisory.
        let v = c.load(Ordering::Relaxed);
        c.store(
            match dir {
                Dir::Add => v.wrapping_add(k),
                Dir::Remove => v.wrapping_sub(k),
            },
            Ordering::Relaxed,
        );
    }

    /// Registers a notifier (B25): enables tracking on first use, takes a reference on the
    /// tracker for the handle's lifetime, and puts the notifier first in its class.
    ///
    /// # Errors
    /// [`Error::OutOfMemory`] while enabling; then nothing was registered.
    #[cfg(feature = "notifiers")]
    pub fn register(
        self: &Arc<Self>,
        notifier: Arc<dyn TrackNotifier>,
        options: impl Into<RegisterOptions>,
    ) -> Result<NotifierHandle> {
        self.enable_write_tracking()?;
        let options = options.into();
        let delivery = options.delivery;
        // Outside callbacks the backend hears of the registration first (it may report the
        // writes it holds, to the notifiers registered already) and last.
        let hooked = !crate::context::in_callback_of(self.id);
        if hooked {
            self.backend.before_register(delivery);
        }
        let _after = hooked.then(|| Defer::new(|| self.backend.after_register(delivery)));
        let entry = Arc::new(Entry::new(notifier, options));
        {
            // Under mmu_lock, against `set_memory_region`'s MOVE check (K4).
            let _mmu = self.lock_mmu();
            self.external_enabled.store(true, Ordering::Release);
            self.registry.insert(Arc::clone(&entry));
        }
        Ok(NotifierHandle {
            tracker: Arc::clone(self),
            entry: Some(entry),
        })
    }

    /// True while at least one notifier is registered (B28).
    pub fn has_external_user(&self) -> bool {
        #[cfg(feature = "notifiers")]
        {
            !self.registry.is_empty()
        }
        #[cfg(not(feature = "notifiers"))]
        {
            false
        }
    }

    /// True if at least one notifier is registered and every one accepts coalesced events
    /// ([`Delivery::Coalesced`](crate::Delivery::Coalesced)): only then may a backend run
    /// frames relaxed. A lock-free snapshot, like [`PageTracker::has_external_user`].
    pub fn accepts_coalesced(&self) -> bool {
        #[cfg(feature = "notifiers")]
        {
            let list = self.registry.snapshot();
            !list.is_empty()
                && list
                    .iter()
                    .all(|e| e.options.delivery == crate::Delivery::Coalesced)
        }
        #[cfg(not(feature = "notifiers"))]
        {
            false
        }
    }

    /// Number of registered notifiers.
    pub fn notifier_count(&self) -> usize {
        #[cfg(feature = "notifiers")]
        {
            self.registry.len()
        }
        #[cfg(not(feature = "notifiers"))]
        {
            0
        }
    }

    /// True once a notifier was ever registered (sticky, B6).
    pub fn external_tracking_enabled(&self) -> bool {
        self.external_enabled.load(Ordering::Acquire)
    }
}

/// Runs a closure when dropped (on return and on unwind alike) unless cancelled.
struct Defer<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Defer<F> {
    fn new(f: F) -> Defer<F> {
        Defer(Some(f))
    }

    fn cancel(mut self) {
        self.0 = None;
    }
}

impl<F: FnOnce()> Drop for Defer<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// A list that holds one element without allocating, so single-frame add/remove (the
/// kernel's API, and the hot path) touches no heap.
#[derive(Debug)]
enum OneOrMore<T> {
    Empty,
    One([T; 1]),
    More(Vec<T>),
}

impl<T: Copy> OneOrMore<T> {
    fn with_capacity(n: usize) -> OneOrMore<T> {
        if n <= 1 {
            OneOrMore::Empty
        } else {
            OneOrMore::More(Vec::with_capacity(n))
        }
    }

    fn push(&mut self, v: T) {
        match self {
            OneOrMore::Empty => *self = OneOrMore::One([v]),
            OneOrMore::One([first]) => *self = OneOrMore::More(vec![*first, v]),
            OneOrMore::More(all) => all.push(v),
        }
    }

    /// `push`, failing instead of aborting when memory is short.
    fn try_push(&mut self, v: T) -> Result<()> {
        let oom = |n: usize| Error::OutOfMemory {
            bytes: n.saturating_mul(std::mem::size_of::<T>()),
        };
        match self {
            OneOrMore::Empty => *self = OneOrMore::One([v]),
            OneOrMore::One([first]) => {
                let mut all = Vec::new();
                all.try_reserve(4).map_err(|_| oom(4))?;
                all.extend([*first, v]);
                *self = OneOrMore::More(all);
            }
            OneOrMore::More(all) => {
                all.try_reserve(1).map_err(|_| oom(all.len() + 1))?;
                all.push(v);
            }
        }
        Ok(())
    }

    fn last_mut(&mut self) -> Option<&mut T> {
        match self {
            OneOrMore::Empty => None,
            OneOrMore::One([one]) => Some(one),
            OneOrMore::More(all) => all.last_mut(),
        }
    }

    fn as_slice(&self) -> &[T] {
        match self {
            OneOrMore::Empty => &[],
            OneOrMore::One(one) => one,
            OneOrMore::More(all) => all,
        }
    }
}

/// The page-sized pieces of a `len`-byte write at `gpa`: each piece's address and its byte
/// range in the write. Bytes past the end of the 64-bit guest-physical space belong to no
/// frame (physical addresses do not wrap), so the pieces stop there.
fn pieces_of(gpa: Gpa, len: usize) -> impl Iterator<Item = (Gpa, std::ops::Range<usize>)> {
    let mut offset = 0usize;
    std::iter::from_fn(move || {
        if offset >= len {
            return None;
        }
        let at = Gpa(gpa.0.checked_add(offset as u64)?);
        let room = usize::try_from(PAGE_SIZE - at.page_offset()).unwrap_or(usize::MAX);
        let range = offset..offset + room.min(len - offset);
        offset = range.end;
        Some((at, range))
    })
}

/// A per-thread fast path over a [`PageTracker`] (see [`PageTracker::reader`]): `&mut self`
/// methods, so keep one per thread (a vCPU thread, typically). It keeps the tracker alive.
///
/// Memory: the reader holds the memslot snapshot it last used until its next call (that is
/// what makes the next call cheap). After a slot is deleted, that slot's arrays (2 bytes per
/// frame, plus its huge-page counts) therefore stay allocated until every reader has made one
/// more call or was dropped; call [`TrackReader::refresh`] after a large DELETE on threads
/// that may sit idle, or drop their readers.
pub struct TrackReader {
    tracker: Arc<PageTracker>,
    cache: arc_swap::Cache<Arc<ArcSwap<Memslots>>, Arc<Memslots>>,
    /// Position of the slot the last query hit (a guess, checked each time).
    hint: usize,
}

impl std::fmt::Debug for TrackReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackReader").finish_non_exhaustive()
    }
}

impl TrackReader {
    /// As [`PageTracker::is_write_tracked`], without the shared snapshot load.
    #[inline]
    pub fn is_write_tracked(&mut self, as_id: AsId, gfn: Gfn) -> bool {
        self.tracker.is_enabled()
            && self
                .cache
                .load()
                .is_write_tracked_hinted(as_id, gfn, &mut self.hint)
    }

    /// As [`PageTracker::report_write`], without the shared snapshot load on the untracked path.
    #[inline]
    pub fn report_write(&mut self, event: &WriteEvent<'_>) {
        if !event.new.is_empty() && self.tracker.is_enabled() {
            let snap = self.cache.load();
            self.tracker.report_with(snap, event, &mut self.hint);
        } else {
            self.tracker.count_reported(event);
        }
    }

    /// The tracker.
    pub fn tracker(&self) -> &Arc<PageTracker> {
        &self.tracker
    }

    /// Drops a superseded cached snapshot now (see the memory note on [`TrackReader`]).
    pub fn refresh(&mut self) {
        let _ = self.cache.load();
    }
}

/// A registered notifier. Dropping it unregisters (B27) and returns only after every in-flight
/// callback of the notifier has finished; the notifier is never called again. It holds a
/// reference on the tracker, like the kernel's VM reference.
#[cfg(feature = "notifiers")]
#[must_use = "dropping the handle unregisters the notifier at once"]
pub struct NotifierHandle {
    tracker: Arc<PageTracker>,
    entry: Option<Arc<Entry>>,
}

#[cfg(feature = "notifiers")]
impl std::fmt::Debug for NotifierHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifierHandle")
            .field("entry", &self.entry)
            .finish_non_exhaustive()
    }
}

/// [`NotifierHandle::unregister`] was called from inside the notifier's own callback.
#[cfg(feature = "notifiers")]
#[derive(Debug, thiserror::Error)]
#[error("a notifier cannot be unregistered from inside its own callback")]
pub struct UnregisterError {
    /// The handle, still registered: unregister it later, or drop it (which then waits only
    /// for the callbacks of other threads).
    pub handle: NotifierHandle,
}

#[cfg(feature = "notifiers")]
impl NotifierHandle {
    /// The tracker the notifier is registered with, as its consumers see it ([`Tracking`]:
    /// no memslot changes or write reports through a handle).
    ///
    /// [`Tracking`]: crate::Tracking
    pub fn tracker(&self) -> crate::Tracking {
        crate::Tracking::new(Arc::clone(&self.tracker))
    }

    /// Unregisters now, waiting for in-flight callbacks of this notifier on other threads.
    ///
    /// # Errors
    /// From inside the notifier's own callback it cannot wait for itself: the handle comes back
    /// in the error, still registered.
    pub fn unregister(mut self) -> Result<(), UnregisterError> {
        let entry = self.entry.as_ref().expect("a live handle has its entry");
        if crate::context::frames_of_entry(entry.id) > 0 {
            return Err(UnregisterError { handle: self });
        }
        self.retire();
        Ok(())
    }

    fn retire(&mut self) {
        let Some(entry) = self.entry.take() else {
            return;
        };
        if entry.options.delivery == crate::Delivery::Coalesced
            && !crate::context::in_callback_of(self.tracker.id)
        {
            // Still registered: the writes the backend holds reach this notifier too.
            self.tracker.backend.before_unregister();
        }
        self.tracker.registry.unlink(entry.id);
        let own = crate::context::frames_of_entry(entry.id);
        if !crate::context::in_callback_of(self.tracker.id) {
            entry.retire(own);
            return;
        }
        // From inside a callback, waiting for the other threads' calls can deadlock if one of
        // them is itself waiting, from inside a callback of ours, for this thread (two
        // callbacks dropping each other's handles). One such waiter at a time cannot form a
        // cycle: the threads it waits for are inside callbacks, and those never wait. A second
        // one only stops new calls.
        match self.tracker.callback_retire.try_lock() {
            Ok(_one) => entry.retire(own),
            Err(std::sync::TryLockError::Poisoned(p)) => {
                let _one = p.into_inner();
                entry.retire(own);
            }
            Err(std::sync::TryLockError::WouldBlock) => entry.stop(),
        }
    }
}

#[cfg(feature = "notifiers")]
impl Drop for NotifierHandle {
    fn drop(&mut self) {
        self.retire();
    }
}
