//! Named tracked regions that follow the program: frames of the requested kinds are tracked
//! when they are mapped (heap growth, new mmaps, new page tables) and untracked when the
//! program gives them back, in one batch per system call.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use pagetrack::{AsId, Gfn};
use pagetrack_kvm::{PageTableUpdate, Vm};
use vm_memory::{Bytes, GuestAddress};

use super::mm::{AddressSpace, Mapped, PAGE, PageKind};
use crate::error::{RegionError, Result};

/// A `--track` region of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Region {
    /// The stack (it grows on demand).
    Stack,
    /// The program break area.
    Heap,
    /// Writable image segments (data, bss).
    Data,
    /// Read-only image segments (code, read-only data).
    Text,
    /// mmap'd areas.
    Mmap,
    /// The page tables the VMM writes for the program.
    PageTables,
    /// Every page the program can write, and the page tables: stack, heap, data, mmap,
    /// page-tables.
    Writable,
    /// Pages mapped in the program's virtual range `[start, end)`.
    Range {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
}

impl Region {
    /// True if a frame of `kind` mapped at `va` (None for page tables) belongs to the region.
    pub fn covers(&self, kind: PageKind, va: Option<u64>) -> bool {
        match self {
            Region::Stack => kind == PageKind::Stack,
            Region::Heap => kind == PageKind::Heap,
            Region::Data => kind == PageKind::Data,
            Region::Text => kind == PageKind::Text,
            Region::Mmap => kind == PageKind::Mmap,
            Region::PageTables => kind == PageKind::PageTable,
            Region::Writable => matches!(
                kind,
                PageKind::Stack
                    | PageKind::Heap
                    | PageKind::Data
                    | PageKind::Mmap
                    | PageKind::PageTable
            ),
            Region::Range { start, end } => va.is_some_and(|v| v + PAGE > *start && v < *end),
        }
    }
}

fn parse_num(s: &str) -> std::result::Result<u64, RegionError> {
    let t = s.trim();
    let (digits, radix) = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => (h, 16),
        None => (t, 10),
    };
    u64::from_str_radix(digits, radix).map_err(|_| RegionError::NotANumber { text: s.to_owned() })
}

impl FromStr for Region {
    type Err = RegionError;

    /// `stack`, `heap`, `data`, `text`, `mmap`, `page-tables`, `writable`, or a virtual
    /// range `ADDR-END` (END exclusive) or `ADDR+LEN`.
    fn from_str(s: &str) -> std::result::Result<Region, RegionError> {
        Ok(match s {
            "stack" => Region::Stack,
            "heap" => Region::Heap,
            "data" => Region::Data,
            "text" => Region::Text,
            "mmap" => Region::Mmap,
            "page-tables" => Region::PageTables,
            "writable" | "all" => Region::Writable,
            _ => {
                let (start, end) = if let Some((a, l)) = s.split_once('+') {
                    let a = parse_num(a)?;
                    (
                        a,
                        a.checked_add(parse_num(l)?).ok_or(RegionError::Overflow)?,
                    )
                } else if let Some((a, e)) = s.split_once('-') {
                    (parse_num(a)?, parse_num(e)?)
                } else {
                    return Err(RegionError::Unknown { text: s.to_owned() });
                };
                if end <= start {
                    return Err(RegionError::Empty { text: s.to_owned() });
                }
                Region::Range { start, end }
            }
        })
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Region::Stack => f.write_str("stack"),
            Region::Heap => f.write_str("heap"),
            Region::Data => f.write_str("data"),
            Region::Text => f.write_str("text"),
            Region::Mmap => f.write_str("mmap"),
            Region::PageTables => f.write_str("page-tables"),
            Region::Writable => f.write_str("writable"),
            Region::Range { start, end } => write!(f, "{start:#x}-{end:#x}"),
        }
    }
}

/// Told when a frame starts and stops being tracked, with its contents at that moment: with
/// the write events in between, enough to replay every tracked frame (the replay oracle).
pub trait FrameObserver: Send + Sync {
    /// `gfn` is about to be tracked (no write reaches it until the next event); `contents`
    /// are its 4 KiB now.
    fn tracked(&self, gfn: Gfn, kind: PageKind, contents: &[u8]) {
        let _ = (gfn, kind, contents);
    }

    /// `gfn` is no longer tracked (no event for it follows); `contents` are its 4 KiB now.
    fn untracked(&self, gfn: Gfn, contents: &[u8]) {
        let _ = (gfn, contents);
    }
}

/// Counters of tracking.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TrackStats {
    /// Frames that started being tracked (a frame reused counts again).
    pub frames_tracked: u64,
    /// Frames that stopped being tracked before the end.
    pub frames_untracked: u64,
    /// Tracked frames at the end.
    pub frames_at_end: u64,
    /// Track or untrack batches (each one KVM memslot re-cut per affected chunk).
    pub batches: u64,
    /// Calls to invalidate KVM's translations after a present entry changed.
    pub invalidations: u64,
    /// KVM fragments re-created by them.
    pub fragments_recreated: u64,
}

