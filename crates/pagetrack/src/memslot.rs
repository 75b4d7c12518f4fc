//! Memslots: regions of guest-physical memory in N address spaces, their per-frame write-track
//! counts and huge-page disallow counts, and the fast gfn → slot lookup.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU16, Ordering};
use std::sync::{Arc, OnceLock};

use crate::addr::{AsId, GFN_LIMIT, Gfn, PageLevel, SlotId};
use crate::error::{Error, Result};

/// Memslot flags, with the values of `KVM_SET_USER_MEMORY_REGION`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RegionFlags(u32);

impl RegionFlags {
    /// No flags.
    pub const NONE: RegionFlags = RegionFlags(0);
    /// `KVM_MEM_LOG_DIRTY_PAGES`: the only flag that may change on a live slot.
    pub const LOG_DIRTY_PAGES: RegionFlags = RegionFlags(1);
    /// `KVM_MEM_READONLY`: fixed for the slot's lifetime.
    pub const READONLY: RegionFlags = RegionFlags(2);
    const KNOWN: u32 = 3;

    /// The flags as KVM's bit mask.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Flags from KVM's bit mask; unknown bits are kept so validation can refuse them.
    pub const fn from_bits_retain(bits: u32) -> RegionFlags {
        RegionFlags(bits)
    }

    /// True if every flag of `other` is set in `self`.
    pub const fn contains(self, other: RegionFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for RegionFlags {
    type Output = RegionFlags;
    fn bitor(self, rhs: RegionFlags) -> RegionFlags {
        RegionFlags(self.0 | rhs.0)
    }
}

/// One memslot as userspace describes it: `npages == 0` asks for deletion, as in KVM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MemoryRegion {
    /// Address space of the slot.
    pub as_id: AsId,
    /// Slot id inside the address space.
    pub slot: SlotId,
    /// First frame.
    pub base: Gfn,
    /// Number of 4 KiB frames; 0 deletes the slot.
    pub npages: u64,
    /// Flags.
    pub flags: RegionFlags,
}

impl MemoryRegion {
    /// A region in the normal address space with no flags.
    pub const fn new(slot: SlotId, base: Gfn, npages: u64) -> MemoryRegion {
        MemoryRegion {
            as_id: AsId::NORMAL,
            slot,
            base,
            npages,
            flags: RegionFlags::NONE,
        }
    }

    /// The same region in another address space.
    pub const fn in_address_space(mut self, as_id: AsId) -> MemoryRegion {
        self.as_id = as_id;
        self
    }

    /// The same region with other flags.
    pub const fn with_flags(mut self, flags: RegionFlags) -> MemoryRegion {
        self.flags = flags;
        self
    }

    /// The deletion request for a slot.
    pub const fn delete(as_id: AsId, slot: SlotId) -> MemoryRegion {
        MemoryRegion {
            as_id,
            slot,
            base: Gfn(0),
            npages: 0,
            flags: RegionFlags::NONE,
        }
    }

    /// One past the last frame (saturating at `u64::MAX` for a region that would wrap, which
    /// [`PageTracker::set_memory_region`](crate::PageTracker::set_memory_region) refuses).
    pub const fn end(&self) -> Gfn {
        Gfn(self.base.0.saturating_add(self.npages))
    }

    /// One past the last frame, or `None` if the region wraps.
    pub const fn checked_end(&self) -> Option<Gfn> {
        self.base.checked_add(self.npages)
    }

    /// True if `gfn` is inside the region.
    pub const fn contains(&self, gfn: Gfn) -> bool {
        gfn.0 >= self.base.0 && gfn.0 - self.base.0 < self.npages
    }
}

/// The kind of change a [`MemoryRegion`] asks for, derived from the old and new slot as KVM does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SlotChange {
    /// A new slot.
    Create,
    /// The slot goes away; notifiers get `track_remove_region`.
    Delete,
    /// Same size, new base: counts restart at zero. Refused while notifiers are registered.
    Move,
    /// Only `LOG_DIRTY_PAGES` changed: counts are kept.
    FlagsOnly,
    /// Nothing changed (KVM returns success without doing anything).
    Unchanged,
}

