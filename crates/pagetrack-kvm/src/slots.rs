//! Enforcement by memslot fragments: guest RAM is registered with KVM in chunks; a chunk that
//! holds tracked frames is cut into fragments, the tracked runs `KVM_MEM_READONLY` (so every
//! guest store to them exits to userspace) and the rest writable (full speed).
//!
//! Relaxed frames (`relaxed.rs`) are tracked frames in writable fragments that carry
//! `KVM_MEM_LOG_DIRTY_PAGES`: a relaxed run gets its own fragment (adjacent relaxed frames
//! share one), unless every fragment logs anyway ([`crate::VmConfig::with_dirty_log`]), in
//! which case relaxed frames simply join their writable neighbours. Every harvest of a
//! fragment's log, whoever asks for it (the VMM's [`crate::Vm::take_dirty_log`], a re-cut
//! deleting the fragment, a relaxed sync), is dispatched to both consumers: the VMM's
//! [`DirtyBits`] and the chunk's `pending` bits of relaxed frames, so neither steals the
//! other's pages.

use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::VmFd;
use vm_memory::GuestRegionMmap;

use crate::dirty::DirtyBits;
use crate::error::{Error, Result};
use crate::ring::{DirtyRings, RingEntry};
use crate::sys::KvmSlot;

const PAGE: u64 = 4096;

/// The KVM memslot operations the fragment table makes, one ioctl each: the enforcer's seam
/// to KVM. [`VmFd`] is the real one; the unit tests use a fake that records the calls and
/// injects failures.
pub(crate) trait SlotOps {
    /// Creates slot `id` for `[gpa, gpa + size)` of `region` (`KVM_SET_USER_MEMORY_REGION`).
    fn create_slot(
        &self,
        id: u32,
        region: &Arc<GuestRegionMmap>,
        gpa: u64,
        size: u64,
        readonly: bool,
        log_dirty: bool,
    ) -> std::result::Result<KvmSlot, kvm_ioctls::Error>;

    /// Deletes `slot` (`KVM_SET_USER_MEMORY_REGION` with size 0). On failure KVM may still
    /// map it: the slot comes back with the error, mapping and all.
    fn delete_slot(&self, slot: KvmSlot) -> std::result::Result<(), (KvmSlot, kvm_ioctls::Error)>;

    /// Takes (and clears) `slot`'s dirty log (`KVM_GET_DIRTY_LOG`, then with `manual`
    /// protect `KVM_CLEAR_DIRTY_LOG` of exactly those bits but the ones set in `keep`): bit
    /// i is page i.
    fn dirty_log(
        &self,
        slot: &KvmSlot,
        manual: bool,
        keep: Option<&[u64]>,
    ) -> std::result::Result<Vec<u64>, kvm_ioctls::Error>;

    /// Harvests every vCPU's dirty ring and resets them (`KVM_RESET_DIRTY_RINGS`), see
    /// [`DirtyRings::take`]. The fake KVM of the unit tests has no rings.
    fn take_ring(&self, rings: &DirtyRings) -> Result<Vec<RingEntry>> {
        let _ = rings;
        Ok(Vec::new())
    }
}

impl SlotOps for VmFd {
    fn create_slot(
        &self,
        id: u32,
        region: &Arc<GuestRegionMmap>,
        gpa: u64,
        size: u64,
        readonly: bool,
        log_dirty: bool,
    ) -> std::result::Result<KvmSlot, kvm_ioctls::Error> {
        KvmSlot::create(self, id, region, gpa, size, readonly, log_dirty)
    }

    fn delete_slot(&self, slot: KvmSlot) -> std::result::Result<(), (KvmSlot, kvm_ioctls::Error)> {
        slot.remove(self)
    }

    fn dirty_log(
        &self,
        slot: &KvmSlot,
        manual: bool,
        keep: Option<&[u64]>,
    ) -> std::result::Result<Vec<u64>, kvm_ioctls::Error> {
        slot.take_dirty_log(self, manual, keep)
    }

    fn take_ring(&self, rings: &DirtyRings) -> Result<Vec<RingEntry>> {
        rings.take(self)
    }
}

/// The VM fd as the backend shares it.
impl<S: SlotOps + ?Sized> SlotOps for Arc<S> {
    fn create_slot(
        &self,
        id: u32,
        region: &Arc<GuestRegionMmap>,
        gpa: u64,
        size: u64,
        readonly: bool,
        log_dirty: bool,
    ) -> std::result::Result<KvmSlot, kvm_ioctls::Error> {
        (**self).create_slot(id, region, gpa, size, readonly, log_dirty)
    }

    fn delete_slot(&self, slot: KvmSlot) -> std::result::Result<(), (KvmSlot, kvm_ioctls::Error)> {
        (**self).delete_slot(slot)
    }

    fn dirty_log(
        &self,
        slot: &KvmSlot,
        manual: bool,
        keep: Option<&[u64]>,
    ) -> std::result::Result<Vec<u64>, kvm_ioctls::Error> {
        (**self).dirty_log(slot, manual, keep)
    }

    fn take_ring(&self, rings: &DirtyRings) -> Result<Vec<RingEntry>> {
        (**self).take_ring(rings)
    }
}

/// One desired fragment of a chunk: `[first, first + pages)` in pages from the chunk start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    first: u64,
    pages: u64,
    readonly: bool,
    /// A writable fragment with `KVM_MEM_LOG_DIRTY_PAGES` (always false for read-only
    /// pieces, whose logging follows the VM's dirty-log setting and logs nothing anyway).
    log: bool,
}

#[derive(Debug)]
struct Chunk {
    gpa: u64,
    pages: u64,
    /// One bit per frame: protected (tracked) or not.
    protected: Vec<u64>,
    /// One bit per protected frame that runs relaxed (writable, dirty-logged, shadowed).
    relaxed: Vec<u64>,
    /// Relaxed frames KVM logged dirty since their last diff (harvested, not yet diffed).
    pending: Vec<u64>,
    /// Hot relaxed frames (manual protect only, `relaxed.rs`): their KVM dirty bits are
    /// never cleared, so they stay writable and every harvest reports them; each sync diffs
    /// them. Not passed to the dirty logs by a harvest: the relaxed sync marks a hot frame
    /// in them when its diff finds a change.
    hot: Vec<u64>,
    /// Set bits of `hot`.
    hot_count: u64,
    /// Hot frames just cooled: KVM still holds their dirty bits from while they were hot,
    /// so the next relaxed harvest clears (re-protects) them but, as for hot frames, leaves
    /// them out of the dirty logs (the sync's diff marks them if changed); then they are
    /// plain relaxed frames.
    cooling: Vec<u64>,
    /// Set bits of `cooling`.
    cooling_count: u64,
    /// Untracked frames that were relaxed when untracked (only without the VMM's dirty log,
    /// where writable fragments do not log): their writable logged fragment is kept as it
    /// was (no re-cut, so the guest does not refault the chunk), and with manual protect
    /// their KVM dirty bits are never cleared, so they stay writable. Nothing reads their
    /// bits (they are not relaxed). Cleared when the frame is tracked again.
    lingering: Vec<u64>,
    /// Set bits of `lingering`.
    lingering_count: u64,
    /// Set bits of `relaxed`.
    relaxed_count: u64,
    /// With the dirty ring, the vCPU whose ring logged each pending frame (`None`: the rings
    /// of several vCPUs did since the frame's last diff). Empty with the bitmap.
    writers: std::collections::HashMap<u64, Option<u32>>,
    frags: Vec<KvmSlot>,
}

impl Chunk {
    fn is_protected(&self, page: u64) -> bool {
        let (w, b) = word_bit(page);
        self.protected[w] & (1 << b) != 0
    }

    fn is_relaxed(&self, page: u64) -> bool {
        let (w, b) = word_bit(page);
        self.relaxed[w] & (1 << b) != 0
    }

    fn is_hot(&self, page: u64) -> bool {
        let (w, b) = word_bit(page);
        self.hot_count > 0 && self.hot[w] & (1 << b) != 0
    }

    fn is_lingering(&self, page: u64) -> bool {
        let (w, b) = word_bit(page);
        self.lingering_count > 0 && self.lingering[w] & (1 << b) != 0
    }

    /// Clears `page`'s hot and cooling bits (it stops being relaxed).
    fn unheat(&mut self, page: u64) {
        let (w, b) = word_bit(page);
        if self.hot[w] & (1 << b) != 0 {
            self.hot[w] &= !(1 << b);
            self.hot_count -= 1;
        }
        self.uncool(page);
    }

    fn uncool(&mut self, page: u64) {
        let (w, b) = word_bit(page);
        if self.cooling[w] & (1 << b) != 0 {
            self.cooling[w] &= !(1 << b);
            self.cooling_count -= 1;
        }
    }

    /// The hot bits (`cooling` too: with the cooling bits) of the `pages` pages from
    /// `first` (a fragment), as a bitmap of its pages; `None` if none is set.
    ///
    /// `cooling` false: the harvest's keep mask instead, the hot and the lingering frames.
    fn hot_mask(&self, first: u64, pages: u64, cooling: bool) -> Option<Vec<u64>> {
        let (other, count) = if cooling {
            (&self.cooling, self.cooling_count)
        } else {
            (&self.lingering, self.lingering_count)
        };
        if self.hot_count == 0 && count == 0 {
            return None;
        }
        let mut mask = vec![0u64; usize::try_from(pages.div_ceil(64)).ok()?];
        let mut any = false;
        let both: Vec<u64> = self.hot.iter().zip(other).map(|(h, o)| h | o).collect();
        for page in crate::dirty::set_bits(&both) {
            if (first..first + pages).contains(&page) {
                let (w, b) = word_bit(page - first);
                mask[w] |= 1 << b;
                any = true;
            }
        }
        any.then_some(mask)
    }