/// The tracking side of a process.
pub(crate) struct Tracking {
    regions: Vec<Region>,
    tracked: HashMap<u64, PageKind>,
    observer: Option<Arc<dyn FrameObserver>>,
    pub(crate) stats: TrackStats,
}

impl fmt::Debug for Tracking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracking")
            .field("regions", &self.regions)
            .field("tracked", &self.tracked.len())
            .finish_non_exhaustive()
    }
}

impl Tracking {
    pub(crate) fn new(regions: Vec<Region>) -> Tracking {
        Tracking {
            regions,
            tracked: HashMap::new(),
            observer: None,
            stats: TrackStats::default(),
        }
    }

    pub(crate) fn set_observer(&mut self, o: Arc<dyn FrameObserver>) {
        self.observer = Some(o);
    }

    fn wants(&self, kind: PageKind, va: Option<u64>) -> bool {
        !matches!(kind, PageKind::Stub | PageKind::System)
            && self.regions.iter().any(|r| r.covers(kind, va))
    }

    /// The frames tracked now, in order.
    pub(crate) fn frames(&self) -> Vec<Gfn> {
        let mut v: Vec<Gfn> = self.tracked.keys().map(|&g| Gfn(g)).collect();
        v.sort_unstable();
        v
    }

    /// Tracks the frames of every page mapped so far and every page table.
    pub(crate) fn start(&mut self, vm: &Vm, mm: &mut AddressSpace) -> Result<()> {
        // What loading recorded is superseded by the full list below.
        drop(mm.take_pending());
        if self.regions.is_empty() {
            return Ok(());
        }
        // Tracking is on even if nobody registered a notifier (the frames are still
        // enforced; events then reach no one).
        vm.tracker().enable_write_tracking()?;
        let mut add: Vec<Mapped> = mm
            .mapped_pages()
            .into_iter()
            .map(|(va, gfn, kind, _)| Mapped {
                gfn,
                kind,
                va: Some(va),
            })
            .collect();
        add.extend(mm.table_frames().iter().map(|&gfn| Mapped {
            gfn,
            kind: PageKind::PageTable,
            va: None,
        }));
        self.track(vm, &add, &HashSet::new())
    }

    fn track(&mut self, vm: &Vm, mapped: &[Mapped], skip: &HashSet<u64>) -> Result<()> {
        let mut add = Vec::new();
        for m in mapped {
            if self.wants(m.kind, m.va)
                && !skip.contains(&m.gfn)
                && !self.tracked.contains_key(&m.gfn)
            {
                self.tracked.insert(m.gfn, m.kind);
                add.push((Gfn(m.gfn), m.kind));
            }
        }
        if add.is_empty() {
            return Ok(());
        }
        if let Some(o) = &self.observer {
            let mut page = vec![0u8; 4096];
            for &(g, kind) in &add {
                vm.memory()
                    .read_slice(&mut page, GuestAddress(g.0 * PAGE))?;
                o.tracked(g, kind, &page);
            }
        }
        let gfns: Vec<Gfn> = add.iter().map(|&(g, _)| g).collect();
        vm.tracker().add_gfns(AsId::NORMAL, &gfns)?;
        self.stats.frames_tracked += gfns.len() as u64;
        self.stats.batches += 1;
        Ok(())
    }

    /// Applies what the address space changed since the last call: drops stale translations,
    /// untracks and releases freed frames, tracks new ones.
    ///
    /// Freed frames are released for reuse, and stale translations dropped, only inside a
    /// [`PageTableUpdate`]: `held` if the caller took one around the whole change (a system
    /// call that edits the address space), else one taken here. No store pagetrack completes
    /// in userspace can then still be writing a released frame (see
    /// [`Vm::page_table_update`]).
    pub(crate) fn commit(
        &mut self,
        vm: &Vm,
        mm: &mut AddressSpace,
        held: Option<&PageTableUpdate<'_>>,
    ) -> Result<()> {
        // After a failed page-table access the records and the tables KVM walks may
        // disagree: nothing is released (a frame the tables still map must never be reused)
        // and the process VM stops here, before the program runs again.
        if let Some(i) = mm.inconsistency() {
            return Err(crate::Error::AddressSpaceInconsistent {
                access: i.access,
                gpa: i.gpa,
            });
        }
        let p = mm.take_pending();
        let _update = (held.is_none() && !(p.freed.is_empty() && p.stale_tables.is_empty()))
            .then(|| vm.page_table_update());
        if !p.stale_tables.is_empty() {
            let mut t: Vec<Gfn> = p.stale_tables.iter().map(|&g| Gfn(g)).collect();
            t.sort_unstable();
            t.dedup();
            let n = vm.invalidate_translations(&t)?;
            self.stats.invalidations += 1;
            self.stats.fragments_recreated += n as u64;
        }
        if !p.freed.is_empty() {
            let gone: Vec<Gfn> = p
                .freed
                .iter()
                .filter(|g| self.tracked.remove(g).is_some())
                .map(|&g| Gfn(g))
                .collect();
            if !gone.is_empty() {
                vm.tracker().remove_gfns(AsId::NORMAL, &gone)?;
                self.stats.frames_untracked += gone.len() as u64;
                self.stats.batches += 1;
                if let Some(o) = &self.observer {
                    let mut page = vec![0u8; 4096];
                    for g in &gone {
                        vm.memory()
                            .read_slice(&mut page, GuestAddress(g.0 * PAGE))?;
                        o.untracked(*g, &page);
                    }
                }
            }
        }
        let freed: HashSet<u64> = p.freed.iter().copied().collect();
        self.track(vm, &p.mapped, &freed)?;
        mm.release(&p.freed);
        Ok(())
    }