/// Per-slot metadata that survives a FLAGS_ONLY change (the kernel's `kvm_arch_memory_slot`).
#[derive(Debug)]
pub(crate) struct SlotMeta {
    /// `gfn_write_track`: exactly one `u16` per frame, absent until tracking is enabled (B5).
    pub(crate) counts: OnceLock<Box<[AtomicU16]>>,
    /// `disallow_lpage` for 2 MiB (index 0) and 1 GiB (index 1) regions (B20).
    pub(crate) lpage: [Box<[AtomicI32]>; 2],
    /// Set when the slot is deleted or moved away, before the change waits for dispatches:
    /// a read section that still holds a snapshot with this slot sees it and delivers nothing
    /// (see `grace.rs` for why a section may use any snapshot).
    pub(crate) gone: AtomicBool,
}

/// One installed slot.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) region: MemoryRegion,
    pub(crate) meta: Arc<SlotMeta>,
}

impl Slot {
    /// Index of `gfn` into this slot's per-frame arrays. The caller found the slot by `gfn`.
    #[expect(
        clippy::cast_possible_truncation,
        reason = "a slot has at most 2^31 - 1 pages, checked at creation"
    )]
    pub(crate) fn index(&self, gfn: Gfn) -> usize {
        (gfn.0 - self.region.base.0) as usize
    }

    /// Index of the 2M (`level_idx` 0) or 1G (1) region holding `gfn` (B20's formula).
    #[expect(
        clippy::cast_possible_truncation,
        reason = "bounded by the slot's page count"
    )]
    pub(crate) fn lpage_index(&self, gfn: Gfn, level_idx: usize) -> usize {
        let shift = LPAGE_LEVELS[level_idx].frame_shift();
        ((gfn.0 >> shift) - (self.region.base.0 >> shift)) as usize
    }

    /// The counter of `gfn`, if the arrays exist.
    pub(crate) fn count(&self, gfn: Gfn) -> Option<&AtomicU16> {
        self.meta.counts.get().map(|c| &c[self.index(gfn)])
    }
}

pub(crate) const LPAGE_LEVELS: [PageLevel; 2] = [PageLevel::M2, PageLevel::G1];

/// Allocates a zeroed count array, failing instead of aborting when memory is short.
pub(crate) fn alloc_counts(npages: u64) -> Result<Box<[AtomicU16]>> {
    let bytes = usize::try_from(npages)
        .ok()
        .and_then(|n| n.checked_mul(2))
        .unwrap_or(usize::MAX);
    let n = usize::try_from(npages).map_err(|_| Error::OutOfMemory { bytes })?;
    let mut v: Vec<AtomicU16> = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| Error::OutOfMemory { bytes })?;
    v.resize_with(n, || AtomicU16::new(0));
    Ok(v.into_boxed_slice())
}

/// Builds the huge-page disallow counts of a slot: partial regions at the edges start at 1.
fn alloc_lpage(region: &MemoryRegion) -> Result<[Box<[AtomicI32]>; 2]> {
    let build = |level: PageLevel| -> Result<Box<[AtomicI32]>> {
        let shift = level.frame_shift();
        let first = region.base.0 >> shift;
        let last = (region.end().0 - 1) >> shift;
        let n = usize::try_from(last - first + 1).unwrap_or(usize::MAX);
        let mut v: Vec<AtomicI32> = Vec::new();
        v.try_reserve_exact(n).map_err(|_| Error::OutOfMemory {
            bytes: n.saturating_mul(4),
        })?;
        v.resize_with(n, || AtomicI32::new(0));
        let mask = level.frames() - 1;
        if region.base.0 & mask != 0 {
            v[0].store(1, Ordering::Relaxed);
        }
        if region.end().0 & mask != 0 {
            v[n - 1].store(1, Ordering::Relaxed);
        }
        Ok(v.into_boxed_slice())
    };
    Ok([build(PageLevel::M2)?, build(PageLevel::G1)?])
}

impl SlotMeta {
    pub(crate) fn new(region: &MemoryRegion, with_counts: bool) -> Result<SlotMeta> {
        let lpage = alloc_lpage(region)?;
        let counts = OnceLock::new();
        if with_counts {
            // The lock is fresh, so this cannot already be set.
            let _ = counts.set(alloc_counts(region.npages)?);
        }
        Ok(SlotMeta {
            counts,
            lpage,
            gone: AtomicBool::new(false),
        })
    }
}

/// Entries of `AddressSpace::bases` per entry of its top-level `index`.
const FANOUT: usize = 64;

