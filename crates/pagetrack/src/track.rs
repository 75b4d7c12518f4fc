//! The VM-wide tracker: memslots, write-track counts, huge-page accounting, enforcement and
//! write dispatch (the kernel's `struct kvm` page-track state).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;

use crate::addr::{AsId, Gfn, Gpa, PAGE_SIZE, PageLevel};
use crate::error::{Error, Result};
use crate::grace::Grace;
use crate::memslot::{self, LPAGE_LEVELS, MemoryRegion, Memslots, Slot, SlotChange};
use crate::notifier::WriteEvent;
#[cfg(feature = "notifiers")]
use crate::notifier::{Entry, RegisterOptions, Registry, TrackNotifier};

/// What the core asks of an enforcement backend (for example pagetrack-kvm's read-only memslot
/// fragments). Calls are serialized by the tracker; they must not call back into it.
pub trait Enforcement: Send + Sync {
    /// `frames` went from untracked to tracked. Return once no write to them can land without
    /// reaching [`PageTracker::report_write`] (the kernel flushes remote TLBs before returning).
    ///
    /// # Errors
    /// A failure rolls the count changes back; the caller gets [`Error::Backend`].
    fn protect(&self, frames: &[(AsId, Gfn)]) -> std::result::Result<(), BackendError>;

    /// The last track of `frames` went away; writes to them may run at full speed again.
    ///
    /// # Errors
    /// A failure rolls the count changes back; the caller gets [`Error::Backend`].
    fn unprotect(&self, frames: &[(AsId, Gfn)]) -> std::result::Result<(), BackendError>;

    /// A slot was deleted or moved away; its counts (and so its frames' protection) are gone.
    fn region_removed(&self, region: &MemoryRegion) {
        let _ = region;
    }
}

/// A backend failure, as text for the core's [`Error::Backend`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendError(pub String);

impl<E: std::error::Error> From<E> for BackendError {
    fn from(e: E) -> BackendError {
        BackendError(e.to_string())
    }
}

/// A backend that enforces nothing: for cores driven by an emulator that consults
/// [`PageTracker::is_write_tracked`] itself, and for tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoEnforcement;

impl Enforcement for NoEnforcement {
    fn protect(&self, _: &[(AsId, Gfn)]) -> std::result::Result<(), BackendError> {
        Ok(())
    }
    fn unprotect(&self, _: &[(AsId, Gfn)]) -> std::result::Result<(), BackendError> {
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
    /// `slots_lock` + `slots_arch_lock`: memslot changes and enabling.
    slots_lock: Mutex<()>,
    /// `mmu_lock`: count and huge-page updates, and snapshot installation. It holds the
    /// installed snapshot (the same as `slots`, both written under it), so an update under the
    /// lock reads it without an `ArcSwap` load.
    mmu_lock: Mutex<Arc<Memslots>>,
    grace: Grace,
    #[cfg(feature = "notifiers")]
    registry: Registry,
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
            slots_lock: Mutex::new(()),
            mmu_lock: Mutex::new(empty),
            grace: Grace::default(),
            #[cfg(feature = "notifiers")]
            registry: Registry::default(),
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
        let _slots = lock(&self.slots_lock);
        let current = self.slots.load_full();
        let plan = memslot::plan(
            &current,
            &region,
            self.config.max_slots,
            self.config.max_pages,
        )?;
        if plan.change == SlotChange::Move && self.has_external_user() {
            return Err(Error::MoveWithNotifiers {
                as_id: region.as_id,
                slot: region.slot,
            });
        }
        // Prepare: allocations happen here and may fail with nothing changed. Under
        // slots_lock, so `enabled` cannot flip between this read and the install (B13).
        let with_counts = self.enabled.load(Ordering::Acquire);
        let next = memslot::apply(&current, &region, &plan, with_counts)?;
        {
            let mut installed = lock(&self.mmu_lock);
            let next = Arc::new(next);
            self.slots.store(Arc::clone(&next));
            *installed = next;
        }
        if let Some(old) = plan.old.as_ref() {
            if matches!(plan.change, SlotChange::Delete | SlotChange::Move) {
                self.backend.region_removed(&old.region);
            }
            if plan.change == SlotChange::Delete {
                // Commit: the slot is unreachable and the change cannot fail any more (K8).
                self.notify_remove_region(&old.region);
            }
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
        self.update(AsId::NORMAL, &[gfn], Dir::Add)
    }

    /// Removes one track from `gfn` in address space 0, like `kvm_write_track_remove_gfn`.
    ///
    /// # Errors
    /// [`Error::TrackingDisabled`], [`Error::UnknownGfn`], [`Error::NotTracked`],
    /// [`Error::Backend`]; on error nothing changed.
    pub fn remove_gfn(&self, gfn: Gfn) -> Result<()> {
        self.update(AsId::NORMAL, &[gfn], Dir::Remove)
    }

    /// Adds one track to each of `gfns` in `as_id` (duplicates add several), all or nothing,
    /// with one round of backend work.
    ///
    /// # Errors
    /// As [`add_gfn`](Self::add_gfn), plus [`Error::InvalidAddressSpace`].
    pub fn add_gfns(&self, as_id: AsId, gfns: &[Gfn]) -> Result<()> {
        self.update(as_id, gfns, Dir::Add)
    }

    /// Removes one track from each of `gfns` in `as_id`, all or nothing.
    ///
    /// # Errors
    /// As [`remove_gfn`](Self::remove_gfn), plus [`Error::InvalidAddressSpace`].
    pub fn remove_gfns(&self, as_id: AsId, gfns: &[Gfn]) -> Result<()> {
        self.update(as_id, gfns, Dir::Remove)
    }

    /// Adds one track to every frame of `[first, first + n)` in `as_id`, all or nothing.
    ///
    /// # Errors
    /// As [`add_gfns`](Self::add_gfns).
    pub fn add_range(&self, as_id: AsId, first: Gfn, n: u64) -> Result<()> {
        let gfns = self.range_gfns(as_id, first, n)?;
        self.update(as_id, &gfns, Dir::Add)
    }

    /// Removes one track from every frame of `[first, first + n)` in `as_id`, all or nothing.
    ///
    /// # Errors
    /// As [`remove_gfns`](Self::remove_gfns).
    pub fn remove_range(&self, as_id: AsId, first: Gfn, n: u64) -> Result<()> {
        let gfns = self.range_gfns(as_id, first, n)?;
        self.update(as_id, &gfns, Dir::Remove)
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

    /// Whether `gfn` is write-tracked in `as_id` or in the other x86 address space (B19, K7).
    /// Lock-free: one snapshot load, a two-level binary search, one array load.
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
            self.report_with(&self.slots.load(), event);
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
        }
    }