    /// Stops tracking everything (at the end of a run), telling the observer the final
    /// contents.
    pub(crate) fn finish(&mut self, vm: &Vm) -> Result<()> {
        let all = self.frames();
        self.stats.frames_at_end = all.len() as u64;
        if let Some(o) = &self.observer {
            let mut page = vec![0u8; 4096];
            for g in &all {
                vm.memory()
                    .read_slice(&mut page, GuestAddress(g.0 * PAGE))?;
                o.untracked(*g, &page);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_after_a_failed_page_table_access_stops_with_a_typed_error() {
        let kvm = pagetrack_testkit::kvm_or_skip!();
        let vm = Vm::with_kvm(kvm, pagetrack_kvm::VmConfig::default().with_ram(16 << 20)).unwrap();
        vm.add_ram(0, 16 << 20).unwrap();
        // A table pool beyond the 4096 frames of RAM (a broken set-up): the PML4 is there, so
        // the first mapping's table walk cannot read it.
        let frames = super::super::mm::Frames::new((5000, 5010), (100, 200));
        let mut mm = AddressSpace::new(vm.memory(), frames, true).unwrap();
        let rw = super::super::abi::PROT_READ | super::super::abi::PROT_WRITE;
        assert_eq!(
            mm.map(0x4000_0000, PAGE, rw, PageKind::Mmap),
            Err(super::super::abi::EFAULT)
        );
        let mut tracking = Tracking::new(vec![Region::Writable]);
        let stats = tracking.stats;
        match tracking.commit(&vm, &mut mm, None) {
            Err(crate::Error::AddressSpaceInconsistent { access, gpa }) => {
                assert_eq!(access, crate::PageTableAccess::Read);
                assert_eq!(gpa, 5000 * PAGE, "the PML4 entry of 0x4000_0000");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            tracking.stats, stats,
            "nothing tracked, released or invalidated"
        );
        assert!(tracking.frames().is_empty());
    }

    #[test]
    fn region_parse_names_and_ranges() {
        assert_eq!("stack".parse::<Region>(), Ok(Region::Stack));
        assert_eq!("page-tables".parse::<Region>(), Ok(Region::PageTables));
        assert_eq!(
            "0x400000-0x401000".parse::<Region>(),
            Ok(Region::Range {
                start: 0x40_0000,
                end: 0x40_1000
            })
        );
        assert_eq!(
            "0x1000+16".parse::<Region>(),
            Ok(Region::Range {
                start: 0x1000,
                end: 0x1010
            })
        );
        assert_eq!(
            "0x2000-0x1000".parse::<Region>(),
            Err(RegionError::Empty {
                text: "0x2000-0x1000".into()
            })
        );
        assert_eq!(
            "bogus".parse::<Region>(),
            Err(RegionError::Unknown {
                text: "bogus".into()
            })
        );
        assert_eq!(
            "0x1000+zz".parse::<Region>(),
            Err(RegionError::NotANumber { text: "zz".into() })
        );
        assert_eq!(
            "0xffffffffffffffff+2".parse::<Region>(),
            Err(RegionError::Overflow)
        );
    }

    #[test]
    fn region_covers_by_kind_and_address() {
        assert!(Region::Writable.covers(PageKind::PageTable, None));
        assert!(!Region::Writable.covers(PageKind::Text, Some(0x40_0000)));
        let r = Region::Range {
            start: 0x1800,
            end: 0x2001,
        };
        assert!(r.covers(PageKind::Text, Some(0x1000)));
        assert!(r.covers(PageKind::Heap, Some(0x2000)));
        assert!(!r.covers(PageKind::Heap, Some(0x3000)));
        assert!(!r.covers(PageKind::PageTable, None));
    }
}