/// The slots of one address space, sorted by base frame for binary search.
#[derive(Debug, Default, Clone)]
pub(crate) struct AddressSpace {
    /// Base frame of each slot, ascending (kept apart from `slots` for cache-friendly search).
    bases: Vec<u64>,
    /// Every `FANOUT`-th entry of `bases`. A lookup searches this short array, then one
    /// `FANOUT`-long run of `bases`, instead of a path through the whole of `bases` (with 32764
    /// slots: 4 KiB plus 512 bytes, rather than 15 scattered cache lines).
    index: Vec<u64>,
    /// Each slot's region, in the same order: the containment check and `region_of` read it
    /// here instead of following the slot's `Arc`.
    regions: Vec<MemoryRegion>,
    slots: Vec<Arc<Slot>>,
}

impl AddressSpace {
    fn from_slots(slots: Vec<Arc<Slot>>) -> AddressSpace {
        let bases: Vec<u64> = slots.iter().map(|s| s.region.base.0).collect();
        AddressSpace {
            index: bases.iter().step_by(FANOUT).copied().collect(),
            regions: slots.iter().map(|s| s.region).collect(),
            bases,
            slots,
        }
    }

    /// Position of the slot containing `gfn`: two short binary searches, one region check.
    #[inline]
    fn position(&self, gfn: Gfn) -> Option<usize> {
        let block = self.index.partition_point(|&b| b <= gfn.0).checked_sub(1)?;
        let lo = block * FANOUT;
        let run = self.bases.get(lo..self.bases.len().min(lo + FANOUT))?;
        // `run[0] == index[block] <= gfn`, so the subtraction cannot fail.
        let i = (lo + run.partition_point(|&b| b <= gfn.0)).checked_sub(1)?;
        let r = self.regions.get(i)?;
        (gfn.0 - r.base.0 < r.npages).then_some(i)
    }

    /// The slot containing `gfn`.
    #[inline]
    pub(crate) fn find(&self, gfn: Gfn) -> Option<&Arc<Slot>> {
        self.slots.get(self.position(gfn)?)
    }

    /// The region of the slot containing `gfn`, without touching the slot itself.
    #[inline]
    pub(crate) fn region_of(&self, gfn: Gfn) -> Option<MemoryRegion> {
        self.regions.get(self.position(gfn)?).copied()
    }

