//! Guest RAM as pagetrack writes it: [`TrackedRam`], the only code that writes guest memory.
//!
//! Every store pagetrack applies in userspace (a trapped guest store, a `rep` element, a
//! locked read-modify-write it re-executes, an instruction it emulates, a device write through
//! [`crate::TrackedMemory`]) ends in [`TrackedRam::commit`]: under the frame locks, the planned
//! writes `(gpa, old, new)` are checked to be RAM, stored, marked dirty, checked against the
//! frames marked as guest page tables, and reported to the core tracker with their old bytes.
//! The commit returns the frames whose translations went stale ([`Stale`]); making KVM drop
//! its shadows of them is the caller's (the enforcer's fragments, `vm.rs`), so this module
//! touches neither KVM nor the fragment table.
//!
//! Relaxed frames (`relaxed.rs`) keep a shadow of their bytes: the commit calls the VM's
//! [`Shadows`] around its writes so that a frame's undelivered guest changes are delivered
//! before the exact event and the shadow takes the new bytes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use pagetrack::{AsId, Gfn, Gpa, PAGE_SIZE, PageTracker, Source, WriteEvent};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap,
    Permissions,
};

use crate::dirty::DirtyBits;
use crate::store::{FrameLocks, Held};
use crate::walk::pte;

/// The relaxed-mode sync lock, when a commit holds it (`relaxed.rs`).
pub(crate) type ShadowLock<'a> = Option<crate::relaxed::SyncHeld<'a>>;

/// The relaxed-mode bookkeeping a commit calls around its writes (`relaxed.rs` implements it
/// for the VM; see `relaxed::before_apply`, `after_apply` and `applied`).
pub(crate) trait Shadows {
    /// Takes the frame locks of a copy into `[gpa, gpa + len)` (with [`TrackedRam::lock`]),
    /// and first the sync lock where the range touches a relaxed frame (lock order,
    /// `relaxed::lock_for_write`).
    fn lock_for_copy<'a>(
        &'a self,
        ram: &'a TrackedRam,
        gpa: u64,
        len: u64,
    ) -> (ShadowLock<'a>, Held<'a>);
    /// Before a copy into `[gpa, gpa + len)` whose old bytes are still to be read: a relaxed
    /// frame's guest changes so far are delivered first; the lock is held until the write's
    /// event is delivered.
    fn before_copy(&self, gpa: u64, len: u64) -> ShadowLock<'_>;
    /// After that copy changed `old` into `new` at `gpa`, under `lock`.
    fn after_copy(&self, lock: &mut ShadowLock<'_>, gpa: u64, old: &[u8], new: &[u8]);
    /// After a planned write (old bytes read under the frame locks by its planner) changed
    /// `old` into `new` at `gpa`: the lock is returned held until its event is delivered.
    fn applied(&self, gpa: u64, old: &[u8], new: &[u8]) -> ShadowLock<'_>;
}

/// No relaxed frames (unit tests).
#[cfg(test)]
impl Shadows for () {
    fn lock_for_copy<'a>(
        &'a self,
        ram: &'a TrackedRam,
        gpa: u64,
        len: u64,
    ) -> (ShadowLock<'a>, Held<'a>) {
        (None, ram.lock(&|| {}, pages(gpa, len)))
    }
    fn before_copy(&self, _: u64, _: u64) -> ShadowLock<'_> {
        None
    }
    fn after_copy(&self, _: &mut ShadowLock<'_>, _: u64, _: &[u8], _: &[u8]) {}
    fn applied(&self, _: u64, _: &[u8], _: &[u8]) -> ShadowLock<'_> {
        None
    }
}

/// One planned write: `new` at `gpa`, with the bytes it replaces when they were read (tracked
/// frames; an event without old bytes otherwise).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Write<'a> {
    pub(crate) gpa: u64,
    pub(crate) old: Option<&'a [u8]>,
    pub(crate) new: &'a [u8],
}

