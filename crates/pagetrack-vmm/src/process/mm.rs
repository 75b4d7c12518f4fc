//! The process's address space: guest-physical frames, its 4-level page tables (4 KiB pages,
//! user and NX bits), the areas it has mapped (image, heap, stack, mmap), and the program
//! break.
//!
//! Every write the VMM makes to guest memory here (page-table entries, zeroed frames, copied
//! file bytes) goes through [`TrackedMemory`], so tracked frames report it as a device write.
//! An operation that changes or removes a *present* translation records the page-table frame
//! that held it in [`Pending::stale_tables`]; the caller must have KVM drop its shadows of
//! those frames ([`pagetrack_kvm::Vm::invalidate_translations`]) before the program runs again.
//! Frames an operation frees are parked in [`Pending::freed`] and reused only after that, and
//! only inside a [`pagetrack_kvm::Vm::page_table_update`] (the tracking's commit), so no
//! store completed in userspace can still be writing them.
//!
//! The address space reaches guest memory only through [`GuestRam`]: [`TrackedMemory`] in a
//! VM, plain `vm_memory::GuestMemoryMmap` in the unit tests, which run without `/dev/kvm`.

use std::collections::{BTreeMap, HashMap};

use pagetrack_kvm::TrackedMemory;

use super::abi::{EFAULT, EINVAL, ENOMEM, PROT_EXEC, PROT_READ, PROT_WRITE, SysResult};
use crate::error::PageTableAccess;

/// Page size.
pub const PAGE: u64 = 4096;
/// First address above the user half (47-bit canonical).
pub const USER_END: u64 = 0x8000_0000_0000;
/// The system-call stub page (user, read and execute).
pub const STUB_VA: u64 = 0x7fff_ffff_f000;
/// The initial stack pointer's region ends here (exclusive).
pub const STACK_TOP: u64 = 0x7fff_ff00_0000;
/// How far the stack may grow (`RLIMIT_STACK`).
pub const STACK_MAX: u64 = 8 << 20;
/// Stack mapped at start.
pub const STACK_INITIAL: u64 = 128 << 10;
/// How much more stack a fault below the stack maps at once.
const STACK_STEP: u64 = 64 << 10;
/// mmap without a usable hint places areas top-down below this.
pub const MMAP_TOP: u64 = 0x7fff_0000_0000;
/// Lowest address mmap hands out (`vm.mmap_min_addr`).
const MMAP_MIN: u64 = 0x1_0000;
/// How far the program break may grow beyond its start.
const BRK_MAX: u64 = 1 << 40;

use pagetrack_kvm::walk::pte::{
    ACCESSED as PTE_A, ADDR_MASK, DIRTY as PTE_D, NX as PTE_NX, PRESENT as PTE_P, USER as PTE_U,
    WRITABLE as PTE_W,
};
/// Flags of a non-leaf entry: permissions are decided at the leaf.
const TABLE_FLAGS: u64 = PTE_P | PTE_W | PTE_U | PTE_A;

static ZERO_PAGE: [u8; 4096] = [0; 4096];

/// The guest memory an [`AddressSpace`] reads and writes (page-table entries, zeroed
/// frames, user data); every failure is the program's `EFAULT`.
pub trait GuestRam: std::fmt::Debug {
    /// Writes `buf` at guest-physical `gpa`.
    ///
    /// # Errors
    /// `EFAULT` if any byte is outside guest RAM.
    fn write(&self, buf: &[u8], gpa: u64) -> SysResult<()>;

    /// Reads `buf.len()` bytes at guest-physical `gpa`.
    ///
    /// # Errors
    /// `EFAULT` if any byte is outside guest RAM.
    fn read(&self, buf: &mut [u8], gpa: u64) -> SysResult<()>;
}

/// In unit tests: plain memory, no VM.
#[cfg(test)]
impl GuestRam for vm_memory::GuestMemoryMmap {
    fn write(&self, buf: &[u8], gpa: u64) -> SysResult<()> {
        vm_memory::Bytes::write_slice(self, buf, vm_memory::GuestAddress(gpa)).map_err(|_| EFAULT)
    }

    fn read(&self, buf: &mut [u8], gpa: u64) -> SysResult<()> {
        vm_memory::Bytes::read_slice(self, buf, vm_memory::GuestAddress(gpa)).map_err(|_| EFAULT)
    }
}

/// In a VM: every write is tracked (a tracked frame reports it as a device write).
impl GuestRam for TrackedMemory {
    fn write(&self, buf: &[u8], gpa: u64) -> SysResult<()> {
        vm_memory::Bytes::write_slice(self, buf, vm_memory::GuestAddress(gpa)).map_err(|_| EFAULT)
    }