    pub(crate) fn by_id(&self, id: SlotId) -> Option<&Arc<Slot>> {
        self.slots.iter().find(|s| s.region.slot == id)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<Slot>> {
        self.slots.iter()
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// The first slot other than `except` that overlaps `[base, end)`.
    fn overlap(&self, base: Gfn, end: Gfn, except: SlotId) -> Option<&Arc<Slot>> {
        let i = self.bases.partition_point(|&b| b < end.0);
        self.slots[..i]
            .iter()
            .rev()
            // Slots never overlap, so ends ascend with bases: only the nearest one can reach `base`.
            .find(|s| s.region.slot != except)
            .filter(|s| s.region.end().0 > base.0)
    }

    /// A copy without slot `id` and, if given, with `add` inserted in order.
    fn replaced(&self, id: Option<SlotId>, add: Option<Arc<Slot>>) -> AddressSpace {
        let mut slots: Vec<Arc<Slot>> = self
            .slots
            .iter()
            .filter(|s| Some(s.region.slot) != id)
            .cloned()
            .collect();
        if let Some(new) = add {
            let at = slots.partition_point(|s| s.region.base < new.region.base);
            slots.insert(at, new);
        }
        AddressSpace::from_slots(slots)
    }
}

/// An immutable snapshot of every address space's slots, published through an `ArcSwap`.
#[derive(Debug, Clone)]
pub struct Memslots {
    pub(crate) spaces: Vec<AddressSpace>,
}

impl Memslots {
    pub(crate) fn new(count: u16) -> Memslots {
        Memslots {
            spaces: vec![AddressSpace::default(); usize::from(count)],
        }
    }

    /// The slot containing `gfn` in `as_id`.
    #[inline]
    pub(crate) fn find(&self, as_id: AsId, gfn: Gfn) -> Option<&Arc<Slot>> {
        self.spaces.get(usize::from(as_id.0))?.find(gfn)
    }

    /// The region containing `gfn` in `as_id`, if any.
    #[inline]
    pub fn region_of(&self, as_id: AsId, gfn: Gfn) -> Option<MemoryRegion> {
        self.spaces.get(usize::from(as_id.0))?.region_of(gfn)
    }

    /// Every region of `as_id`, in base order.
    pub fn regions(&self, as_id: AsId) -> impl Iterator<Item = MemoryRegion> + '_ {
        self.spaces
            .get(usize::from(as_id.0))
            .into_iter()
            .flat_map(|s| s.iter().map(|s| s.region))
    }

    /// Number of slots in `as_id`.
    pub fn len(&self, as_id: AsId) -> usize {
        self.spaces
            .get(usize::from(as_id.0))
            .map_or(0, AddressSpace::len)
    }

    /// True if no address space has a slot.
    pub fn is_empty(&self) -> bool {
        self.spaces.iter().all(|s| s.len() == 0)
    }

    /// Whether `gfn` is write-tracked in `as_id`, as [`PageTracker::is_write_tracked`](crate::PageTracker::is_write_tracked)
    /// answers it, for callers that hold a snapshot (one array load after the lookup).
    #[inline]
    pub fn is_write_tracked(&self, as_id: AsId, gfn: Gfn) -> bool {
        self.find(as_id, gfn)
            .and_then(|s| s.count(gfn))
            // Relaxed: a lockless read that may be stale against a concurrent update (B19);
            // the arrays themselves were published with release/acquire via the OnceLock.
            .is_some_and(|c| c.load(Ordering::Relaxed) != 0)
    }

    /// The slot holding `gfn` in `as_id`, trying the one at position `hint` first (and leaving
    /// there the position of the slot that held `gfn`): a per-thread caller whose frames keep
    /// falling in the same slot skips the search. The hint is only a guess, checked against
    /// the region.
    #[inline]
    fn slot_hinted(&self, as_id: AsId, gfn: Gfn, hint: &mut usize) -> Option<&Slot> {
        let space = self.spaces.get(usize::from(as_id.0))?;
        let i = match space.regions.get(*hint) {
            Some(r) if r.contains(gfn) => *hint,
            _ => {
                let i = space.position(gfn)?;
                *hint = i;
                i
            }
        };
        Some(&space.slots[i])
    }

    /// `is_write_tracked`, with the slot found as [`slot_hinted`](Self::slot_hinted) does.
    #[inline]
    pub(crate) fn is_write_tracked_hinted(&self, as_id: AsId, gfn: Gfn, hint: &mut usize) -> bool {
        self.slot_hinted(as_id, gfn, hint)
            .and_then(|slot| slot.count(gfn))
            // Relaxed: as `is_write_tracked`.
            .is_some_and(|c| c.load(Ordering::Relaxed) != 0)
    }

    /// Whether a read section delivers a write to `gfn`: the slot holding it in this snapshot
    /// (which may be stale) is not gone and the frame's count is non-zero, both loaded with the
    /// ordering the grace protocol needs (`SeqCst` outside loom; see `grace.rs`).
    #[inline]
    pub(crate) fn is_tracked_in_section(&self, as_id: AsId, gfn: Gfn, hint: &mut usize) -> bool {
        let order = crate::sync::dekker(Ordering::Relaxed);
        self.slot_hinted(as_id, gfn, hint).is_some_and(|slot| {
            !slot.meta.gone.load(order) && slot.count(gfn).is_some_and(|c| c.load(order) != 0)
        })
    }

    /// The slot containing `gfn` in `as_id`, for a backend that resolves a slot once and then
    /// asks about many of its frames (the kernel's `kvm_gfn_is_write_tracked(kvm, slot, gfn)`).
    #[inline]
    pub fn slot(&self, as_id: AsId, gfn: Gfn) -> Option<SlotRef<'_>> {
        self.find(as_id, gfn).map(|slot| SlotRef { slot })
    }
}

/// One slot of a [`Memslots`] snapshot (see [`Memslots::slot`]): "is this frame tracked?" is
/// one array load.
#[derive(Clone, Copy, Debug)]
pub struct SlotRef<'a> {
    slot: &'a Slot,
}