impl<'a> Write<'a> {
    /// An emulator's write (old bytes always read).
    pub(crate) fn of(w: &'a crate::emulate::MemWrite) -> Write<'a> {
        Write {
            gpa: w.gpa,
            old: Some(&w.old),
            new: &w.new,
        }
    }
}

/// Frames marked as guest page tables whose present translations a commit changed: KVM's
/// shadows of them must be dropped before any vCPU runs on ([`crate::Vm::mark_page_tables`]).
#[derive(Debug, Default, PartialEq, Eq)]
#[must_use = "stale translations must be invalidated"]
pub(crate) struct Stale(pub(crate) Vec<Gfn>);

/// Why a commit wrote nothing.
#[derive(Debug)]
pub(crate) enum CommitError<E> {
    /// A write's range is not all guest RAM (nothing was written).
    NotRam { gpa: u64 },
    /// The store itself failed (only a caller-supplied store can; nothing was written).
    Store(E),
}

/// The aligned 8-byte entries a store covers in page-table frames, read before the store.
#[derive(Debug, Default)]
struct PtEntries(Vec<(u64, u64)>);

/// How a commit keeps relaxed shadows in step.
enum Shadowing<'a> {
    /// Frames not tracked: nothing to do.
    Untracked,
    /// A copy whose lock [`Shadows::before_copy`] took.
    Copy(ShadowLock<'a>),
    /// Planned writes: [`Shadows::applied`] per write.
    Planned,
}

/// Guest memory, the frame locks, page-table coherence and the dirty bookkeeping of the
/// stores pagetrack applies itself (module docs).
#[derive(Debug)]
pub(crate) struct TrackedRam {
    /// Shared with the VM, whose regions it publishes (`GuestMemoryAtomic` is a handle).
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    tracker: Arc<PageTracker>,
    locks: FrameLocks,
    /// Frames marked as guest page tables, with their paging level where known (4 = PML4,
    /// ..., 1 = page table; 0 = unknown, as marked by [`crate::Vm::mark_page_tables`]).
    pt_frames: RwLock<HashMap<u64, u8>>,
    pt_marked: AtomicBool,
    dirty_log: bool,
    /// Dirty logs of the RAM regions, when dirty logging is on.
    dirty: RwLock<Vec<Arc<DirtyBits>>>,
}

impl TrackedRam {
    pub(crate) fn new(
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        tracker: Arc<PageTracker>,
        dirty_log: bool,
    ) -> TrackedRam {
        TrackedRam {
            mem,
            tracker,
            locks: FrameLocks::default(),
            pt_frames: RwLock::default(),
            pt_marked: AtomicBool::new(false),
            dirty_log,
            dirty: RwLock::default(),
        }
    }

    /// Locks the frames of `gpas` (re-entrant on one thread): planners read the old bytes
    /// and compute their writes under it, then [`TrackedRam::commit`] them before it drops.
    /// `park` runs before blocking on a lock another thread holds (a vCPU thread parks its
    /// continuation: `FrameLocks::lock`).
    pub(crate) fn lock(&self, park: &dyn Fn(), gpas: impl Iterator<Item = u64>) -> Held<'_> {
        self.locks.lock(park, gpas)
    }