    fn read(&self, buf: &mut [u8], gpa: u64) -> SysResult<()> {
        vm_memory::Bytes::read_slice(self, buf, vm_memory::GuestAddress(gpa)).map_err(|_| EFAULT)
    }
}

/// What a page of the process is for; decides which `--track` regions it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum PageKind {
    /// A read-only image segment (code, read-only data).
    Text,
    /// A writable image segment (data, bss).
    Data,
    /// The program break area.
    Heap,
    /// The stack.
    Stack,
    /// An mmap'd area.
    Mmap,
    /// A page-table frame (not mapped in the process).
    PageTable,
    /// The system-call stub page.
    Stub,
    /// The CPL0 system region (GDT, IDT, TSS, exception stubs and stacks).
    System,
}

impl PageKind {
    /// The name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            PageKind::Text => "text",
            PageKind::Data => "data",
            PageKind::Heap => "heap",
            PageKind::Stack => "stack",
            PageKind::Mmap => "mmap",
            PageKind::PageTable => "page-tables",
            PageKind::Stub => "stub",
            PageKind::System => "system",
        }
    }
}

/// Guest-physical frames: a pool for page tables (kept together, so that invalidating them
/// re-creates few KVM fragments) and a general pool. Frames never handed out are known to be
/// zero; recycled ones are zeroed on reuse.
#[derive(Debug)]
pub struct Frames {
    table_next: u64,
    table_end: u64,
    next: u64,
    end: u64,
    free: Vec<u64>,
    in_use: u64,
    peak: u64,
}

impl Frames {
    /// Frames `[tables.0, tables.1)` for page tables and `[general.0, general.1)` for the rest
    /// (frame numbers).
    pub fn new(tables: (u64, u64), general: (u64, u64)) -> Frames {
        Frames {
            table_next: tables.0,
            table_end: tables.1,
            next: general.0,
            end: general.1,
            free: Vec::new(),
            in_use: 0,
            peak: 0,
        }
    }

    fn count(&mut self) {
        self.in_use += 1;
        self.peak = self.peak.max(self.in_use);
    }

    /// A general frame and whether it is known to be zero.
    fn alloc(&mut self) -> Option<(u64, bool)> {
        let got = if let Some(f) = self.free.pop() {
            (f, false)
        } else if self.next < self.end {
            self.next += 1;
            (self.next - 1, true)
        } else {
            return None;
        };
        self.count();
        Some(got)
    }

    fn alloc_table(&mut self) -> Option<(u64, bool)> {
        if self.table_next < self.table_end {
            self.table_next += 1;
            self.count();
            return Some((self.table_next - 1, true));
        }
        self.alloc()
    }

    /// Frames still free (general and page-table pools).
    pub fn free(&self) -> u64 {
        (self.end - self.next) + (self.table_end - self.table_next) + self.free.len() as u64
    }

    /// Returns frames to the general pool.
    pub fn release(&mut self, frames: &[u64]) {
        self.in_use -= frames.len() as u64;
        self.free.extend_from_slice(frames);
    }

    /// The most frames in use at once.
    pub fn peak(&self) -> u64 {
        self.peak
    }
}

/// One mapped area `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Vma {
    end: u64,
    prot: u32,
    kind: PageKind,
}

/// A frame newly given to the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapped {
    /// The frame.
    pub gfn: u64,
    /// What it holds.
    pub kind: PageKind,
    /// Its virtual address (`None` for page tables).
    pub va: Option<u64>,
}

/// What the operations since the last [`AddressSpace::take_pending`] changed, for tracking
/// and translation invalidation.
#[derive(Debug, Default)]
pub struct Pending {
    /// Frames newly mapped (or page tables created).
    pub mapped: Vec<Mapped>,
    /// Frames the process no longer has; not reused until released.
    pub freed: Vec<u64>,
    /// Page-table frames in which a present entry changed.
    pub stale_tables: Vec<u64>,
}

/// A page-table access that failed while the address space was being changed: its records
/// (areas, frames) and the page tables KVM walks may disagree from then on, so the address
/// space refuses every further edit and the process must not run again
/// ([`AddressSpace::inconsistency`]).
///
/// The page tables lie in frames the VMM chose inside guest RAM, so this is a broken
/// invariant of the VMM's set-up, never something a program can cause; it is still an error
/// (which stops the process VM) rather than a panic or a silent divergence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inconsistency {
    /// Which access failed.
    pub access: PageTableAccess,
    /// The guest-physical address of the access.
    pub gpa: u64,
}