    /// Runs of strict protected frames as read-only pieces, the gaps as writable ones, and
    /// runs of relaxed frames as logged writable ones (`log_all`: every writable piece logs,
    /// so relaxed frames join the gaps).
    fn layout(&self, log_all: bool) -> Vec<Piece> {
        let mut out: Vec<Piece> = Vec::new();
        for page in 0..self.pages {
            let relaxed = self.relaxed_count > 0 && self.is_relaxed(page);
            let ro = self.is_protected(page) && !relaxed;
            let log = !ro && (relaxed || log_all || self.is_lingering(page));
            match out.last_mut() {
                Some(p) if p.readonly == ro && p.log == log => p.pages += 1,
                _ => out.push(Piece {
                    first: page,
                    pages: 1,
                    readonly: ro,
                    log,
                }),
            }
        }
        out
    }

    fn current(&self) -> Vec<Piece> {
        self.frags
            .iter()
            .map(|s| Piece {
                first: (s.gpa() - self.gpa) / PAGE,
                pages: s.size() / PAGE,
                readonly: s.readonly(),
                log: !s.readonly() && s.log_dirty(),
            })
            .collect()
    }

    /// Adds a harvested KVM bitmap of the fragment at `slot_gpa` to the relaxed frames'
    /// pending bits.
    fn absorb(&mut self, slot_gpa: u64, bitmap: &[u64]) {
        if self.relaxed_count == 0 {
            return;
        }
        let base = (slot_gpa - self.gpa) / PAGE;
        for page in crate::dirty::set_bits(bitmap).map(|b| base + b) {
            if page < self.pages && self.is_relaxed(page) {
                let (w, b) = word_bit(page);
                self.pending[w] |= 1 << b;
            }
        }
    }

    /// Adds one harvested dirty-ring entry (page `page` of the chunk, from vCPU `vcpu`'s
    /// ring) to the relaxed frames' pending bits and first writers.
    fn absorb_entry(&mut self, page: u64, vcpu: u32) {
        if page >= self.pages || !self.is_relaxed(page) {
            return;
        }
        let (w, b) = word_bit(page);
        self.pending[w] |= 1 << b;
        self.writers
            .entry(page)
            .and_modify(|v| {
                if *v != Some(vcpu) {
                    *v = None;
                }
            })
            .or_insert(Some(vcpu));
    }
}

/// A relaxed frame a harvest found dirty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DirtyFrame {
    /// Its guest address.
    pub(crate) gpa: u64,
    /// With the dirty ring, the vCPU that dirtied it first since its previous diff (the only
    /// vCPU whose ring logged it since); `None` with the bitmap or when several rings did.
    pub(crate) first_writer: Option<u32>,
}

fn word_bit(page: u64) -> (usize, u32) {
    let w = usize::try_from(page / 64).expect("chunks are far smaller than the address space");
    let b = u32::try_from(page % 64).expect("a remainder of 64 fits");
    (w, b)
}

/// Merges writable gaps into their read-only neighbours, smallest first, until at most `max`
/// pieces remain (writes to the merged untracked frames then exit and are applied silently;
/// a merged relaxed frame's stores exit too and are applied as exact events, which keeps its
/// shadow current: `memory.rs`).
fn squeeze(mut pieces: Vec<Piece>, max: usize) -> Option<Vec<Piece>> {
    while pieces.len() > max {
        let has_ro = pieces.iter().any(|p| p.readonly);
        if !has_ro {
            return None;
        }
        // The smallest writable piece next to a read-only one.
        let (i, _) = pieces
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.readonly)
            .min_by_key(|(_, p)| p.pages)?;
        pieces[i].readonly = true;
        pieces[i].log = false;
        // Coalesce neighbours that are now both read-only.
        let mut merged: Vec<Piece> = Vec::with_capacity(pieces.len());
        for p in pieces {
            match merged.last_mut() {
                Some(last) if last.readonly == p.readonly && last.log == p.log => {
                    last.pages += p.pages
                }
                _ => merged.push(p),
            }
        }
        pieces = merged;
    }
    Some(pieces)
}

#[derive(Debug)]
struct Ram {
    gpa: u64,
    size: u64,
    mmap: Arc<GuestRegionMmap>,
    chunks: Vec<Chunk>,
    /// The region's dirty log, when dirty logging is on.
    dirty: Option<Arc<DirtyBits>>,
}

/// Counters of the fragment table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FragmentStats {
    /// KVM memslots in use (writable and read-only fragments).
    pub fragments: usize,
    /// Read-only fragments among them.
    pub readonly_fragments: usize,
    /// KVM memslots pagetrack may use.
    pub budget: usize,
    /// `KVM_SET_USER_MEMORY_REGION` calls made for tracking changes.
    pub slot_changes: u64,
    /// Time spent in those calls, in nanoseconds.
    pub slot_change_ns: u64,
    /// Chunks re-cut.
    pub relayouts: u64,
}