    /// Commits writes planned under `_held` (their frames' locks): if every range is guest
    /// RAM, stores them in order, marks them dirty, keeps page tables coherent and reports
    /// each with its old bytes. Returns the frames whose translations went stale.
    ///
    /// # Errors
    /// [`CommitError::NotRam`] if some range is not RAM: nothing is written then.
    pub(crate) fn commit(
        &self,
        shadows: &impl Shadows,
        mem: &GuestMemoryMmap,
        _held: &Held<'_>,
        writes: &[Write<'_>],
        source: Source,
    ) -> Result<Stale, CommitError<Infallible>> {
        self.commit_with(
            shadows,
            mem,
            writes,
            (source, true),
            Shadowing::Planned,
            |mem, w| {
                mem.write_slice(w.new, GuestAddress(w.gpa))
                    .expect("the range was checked, and `mem` holds its regions");
                Ok(())
            },
        )
    }

    /// Copies `data` to `gpa` through [`TrackedRam::write_with`]; `None` if not all RAM.
    pub(crate) fn write(
        &self,
        shadows: &impl Shadows,
        gpa: u64,
        data: &[u8],
        source: Source,
    ) -> Option<Stale> {
        self.write_with(shadows, gpa, data, source, |mem| {
            mem.write_slice(data, GuestAddress(gpa))
                .expect("the range was checked, and `mem` holds its regions");
            Ok::<(), Infallible>(())
        })
        .map(|res| match res {
            Ok(stale) => stale,
        })
    }

    /// A write of `data` at `gpa` planned here: if `[gpa, gpa + data.len())` is guest RAM,
    /// takes the frame locks, reads the old bytes of tracked frames, and commits it with
    /// `store` (a copy, or an atomic store of the same bytes). `None` if the range is not
    /// RAM; `store`'s error, with nothing reported, if it failed.
    pub(crate) fn write_with<E>(
        &self,
        shadows: &impl Shadows,
        gpa: u64,
        data: &[u8],
        source: Source,
        store: impl FnOnce(&GuestMemoryMmap) -> Result<(), E>,
    ) -> Option<Result<Stale, E>> {
        self.write_logged(shadows, gpa, data, source, true, store)
    }

    /// [`TrackedRam::write_with`], marking the checkpoint's dirty log too only if
    /// `since_checkpoint` (a restore's own writes put the checkpoint's bytes back:
    /// `checkpoint.rs`).
    pub(crate) fn write_logged<E>(
        &self,
        shadows: &impl Shadows,
        gpa: u64,
        data: &[u8],
        source: Source,
        since_checkpoint: bool,
        store: impl FnOnce(&GuestMemoryMmap) -> Result<(), E>,
    ) -> Option<Result<Stale, E>> {
        let mem = self.mem.memory();
        if data.is_empty()
            || !mem.check_range(GuestAddress(gpa), data.len(), Permissions::ReadWrite)
        {
            return None;
        }
        let tracker = &self.tracker;
        let last = gpa + data.len() as u64 - 1;
        // Serialize with read-modify-writes that pagetrack completes on the same frames, and keep
        // event order per frame equal to memory order: held until the event is delivered.
        // The sync lock first where the range touches a relaxed frame (lock order, `relaxed.rs`).
        let (_sync, _locks) = shadows.lock_for_copy(self, gpa, last - gpa + 1);
        let any_tracked = tracker.is_enabled() && {
            (gpa / PAGE_SIZE..=last / PAGE_SIZE)
                .any(|f| tracker.is_write_tracked(AsId::NORMAL, pagetrack::Gfn(f)))
        };
        let mut store = Some(store);
        let mut store = |mem: &GuestMemoryMmap, _: &Write<'_>| {
            (store.take().expect("one write, stored once"))(mem)
        };
        let res = if !any_tracked {
            // Still reported: a frame may have become tracked in between (report_write filters).
            let write = Write {
                gpa,
                old: None,
                new: data,
            };
            self.commit_with(
                shadows,
                &mem,
                &[write],
                (source, since_checkpoint),
                Shadowing::Untracked,
                &mut store,
            )
        } else {
            // A relaxed frame: its guest changes so far are delivered first, and its shadow takes
            // these bytes (`relaxed.rs`); held until this write's event is delivered.
            let relaxed = shadows.before_copy(gpa, data.len() as u64);
            let mut small = [0u8; 64];
            let mut big = Vec::new();
            let old: &mut [u8] = if data.len() <= small.len() {
                &mut small[..data.len()]
            } else {
                big.resize(data.len(), 0);
                &mut big
            };
            mem.read_slice(old, GuestAddress(gpa))
                .expect("the range was checked above, and `mem` holds its regions");
            let write = Write {
                gpa,
                old: Some(old),
                new: data,
            };
            self.commit_with(
                shadows,
                &mem,
                &[write],
                (source, since_checkpoint),
                Shadowing::Copy(relaxed),
                &mut store,
            )
        };
        match res {
            Ok(stale) => Some(Ok(stale)),
            Err(CommitError::Store(e)) => Some(Err(e)),
            // Checked above: `mem` is the same snapshot.
            Err(CommitError::NotRam { .. }) => None,
        }
    }