    #[inline]
    fn count_reported(&self, event: &WriteEvent<'_>) {
        let len = event.new.len();
        if len == 0 {
            return;
        }
        // One piece per frame touched.
        let pieces = (event.gpa.page_offset() + len as u64 - 1) / PAGE_SIZE + 1;
        self.writes_reported.fetch_add(pieces, Ordering::Relaxed);
    }

    /// `report_write` with a snapshot the caller already holds (current or about to be
    /// revalidated; the counts it points at are live).
    #[inline]
    fn report_with(&self, snap: &Memslots, event: &WriteEvent<'_>) {
        self.count_reported(event);
        let len = event.new.len();
        // Lock-free pre-check outside any read section, since most writes hit no tracked frame.
        if !pieces_of(event.gpa, len).any(|(gpa, _)| snap.is_write_tracked(event.as_id, gpa.gfn()))
        {
            return;
        }
        let _section = self.grace.read();
        // Check again inside the section: a frame whose last remove returned before the section
        // began is seen untracked here, and removes that may still race wait for the section.
        for (gpa, range) in pieces_of(event.gpa, len) {
            if self.is_write_tracked(event.as_id, gpa.gfn()) {
                let piece = WriteEvent {
                    as_id: event.as_id,
                    gpa,
                    new: &event.new[range.clone()],
                    old: event.old.and_then(|o| o.get(range.clone())),
                    source: event.source,
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

    /// The frames of `[first, first + n)`, once the checks `update` would make first pass
    /// (enabled, address space, every frame inside a slot), so that a range outside the slots
    /// is an error before anything is allocated for it. One lookup per slot crossed; `update`
    /// validates again under `mmu_lock`.
    fn range_gfns(&self, as_id: AsId, first: Gfn, n: u64) -> Result<Vec<Gfn>> {
        if !self.is_enabled() {
            return Err(Error::TrackingDisabled);
        }
        let end = first.0.checked_add(n);
        let snap = self.slots.load();
        let mut next = first.0;
        while next < end.unwrap_or(u64::MAX) {
            next = self.find(&snap, as_id, Gfn(next))?.region.end().0;
        }
        // Slots end at most at u64::MAX (exclusive), so a range reaching past it always holds
        // that unknown frame.
        let end = end.ok_or(Error::UnknownGfn {
            as_id,
            gfn: Gfn(u64::MAX),
        })?;
        Ok((first.0..end).map(Gfn).collect())
    }

    fn find<'s>(&self, snap: &'s Memslots, as_id: AsId, gfn: Gfn) -> Result<&'s Arc<Slot>> {
        if usize::from(as_id.0) >= snap.spaces.len() {
            return Err(Error::InvalidAddressSpace {
                as_id,
                count: self.config.address_spaces,
            });
        }
        snap.find(as_id, gfn)
            .ok_or(Error::UnknownGfn { as_id, gfn })
    }

    /// add/remove: validate every frame, then update counts and huge-page counts, then ask the
    /// backend (rolling back on failure), then, for removals that untracked a frame, wait for
    /// dispatches that may still have seen it tracked.
    fn update(&self, as_id: AsId, gfns: &[Gfn], dir: Dir) -> Result<()> {
        if !self.is_enabled() {
            return Err(Error::TrackingDisabled);
        }
        let mut changed: OneOrMore<(AsId, Gfn)> = OneOrMore::with_capacity(0);
        {
            // The installed snapshot, stable while mmu_lock is held.
            let snap = lock(&self.mmu_lock);
            let mut found = OneOrMore::with_capacity(gfns.len());
            for &gfn in gfns {
                found.push(self.find(&snap, as_id, gfn)?);
            }
            let slots = found.as_slice();
            let compat = self.config.limits == LimitMode::KernelCompat;
            // Validate: the net effect on each frame must stay within 0..=65535 (R1).
            if !compat {
                self.check_limits(as_id, gfns, slots, dir)?;
            }
            // KernelCompat only: indices whose count was kept at a limit (B18), ascending, so a
            // rollback does not undo a change that never happened. Empty vectors do not allocate.
            let mut absorbed: Vec<usize> = Vec::new();
            for (i, (&gfn, slot)) in gfns.iter().zip(slots).enumerate() {
                let counts = slot
                    .count(gfn)
                    .expect("enabled implies arrays present (B5)");
                // Relaxed: all writers hold mmu_lock; readers tolerate staleness (B19).
                let v = counts.load(Ordering::Relaxed);
                let next = match dir {
                    Dir::Add => v.checked_add(1),
                    Dir::Remove => v.checked_sub(1),
                };
                match next {
                    Some(n) => {
                        counts.store(n, Ordering::Relaxed);
                        if (dir == Dir::Add && n == 1) || (dir == Dir::Remove && n == 0) {
                            changed.push((as_id, gfn));
                        }
                    }
                    // Only reachable in KernelCompat mode: keep the count, warn (B18).
                    None => {
                        self.limit_warnings.fetch_add(1, Ordering::Relaxed);
                        absorbed.push(i);
                    }
                }
                self.account_lpage(slot, gfn, dir);
            }
            let changed = changed.as_slice();
            if !changed.is_empty() {
                let res = match dir {
                    Dir::Add => self.backend.protect(changed),
                    Dir::Remove => self.backend.unprotect(changed),
                };
                if let Err(BackendError(message)) = res {
                    self.rollback(gfns, slots, dir, &absorbed);
                    return Err(Error::Backend {
                        op: if dir == Dir::Add {
                            "protect"
                        } else {
                            "unprotect"
                        },
                        message,
                    });
                }
            }
        }
        if dir == Dir::Remove
            && !changed.as_slice().is_empty()
            && !crate::context::in_callback_of(self.id)
        {
            // From inside a callback the wait could include the caller's own section (or a
            // peer waiting on ours), so it is skipped there; documented in the crate docs.
            self.grace.synchronize();
        }
        Ok(())
    }

    fn check_limits(
        &self,
        as_id: AsId,
        gfns: &[Gfn],
        slots: &[&Arc<Slot>],
        dir: Dir,
    ) -> Result<()> {
        let err = |gfn| match dir {
            Dir::Add => Error::TrackCountOverflow { as_id, gfn },
            Dir::Remove => Error::NotTracked { as_id, gfn },
        };
        let ok = |v: u16, k: u64| match dir {
            Dir::Add => u64::from(v) + k <= u64::from(u16::MAX),
            Dir::Remove => u64::from(v) >= k,
        };
        let current = |i: usize| {
            slots[i]
                .count(gfns[i])
                .expect("enabled implies arrays present (B5)")
                .load(Ordering::Relaxed)
        };
        if gfns.len() == 1 {
            return if ok(current(0), 1) {
                Ok(())
            } else {
                Err(err(gfns[0]))
            };
        }
        let mut order: Vec<usize> = (0..gfns.len()).collect();
        order.sort_unstable_by_key(|&i| gfns[i]);
        for run in order.chunk_by(|&a, &b| gfns[a] == gfns[b]) {
            if !ok(current(run[0]), run.len() as u64) {
                return Err(err(gfns[run[0]]));
            }
        }
        Ok(())
    }

    fn account_lpage(&self, slot: &Slot, gfn: Gfn, dir: Dir) {
        for i in 0..LPAGE_LEVELS.len() {
            let c = &slot.meta.lpage[i][slot.lpage_index(gfn, i)];
            // Relaxed load and store, no read-modify-write: every writer holds mmu_lock, and
            // readers (`max_mapping_level`) are advisory. Wrapping like the kernel's signed
            // count (reachable only in KernelCompat mode, B18).
            let v = c.load(Ordering::Relaxed);
            c.store(
                match dir {
                    Dir::Add => v.wrapping_add(1),
                    Dir::Remove => v.wrapping_sub(1),
                },
                Ordering::Relaxed,
            );
        }
    }

    /// Undoes a committed update (after a backend failure); still under mmu_lock. `absorbed`
    /// (ascending) lists the entries whose count a KernelCompat limit kept unchanged: only their
    /// huge-page accounting is undone.
    fn rollback(&self, gfns: &[Gfn], slots: &[&Arc<Slot>], dir: Dir, absorbed: &[usize]) {
        let undo = if dir == Dir::Add {
            Dir::Remove
        } else {
            Dir::Add
        };
        for (i, (&gfn, slot)) in gfns.iter().zip(slots).enumerate() {
            self.account_lpage(slot, gfn, undo);
            if absorbed.binary_search(&i).is_ok() {
                continue;
            }
            let c = slot
                .count(gfn)
                .expect("enabled implies arrays present (B5)");
            let v = c.load(Ordering::Relaxed);
            let back = match undo {
                Dir::Add => v.checked_add(1),
                Dir::Remove => v.checked_sub(1),
            };
            if let Some(b) = back {
                c.store(b, Ordering::Relaxed);
            }
        }
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
        self.external_enabled.store(true, Ordering::Release);
        let entry = self.registry.insert(notifier, options.into());
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

    fn as_slice(&self) -> &[T] {
        match self {
            OneOrMore::Empty => &[],
            OneOrMore::One(one) => one,
            OneOrMore::More(all) => all,
        }
    }
}

/// The page-sized pieces of a `len`-byte write at `gpa`: each piece's address and its byte
/// range in the write.
fn pieces_of(gpa: Gpa, len: usize) -> impl Iterator<Item = (Gpa, std::ops::Range<usize>)> {
    let mut offset = 0usize;
    std::iter::from_fn(move || {
        if offset >= len {
            return None;
        }
        let at = Gpa(gpa.0.wrapping_add(offset as u64));
        let room = usize::try_from(PAGE_SIZE - at.page_offset()).unwrap_or(usize::MAX);
        let range = offset..offset + room.min(len - offset);
        offset = range.end;
        Some((at, range))
    })
}

/// A per-thread fast path over a [`PageTracker`] (see [`PageTracker::reader`]): `&mut self`
/// methods, so keep one per thread (a vCPU thread, typically). It keeps the tracker alive.
pub struct TrackReader {
    tracker: Arc<PageTracker>,
    cache: arc_swap::Cache<Arc<ArcSwap<Memslots>>, Arc<Memslots>>,
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
        self.tracker.is_enabled() && self.cache.load().is_write_tracked(as_id, gfn)
    }

    /// As [`PageTracker::report_write`], without the shared snapshot load on the untracked path.
    #[inline]
    pub fn report_write(&mut self, event: &WriteEvent<'_>) {
        if !event.new.is_empty() && self.tracker.is_enabled() {
            let snap = self.cache.load();
            self.tracker.report_with(snap, event);
        } else {
            self.tracker.count_reported(event);
        }
    }

    /// The tracker.
    pub fn tracker(&self) -> &Arc<PageTracker> {
        &self.tracker
    }
}

/// A registered notifier. Dropping it unregisters (B27) and returns only after every in-flight
/// callback of the notifier has finished; the notifier is never called again. It holds a
/// reference on the tracker, like the kernel's VM reference.
#[cfg(feature = "notifiers")]
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
    /// The tracker the notifier is registered with.
    pub fn tracker(&self) -> &Arc<PageTracker> {
        &self.tracker
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
        if let Some(entry) = self.entry.take() {
            self.tracker.registry.unlink(entry.id);
            entry.retire(crate::context::frames_of_entry(entry.id));
        }
    }
}

#[cfg(feature = "notifiers")]
impl Drop for NotifierHandle {
    fn drop(&mut self) {
        self.retire();
    }
}