/// The address space.
#[derive(Debug)]
pub struct AddressSpace<M: GuestRam = TrackedMemory> {
    mem: M,
    frames: Frames,
    pml4: u64,
    nx: bool,
    vmas: BTreeMap<u64, Vma>,
    /// Frame of each page that has one (virtual page number → frame number).
    pages: BTreeMap<u64, u64>,
    /// Leaf table of each 2 MiB region (va >> 21 → table gpa); tables are never freed.
    leaf_tables: HashMap<u64, u64>,
    tables: Vec<u64>,
    pending: Pending,
    brk_start: u64,
    brk: u64,
    stack_low: u64,
    stack_prot: u32,
    /// Set by the first page-table access that failed; every later edit is refused.
    broken: Option<Inconsistency>,
}

fn page_down(a: u64) -> u64 {
    a & !(PAGE - 1)
}

fn page_up(a: u64) -> Option<u64> {
    a.checked_next_multiple_of(PAGE)
}

impl<M: GuestRam> AddressSpace<M> {
    /// An empty address space with a fresh PML4.
    ///
    /// # Errors
    /// No frame for the PML4, or it cannot be written.
    pub fn new(mem: M, mut frames: Frames, nx: bool) -> SysResult<AddressSpace<M>> {
        let (pml4, fresh) = frames.alloc_table().ok_or(ENOMEM)?;
        let mut space = AddressSpace {
            mem,
            frames,
            pml4: pml4 * PAGE,
            nx,
            vmas: BTreeMap::new(),
            pages: BTreeMap::new(),
            leaf_tables: HashMap::new(),
            tables: vec![pml4],
            pending: Pending::default(),
            brk_start: 0,
            brk: 0,
            stack_low: STACK_TOP,
            stack_prot: PROT_READ | PROT_WRITE,
            broken: None,
        };
        space.zero_frame(pml4, fresh)?;
        space.pending.mapped.push(Mapped {
            gfn: pml4,
            kind: PageKind::PageTable,
            va: None,
        });
        Ok(space)
    }

    /// Guest-physical address of the PML4 (CR3).
    pub fn cr3(&self) -> u64 {
        self.pml4
    }

    /// Frames not yet handed out.
    pub fn free_frames(&self) -> u64 {
        self.frames.free()
    }

    /// The most frames in use at once.
    pub fn peak_frames(&self) -> u64 {
        self.frames.peak()
    }

    /// Takes the record of changes since the last call.
    pub fn take_pending(&mut self) -> Pending {
        std::mem::take(&mut self.pending)
    }

    /// Returns frames parked in [`Pending::freed`] to the allocator (after invalidation).
    pub fn release(&mut self, frames: &[u64]) {
        self.frames.release(frames);
    }

    /// Every page-table frame so far.
    pub fn table_frames(&self) -> &[u64] {
        &self.tables
    }

    /// Every mapped page: (virtual address, frame, kind, prot).
    pub fn mapped_pages(&self) -> Vec<(u64, u64, PageKind, u32)> {
        self.pages
            .iter()
            .filter_map(|(&vpn, &gfn)| {
                let va = vpn * PAGE;
                self.vma_at(va).map(|(_, v)| (va, gfn, v.kind, v.prot))
            })
            .collect()
    }

    /// The failed page-table access after which this address space and its page tables may
    /// disagree, if one happened: the process must then be stopped (the tracking's commit
    /// refuses to go on).
    pub fn inconsistency(&self) -> Option<Inconsistency> {
        self.broken
    }

    /// Refuses an edit once a page-table access has failed.
    fn check_consistent(&self) -> SysResult<()> {
        match self.broken {
            Some(_) => Err(EFAULT),
            None => Ok(()),
        }
    }

    /// Reads page-table (or fresh-frame) bytes; a failure breaks the address space.
    fn table_read(&mut self, buf: &mut [u8], gpa: u64) -> SysResult<()> {
        self.mem.read(buf, gpa).inspect_err(|_| {
            self.broken.get_or_insert(Inconsistency {
                access: PageTableAccess::Read,
                gpa,
            });
        })
    }

    /// Writes page-table (or fresh-frame) bytes; a failure breaks the address space.
    fn table_write(&mut self, buf: &[u8], gpa: u64) -> SysResult<()> {
        self.mem.write(buf, gpa).inspect_err(|_| {
            self.broken.get_or_insert(Inconsistency {
                access: PageTableAccess::Write,
                gpa,
            });
        })
    }

    fn zero_frame(&mut self, gfn: u64, fresh: bool) -> SysResult<()> {
        if !fresh {
            self.table_write(&ZERO_PAGE, gfn * PAGE)?;
        }
        Ok(())
    }