    /// The commit (module docs): RAM checked, page-table entries read, every write stored in
    /// order, stale translations found; then per write the shadows, the dirty log and the event.
    fn commit_with<'s, E>(
        &self,
        shadows: &'s impl Shadows,
        mem: &GuestMemoryMmap,
        writes: &[Write<'_>],
        (source, since_checkpoint): (Source, bool),
        mut shadowing: Shadowing<'s>,
        mut store: impl FnMut(&GuestMemoryMmap, &Write<'_>) -> Result<(), E>,
    ) -> Result<Stale, CommitError<E>> {
        if let Some(w) = writes
            .iter()
            .find(|w| !mem.check_range(GuestAddress(w.gpa), w.new.len(), Permissions::ReadWrite))
        {
            return Err(CommitError::NotRam { gpa: w.gpa });
        }
        // Acquire: pairs with the Release in mark_page_tables and mark_page_table_tree. Without
        // marked frames nothing is read (and nothing allocated: the trapped-store path).
        let pts: Vec<PtEntries> = if self.pt_marked.load(Ordering::Acquire) {
            writes
                .iter()
                .map(|w| self.page_table_entries(mem, w.gpa, w.new.len()))
                .collect()
        } else {
            Vec::new()
        };
        for (i, w) in writes.iter().enumerate() {
            if let Err(e) = store(mem, w) {
                // Ranges are RAM, so only a caller's first (and only) store can fail.
                debug_assert_eq!(i, 0, "a later store failed after earlier ones landed");
                return Err(CommitError::Store(e));
            }
        }
        let mut stale = Vec::new();
        for pt in &pts {
            self.stale_entries(mem, pt, &mut stale);
        }
        stale.sort_unstable();
        stale.dedup();
        for w in writes {
            let old = w.old.unwrap_or(&[]);
            let _applied = match &mut shadowing {
                Shadowing::Untracked => None,
                Shadowing::Copy(lock) => {
                    shadows.after_copy(lock, w.gpa, old, w.new);
                    None
                }
                Shadowing::Planned => shadows.applied(w.gpa, old, w.new),
            };
            self.mark_dirty_for(w.gpa, w.new.len(), since_checkpoint);
            let event = WriteEvent::new(Gpa(w.gpa), w.new, source);
            match w.old {
                Some(old) => self.tracker.report_write(&event.with_old(old)),
                None => self.tracker.report_write(&event),
            }
        }
        drop(shadowing);
        Ok(Stale(stale))
    }

    /// Records a store pagetrack applied to guest RAM in userspace (KVM's log never sees it),
    /// in the checkpoint's log too only if `since_checkpoint` (a restore's own writes put the
    /// checkpoint's bytes back: `checkpoint.rs`).
    pub(crate) fn mark_dirty_for(&self, gpa: u64, len: usize, since_checkpoint: bool) {
        if !self.dirty_log {
            return;
        }
        let logs = self.dirty.read().unwrap_or_else(|e| e.into_inner());
        for log in logs.iter() {
            log.mark_for(gpa, len as u64, since_checkpoint);
        }
    }

    /// Adds a RAM region's dirty log.
    pub(crate) fn add_dirty_log(&self, log: Arc<DirtyBits>) {
        self.dirty
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(log);
    }

    /// Removes a RAM region's dirty log.
    pub(crate) fn remove_dirty_log(&self, log: &Arc<DirtyBits>) {
        self.dirty
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|l| !Arc::ptr_eq(l, log));
    }