/// The fragment table: every KVM memslot pagetrack created.
#[derive(Debug)]
pub(crate) struct Fragments {
    rams: Vec<Ram>,
    /// Slots of removed RAM whose delete ioctl failed: KVM may still map them, so they (and
    /// the `Arc` of their mapping) are kept until the VM fd closes.
    stuck: Vec<KvmSlot>,
    free_ids: Vec<u32>,
    /// The next never-used KVM slot id; ids are handed out from `first_id` up, at most
    /// `budget` of them at a time (the range the VMM left to pagetrack).
    next_id: u32,
    budget: usize,
    chunk_bytes: u64,
    /// Every fragment carries `KVM_MEM_LOG_DIRTY_PAGES`.
    log_dirty: bool,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` is enabled on the VM: a harvest is
    /// `KVM_GET_DIRTY_LOG` then `KVM_CLEAR_DIRTY_LOG` of exactly the bits it returned.
    manual_protect: bool,
    /// The dirty ring, which replaces every fragment's bitmap when the VM enabled it.
    rings: Option<Arc<DirtyRings>>,
    /// The guest address of each of pagetrack's KVM slots, by id: dispatches ring entries.
    slot_base: std::collections::HashMap<u32, u64>,
    /// Ring entries of memslots pagetrack does not own (the VMM's own), as (slot, page).
    foreign: std::collections::BTreeSet<(u32, u64)>,
    stats: FragmentStats,
}

impl Fragments {
    /// A table whose fragments use KVM slot ids `first_id..first_id + budget`.
    pub(crate) fn new(
        first_id: u32,
        budget: usize,
        chunk_bytes: u64,
        log_dirty: bool,
    ) -> Fragments {
        Fragments {
            rams: Vec::new(),
            stuck: Vec::new(),
            free_ids: Vec::new(),
            next_id: first_id,
            budget,
            chunk_bytes,
            log_dirty,
            manual_protect: false,
            rings: None,
            slot_base: std::collections::HashMap::new(),
            foreign: std::collections::BTreeSet::new(),
            stats: FragmentStats {
                budget,
                ..FragmentStats::default()
            },
        }
    }

    pub(crate) fn stats(&self) -> FragmentStats {
        self.stats
    }

    /// Harvests from now on re-protect with `KVM_CLEAR_DIRTY_LOG` (the VM has
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` enabled), or not.
    pub(crate) fn set_manual_protect(&mut self, on: bool) {
        self.manual_protect = on;
    }

    /// True if harvests use `KVM_CLEAR_DIRTY_LOG`.
    pub(crate) fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    /// Harvests come from the dirty ring from now on (the VM enabled it: no bitmaps).
    pub(crate) fn set_rings(&mut self, rings: Arc<DirtyRings>) {
        self.rings = Some(rings);
    }

    /// Harvests every vCPU's dirty ring, resets them (which re-protects the pages), then
    /// dispatches each entry by memslot id to its region's [`DirtyBits`] (both consumers) and
    /// its chunk's relaxed frames: the ring's one harvest, shared by every consumer as a
    /// bitmap harvest is. A no-op without the ring.
    fn drain_ring(&mut self, vm: &(impl SlotOps + ?Sized)) -> Result<()> {
        let Some(rings) = self.rings.clone() else {
            return Ok(());
        };
        let entries = vm.take_ring(&rings)?;
        let mut foreign = 0u64;
        for e in entries {
            let Some(&base) = self.slot_base.get(&e.slot) else {
                foreign += u64::from(self.foreign.insert((e.slot, e.offset)));
                continue;
            };
            let Some(gpa) = e.offset.checked_mul(PAGE).and_then(|o| o.checked_add(base)) else {
                continue;
            };
            let Some((r, c)) = self.locate(gpa) else {
                continue;
            };
            if let Some(log) = &self.rams[r].dirty {
                log.mark_for(gpa, 1, true);
            }
            let chunk = &mut self.rams[r].chunks[c];
            let page = (gpa - chunk.gpa) / PAGE;
            chunk.absorb_entry(page, e.vcpu);
        }
        if foreign > 0 {
            rings.count_foreign(foreign);
        }
        Ok(())
    }

    /// The ring entries of memslots pagetrack does not own, as (slot, page), harvested
    /// first; leaves them empty.
    pub(crate) fn take_foreign(&mut self, vm: &(impl SlotOps + ?Sized)) -> Result<Vec<(u32, u64)>> {
        self.drain_ring(vm)?;
        Ok(std::mem::take(&mut self.foreign).into_iter().collect())
    }

    /// The ioctls of a harvest, for errors.
    fn harvest_op(&self) -> &'static str {
        if self.manual_protect {
            "KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG"
        } else {
            "KVM_GET_DIRTY_LOG"
        }
    }

    pub(crate) fn chunk_bytes(&self) -> u64 {
        self.chunk_bytes
    }

    fn alloc_id(&mut self) -> Result<u32> {
        if self.stats.fragments >= self.budget {
            return Err(Error::SlotBudget {
                budget: self.budget,
            });
        }
        Ok(self.free_ids.pop().unwrap_or_else(|| {
            self.next_id += 1;
            self.next_id - 1
        }))
    }

    fn create(
        &mut self,
        vm: &(impl SlotOps + ?Sized),
        mmap: &Arc<GuestRegionMmap>,
        gpa: u64,
        size: u64,
        ro: bool,
        log: bool,
    ) -> Result<KvmSlot> {
        let id = self.alloc_id()?;
        let t = Instant::now();
        let res = vm.create_slot(id, mmap, gpa, size, ro, self.log_dirty || log);
        self.account(t);
        match res {
            Ok(s) => {
                self.slot_base.insert(id, gpa);
                self.stats.fragments += 1;
                self.stats.readonly_fragments += usize::from(ro);
                Ok(s)
            }
            Err(e) => {
                self.free_ids.push(id);
                Err(Error::Kvm {
                    op: "KVM_SET_USER_MEMORY_REGION",
                    source: e,
                })
            }
        }
    }

    /// Deletes `slot` from KVM, first harvesting its dirty log if `harvest` (returned, for
    /// [`Fragments::dispatch`]). On failure the slot comes back with the error (KVM may still
    /// map it: the caller keeps it).
    fn delete(
        &mut self,
        vm: &(impl SlotOps + ?Sized),
        slot: KvmSlot,
        harvest: bool,
    ) -> std::result::Result<Option<Vec<u64>>, (KvmSlot, Error)> {
        let mut bits = None;
        if self.rings.is_some() {
            // The ring names slots by id: entries of this one are dispatched before the id
            // is freed (and maybe reused at another address). A read-only slot has none, and
            // KVM has no bitmap to take with the ring on (`KVM_GET_DIRTY_LOG` fails ENXIO:
            // the mode model test's track-next-to-a-tracked-frame re-cut).
            if slot.log_dirty()
                && !slot.readonly()
                && let Err(e) = self.drain_ring(vm)
            {
                return Err((slot, e));
            }
        } else if harvest && slot.log_dirty() {
            match vm.dirty_log(&slot, self.manual_protect, None) {
                Ok(b) => bits = Some(b),
                Err(e) => return Err((slot, Error::kvm(self.harvest_op())(e))),
            }
        }
        let (id, ro) = (slot.id(), slot.readonly());
        let t = Instant::now();
        let res = vm.delete_slot(slot);
        self.account(t);
        res.map_err(|(slot, e)| (slot, Error::kvm("KVM_SET_USER_MEMORY_REGION")(e)))?;
        self.slot_base.remove(&id);
        self.free_ids.push(id);
        self.stats.fragments -= 1;
        self.stats.readonly_fragments -= usize::from(ro);
        Ok(bits)
    }

    /// Hands a harvested bitmap of the fragment at `slot_gpa` (in chunk `c` of RAM `r`) to
    /// both consumers: the VMM's dirty log and the relaxed frames' pending bits.
    /// Hot frames go to the pending bits only: KVM reports them at every harvest whether
    /// written or not, so the relaxed sync marks them in the dirty log when its diff finds
    /// them changed (`relaxed.rs`).
    fn dispatch(&mut self, r: usize, c: usize, slot_gpa: u64, bits: &[u64]) {
        if let Some(log) = &self.rams[r].dirty {
            let chunk = &self.rams[r].chunks[c];
            match chunk.hot_mask((slot_gpa - chunk.gpa) / PAGE, bits.len() as u64 * 64, true) {
                Some(hot) => {
                    let cold: Vec<u64> = bits.iter().zip(&hot).map(|(b, h)| b & !h).collect();
                    log.merge(slot_gpa, &cold);
                }
                None => log.merge(slot_gpa, bits),
            }
        }
        self.rams[r].chunks[c].absorb(slot_gpa, bits);
    }

    /// Deletes `slot` for good (its RAM is going away); one whose delete fails is kept in
    /// `stuck`, mapping and all.
    fn delete_or_keep(&mut self, vm: &(impl SlotOps + ?Sized), slot: KvmSlot) -> Result<()> {
        self.delete(vm, slot, false).map(drop).map_err(|(slot, e)| {
            self.stuck.push(slot);
            e
        })
    }

    fn account(&mut self, t: Instant) {
        self.stats.slot_changes += 1;
        self.stats.slot_change_ns += u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
    }

    /// Registers `[gpa, gpa + size)` of `mmap` with KVM as writable chunks.
    pub(crate) fn add_ram(
        &mut self,
        vm: &(impl SlotOps + ?Sized),
        mmap: Arc<GuestRegionMmap>,
        gpa: u64,
        size: u64,
        dirty: Option<Arc<DirtyBits>>,
    ) -> Result<()> {
        let nchunks = size.div_ceil(self.chunk_bytes);
        if self.stats.fragments + usize::try_from(nchunks).unwrap_or(usize::MAX) > self.budget {
            return Err(Error::SlotBudget {
                budget: self.budget,
            });
        }
        let mut chunks = Vec::new();
        let mut at = gpa;
        while at < gpa + size {
            let len = self.chunk_bytes.min(gpa + size - at);
            match self.create(vm, &mmap, at, len, false, false) {
                Ok(slot) => {
                    let pages = len / PAGE;
                    let words = usize::try_from(pages.div_ceil(64)).unwrap_or(0);
                    chunks.push(Chunk {
                        gpa: at,
                        pages,
                        protected: vec![0; words],
                        relaxed: vec![0; words],
                        pending: vec![0; words],
                        hot: vec![0; words],
                        hot_count: 0,
                        cooling: vec![0; words],
                        cooling_count: 0,
                        lingering: vec![0; words],
                        lingering_count: 0,
                        relaxed_count: 0,
                        writers: std::collections::HashMap::new(),
                        frags: vec![slot],
                    });
                }
                Err(e) => {
                    // The creation error is the one to report; a slot whose delete also
                    // fails stays in `stuck` (see `delete_or_keep`), so nothing is lost.
                    for s in chunks.into_iter().flat_map(|c| c.frags) {
                        if let Err(_kept_in_stuck) = self.delete_or_keep(vm, s) {
                            // Reported by the creation error; the slot is kept (see above).
                        }
                    }
                    return Err(e);
                }
            }
            at += len;
        }
        let pos = self.rams.partition_point(|r| r.gpa < gpa);
        self.rams.insert(
            pos,
            Ram {
                gpa,
                size,
                mmap,
                chunks,
                dirty,
            },
        );
        Ok(())
    }

    /// Moves KVM's dirty log of every fragment of the RAM region at `gpa` into the region's
    /// [`DirtyBits`]. Needs no vCPU pause.
    pub(crate) fn harvest(&mut self, vm: &(impl SlotOps + ?Sized), gpa: u64) -> Result<()> {
        let Some(r) = self.rams.iter().position(|r| r.gpa == gpa) else {
            return Ok(());
        };
        if self.rams[r].dirty.is_none() {
            return Ok(());
        }
        if self.rings.is_some() {
            return self.drain_ring(vm);
        }
        for c in 0..self.rams[r].chunks.len() {
            self.harvest_chunk(vm, r, c, false)?;
        }
        Ok(())
    }

    /// Harvests every logging fragment of chunk `c` of RAM `r` (only those holding relaxed
    /// frames if `relaxed_only`) and dispatches the bits.
    fn harvest_chunk(
        &mut self,
        vm: &(impl SlotOps + ?Sized),
        r: usize,
        c: usize,
        relaxed_only: bool,
    ) -> Result<()> {
        if self.rings.is_some() {
            return self.drain_ring(vm);
        }
        for i in 0..self.rams[r].chunks[c].frags.len() {
            let chunk = &self.rams[r].chunks[c];
            let s = &chunk.frags[i];
            if !s.log_dirty() || s.readonly() {
                continue;
            }
            let (first, pages) = ((s.gpa() - chunk.gpa) / PAGE, s.size() / PAGE);
            if relaxed_only && !(first..first + pages).any(|p| chunk.is_relaxed(p)) {
                continue;
            }
            let gpa = s.gpa();
            let keep = if self.manual_protect {
                chunk.hot_mask(first, pages, false)
            } else {
                None
            };
            let bits = vm
                .dirty_log(s, self.manual_protect, keep.as_deref())
                .map_err(Error::kvm(self.harvest_op()))?;
            self.dispatch(r, c, gpa, &bits);
        }
        Ok(())
    }

    /// The first step of a relaxed sync: harvests and re-protects (plain `KVM_GET_DIRTY_LOG`
    /// write-protects exactly the pages it reports before returning; with manual protect
    /// `KVM_CLEAR_DIRTY_LOG` of exactly the harvested bits follows it) every fragment holding
    /// relaxed frames, then returns the guest addresses of the relaxed frames
    /// logged dirty since their last diff, in address order, and clears their pending bits.
    /// Needs no vCPU pause. Costs one ioctl per relaxed fragment and O(dirty) more; with the
    /// dirty ring, one harvest of every vCPU's ring and one `KVM_RESET_DIRTY_RINGS` (all
    /// rings are harvested before the reset, and the reset returns before any frame is
    /// read), and each frame comes with its first writer.
    ///
    /// Also returns the frames whose cooling bit this harvest cleared (their KVM bits now
    /// cleared too): with the hot frames, the ones the dirty logs learn of from the diff.
    pub(crate) fn harvest_relaxed(
        &mut self,
        vm: &(impl SlotOps + ?Sized),
    ) -> Result<(Vec<DirtyFrame>, Vec<u64>)> {
        self.drain_ring(vm)?;
        let ring = self.rings.is_some();
        let mut out = Vec::new();
        let mut cooled = Vec::new();
        for r in 0..self.rams.len() {
            for c in 0..self.rams[r].chunks.len() {
                if self.rams[r].chunks[c].relaxed_count == 0 {
                    continue;
                }
                if !ring {
                    self.harvest_chunk(vm, r, c, true)?;
                }
                let chunk = &mut self.rams[r].chunks[c];
                let writers = std::mem::take(&mut chunk.writers);
                out.extend(
                    crate::dirty::set_bits(&chunk.pending).map(|page| DirtyFrame {
                        gpa: chunk.gpa + page * PAGE,
                        first_writer: writers.get(&page).copied().flatten(),
                    }),
                );
                chunk.pending.fill(0);
                if chunk.cooling_count > 0 {
                    cooled.extend(
                        crate::dirty::set_bits(&chunk.cooling).map(|page| chunk.gpa + page * PAGE),
                    );
                    chunk.cooling.fill(0);
                    chunk.cooling_count = 0;
                }
            }
        }
        Ok((out, cooled))
    }

    /// Reads the 4 KiB frame at `gpa` into `words` (little-endian words, aligned 8-byte
    /// loads); leaves `words` as is if the frame is not RAM.
    pub(crate) fn read_frame(&self, gpa: u64, words: &mut [u64]) {
        use vm_memory::{GuestMemoryRegion, MemoryRegionAddress};
        let Some((r, _)) = self.locate(gpa) else {
            return;
        };
        let ram = &self.rams[r];
        let Ok(slice) = ram
            .mmap
            .get_slice(MemoryRegionAddress(gpa - ram.gpa), words.len() * 8)
        else {
            return;
        };
        if let Some(atomics) = crate::sys::slice_words(&slice) {
            for (w, a) in words.iter_mut().zip(atomics) {
                *w = a.load(std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// True if the frame at `gpa` runs relaxed.
    pub(crate) fn is_relaxed(&self, gpa: u64) -> bool {
        self.locate(gpa).is_some_and(|(r, c)| {
            let chunk = &self.rams[r].chunks[c];
            chunk.relaxed_count > 0 && chunk.is_relaxed((gpa - chunk.gpa) / PAGE)
        })
    }

    /// True if the frame at `gpa` is protected (tracked).
    pub(crate) fn is_protected(&self, gpa: u64) -> bool {
        self.locate(gpa).is_some_and(|(r, c)| {
            let chunk = &self.rams[r].chunks[c];
            chunk.is_protected((gpa - chunk.gpa) / PAGE)
        })
    }

    /// Sets (only on protected frames) or clears the relaxed bit of each frame; returns the
    /// frames whose bit changed and the chunks to re-cut. Clearing also drops pending bits:
    /// the caller diffed them first.
    pub(crate) fn set_relaxed(
        &mut self,
        gpas: impl Iterator<Item = u64>,
        on: bool,
    ) -> (Vec<u64>, Vec<(usize, usize)>) {
        let mut frames = Vec::new();
        let mut chunks: Vec<(usize, usize)> = Vec::new();
        for gpa in gpas {
            let Some((r, c)) = self.locate(gpa) else {
                continue;
            };
            let chunk = &mut self.rams[r].chunks[c];
            let page = (gpa - chunk.gpa) / PAGE;
            if chunk.is_relaxed(page) == on || (on && !chunk.is_protected(page)) {
                continue;
            }
            let (w, b) = word_bit(page);
            if on {
                chunk.relaxed[w] |= 1 << b;
                chunk.relaxed_count += 1;
            } else {
                chunk.relaxed[w] &= !(1 << b);
                chunk.pending[w] &= !(1 << b);
                chunk.writers.remove(&page);
                chunk.relaxed_count -= 1;
                chunk.unheat(page);
            }
            frames.push(gpa & !(PAGE - 1));
            if chunks.last() != Some(&(r, c)) {
                chunks.push((r, c));
            }
        }
        chunks.sort_unstable();
        chunks.dedup();
        (frames, chunks)
    }

    /// True if the frame at `gpa` is untracked and lingers in a logged fragment (see
    /// `Chunk::lingering`).
    pub(crate) fn is_lingering(&self, gpa: u64) -> bool {
        self.locate(gpa).is_some_and(|(r, c)| {
            let chunk = &self.rams[r].chunks[c];
            chunk.is_lingering((gpa - chunk.gpa) / PAGE)
        })
    }

    /// True if the frame at `gpa` is hot (see `Chunk::hot`).
    pub(crate) fn is_hot(&self, gpa: u64) -> bool {
        self.locate(gpa).is_some_and(|(r, c)| {
            let chunk = &self.rams[r].chunks[c];
            chunk.is_hot((gpa - chunk.gpa) / PAGE)
        })
    }

    /// Makes the relaxed frame at `gpa` hot or not (manual protect only: with plain
    /// `KVM_GET_DIRTY_LOG` every harvest re-protects what it reports); true if its bit
    /// changed. A hot frame's KVM dirty bit is left set by harvests; one that stops being
    /// hot is cleared (and re-protected) by the next harvest, which reports it once more.
    pub(crate) fn set_hot(&mut self, gpa: u64, on: bool) -> bool {
        if on && !self.manual_protect {
            return false;
        }
        let Some((r, c)) = self.locate(gpa) else {
            return false;
        };
        let chunk = &mut self.rams[r].chunks[c];
        let page = (gpa - chunk.gpa) / PAGE;
        if chunk.is_hot(page) == on || (on && !chunk.is_relaxed(page)) {
            return false;
        }
        let (w, b) = word_bit(page);
        if on {
            chunk.uncool(page);
            chunk.hot[w] |= 1 << b;
            chunk.hot_count += 1;
        } else {
            chunk.hot[w] &= !(1 << b);
            chunk.hot_count -= 1;
            chunk.cooling[w] |= 1 << b;
            chunk.cooling_count += 1;
        }
        true
    }

    /// Hot frames in all chunks.
    pub(crate) fn hot_count(&self) -> u64 {
        self.rams
            .iter()
            .flat_map(|r| &r.chunks)
            .map(|c| c.hot_count)
            .sum()
    }

    /// Hot and cooling frames in all chunks: while there are any, the dirty logs need a
    /// relaxed sync before they are complete.
    pub(crate) fn quiet_count(&self) -> u64 {
        self.rams
            .iter()
            .flat_map(|r| &r.chunks)
            .map(|c| c.hot_count + c.cooling_count)
            .sum()
    }

    /// Relaxed frames in all, and the guest addresses of all of them.
    pub(crate) fn relaxed_frames(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for chunk in self.rams.iter().flat_map(|r| &r.chunks) {
            if chunk.relaxed_count == 0 {
                continue;
            }
            for page in 0..chunk.pages {
                if chunk.is_relaxed(page) {
                    out.push(chunk.gpa + page * PAGE);
                }
            }
        }
        out
    }

    /// Deletes every fragment of the RAM region starting at `gpa`.
    pub(crate) fn remove_ram(&mut self, vm: &(impl SlotOps + ?Sized), gpa: u64) -> Result<()> {
        let Some(pos) = self.rams.iter().position(|r| r.gpa == gpa) else {
            return Ok(());
        };
        let ram = self.rams.remove(pos);
        let mut first_err = None;
        for c in ram.chunks {
            for s in c.frags {
                if let Err(e) = self.delete_or_keep(vm, s) {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn locate(&self, gpa: u64) -> Option<(usize, usize)> {
        let r = self.rams.partition_point(|r| r.gpa <= gpa).checked_sub(1)?;
        let ram = &self.rams[r];
        if gpa >= ram.gpa + ram.size {
            return None;
        }
        let c = usize::try_from((gpa - ram.gpa) / self.chunk_bytes).ok()?;
        Some((r, c))
    }

    /// Sets or clears the protected bit of each frame; returns the chunks whose bits changed.
    pub(crate) fn mark(
        &mut self,
        gpas: impl Iterator<Item = u64>,
        protect: bool,
    ) -> Vec<(usize, usize)> {
        let mut dirty: Vec<(usize, usize)> = Vec::new();
        for gpa in gpas {
            let Some((r, c)) = self.locate(gpa) else {
                continue;
            };
            let chunk = &mut self.rams[r].chunks[c];
            let page = (gpa - chunk.gpa) / PAGE;
            let (w, b) = word_bit(page);
            if protect {
                chunk.protected[w] |= 1 << b;
                if chunk.lingering[w] & (1 << b) != 0 {
                    chunk.lingering[w] &= !(1 << b);
                    chunk.lingering_count -= 1;
                }
            } else {
                chunk.protected[w] &= !(1 << b);
                // An untracked frame stops being relaxed (its undelivered changes go with its
                // tracking: `Vm::sync` first to have them).
                if chunk.is_relaxed(page) {
                    chunk.relaxed[w] &= !(1 << b);
                    chunk.pending[w] &= !(1 << b);
                    chunk.relaxed_count -= 1;
                    chunk.unheat(page);
                    // Writable either way: keep its logged fragment (no re-cut).
                    if !self.log_dirty && chunk.lingering[w] & (1 << b) == 0 {
                        chunk.lingering[w] |= 1 << b;
                        chunk.lingering_count += 1;
                    }
                }
            }
            // One entry per run of frames in the same chunk, not one per frame.
            if dirty.last() != Some(&(r, c)) {
                dirty.push((r, c));
            }
        }
        dirty.sort_unstable();
        dirty.dedup();
        dirty
    }

    /// Re-cuts the given chunks to match their protected bits. The caller holds every vCPU
    /// outside `KVM_RUN`. On a KVM failure the table keeps exactly the slots KVM still has
    /// (a fragment whose delete failed stays, with its mapping; a range whose create failed
    /// has no slot, so every access to it exits): the caller restores the bits and re-cuts
    /// again (`Backend::change`), and the layout is never weaker than those bits.
    pub(crate) fn relayout(
        &mut self,
        vm: &(impl SlotOps + ?Sized),
        chunks: &[(usize, usize)],
    ) -> Result<()> {
        for &(r, c) in chunks {
            let want = self.rams[r].chunks[c].layout(self.log_dirty);
            let have = self.rams[r].chunks[c].current();
            if want == have {
                continue;
            }
            let room = self.budget - (self.stats.fragments - have.len());
            let want = squeeze(want, room).ok_or(Error::SlotBudget {
                budget: self.budget,
            })?;
            if want == have {
                continue;
            }
            self.stats.relayouts += 1;
            // Keep the fragments that stay as they are; delete the rest, then create the new
            // ones (deletes first: KVM refuses overlapping slots).
            let base = self.rams[r].chunks[c].gpa;
            let harvest = self.rams[r].dirty.is_some() || self.rams[r].chunks[c].relaxed_count > 0;
            let mut old = std::mem::take(&mut self.rams[r].chunks[c].frags).into_iter();
            let mut kept = Vec::with_capacity(want.len());
            let mut failed = None;
            for s in old.by_ref() {
                let piece = Piece {
                    first: (s.gpa() - base) / PAGE,
                    pages: s.size() / PAGE,
                    readonly: s.readonly(),
                    log: !s.readonly() && s.log_dirty(),
                };
                let gpa = s.gpa();
                if want.contains(&piece) {
                    kept.push(s);
                    continue;
                }
                match self.delete(vm, s, harvest) {
                    Ok(Some(bits)) => self.dispatch(r, c, gpa, &bits),
                    Ok(None) => {}
                    Err((s, e)) => {
                        // KVM still has this slot and those not yet visited: keep them all in
                        // the table (the layout is then partly the old one, never weaker: a
                        // deleted range has no slot, and every access to it exits).
                        kept.push(s);
                        failed = Some(e);
                        break;
                    }
                }
            }
            kept.extend(old);
            kept.sort_by_key(KvmSlot::gpa);
            self.rams[r].chunks[c].frags = kept;
            if let Some(e) = failed {
                return Err(e);
            }
            let mmap = Arc::clone(&self.rams[r].mmap);
            for p in &want {
                if have.contains(p) {
                    continue;
                }
                let slot = self.create(
                    vm,
                    &mmap,
                    base + p.first * PAGE,
                    p.pages * PAGE,
                    p.readonly,
                    p.log,
                )?;
                self.rams[r].chunks[c].frags.push(slot);
            }
            self.rams[r].chunks[c].frags.sort_by_key(KvmSlot::gpa);
        }
        Ok(())
    }

    /// Deletes and re-creates the fragment holding each of `gpas`: with the zap-all quirk
    /// disabled, KVM then drops exactly the shadow pages of that fragment, including shadows
    /// of guest page tables that live in it. The caller holds every vCPU outside `KVM_RUN`.
    pub(crate) fn recreate(&mut self, vm: &(impl SlotOps + ?Sized), gpas: &[u64]) -> Result<usize> {
        let mut targets: Vec<(usize, usize, u64)> = Vec::new();
        for &gpa in gpas {
            let Some((r, c)) = self.locate(gpa) else {
                continue;
            };
            let chunk = &self.rams[r].chunks[c];
            if let Some(s) = chunk
                .frags
                .iter()
                .find(|s| gpa >= s.gpa() && gpa < s.gpa() + s.size())
            {
                targets.push((r, c, s.gpa()));
            }
        }
        targets.sort_unstable();
        targets.dedup();
        for &(r, c, at) in &targets {
            let i = self.rams[r].chunks[c]
                .frags
                .iter()
                .position(|s| s.gpa() == at)
                .expect("found above, nothing removed since");
            let old = self.rams[r].chunks[c].frags.remove(i);
            let (size, ro) = (old.size(), old.readonly());
            let log = !ro && old.log_dirty();
            match self.delete(vm, old, true) {
                Ok(Some(bits)) => self.dispatch(r, c, at, &bits),
                Ok(None) => {}
                Err((old, e)) => {
                    self.rams[r].chunks[c].frags.insert(i, old);
                    return Err(e);
                }
            }
            let mmap = Arc::clone(&self.rams[r].mmap);
            let slot = self.create(vm, &mmap, at, size, ro, log)?;
            self.rams[r].chunks[c].frags.insert(i, slot);
        }
        Ok(targets.len())
    }

    /// Forgets every slot without ioctls: the VM fd is closing and takes them with it.
    /// Deletes every fragment from KVM, for a VM fd that outlives pagetrack (the VMM's own,
    /// [`crate::Vm::from_vm_fd`]): the VMM's memslots stay as they are. A fragment whose
    /// delete fails keeps its mapping alive for good (leaked), as KVM may still map it.
    pub(crate) fn delete_all(&mut self, vm: &(impl SlotOps + ?Sized)) {
        let gpas: Vec<u64> = self.rams.iter().map(|r| r.gpa).collect();
        for gpa in gpas {
            if let Err(_kept_in_stuck) = self.remove_ram(vm, gpa) {
                // The slot stays in `stuck`, leaked below.
            }
        }
        for s in self.stuck.drain(..) {
            std::mem::forget(s);
        }
    }

    pub(crate) fn forget_all(&mut self) {
        for s in &mut self.stuck {
            s.forget_region_for_drop();
        }
        for ram in &mut self.rams {
            for c in &mut ram.chunks {
                for s in &mut c.frags {
                    s.forget_region_for_drop();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(first: u64, pages: u64, readonly: bool) -> Piece {
        Piece {
            first,
            pages,
            readonly,
            log: false,
        }
    }

    #[test]
    fn squeeze_under_budget_keeps_layout() {
        let l = vec![p(0, 5, false), p(5, 1, true), p(6, 10, false)];
        assert_eq!(squeeze(l.clone(), 3), Some(l));
    }

    #[test]
    fn squeeze_merges_smallest_gap_first() {
        let l = vec![
            p(0, 5, false),
            p(5, 1, true),
            p(6, 2, false),
            p(8, 1, true),
            p(9, 10, false),
        ];
        let got = squeeze(l, 3).expect("fits");
        assert_eq!(got, vec![p(0, 5, false), p(5, 4, true), p(9, 10, false)]);
    }

    #[test]
    fn squeeze_without_readonly_cannot_shrink() {
        assert_eq!(squeeze(vec![p(0, 5, false)], 0), None);
    }

    use std::collections::BTreeSet;

    use proptest::prelude::*;
    use vm_memory::GuestAddress;

    /// Frames per chunk in the table tests: 4 chunks of 256 frames (1 MiB each).
    const CHUNK_PAGES: u64 = 256;
    const CHUNKS: u64 = 4;
    /// Where the test RAM starts (not 0, so offsets and addresses differ).
    const BASE: u64 = 0x4000_0000;

    /// A fragment table over one RAM region of [`CHUNKS`] chunks, with no KVM slot behind it:
    /// enough for [`Fragments::mark`] and the planning halves of a re-cut, which make no ioctl.
    fn table() -> Fragments {
        table_of(CHUNK_PAGES, CHUNKS)
    }

    /// A fragment table of `chunks` chunks of `chunk_pages` frames (see [`table`]).
    fn table_of(chunk_pages: u64, chunks: u64) -> Fragments {
        let chunk_bytes = chunk_pages * PAGE;
        let size = chunks * chunk_bytes;
        let mmap = GuestRegionMmap::<()>::from_range(
            GuestAddress(BASE),
            usize::try_from(size).expect("small"),
            None,
        )
        .expect("anonymous mapping");
        let chunks = (0..chunks)
            .map(|i| {
                let words = usize::try_from(chunk_pages.div_ceil(64)).expect("small");
                Chunk {
                    gpa: BASE + i * chunk_bytes,
                    pages: chunk_pages,
                    protected: vec![0; words],
                    relaxed: vec![0; words],
                    pending: vec![0; words],
                    hot: vec![0; words],
                    hot_count: 0,
                    cooling: vec![0; words],
                    cooling_count: 0,
                    lingering: vec![0; words],
                    lingering_count: 0,
                    relaxed_count: 0,
                    writers: std::collections::HashMap::new(),
                    frags: Vec::new(),
                }
            })
            .collect();
        let mut f = Fragments::new(0, 64, chunk_bytes, false);
        f.rams.push(Ram {
            gpa: BASE,
            size,
            mmap: Arc::new(mmap),
            chunks,
            dirty: None,
        });
        f
    }

    /// The oracle's layout of one chunk: one piece per maximal run of equal protection,
    /// computed from a set of protected page offsets, not from the bitmap.
    fn oracle_layout(protected: &BTreeSet<u64>, chunk: u64) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut page = 0;
        while page < CHUNK_PAGES {
            let ro = protected.contains(&(chunk * CHUNK_PAGES + page));
            let start = page;
            while page < CHUNK_PAGES && protected.contains(&(chunk * CHUNK_PAGES + page)) == ro {
                page += 1;
            }
            out.push(p(start, page - start, ro));
        }
        out
    }

    /// Checks the planner's invariants for one squeezed layout against the protected set:
    /// the pieces tile the chunk in order, neighbours differ, every protected frame is in a
    /// read-only piece (never weaker than asked), and only whole writable gaps were given up.
    fn check_squeezed(got: &[Piece], natural: &[Piece], max: usize, protected: &[bool]) {
        assert!(
            got.len() <= max,
            "{} pieces over a room of {max}",
            got.len()
        );
        let mut next = 0;
        for (i, piece) in got.iter().enumerate() {
            assert_eq!(piece.first, next, "gap or overlap at piece {i}: {got:?}");
            assert!(piece.pages > 0);
            next += piece.pages;
            if i > 0 {
                assert_ne!(
                    got[i - 1].readonly,
                    piece.readonly,
                    "unmerged neighbours: {got:?}"
                );
            }
            for page in piece.first..piece.first + piece.pages {
                let idx = usize::try_from(page).expect("small");
                if protected[idx] {
                    assert!(
                        piece.readonly,
                        "protected page {page} left writable: {got:?}"
                    );
                }
            }
        }
        assert_eq!(next, CHUNK_PAGES, "pieces do not cover the chunk: {got:?}");
        // Every writable piece of the result is a writable piece of the natural layout.
        for piece in got.iter().filter(|q| !q.readonly) {
            assert!(natural.contains(piece), "{piece:?} is not an original gap");
        }
        // Squeezing stops as soon as the layout fits: one merge more than needed at most
        // (a merge removes one or two pieces).
        if natural.len() > max {
            assert!(
                got.len() + 1 >= max,
                "over-squeezed to {} for {max}",
                got.len()
            );
        } else {
            assert_eq!(got, natural);
        }
    }

    /// One tracking change: protect or unprotect `len` frames from frame `first` (of the
    /// whole RAM region).
    #[derive(Clone, Debug)]
    struct Change {
        protect: bool,
        first: u64,
        len: u64,
    }

    fn change() -> impl Strategy<Value = Change> {
        let edge = prop_oneof![
            // Runs that start or end on a chunk edge, where re-cuts are most error-prone.
            (0..CHUNKS, 0..3u64).prop_map(|(c, d)| (c * CHUNK_PAGES).saturating_sub(d)),
            0..CHUNKS * CHUNK_PAGES,
        ];
        (any::<bool>(), edge, 1..300u64).prop_map(|(protect, first, len)| Change {
            protect,
            first,
            len: len.min(CHUNKS * CHUNK_PAGES - first),
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random sequences of track and untrack runs (middles, chunk edges, adjacent runs,
        /// runs crossing chunks): after each one the table's bits, the chunks it reports as
        /// changed and each chunk's layout equal the oracle's, and the squeezed plan for
        /// every room keeps each protected frame read-only.
        #[test]
        fn recut_plan_matches_an_oracle(changes in proptest::collection::vec(change(), 1..12)) {
            let mut table = table();
            let mut protected: BTreeSet<u64> = BTreeSet::new();
            for ch in &changes {
                let frames: Vec<u64> = (ch.first..ch.first + ch.len).collect();
                let changed = table.mark(frames.iter().map(|f| BASE + f * PAGE), ch.protect);
                let want_changed: Vec<(usize, usize)> = frames
                    .iter()
                    .map(|f| (0, usize::try_from(f / CHUNK_PAGES).expect("small")))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                prop_assert_eq!(changed, want_changed);
                for f in frames {
                    if ch.protect {
                        protected.insert(f);
                    } else {
                        protected.remove(&f);
                    }
                }
                for c in 0..CHUNKS {
                    let chunk = &table.rams[0].chunks[usize::try_from(c).expect("small")];
                    let natural = chunk.layout(false);
                    prop_assert_eq!(&natural, &oracle_layout(&protected, c));
                    let bits: Vec<bool> = (0..CHUNK_PAGES)
                        .map(|pg| protected.contains(&(c * CHUNK_PAGES + pg)))
                        .collect();
                    for max in [1, 2, 3, 5, natural.len().saturating_sub(1), natural.len()] {
                        if max == 0 {
                            continue;
                        }
                        let got = squeeze(natural.clone(), max).expect("a room of 1 always fits");
                        check_squeezed(&got, &natural, max, &bits);
                    }
                }
            }
        }

        /// Squeezing alone, over arbitrary alternating layouts: never weaker, and `None` only
        /// for a room of zero (the slot-budget error of a re-cut).
        #[test]
        fn squeeze_is_never_weaker(
            sizes in proptest::collection::vec(1..40u64, 1..40),
            first_ro in any::<bool>(),
            max in 0..45usize,
        ) {
            let mut pieces = Vec::new();
            let mut at = 0;
            for (i, &n) in sizes.iter().enumerate() {
                pieces.push(p(at, n, (i % 2 == 0) == first_ro));
                at += n;
            }
            let got = squeeze(pieces.clone(), max);
            if max == 0 {
                prop_assert_eq!(got, None);
            } else {
                let got = got.expect("fits");
                prop_assert!(got.len() <= max);
                prop_assert_eq!(got.iter().map(|q| q.pages).sum::<u64>(), at);
                for q in pieces.iter().filter(|q| q.readonly) {
                    prop_assert!(
                        got.iter().any(|g| g.readonly
                            && g.first <= q.first
                            && q.first + q.pages <= g.first + g.pages),
                        "{:?} lost its protection in {:?}", q, got
                    );
                }
                if pieces.len() <= max {
                    prop_assert_eq!(got, pieces);
                }
            }
        }
    }

    #[test]
    fn mark_ignores_frames_outside_ram_and_reports_each_chunk_once() {
        let mut table = table();
        let end = BASE + CHUNKS * CHUNK_PAGES * PAGE;
        // Below, above, then the last frame of chunk 0 and the first of chunk 1, twice.
        let gpas = [
            BASE - PAGE,
            end,
            BASE + 255 * PAGE,
            BASE + 256 * PAGE,
            BASE + 255 * PAGE,
        ];
        assert_eq!(table.mark(gpas.into_iter(), true), vec![(0, 0), (0, 1)]);
        assert_eq!(
            table.rams[0].chunks[0].layout(false),
            vec![p(0, 255, false), p(255, 1, true)]
        );
        assert_eq!(
            table.rams[0].chunks[1].layout(false),
            vec![p(0, 1, true), p(1, 255, false)]
        );
        assert_eq!(table.mark([end + PAGE].into_iter(), true), vec![]);
    }

    #[test]
    fn every_other_frame_tracked_fits_any_budget_or_fails_typed() {
        // The worst case: 256 alternating pieces in one chunk.
        let mut table = table();
        let changed = table.mark((0..CHUNK_PAGES).step_by(2).map(|f| BASE + f * PAGE), true);
        assert_eq!(changed, vec![(0, 0)]);
        let natural = table.rams[0].chunks[0].layout(false);
        assert_eq!(natural.len(), 256);
        let bits: Vec<bool> = (0..CHUNK_PAGES).map(|pg| pg % 2 == 0).collect();
        for max in [1, 2, 7, 64, 255, 256] {
            let got = squeeze(natural.clone(), max).expect("fits");
            check_squeezed(&got, &natural, max, &bits);
        }
        // A full budget leaves no room: the re-cut's `Error::SlotBudget`.
        assert_eq!(squeeze(natural, 0), None);
    }

    #[test]
    fn a_million_frames_in_two_chunks_cut_where_the_oracle_says() {
        // Two 2 GiB chunks (524,288 frames each; the mapping is reserved, never touched).
        const PAGES: u64 = 1 << 19;
        let mut table = table_of(PAGES, 2);
        // Every frame of 1,000 runs of 700 frames spaced 1,048 apart, crossing the chunk edge,
        // then every third frame of the first run untracked again.
        let tracked: Vec<u64> = (0..1000u64)
            .flat_map(|i| (i * 1048..i * 1048 + 700).filter(move |f| i != 0 || f % 3 != 0))
            .collect();
        let all: Vec<u64> = (0..1000u64)
            .flat_map(|i| i * 1048..i * 1048 + 700)
            .collect();
        assert_eq!(
            table.mark(all.iter().map(|f| BASE + f * PAGE), true),
            vec![(0, 0), (0, 1)]
        );
        table.mark((0..700).step_by(3).map(|f| BASE + f * PAGE), false);
        let set: BTreeSet<u64> = tracked.into_iter().collect();
        for c in 0..2u64 {
            let got = table.rams[0].chunks[usize::try_from(c).expect("small")].layout(false);
            // The oracle: runs of equal protection over the chunk, from the set.
            let mut want: Vec<Piece> = Vec::new();
            for pg in 0..PAGES {
                let ro = set.contains(&(c * PAGES + pg));
                match want.last_mut() {
                    Some(q) if q.readonly == ro => q.pages += 1,
                    _ => want.push(p(pg, 1, ro)),
                }
            }
            assert_eq!(got, want, "chunk {c}");
        }
    }

    #[test]
    fn slot_ids_stop_at_the_budget_with_a_typed_error() {
        let mut f = Fragments::new(0, 2, CHUNK_PAGES * PAGE, false);
        f.stats.fragments = 2;
        assert!(matches!(f.alloc_id(), Err(Error::SlotBudget { budget: 2 })));
        f.stats.fragments = 1;
        assert_eq!(f.alloc_id().expect("room for one"), 0);
    }

    /// Fragments take their KVM slot ids from the range the VMM gave, never beyond it, and
    /// reuse freed ones.
    #[test]
    fn slot_ids_stay_in_the_vmms_range() {
        let mut f = Fragments::new(100, 3, CHUNK_PAGES * PAGE, false);
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(f.alloc_id().expect("within the budget"));
            f.stats.fragments += 1;
        }
        assert_eq!(ids, [100, 101, 102]);
        assert!(f.alloc_id().is_err(), "a fourth id");
        f.free_ids.push(101);
        f.stats.fragments -= 1;
        assert_eq!(f.alloc_id().expect("a freed id"), 101);
    }
}

/// The mode state machine's bookkeeping (strict/relaxed bits, pending dirty bits, the layout
/// they ask for) against an oracle of sets, over random sequences of tracking changes,
/// promotions, demotions, dirty harvests and takes. No KVM: the planning halves only.
#[cfg(test)]
mod mode_model {
    use std::collections::BTreeSet;

    use proptest::prelude::*;
    use vm_memory::GuestAddress;

    use super::*;

    const CHUNK_PAGES: u64 = 128;
    const CHUNKS: u64 = 3;
    const BASE: u64 = 0x1000_0000;

    fn table() -> Fragments {
        let size = CHUNKS * CHUNK_PAGES * PAGE;
        let mmap = GuestRegionMmap::<()>::from_range(
            GuestAddress(BASE),
            usize::try_from(size).expect("small"),
            None,
        )
        .expect("anonymous mapping");
        let words = usize::try_from(CHUNK_PAGES.div_ceil(64)).expect("small");
        let chunks = (0..CHUNKS)
            .map(|i| Chunk {
                gpa: BASE + i * CHUNK_PAGES * PAGE,
                pages: CHUNK_PAGES,
                protected: vec![0; words],
                relaxed: vec![0; words],
                pending: vec![0; words],
                hot: vec![0; words],
                hot_count: 0,
                cooling: vec![0; words],
                cooling_count: 0,
                lingering: vec![0; words],
                lingering_count: 0,
                relaxed_count: 0,
                writers: std::collections::HashMap::new(),
                frags: Vec::new(),
            })
            .collect();
        let mut f = Fragments::new(0, 64, CHUNK_PAGES * PAGE, false);
        f.rams.push(Ram {
            gpa: BASE,
            size,
            mmap: Arc::new(mmap),
            chunks,
            dirty: None,
        });
        f
    }

    #[derive(Clone, Debug)]
    enum Op {
        Track(u64, u64),
        Untrack(u64, u64),
        Relax(u64, u64),
        Strict(u64, u64),
        /// KVM logged these frames dirty (a harvested bitmap, dispatched).
        Dirty(Vec<u64>),
        /// A sync takes the pending frames.
        Take,
    }

    fn op() -> impl Strategy<Value = Op> {
        let n = CHUNKS * CHUNK_PAGES;
        let run = (0..n, 1..40u64).prop_map(move |(f, l)| (f, l.min(n - f)));
        prop_oneof![
            run.clone().prop_map(|(f, l)| Op::Track(f, l)),
            run.clone().prop_map(|(f, l)| Op::Untrack(f, l)),
            run.clone().prop_map(|(f, l)| Op::Relax(f, l)),
            run.prop_map(|(f, l)| Op::Strict(f, l)),
            (0..n, 1..80u64).prop_map(move |(f, l)| Op::Dirty((f..(f + l).min(n)).collect())),
            Just(Op::Take),
        ]
    }

    fn take_pending(t: &mut Fragments) -> BTreeSet<u64> {
        let mut out = BTreeSet::new();
        for (c, chunk) in t.rams[0].chunks.iter_mut().enumerate() {
            for (w, word) in chunk.pending.iter_mut().enumerate() {
                let mut bits = std::mem::take(word);
                while bits != 0 {
                    let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    out.insert(c as u64 * CHUNK_PAGES + page);
                }
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn mode_bits_pending_and_layout_match_the_oracle(ops in proptest::collection::vec(op(), 1..40)) {
            let mut t = table();
            let gpa = |f: u64| BASE + f * PAGE;
            let (mut tracked, mut relaxed, mut pending) =
                (BTreeSet::new(), BTreeSet::<u64>::new(), BTreeSet::new());
            // Untracked while relaxed: they keep their logged writable fragment.
            let mut lingering = BTreeSet::new();
            for op in &ops {
                match op {
                    Op::Track(f, l) => {
                        t.mark((*f..f + l).map(gpa), true);
                        tracked.extend(*f..f + l);
                        for x in *f..f + l {
                            lingering.remove(&x);
                        }
                    }
                    Op::Untrack(f, l) => {
                        t.mark((*f..f + l).map(gpa), false);
                        for x in *f..f + l {
                            tracked.remove(&x);
                            if relaxed.remove(&x) {
                                lingering.insert(x);
                            }
                            pending.remove(&x);
                        }
                    }
                    Op::Relax(f, l) => {
                        let (frames, _) = t.set_relaxed((*f..f + l).map(gpa), true);
                        let want: Vec<u64> = (*f..f + l)
                            .filter(|x| tracked.contains(x) && !relaxed.contains(x))
                            .collect();
                        prop_assert_eq!(frames, want.iter().map(|&x| gpa(x)).collect::<Vec<_>>());
                        relaxed.extend(want);
                    }
                    Op::Strict(f, l) => {
                        let (frames, _) = t.set_relaxed((*f..f + l).map(gpa), false);
                        let want: Vec<u64> =
                            (*f..f + l).filter(|x| relaxed.contains(x)).collect();
                        prop_assert_eq!(frames, want.iter().map(|&x| gpa(x)).collect::<Vec<_>>());
                        for x in want {
                            relaxed.remove(&x);
                            pending.remove(&x);
                        }
                    }
                    Op::Dirty(frames) => {
                        for &x in frames {
                            let c = usize::try_from(x / CHUNK_PAGES).expect("small");
                            let chunk = &mut t.rams[0].chunks[c];
                            let slot_gpa = chunk.gpa;
                            let page = x % CHUNK_PAGES;
                            let mut bitmap = vec![0u64; usize::try_from(CHUNK_PAGES / 64).expect("small")];
                            bitmap[usize::try_from(page / 64).expect("small")] |= 1 << (page % 64);
                            chunk.absorb(slot_gpa, &bitmap);
                            if relaxed.contains(&x) {
                                pending.insert(x);
                            }
                        }
                    }
                    Op::Take => {
                        prop_assert_eq!(take_pending(&mut t), std::mem::take(&mut pending));
                    }
                }
                // Invariants: relaxed ⊆ tracked; the bits and the layout say what the sets do.
                prop_assert!(relaxed.is_subset(&tracked));
                for x in 0..CHUNKS * CHUNK_PAGES {
                    prop_assert_eq!(t.is_relaxed(gpa(x)), relaxed.contains(&x), "frame {}", x);
                    prop_assert_eq!(t.is_protected(gpa(x)), tracked.contains(&x), "frame {}", x);
                }
                let mut listed = t.relaxed_frames();
                listed.sort_unstable();
                prop_assert_eq!(listed, relaxed.iter().map(|&x| gpa(x)).collect::<Vec<_>>());
                for (c, chunk) in t.rams[0].chunks.iter().enumerate() {
                    for p in chunk.layout(false) {
                        for page in p.first..p.first + p.pages {
                            let x = c as u64 * CHUNK_PAGES + page;
                            let strict = tracked.contains(&x) && !relaxed.contains(&x);
                            prop_assert_eq!(p.readonly, strict, "frame {} in {:?}", x, p);
                            prop_assert_eq!(
                                p.log,
                                relaxed.contains(&x) || lingering.contains(&x),
                                "frame {} in {:?}",
                                x,
                                p
                            );
                        }
                    }
                    // With every fragment logging, relaxed frames join the writable gaps.
                    for p in chunk.layout(true) {
                        prop_assert_eq!(p.log, !p.readonly);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod seam {
    //! The fragment table against a fake KVM ([`SlotOps`]) that records every memslot ioctl and
    //! fails the one asked for: whatever fails, KVM's slots and the table's are the same set
    //! (no slot registered in KVM that pagetrack forgot, none it thinks it has that KVM
    //! dropped), a slot whose delete failed keeps its mapping, and the layout is never weaker
    //! than the protected bits.

    use std::cell::{Cell, RefCell};
    use std::collections::{BTreeMap, BTreeSet};

    use vm_memory::{GuestAddress, GuestMemoryRegion};

    use super::*;

    pub(crate) const BASE: u64 = 0x10_0000;
    pub(crate) const CHUNK_PAGES: u64 = 64;

    /// What KVM holds for a slot id: gpa, size, read-only, dirty logging.
    type Registered = BTreeMap<u32, (u64, u64, bool, bool)>;

    #[derive(Debug, Default)]
    pub(crate) struct FakeKvm {
        /// When set, every call must come while this is true (the vCPUs are paused).
        paused: Option<std::rc::Rc<Cell<bool>>>,
        slots: RefCell<Registered>,
        calls: Cell<usize>,
        /// The calls (counted from 0) that fail.
        fail: RefCell<BTreeSet<usize>>,
        /// Every call, in order: "create <id>", "delete <id>", "log <id>".
        log: RefCell<Vec<String>>,
    }

    impl FakeKvm {
        /// Counts a call; true if it is the one to fail.
        fn call(&self, what: String) -> bool {
            if let Some(p) = &self.paused {
                assert!(p.get(), "{what} while the vCPUs run");
            }
            let n = self.calls.get();
            self.calls.set(n + 1);
            self.log.borrow_mut().push(what);
            self.fail.borrow().contains(&n)
        }

        /// A fake whose every call must come while `paused` is true.
        pub(crate) fn checking(paused: std::rc::Rc<Cell<bool>>) -> FakeKvm {
            FakeKvm {
                paused: Some(paused),
                ..FakeKvm::default()
            }
        }

        /// The call `calls` calls from now fails.
        pub(crate) fn fail_in(&self, calls: usize) {
            self.fail.borrow_mut().insert(self.calls.get() + calls);
        }

        pub(crate) fn heal(&self) {
            self.fail.borrow_mut().clear();
        }
    }

    impl SlotOps for FakeKvm {
        fn create_slot(
            &self,
            id: u32,
            region: &Arc<GuestRegionMmap>,
            gpa: u64,
            size: u64,
            readonly: bool,
            log_dirty: bool,
        ) -> std::result::Result<KvmSlot, kvm_ioctls::Error> {
            if self.call(format!("create {id}")) {
                return Err(kvm_ioctls::Error::new(libc::ENOMEM));
            }
            let mut slots = self.slots.borrow_mut();
            // KVM refuses a taken id and overlapping slots.
            if slots.contains_key(&id)
                || slots
                    .values()
                    .any(|&(g, s, _, _)| gpa < g + s && g < gpa + size)
            {
                return Err(kvm_ioctls::Error::new(libc::EEXIST));
            }
            slots.insert(id, (gpa, size, readonly, log_dirty));
            Ok(KvmSlot::unregistered(
                id, region, gpa, size, readonly, log_dirty,
            ))
        }

        fn delete_slot(
            &self,
            mut slot: KvmSlot,
        ) -> std::result::Result<(), (KvmSlot, kvm_ioctls::Error)> {
            if self.call(format!("delete {}", slot.id())) {
                return Err((slot, kvm_ioctls::Error::new(libc::EIO)));
            }
            let gone = self.slots.borrow_mut().remove(&slot.id());
            assert!(
                gone.is_some(),
                "deleted slot {} KVM does not have",
                slot.id()
            );
            slot.forget_region_for_drop();
            Ok(())
        }

        fn dirty_log(
            &self,
            slot: &KvmSlot,
            _manual: bool,
            _keep: Option<&[u64]>,
        ) -> std::result::Result<Vec<u64>, kvm_ioctls::Error> {
            if self.call(format!("log {}", slot.id())) {
                return Err(kvm_ioctls::Error::new(libc::EIO));
            }
            let words = usize::try_from((slot.size() / PAGE).div_ceil(64)).expect("small");
            Ok(vec![0; words])
        }
    }

    fn region(chunks: u64) -> Arc<GuestRegionMmap> {
        let size = usize::try_from(chunks * CHUNK_PAGES * PAGE).expect("small");
        Arc::new(
            GuestRegionMmap::<()>::from_range(GuestAddress(BASE), size, None)
                .expect("anonymous mapping"),
        )
    }

    /// A table with one RAM region of `chunks` chunks registered through `kvm`.
    pub(crate) fn table(
        kvm: &FakeKvm,
        chunks: u64,
        log_dirty: bool,
    ) -> (Fragments, Arc<GuestRegionMmap>) {
        let mut f = Fragments::new(10, 32, CHUNK_PAGES * PAGE, log_dirty);
        let mmap = region(chunks);
        let dirty = log_dirty.then(|| Arc::new(DirtyBits::new(BASE, mmap.len())));
        f.add_ram(kvm, Arc::clone(&mmap), BASE, mmap.len(), dirty)
            .expect("no failure injected");
        (f, mmap)
    }

    /// Every slot the table holds (its fragments and the stuck ones), as KVM would list them.
    fn held(f: &Fragments) -> Registered {
        f.rams
            .iter()
            .flat_map(|r| r.chunks.iter().flat_map(|c| c.frags.iter()))
            .chain(f.stuck.iter())
            .map(|s| (s.id(), (s.gpa(), s.size(), s.readonly(), s.log_dirty())))
            .collect()
    }

    /// KVM and the table agree and the counters match.
    pub(crate) fn agree(kvm: &FakeKvm, f: &Fragments) {
        assert_eq!(
            *kvm.slots.borrow(),
            held(f),
            "calls: {:?}",
            kvm.log.borrow()
        );
        let live = f
            .rams
            .iter()
            .flat_map(|r| r.chunks.iter())
            .map(|c| c.frags.len());
        assert_eq!(f.stats.fragments, live.sum::<usize>() + f.stuck.len());
    }

    /// [`agree`], and no protected page is writable (a page without a slot exits on every
    /// access: stricter, never weaker).
    pub(crate) fn check(kvm: &FakeKvm, f: &Fragments) {
        agree(kvm, f);
        for c in f.rams.iter().flat_map(|r| r.chunks.iter()) {
            for page in (0..c.pages).filter(|&p| c.is_protected(p)) {
                let gpa = c.gpa + page * PAGE;
                let writable = c
                    .frags
                    .iter()
                    .any(|s| !s.readonly() && gpa >= s.gpa() && gpa < s.gpa() + s.size());
                assert!(!writable, "protected page {gpa:#x} is writable");
            }
        }
    }

    /// Frames tracked first (cutting chunk 0), then frames whose tracking fails and is undone
    /// (cutting chunks 0 and 1 further).
    pub(crate) fn first() -> Vec<u64> {
        [3u64, 4, 5, 40].iter().map(|p| BASE + p * PAGE).collect()
    }

    pub(crate) fn then() -> Vec<u64> {
        [20u64, 41, CHUNK_PAGES + 1, CHUNK_PAGES + 30]
            .iter()
            .map(|p| BASE + p * PAGE)
            .collect()
    }

    /// Every live fragment (gpa, size, read-only, logging) in address order, ids aside.
    pub(crate) fn layout(f: &Fragments) -> Vec<(u64, u64, bool, bool)> {
        let mut v: Vec<_> = f
            .rams
            .iter()
            .flat_map(|r| r.chunks.iter().flat_map(|c| c.frags.iter()))
            .map(|s| (s.gpa(), s.size(), s.readonly(), s.log_dirty()))
            .collect();
        v.sort_unstable();
        v
    }

    /// Which of `gpas` are protected.
    pub(crate) fn bits(f: &Fragments, gpas: &[u64]) -> Vec<bool> {
        gpas.iter().map(|&g| f.is_protected(g)).collect()
    }

    /// The calls made so far.
    pub(crate) fn calls(kvm: &FakeKvm) -> usize {
        kvm.calls.get()
    }

    /// A table with [`first`] tracked and laid out.
    pub(crate) fn tracked_table(
        kvm: &FakeKvm,
        log_dirty: bool,
    ) -> (Fragments, Arc<GuestRegionMmap>) {
        let (mut f, mmap) = table(kvm, 2, log_dirty);
        let chunks = f.mark(first().into_iter(), true);
        f.relayout(kvm, &chunks).expect("no failure injected");
        check(kvm, &f);
        (f, mmap)
    }

    /// The number of ioctls tracking [`then`] makes without failures.
    fn recut_calls(log_dirty: bool) -> usize {
        let kvm = FakeKvm::default();
        let (mut f, _mmap) = tracked_table(&kvm, log_dirty);
        let before = kvm.calls.get();
        let chunks = f.mark(then().into_iter(), true);
        f.relayout(&kvm, &chunks).expect("no failure injected");
        check(&kvm, &f);
        kvm.calls.get() - before
    }

    /// What the backend does when a re-cut for `then` fails (`Backend::change`): the bits go
    /// back and the chunks are re-cut again, which may fail too (`undo_fails`).
    fn undo(kvm: &FakeKvm, f: &mut Fragments, undo_fails: bool) {
        let back = f.mark(then().into_iter(), false);
        if undo_fails {
            kvm.fail_in(0);
        }
        let res = f.relayout(kvm, &back);
        kvm.heal();
        // An undo that needs no ioctl cannot fail.
        assert!(undo_fails || res.is_ok());
        check(kvm, f);
    }

    #[test]
    fn a_recut_failing_at_any_ioctl_leaves_kvm_and_the_table_agreeing_and_never_weaker() {
        for log_dirty in [false, true] {
            let calls = recut_calls(log_dirty);
            assert!(calls >= 6, "the re-cut deletes and creates: {calls} calls");
            for n in 0..calls {
                for undo_fails in [false, true] {
                    let kvm = FakeKvm::default();
                    let (mut f, _mmap) = tracked_table(&kvm, log_dirty);
                    let chunks = f.mark(then().into_iter(), true);
                    kvm.fail_in(n);
                    let res = f.relayout(&kvm, &chunks);
                    kvm.heal();
                    assert!(res.is_err(), "call {n} of {calls} failed silently");
                    agree(&kvm, &f);
                    undo(&kvm, &mut f, undo_fails);
                    // With KVM working, the next re-cut reaches the wanted layout.
                    let all = [(0, 0), (0, 1)];
                    f.relayout(&kvm, &all).expect("no failure injected");
                    check(&kvm, &f);
                    for (r, c) in all {
                        let chunk = &f.rams[r].chunks[c];
                        assert_eq!(chunk.current(), chunk.layout(log_dirty));
                    }
                }
            }
        }
    }

    #[test]
    fn a_recreate_failing_at_any_ioctl_leaves_kvm_and_the_table_agreeing() {
        let kvm = FakeKvm::default();
        let (mut f, _mmap) = table(&kvm, 2, true);
        let chunks = f.mark(then().into_iter(), true);
        f.relayout(&kvm, &chunks).expect("no failure injected");
        let gpas = [BASE + 4 * PAGE, BASE + (CHUNK_PAGES + 2) * PAGE];
        for n in 0..6 {
            kvm.fail_in(n);
            // Every outcome is consistent, including the ones where the failure comes later.
            let res = f.recreate(&kvm, &gpas);
            kvm.heal();
            check(&kvm, &f);
            if res.is_err() {
                // The fragment whose re-creation failed is simply missing (every access to it
                // exits): the next re-cut of its chunk brings it back.
                let all: Vec<(usize, usize)> = vec![(0, 0), (0, 1)];
                f.relayout(&kvm, &all).expect("no failure injected");
                check(&kvm, &f);
            }
        }
    }

    #[test]
    fn a_failed_delete_keeps_the_slot_registered_and_its_mapping_alive() {
        let kvm = FakeKvm::default();
        let (mut f, mmap) = table(&kvm, 2, false);
        // The table's region and each chunk's slot hold the mapping.
        assert_eq!(Arc::strong_count(&mmap), 1 + 1 + 2);
        kvm.fail_in(0);
        let err = f
            .remove_ram(&kvm, BASE)
            .expect_err("the first delete fails");
        assert!(matches!(
            err,
            Error::Kvm {
                op: "KVM_SET_USER_MEMORY_REGION",
                ..
            }
        ));
        check(&kvm, &f);
        assert_eq!(f.stuck.len(), 1, "the slot KVM still has is kept");
        assert_eq!(kvm.slots.borrow().len(), 1);
        assert_eq!(
            Arc::strong_count(&mmap),
            1 + 1,
            "the mapping was released while KVM may still map it"
        );
    }

    #[test]
    fn a_recut_whose_harvest_fails_deletes_nothing() {
        let kvm = FakeKvm::default();
        let (mut f, _mmap) = table(&kvm, 1, true);
        let chunks = f.mark([BASE + 7 * PAGE].into_iter(), true);
        kvm.fail_in(0);
        let err = f.relayout(&kvm, &chunks).expect_err("the harvest fails");
        assert!(matches!(
            err,
            Error::Kvm {
                op: "KVM_GET_DIRTY_LOG",
                ..
            }
        ));
        assert_eq!(kvm.log.borrow().last().map(String::as_str), Some("log 10"));
        agree(&kvm, &f);
        assert_eq!(
            kvm.slots.borrow().len(),
            1,
            "the logging fragment was deleted unharvested"
        );
        // The backend's undo: nothing was cut, so nothing is left to do.
        let back = f.mark([BASE + 7 * PAGE].into_iter(), false);
        f.relayout(&kvm, &back).expect("no failure injected");
        check(&kvm, &f);
        assert_eq!(kvm.slots.borrow().len(), 1);
    }

    #[test]
    fn add_ram_failing_half_way_deletes_what_it_created_or_keeps_it_stuck() {
        for delete_fails_too in [false, true] {
            let kvm = FakeKvm::default();
            let mut f = Fragments::new(10, 32, CHUNK_PAGES * PAGE, false);
            let mmap = region(3);
            // Chunks 0 and 1 are created, chunk 2's create (call 2) fails; then the delete of
            // chunk 0 (call 3) may fail too.
            kvm.fail_in(2);
            if delete_fails_too {
                kvm.fail_in(3);
            }
            let res = f.add_ram(&kvm, Arc::clone(&mmap), BASE, mmap.len(), None);
            assert!(matches!(
                res,
                Err(Error::Kvm {
                    op: "KVM_SET_USER_MEMORY_REGION",
                    ..
                })
            ));
            check(&kvm, &f);
            assert!(f.rams.is_empty());
            let stuck = usize::from(delete_fails_too);
            assert_eq!(kvm.slots.borrow().len(), stuck);
            assert_eq!(f.stuck.len(), stuck);
            assert_eq!(Arc::strong_count(&mmap), 1 + stuck);
        }
    }
}