    /// Unmaps `[va, va + len)`, which the caller has just mapped in a call that is failing
    /// (out of frames, a file that cannot be read): the range was free before, so the unmap
    /// cannot be refused, and only a failed page-table access can stop it, which leaves the
    /// address space broken ([`AddressSpace::inconsistency`]) and the process stopped at the
    /// next commit. Nothing is lost by not returning that error here: the caller's own error
    /// goes to the program, which never runs again.
    pub fn undo_map(&mut self, va: u64, len: u64) {
        if let Err(e) = self.unmap(va, len) {
            // `unmap` refuses (changing nothing, so the records and the tables still agree)
            // only ranges past the user half or over the stub and system pages, which a range
            // just mapped as user memory cannot be; any other failure was a page-table
            // access, already recorded.
            debug_assert!(
                self.broken.is_some(),
                "undoing a fresh mapping at {va:#x} was refused: {e:?}"
            );
        }
    }

    fn leaf_flags(&self, prot: u32, kind: PageKind) -> u64 {
        if prot & (PROT_READ | PROT_WRITE | PROT_EXEC) == 0 {
            return 0;
        }
        let mut f = PTE_P | PTE_A | PTE_D;
        if kind == PageKind::System {
            // Supervisor only: the CPL0 structures, never reachable from the program.
            f |= PTE_W;
        } else {
            f |= PTE_U;
            if prot & PROT_WRITE != 0 {
                f |= PTE_W;
            }
        }
        if self.nx && prot & PROT_EXEC == 0 {
            f |= PTE_NX;
        }
        f
    }