    /// Marks `frames` as guest page tables of unknown level, or unmarks them.
    pub(crate) fn mark_page_tables(&self, frames: &[Gfn], is_table: bool) {
        let mut set = self.pt_frames.write().unwrap_or_else(|e| e.into_inner());
        for f in frames {
            if is_table {
                set.entry(f.0).or_insert(0);
            } else {
                set.remove(&f.0);
            }
        }
        // Release: pairs with the Acquire in page_table_entries.
        self.pt_marked.store(!set.is_empty(), Ordering::Release);
    }

    /// Marks the 4-level page tables rooted at `pml4`: the PML4 and every table a present,
    /// non-leaf entry points to, read from guest memory now, each with its level.
    pub(crate) fn mark_page_table_tree(&self, pml4: Gfn) {
        let mem = self.mem.memory();
        let mut found: Vec<(u64, u8)> = vec![(pml4.0, 4)];
        let mut level = vec![pml4.0];
        for depth in (2..=4u8).rev() {
            let mut next = Vec::new();
            for table in level {
                for i in 0..512u64 {
                    let Ok(e) = mem.read_obj::<u64>(GuestAddress((table << 12) + 8 * i)) else {
                        continue;
                    };
                    if e & pte::PRESENT == 0 || (depth < 4 && e & pte::HUGE != 0) {
                        continue;
                    }
                    let child = (e & pte::ADDR_MASK) >> 12;
                    if !found.iter().any(|&(f, _)| f == child) {
                        found.push((child, depth - 1));
                        next.push(child);
                    }
                }
            }
            level = next;
        }
        let mut set = self.pt_frames.write().unwrap_or_else(|e| e.into_inner());
        set.extend(found);
        // Release: pairs with the Acquire in page_table_entries.
        self.pt_marked.store(!set.is_empty(), Ordering::Release);
    }

    /// The page-table entries `[gpa, gpa + len)` overlaps in frames marked as guest page tables
    /// (empty, and free, when none are marked or the host uses TDP).
    fn page_table_entries(&self, mem: &GuestMemoryMmap, gpa: u64, len: usize) -> PtEntries {
        // Acquire: pairs with the Release in mark_page_tables and mark_page_table_tree.
        if !self.pt_marked.load(Ordering::Acquire) || len == 0 {
            return PtEntries::default();
        }
        let frames = self.pt_frames.read().unwrap_or_else(|e| e.into_inner());
        let first = gpa & !7;
        let last = (gpa + len as u64 - 1) & !7;
        let entries = (first..=last)
            .step_by(8)
            .filter(|e| frames.contains_key(&(e >> 12)))
            .filter_map(|e| mem.read_obj::<u64>(GuestAddress(e)).ok().map(|v| (e, v)))
            .collect();
        PtEntries(entries)
    }

    /// After a store to page-table entries: the frames of those that were present and now
    /// translate differently (not an accessed/dirty-only change) go to `stale`.
    fn stale_entries(&self, mem: &GuestMemoryMmap, pt: &PtEntries, stale: &mut Vec<Gfn>) {
        self.mark_new_tables(mem, pt);
        stale.extend(
            pt.0.iter()
                .filter(|(at, old)| {
                    let new = mem.read_obj::<u64>(GuestAddress(*at)).unwrap_or(0);
                    old & pte::PRESENT != 0 && (old ^ new) & !(pte::ACCESSED | pte::DIRTY) != 0
                })
                .map(|(at, _)| Gfn(at >> 12)),
        );
    }