impl SlotRef<'_> {
    /// The slot's region.
    pub fn region(&self) -> MemoryRegion {
        self.slot.region
    }

    /// Whether `gfn` is write-tracked; false for a frame outside the slot, and before
    /// tracking is enabled.
    #[inline]
    pub fn is_write_tracked(&self, gfn: Gfn) -> bool {
        let Some(counts) = self.slot.meta.counts.get() else {
            return false;
        };
        usize::try_from(gfn.0.wrapping_sub(self.slot.region.base.0))
            .ok()
            .and_then(|i| counts.get(i))
            // Relaxed: as `Memslots::is_write_tracked`.
            .is_some_and(|c| c.load(Ordering::Relaxed) != 0)
    }
}

/// What validation decided about a region change, before anything is committed.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) change: SlotChange,
    pub(crate) old: Option<Arc<Slot>>,
}

/// Derives and validates the change `new` asks for against `current` (spec §8), changing nothing.
pub(crate) fn plan(
    current: &Memslots,
    new: &MemoryRegion,
    max_slots: u16,
    max_pages: u64,
) -> Result<Plan> {
    let count = u16::try_from(current.spaces.len()).unwrap_or(u16::MAX);
    let space = current
        .spaces
        .get(usize::from(new.as_id.0))
        .ok_or(Error::InvalidAddressSpace {
            as_id: new.as_id,
            count,
        })?;
    if new.slot.0 >= max_slots {
        return Err(Error::InvalidSlot {
            slot: new.slot,
            max: max_slots,
        });
    }
    let bad = |reason| Error::InvalidRegion {
        slot: new.slot,
        reason,
    };
    if new.flags.bits() & !RegionFlags::KNOWN != 0 {
        return Err(bad("unknown flags"));
    }
    let old = space.by_id(new.slot).cloned();
    if new.npages == 0 {
        return match old {
            Some(old) => Ok(Plan {
                change: SlotChange::Delete,
                old: Some(old),
            }),
            None => Err(Error::UnknownSlot {
                as_id: new.as_id,
                slot: new.slot,
            }),
        };
    }
    if new.npages > max_pages {
        return Err(bad("too many pages for one slot"));
    }
    if new
        .base
        .0
        .checked_add(new.npages)
        .is_none_or(|end| end > GFN_LIMIT)
    {
        return Err(bad(
            "region reaches past the end of the 64-bit guest-physical space",
        ));
    }
    let change = match &old {
        None => SlotChange::Create,
        Some(o) if o.region.npages != new.npages => {
            return Err(bad("a live slot cannot change size"));
        }
        Some(o)
            if (o.region.flags.bits() ^ new.flags.bits()) & RegionFlags::READONLY.bits() != 0 =>
        {
            return Err(bad("KVM_MEM_READONLY cannot change on a live slot"));
        }
        Some(o) if o.region.base != new.base => SlotChange::Move,
        Some(o) if o.region.flags != new.flags => SlotChange::FlagsOnly,
        Some(_) => SlotChange::Unchanged,
    };
    if matches!(change, SlotChange::Create | SlotChange::Move)
        && let Some(existing) = space.overlap(new.base, new.end(), new.slot)
    {
        return Err(Error::MemslotOverlap {
            as_id: new.as_id,
            new: new.slot,
            existing: existing.region.slot,
        });
    }
    Ok(Plan { change, old })
}

/// Builds the snapshot that results from an already validated plan.
pub(crate) fn apply(
    current: &Memslots,
    new: &MemoryRegion,
    plan: &Plan,
    with_counts: bool,
) -> Result<Memslots> {
    let idx = usize::from(new.as_id.0);
    let mut next = current.clone();
    let space = &current.spaces[idx];
    next.spaces[idx] = match plan.change {
        SlotChange::Delete => space.replaced(Some(new.slot), None),
        SlotChange::Create | SlotChange::Move => {
            let meta = Arc::new(SlotMeta::new(new, with_counts)?);
            let slot = Arc::new(Slot { region: *new, meta });
            space.replaced(Some(new.slot), Some(slot))
        }
        SlotChange::FlagsOnly => {
            let old = plan
                .old
                .as_ref()
                .expect("FLAGS_ONLY is planned only for an existing slot");
            let slot = Arc::new(Slot {
                region: *new,
                meta: Arc::clone(&old.meta),
            });
            space.replaced(Some(new.slot), Some(slot))
        }
        SlotChange::Unchanged => return Ok(next),
    };
    Ok(next)
}