    fn read_u64(&mut self, gpa: u64) -> SysResult<u64> {
        let mut bytes = [0u8; 8];
        self.table_read(&mut bytes, gpa)?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// The leaf table covering `va`, created on the way if `create`.
    fn leaf_table(&mut self, va: u64, create: bool) -> SysResult<Option<u64>> {
        if let Some(&t) = self.leaf_tables.get(&(va >> 21)) {
            return Ok(Some(t));
        }
        let mut table = self.pml4;
        for shift in [39u32, 30, 21] {
            let at = table + ((va >> shift) & 0x1ff) * 8;
            let e = self.read_u64(at)?;
            table = if e & PTE_P != 0 {
                e & ADDR_MASK
            } else if create {
                let (gfn, fresh) = self.frames.alloc_table().ok_or(ENOMEM)?;
                self.zero_frame(gfn, fresh)?;
                self.tables.push(gfn);
                self.pending.mapped.push(Mapped {
                    gfn,
                    kind: PageKind::PageTable,
                    va: None,
                });
                self.table_write(&((gfn * PAGE) | TABLE_FLAGS).to_le_bytes(), at)?;
                gfn * PAGE
            } else {
                return Ok(None);
            };
        }
        self.leaf_tables.insert(va >> 21, table);
        Ok(Some(table))
    }

    /// Rewrites the leaf entries of `n` pages from `va`: `f(va, old) -> new`. Each table's
    /// changed span is written once; a changed present entry marks its table stale.
    fn update_ptes(
        &mut self,
        va: u64,
        n: u64,
        create: bool,
        mut f: impl FnMut(u64, u64) -> u64,
    ) -> SysResult<()> {
        self.check_consistent()?;
        let mut vpn = va / PAGE;
        let end = vpn + n;
        let mut buf = vec![0u8; 4096];
        while vpn < end {
            let stop = end.min((vpn | 0x1ff) + 1);
            let Some(table) = self.leaf_table(vpn * PAGE, create)? else {
                vpn = stop;
                continue;
            };
            let count = usize::try_from(stop - vpn).map_err(|_| EINVAL)?;
            let first = table + (vpn & 0x1ff) * 8;
            let bytes = &mut buf[..count * 8];
            self.table_read(bytes, first)?;
            let (mut lo, mut hi, mut stale) = (usize::MAX, 0, false);
            for i in 0..count {
                let slot = &mut bytes[i * 8..i * 8 + 8];
                let old = u64::from_le_bytes(slot.try_into().map_err(|_| EFAULT)?);
                let new = f((vpn + i as u64) * PAGE, old);
                if new != old {
                    slot.copy_from_slice(&new.to_le_bytes());
                    lo = lo.min(i);
                    hi = i + 1;
                    stale |= old & PTE_P != 0;
                }
            }
            if lo < hi {
                self.table_write(&bytes[lo * 8..hi * 8], first + lo as u64 * 8)?;
                if stale {
                    self.pending.stale_tables.push(table / PAGE);
                }
            }
            vpn = stop;
        }
        Ok(())
    }

    fn vma_at(&self, va: u64) -> Option<(u64, &Vma)> {
        self.vmas
            .range(..=va)
            .next_back()
            .filter(|(_, v)| va < v.end)
            .map(|(&s, v)| (s, v))
    }

    /// True if no area overlaps `[start, end)`.
    pub fn is_free(&self, start: u64, end: u64) -> bool {
        if start >= end || end > USER_END {
            return false;
        }
        self.vmas
            .range(..end)
            .next_back()
            .is_none_or(|(_, v)| v.end <= start)
    }

    /// Splits the area containing `at` (strictly inside) in two.
    fn split_at(&mut self, at: u64) {
        if let Some((s, v)) = self.vma_at(at).map(|(s, v)| (s, *v))
            && s < at
        {
            self.vmas.insert(s, Vma { end: at, ..v });
            self.vmas.insert(at, v);
        }
    }

    /// Merges the area starting at `start` with equal neighbours.
    fn merge_around(&mut self, start: u64) {
        let Some(&v) = self.vmas.get(&start) else {
            return;
        };
        let mut start = start;
        if let Some((&ps, &pv)) = self.vmas.range(..start).next_back()
            && pv.end == start
            && pv.prot == v.prot
            && pv.kind == v.kind
        {
            self.vmas.remove(&start);
            self.vmas.insert(ps, Vma { end: v.end, ..pv });
            start = ps;
        }
        let v = self.vmas[&start];
        if let Some(&nv) = self.vmas.get(&v.end)
            && nv.prot == v.prot
            && nv.kind == v.kind
        {
            self.vmas.remove(&v.end);
            self.vmas.insert(start, Vma { end: nv.end, ..v });
        }
    }

    /// Maps `[va, va + len)` (free, page-aligned) as `kind` with `prot`; frames are
    /// allocated and zeroed unless `prot` is `PROT_NONE`.
    ///
    /// # Errors
    /// `ENOMEM` when frames run out (what was mapped stays mapped, as a partial mmap would
    /// be undone by the caller's unmap).
    pub fn map(&mut self, va: u64, len: u64, prot: u32, kind: PageKind) -> SysResult<()> {
        debug_assert!(
            va.is_multiple_of(PAGE) && len.is_multiple_of(PAGE) && self.is_free(va, va + len)
        );
        self.check_consistent()?;
        self.vmas.insert(
            va,
            Vma {
                end: va + len,
                prot,
                kind,
            },
        );
        self.populate(va, len, prot, kind)?;
        self.merge_around(va);
        Ok(())
    }

    /// Gives every page of `[va, va + len)` without a frame one, and writes the entries.
    fn populate(&mut self, va: u64, len: u64, prot: u32, kind: PageKind) -> SysResult<()> {
        let flags = self.leaf_flags(prot, kind);
        if flags == 0 {
            return Ok(());
        }
        let mut frames = Vec::new();
        for page in (va..va + len).step_by(4096) {
            let vpn = page / PAGE;
            let gfn = match self.pages.get(&vpn) {
                Some(&g) => g,
                None => {
                    let (gfn, fresh) = self.frames.alloc().ok_or(ENOMEM)?;
                    self.zero_frame(gfn, fresh)?;
                    self.pages.insert(vpn, gfn);
                    self.pending.mapped.push(Mapped {
                        gfn,
                        kind,
                        va: Some(page),
                    });
                    gfn
                }
            };
            frames.push(gfn);
        }
        let mut it = frames.into_iter();
        self.update_ptes(va, len / PAGE, true, |_, _| {
            it.next().map_or(0, |g| (g * PAGE) | flags)
        })
    }

    /// Maps one page at `va` to the fixed frame `gfn` (the stub page, the system region);
    /// these frames are not the allocator's and never freed.
    pub fn map_fixed_frame(
        &mut self,
        va: u64,
        gfn: u64,
        prot: u32,
        kind: PageKind,
    ) -> SysResult<()> {
        self.check_consistent()?;
        let flags = self.leaf_flags(prot, kind);
        self.vmas.insert(
            va,
            Vma {
                end: va + PAGE,
                prot,
                kind,
            },
        );
        self.merge_around(va);
        self.update_ptes(va, 1, true, |_, _| (gfn * PAGE) | flags)
    }

    /// Unmaps `[va, va + len)` (page-aligned); frames go to [`Pending::freed`].
    ///
    /// # Errors
    /// `EINVAL` if the range touches the stub or system pages.
    pub fn unmap(&mut self, va: u64, len: u64) -> SysResult<()> {
        let end = va
            .checked_add(len)
            .filter(|&e| e <= USER_END)
            .ok_or(EINVAL)?;
        self.check_consistent()?;
        if self
            .vmas
            .range(..end)
            .rev()
            .take_while(|(_, v)| v.end > va)
            .any(|(_, v)| matches!(v.kind, PageKind::Stub | PageKind::System))
        {
            return Err(EINVAL);
        }
        self.split_at(va);
        self.split_at(end);
        let starts: Vec<u64> = self.vmas.range(va..end).map(|(&s, _)| s).collect();
        for s in starts {
            self.vmas.remove(&s);
        }
        let vpns: Vec<u64> = self
            .pages
            .range(va / PAGE..end / PAGE)
            .map(|(&v, _)| v)
            .collect();
        if vpns.is_empty() {
            return Ok(());
        }
        for vpn in &vpns {
            if let Some(gfn) = self.pages.remove(vpn) {
                self.pending.freed.push(gfn);
            }
        }
        // Only the span that had frames can have present entries.
        let (first, last) = (vpns[0], vpns[vpns.len() - 1]);
        self.update_ptes(first * PAGE, last - first + 1, false, |_, _| 0)
    }

    /// Changes the protection of `[va, va + len)`; pages that become accessible get frames.
    ///
    /// # Errors
    /// `ENOMEM` if part of the range is not mapped or frames run out; `EINVAL` for the stub
    /// or system pages.
    pub fn protect(&mut self, va: u64, len: u64, prot: u32) -> SysResult<()> {
        let end = va
            .checked_add(len)
            .filter(|&e| e <= USER_END)
            .ok_or(ENOMEM)?;
        self.check_consistent()?;
        // Every byte must be mapped.
        let mut at = va;
        while at < end {
            let (_, v) = self.vma_at(at).ok_or(ENOMEM)?;
            if matches!(v.kind, PageKind::Stub | PageKind::System) {
                return Err(EINVAL);
            }
            at = v.end;
        }
        self.split_at(va);
        self.split_at(end);
        let areas: Vec<(u64, Vma)> = self.vmas.range(va..end).map(|(&s, &v)| (s, v)).collect();
        for (s, v) in areas {
            self.vmas.insert(s, Vma { prot, ..v });
            let flags = self.leaf_flags(prot, v.kind);
            if flags == 0 {
                // Frames stay (their contents survive PROT_NONE); only the entries go.
                self.update_ptes(s, (v.end - s) / PAGE, false, |_, _| 0)?;
            } else {
                self.populate(s, v.end - s, prot, v.kind)?;
            }
            if v.kind == PageKind::Stack {
                self.stack_prot = prot;
            }
        }
        let starts: Vec<u64> = self.vmas.range(va..end).map(|(&s, _)| s).collect();
        for s in starts {
            if self.vmas.contains_key(&s) {
                self.merge_around(s);
            }
        }
        if let Some((s, _)) = self.vma_at(end) {
            self.merge_around(s);
        }
        Ok(())
    }

    /// A free range of `len` bytes: `hint` if it is free and page-aligned, else the highest
    /// gap below [`MMAP_TOP`].
    pub fn find_free(&self, len: u64, hint: u64) -> Option<u64> {
        if hint != 0
            && hint.is_multiple_of(PAGE)
            && hint >= MMAP_MIN
            && hint.checked_add(len).is_some_and(|e| self.is_free(hint, e))
        {
            return Some(hint);
        }
        let mut top = MMAP_TOP;
        for (&s, v) in self.vmas.range(..MMAP_TOP).rev() {
            if v.end <= top && top - v.end >= len {
                break;
            }
            top = top.min(s);
        }
        top.checked_sub(len)
            .filter(|&a| a >= MMAP_MIN && self.is_free(a, a + len))
    }

    /// The pages of `[start, end)` that have a frame, and whether part of the range lies in
    /// no area; bounded by the frames, not by the length of the range.
    pub fn framed_pages(&self, start: u64, end: u64) -> (Vec<u64>, bool) {
        let first = self.vma_at(start).map_or(start, |(s, _)| s);
        let mut at = start;
        let mut gap = false;
        for (&s, v) in self.vmas.range(first..end) {
            gap |= s > at;
            at = at.max(v.end);
        }
        gap |= at < end;
        let pages = self
            .pages
            .range(start / PAGE..end.div_ceil(PAGE))
            .map(|(&vpn, _)| vpn * PAGE)
            .collect();
        (pages, gap)
    }

    /// The area that contains `va`: (start, end, prot, kind).
    pub fn area(&self, va: u64) -> Option<(u64, u64, u32, PageKind)> {
        self.vma_at(va).map(|(s, v)| (s, v.end, v.prot, v.kind))
    }

    /// At most how many frames mapping `[va, va + len)` takes: a frame per page if `framed`,
    /// plus the page tables (leaf, directory, pointer table) of each 2 MiB region that has
    /// no leaf table yet. An operation that has this many free before it changes anything
    /// cannot run out of frames half-way.
    pub fn frames_for(&self, va: u64, len: u64, framed: bool) -> u64 {
        let Some(end) = va.checked_add(len).filter(|_| len > 0) else {
            return 0;
        };
        let tables = (va >> 21..=(end - 1) >> 21)
            .filter(|r| !self.leaf_tables.contains_key(r))
            .count() as u64
            * 3;
        tables + if framed { len.div_ceil(PAGE) } else { 0 }
    }

    /// Moves the pages of `[old, old + len)` to `[new, new + len)` (free), keeping their
    /// frames: the mremap move. The page tables the new range needs are counted first, so
    /// it either moves or changes nothing.
    ///
    /// # Errors
    /// `EFAULT` if `old` is not mapped; `ENOMEM` without the frames for the new range's page
    /// tables.
    pub fn move_range(&mut self, old: u64, len: u64, new: u64) -> SysResult<()> {
        self.check_consistent()?;
        let (_, _, prot, kind) = self.area(old).ok_or(EFAULT)?;
        if self.leaf_flags(prot, kind) != 0 && self.frames_for(new, len, false) > self.free_frames()
        {
            return Err(ENOMEM);
        }
        let end = old + len;
        let moved: Vec<(u64, u64)> = self
            .pages
            .range(old / PAGE..end / PAGE)
            .map(|(&v, &g)| (v, g))
            .collect();
        self.split_at(old);
        self.split_at(end);
        let starts: Vec<u64> = self.vmas.range(old..end).map(|(&s, _)| s).collect();
        for s in starts {
            self.vmas.remove(&s);
        }
        for (vpn, _) in &moved {
            self.pages.remove(vpn);
        }
        if let (Some(first), Some(last)) = (moved.first(), moved.last()) {
            self.update_ptes(first.0 * PAGE, last.0 - first.0 + 1, false, |_, _| 0)?;
        }
        self.vmas.insert(
            new,
            Vma {
                end: new + len,
                prot,
                kind,
            },
        );
        let delta = new / PAGE;
        for &(vpn, gfn) in &moved {
            self.pages.insert(delta + (vpn - old / PAGE), gfn);
        }
        let flags = self.leaf_flags(prot, kind);
        if flags != 0 {
            let pages = &self.pages;
            let mut entries: Vec<u64> =
                Vec::with_capacity(usize::try_from(len / PAGE).unwrap_or(0));
            for page in (new..new + len).step_by(4096) {
                entries.push(pages.get(&(page / PAGE)).map_or(0, |g| (g * PAGE) | flags));
            }
            let mut it = entries.into_iter();
            self.update_ptes(new, len / PAGE, true, |_, _| it.next().unwrap_or(0))?;
        }
        self.merge_around(new);
        Ok(())
    }

    /// Copies `data` to `va` regardless of protection (loading the image and the stack).
    ///
    /// # Errors
    /// `EFAULT` if a page has no frame.
    pub fn poke(&self, va: u64, data: &[u8]) -> SysResult<()> {
        self.copy_out(va, data, None)
    }

    fn copy_out(&self, va: u64, data: &[u8], need: Option<u32>) -> SysResult<()> {
        let mut done = 0usize;
        while done < data.len() {
            let at = va.checked_add(done as u64).ok_or(EFAULT)?;
            let gpa = self.translate(at, need)?;
            let room = usize::try_from(PAGE - at % PAGE).map_err(|_| EFAULT)?;
            let n = room.min(data.len() - done);
            self.mem.write(&data[done..done + n], gpa)?;
            done += n;
        }
        Ok(())
    }

    /// The guest-physical address of `va` if the page has a frame and (with `need`) allows
    /// that access.
    fn translate(&self, va: u64, need: Option<u32>) -> SysResult<u64> {
        let gfn = *self.pages.get(&(va / PAGE)).ok_or(EFAULT)?;
        if let Some(need) = need {
            let (_, v) = self.vma_at(va).ok_or(EFAULT)?;
            if v.prot & need != need || v.prot == 0 {
                return Err(EFAULT);
            }
        }
        Ok(gfn * PAGE + va % PAGE)
    }

    /// How many bytes from `va` (at most `len`) the program may access with `need`
    /// (`PROT_READ` or `PROT_WRITE`).
    pub fn accessible(&self, va: u64, len: u64, need: u32) -> u64 {
        let mut at = va;
        let end = va.saturating_add(len);
        while at < end {
            if self.translate(at, Some(need)).is_err() {
                break;
            }
            at = page_down(at).saturating_add(PAGE);
        }
        at.min(end).saturating_sub(va)
    }

    /// Writes `data` to user memory at `va` as the kernel would for the program: every page
    /// must be writable.
    ///
    /// # Errors
    /// `EFAULT` (nothing is written if the range is not entirely writable).
    pub fn write_user(&self, va: u64, data: &[u8]) -> SysResult<()> {
        if self.accessible(va, data.len() as u64, PROT_WRITE) < data.len() as u64 {
            return Err(EFAULT);
        }
        self.copy_out(va, data, Some(PROT_WRITE))
    }

    /// Reads user memory at `va` into `buf`: every page must be readable.
    ///
    /// # Errors
    /// `EFAULT`.
    pub fn read_user(&self, va: u64, buf: &mut [u8]) -> SysResult<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = va.checked_add(done as u64).ok_or(EFAULT)?;
            let gpa = self.translate(at, Some(PROT_READ))?;
            let room = usize::try_from(PAGE - at % PAGE).map_err(|_| EFAULT)?;
            let n = room.min(buf.len() - done);
            self.mem.read(&mut buf[done..done + n], gpa)?;
            done += n;
        }
        Ok(())
    }

    /// Reads a NUL-terminated string of at most `max` bytes (without the NUL).
    ///
    /// # Errors
    /// `EFAULT`, or `ENAMETOOLONG` past `max`.
    pub fn read_cstr(&self, va: u64, max: usize) -> SysResult<Vec<u8>> {
        let mut out = Vec::new();
        let mut at = va;
        loop {
            let room = usize::try_from(PAGE - at % PAGE).map_err(|_| EFAULT)?;
            let mut chunk = vec![0u8; room];
            self.read_user(at, &mut chunk)?;
            if let Some(n) = chunk.iter().position(|&b| b == 0) {
                out.extend_from_slice(&chunk[..n]);
                return Ok(out);
            }
            out.extend_from_slice(&chunk);
            if out.len() > max {
                return Err(super::abi::ENAMETOOLONG);
            }
            at = at.checked_add(room as u64).ok_or(EFAULT)?;
        }
    }

    /// Sets the program break's start (the page after the image).
    pub fn init_brk(&mut self, start: u64) {
        self.brk_start = start;
        self.brk = start;
    }

    /// `brk(addr)`: moves the break when it can; returns the break.
    pub fn set_brk(&mut self, addr: u64) -> u64 {
        if addr < self.brk_start || addr - self.brk_start > BRK_MAX {
            return self.brk;
        }
        let (Some(old_top), Some(new_top)) = (page_up(self.brk), page_up(addr)) else {
            return self.brk;
        };
        if new_top > old_top {
            if !self.is_free(old_top, new_top) {
                return self.brk;
            }
            if self
                .map(
                    old_top,
                    new_top - old_top,
                    PROT_READ | PROT_WRITE,
                    PageKind::Heap,
                )
                .is_err()
            {
                // Out of frames: undo the partial growth.
                self.undo_map(old_top, new_top - old_top);
                return self.brk;
            }
        } else if new_top < old_top && self.unmap(new_top, old_top - new_top).is_err() {
            return self.brk;
        }
        self.brk = addr;
        self.brk
    }

    /// Maps the initial stack `[top - size, top)`.
    ///
    /// # Errors
    /// `ENOMEM`.
    pub fn map_stack(&mut self, size: u64, prot: u32) -> SysResult<()> {
        let low = STACK_TOP - size;
        self.stack_prot = prot;
        self.map(low, size, prot, PageKind::Stack)?;
        self.stack_low = low;
        Ok(())
    }

    /// Grows the stack down to cover `addr` if it lies in the stack's growth range and the
    /// range is free (a page fault there); true if it did.
    pub fn grow_stack(&mut self, addr: u64) -> bool {
        let limit = STACK_TOP - STACK_MAX;
        if addr < limit || addr >= self.stack_low {
            return false;
        }
        let low = page_down(addr).saturating_sub(STACK_STEP).max(limit);
        if !self.is_free(low, self.stack_low) {
            return false;
        }
        if self
            .map(low, self.stack_low - low, self.stack_prot, PageKind::Stack)
            .is_err()
        {
            self.undo_map(low, self.stack_low - low);
            return false;
        }
        self.stack_low = low;
        true
    }
}