    /// A store into a marked table of known level above 1 that made an entry point to a
    /// lower table (present, not a large page): that table is marked too, one level down,
    /// so tables a guest installs later stay coherent as well.
    fn mark_new_tables(&self, mem: &GuestMemoryMmap, pt: &PtEntries) {
        if pt.0.is_empty() {
            return;
        }
        let children: Vec<(u64, u8)> = {
            let frames = self.pt_frames.read().unwrap_or_else(|e| e.into_inner());
            pt.0.iter()
                .filter_map(|(at, _)| {
                    let level = *frames.get(&(at >> 12))?;
                    let new = mem.read_obj::<u64>(GuestAddress(*at)).ok()?;
                    let table = new & pte::PRESENT != 0
                        && (level == 4 || (level > 1 && new & pte::HUGE == 0));
                    let child = (new & pte::ADDR_MASK) >> 12;
                    (table && frames.get(&child).is_none_or(|&l| l == 0))
                        .then_some((child, level - 1))
                })
                .collect()
        };
        if !children.is_empty() {
            let mut frames = self.pt_frames.write().unwrap_or_else(|e| e.into_inner());
            frames.extend(children);
        }
    }
}

/// The page addresses of `[gpa, gpa + len)` (`len` > 0).
pub(crate) fn pages(gpa: u64, len: u64) -> impl Iterator<Item = u64> {
    (gpa >> 12..=(gpa + len - 1) >> 12).map(|f| f << 12)
}

#[cfg(test)]
mod tests {
    //! The commit without a VM: anonymous guest memory, a core tracker with no enforcement,
    //! a recording notifier, no relaxed frames.

    use std::sync::Mutex;

    use pagetrack::{
        MemoryRegion, NoEnforcement, NotifierClass, SlotId, TrackNotifier, TrackerConfig,
    };

    use super::*;

    /// (gpa, new, old) of an event.
    type Seen = (u64, Vec<u8>, Option<Vec<u8>>);

    /// Every event.
    #[derive(Debug, Default)]
    struct Recorder(Mutex<Vec<Seen>>);

    impl TrackNotifier for Recorder {
        fn track_write(&self, e: &WriteEvent<'_>) {
            self.0.lock().expect("not poisoned").push((
                e.gpa.0,
                e.new.to_vec(),
                e.old.map(<[u8]>::to_vec),
            ));
        }
    }

    const PAGES: u64 = 16;

    struct Rig {
        ram: TrackedRam,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        events: Arc<Recorder>,
        _handle: pagetrack::NotifierHandle,
    }

    /// 64 KiB of RAM at 0 with frames `tracked` tracked; dirty logging as given.
    fn rig(tracked: &[u64], dirty_log: bool) -> Rig {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::<()>::from_ranges(&[(
                GuestAddress(0),
                usize::try_from(PAGES * PAGE_SIZE).expect("64 KiB"),
            )])
            .expect("anonymous memory"),
        );
        let tracker = PageTracker::new(
            TrackerConfig::default().with_address_spaces(1),
            Arc::new(NoEnforcement),
        );
        tracker
            .set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), PAGES))
            .expect("one slot");
        let events = Arc::new(Recorder::default());
        let handle = tracker
            .register(
                Arc::clone(&events) as Arc<dyn TrackNotifier>,
                NotifierClass::Ordinary,
            )
            .expect("registered");
        for &f in tracked {
            tracker.add_gfn(Gfn(f)).expect("tracked");
        }
        let ram = TrackedRam::new(mem.clone(), tracker, dirty_log);
        Rig {
            ram,
            mem,
            events,
            _handle: handle,
        }
    }

    impl Rig {
        fn events(&self) -> Vec<Seen> {
            self.events.0.lock().expect("not poisoned").clone()
        }

        /// A device write that leaves no translation stale.
        fn put(&self, gpa: u64, data: &[u8]) {
            let stale = self.ram.write(&(), gpa, data, Source::Device).expect("RAM");
            assert_eq!(stale, Stale::default());
        }

        fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
            let mut buf = vec![0; len];
            self.mem
                .memory()
                .read_slice(&mut buf, GuestAddress(gpa))
                .expect("RAM");
            buf
        }

        fn commit(&self, writes: &[Write<'_>]) -> Result<Stale, CommitError<Infallible>> {
            let mem = self.mem.memory();
            let held = self.ram.lock(&|| {}, writes.iter().map(|w| w.gpa));
            self.ram.commit(&(), &mem, &held, writes, Source::Vcpu(3))
        }
    }

    #[test]
    fn commit_planned_writes_stores_and_reports_each_in_order_with_old_bytes() {
        let rig = rig(&[1, 2], false);
        let writes = [
            Write {
                gpa: 0x1ffc,
                old: Some(&[0; 4]),
                new: &[1, 2, 3, 4],
            },
            Write {
                gpa: 0x2000,
                old: Some(&[0; 4]),
                new: &[5, 6, 7, 8],
            },
        ];
        let stale = rig.commit(&writes).expect("RAM");
        assert_eq!(stale, Stale::default());
        assert_eq!(rig.read(0x1ffc, 8), [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            rig.events(),
            [
                (0x1ffc, vec![1, 2, 3, 4], Some(vec![0; 4])),
                (0x2000, vec![5, 6, 7, 8], Some(vec![0; 4])),
            ]
        );
    }

    #[test]
    fn commit_with_one_write_outside_ram_writes_and_reports_nothing() {
        let rig = rig(&[1], false);
        let outside = PAGES * PAGE_SIZE;
        let writes = [
            Write {
                gpa: 0x1000,
                old: Some(&[0]),
                new: &[9],
            },
            Write {
                gpa: outside,
                old: Some(&[0]),
                new: &[9],
            },
        ];
        let err = rig.commit(&writes).expect_err("not RAM");
        assert!(matches!(err, CommitError::NotRam { gpa } if gpa == outside));
        assert_eq!(rig.read(0x1000, 1), [0]);
        assert!(rig.events().is_empty());
    }

    #[test]
    fn write_reads_old_bytes_of_tracked_frames_only() {
        let rig = rig(&[1], false);
        let stale = rig
            .ram
            .write(&(), 0x1000, &[7, 7], Source::Device)
            .expect("RAM");
        assert_eq!(stale, Stale::default());
        let again = rig
            .ram
            .write(&(), 0x1000, &[8, 8], Source::Device)
            .expect("RAM");
        assert_eq!(again, Stale::default());
        // Untracked: stored, and the event (filtered by the core) has no old bytes to read.
        rig.put(0x3000, &[1]);
        assert_eq!(rig.read(0x3000, 1), [1]);
        assert_eq!(
            rig.events(),
            [
                (0x1000, vec![7, 7], Some(vec![0, 0])),
                (0x1000, vec![8, 8], Some(vec![7, 7])),
            ]
        );
    }

    #[test]
    fn write_outside_ram_is_refused_and_changes_nothing() {
        let rig = rig(&[15], false);
        let last = PAGES * PAGE_SIZE - 2;
        assert!(
            rig.ram
                .write(&(), last, &[1, 2, 3], Source::Device)
                .is_none()
        );
        assert!(rig.ram.write(&(), 0x1000, &[], Source::Device).is_none());
        assert_eq!(rig.read(last, 2), [0, 0]);
        assert!(rig.events().is_empty());
    }

    #[test]
    fn write_with_a_failing_store_reports_nothing() {
        let rig = rig(&[1], true);
        let res = rig
            .ram
            .write_with(&(), 0x1000, &[1], Source::Device, |_| Err("refused"));
        assert!(matches!(res, Some(Err("refused"))));
        assert!(rig.events().is_empty());
        let log = Arc::new(DirtyBits::new(0, PAGES * PAGE_SIZE));
        rig.ram.add_dirty_log(Arc::clone(&log));
        let res = rig
            .ram
            .write_with(&(), 0x1000, &[1], Source::Device, |_| Err("refused"));
        assert!(matches!(res, Some(Err("refused"))));
        assert!(
            log.take().iter().all(|&w| w == 0),
            "a failed store was logged dirty"
        );
    }

    #[test]
    fn commits_mark_their_pages_dirty_when_logging() {
        let rig = rig(&[1], true);
        let log = Arc::new(DirtyBits::new(0, PAGES * PAGE_SIZE));
        rig.ram.add_dirty_log(Arc::clone(&log));
        rig.put(0x3ffe, &[1; 4]);
        let writes = [Write {
            gpa: 0x1000,
            old: Some(&[0]),
            new: &[1],
        }];
        assert_eq!(rig.commit(&writes).expect("RAM"), Stale::default());
        assert_eq!(log.take()[0], 0b11010, "pages 1, 3 and 4");
        rig.ram.remove_dirty_log(&log);
        rig.put(0x5000, &[1]);
        assert_eq!(log.take()[0], 0, "a removed log was marked");
    }

    #[test]
    fn commit_changing_a_present_page_table_entry_returns_its_frame_stale() {
        let rig = rig(&[2], false);
        let entry = 0x2000 + 8 * 5;
        let present = 0x7000u64 | pte::PRESENT;
        rig.put(entry, &present.to_le_bytes());
        rig.ram.mark_page_tables(&[Gfn(2)], true);
        // Accessed and dirty bits only: nothing stale.
        let ad = present | pte::ACCESSED | pte::DIRTY;
        let old = present.to_le_bytes();
        let writes = [Write {
            gpa: entry,
            old: Some(&old),
            new: &ad.to_le_bytes(),
        }];
        assert_eq!(rig.commit(&writes).expect("RAM"), Stale::default());
        // Another frame: stale, once for two entries of the same table.
        let moved = (0x8000u64 | pte::PRESENT).to_le_bytes();
        let next = (0x9000u64 | pte::PRESENT).to_le_bytes();
        let writes = [
            Write {
                gpa: entry,
                old: Some(&ad.to_le_bytes()),
                new: &moved,
            },
            Write {
                gpa: entry + 8,
                old: Some(&[0; 8]),
                new: &next,
            },
        ];
        assert_eq!(rig.commit(&writes).expect("RAM"), Stale(vec![Gfn(2)]));
        // Not present → present is free, and an unmarked frame is never stale.
        rig.ram.mark_page_tables(&[Gfn(2)], false);
        let gone = 0u64.to_le_bytes();
        let writes = [Write {
            gpa: entry,
            old: Some(&moved),
            new: &gone,
        }];
        assert_eq!(rig.commit(&writes).expect("RAM"), Stale::default());
    }

    #[test]
    fn a_table_installed_under_a_marked_tree_is_marked_one_level_down() {
        let rig = rig(&[], false);
        // PML4 at frame 1 whose entry 0 points to a PDPT at frame 2.
        let pml4e = (0x2000u64 | pte::PRESENT).to_le_bytes();
        rig.put(0x1000, &pml4e);
        rig.ram.mark_page_table_tree(Gfn(1));
        // The PDPT gets an entry pointing to a page directory at frame 3.
        let pdpte = (0x3000u64 | pte::PRESENT).to_le_bytes();
        rig.put(0x2000, &pdpte);
        // Changing the directory's present entry is then stale.
        let pde = (0x4000u64 | pte::PRESENT).to_le_bytes();
        rig.put(0x3000, &pde);
        let other = (0x5000u64 | pte::PRESENT).to_le_bytes();
        let stale = rig
            .ram
            .write(&(), 0x3000, &other, Source::Device)
            .expect("RAM");
        assert_eq!(stale, Stale(vec![Gfn(3)]));
    }
}
