//! The memory system calls' own rules (arguments, placement, `MAP_FIXED`, the mremap cases)
//! over an [`AddressSpace`] on any [`GuestRam`], so they are unit-tested without a VM. The
//! file half of `mmap` (which descriptor, which bytes) stays with the system-call table.

use super::abi::{EEXIST, EFAULT, EINVAL, ENOMEM, SysResult};
use super::mm::{AddressSpace, GuestRam, PAGE, PageKind, USER_END};

/// `MAP_TYPE`: the mapping-type bits of `mmap`'s flags.
const MAP_TYPE: u64 = 0xf;
/// `MAP_FIXED`.
pub const MAP_FIXED: u64 = 0x10;
/// `MAP_ANONYMOUS`.
pub const MAP_ANONYMOUS: u64 = 0x20;
/// `MAP_FIXED_NOREPLACE`.
pub const MAP_FIXED_NOREPLACE: u64 = 0x10_0000;
/// `MREMAP_MAYMOVE`.
pub const MREMAP_MAYMOVE: u64 = 1;
/// `MREMAP_FIXED`.
pub const MREMAP_FIXED: u64 = 2;
/// The protection bits Linux accepts: `PROT_READ | PROT_WRITE | PROT_EXEC` and
/// `PROT_GROWSDOWN | PROT_GROWSUP` (accepted, not implemented).
const PROT_ACCEPTED: u64 = 0x7 | 0x0300_0000;

fn page_up(len: u64) -> SysResult<u64> {
    len.checked_next_multiple_of(PAGE).ok_or(ENOMEM)
}

/// Checks `mmap`'s length, offset, protection and flags, before any descriptor is looked at
/// (Linux's order): returns the page-rounded length and the protection.
///
/// # Errors
/// `EINVAL` for a zero length, an unaligned offset, unknown protection bits or a bad mapping
/// type; `ENOMEM` for a length that rounds past the address space.
pub fn mmap_args(len: u64, prot: u64, flags: u64, off: u64) -> SysResult<(u64, u32)> {
    if len == 0 || !off.is_multiple_of(PAGE) || prot & !PROT_ACCEPTED != 0 {
        return Err(EINVAL);
    }
    let prot = u32::try_from(prot & 7).map_err(|_| EINVAL)?;
    if !matches!(flags & MAP_TYPE, 1..=3) {
        return Err(EINVAL);
    }
    Ok((page_up(len)?, prot))
}

impl<M: GuestRam> AddressSpace<M> {
    /// Places and maps an `mmap` of `len` (page-rounded, from [`mmap_args`]) bytes: at `addr`
    /// with `MAP_FIXED` (replacing what is there) or `MAP_FIXED_NOREPLACE`, else at the hint
    /// if free or the highest free gap. Returns the address; on failure nothing stays mapped
    /// there.
    ///
    /// # Errors
    /// `EINVAL` for an unaligned fixed address; `ENOMEM` past the user range or without room
    /// or frames; `EEXIST` for `MAP_FIXED_NOREPLACE` over a mapping.
    pub fn mmap_place(&mut self, addr: u64, len: u64, prot: u32, flags: u64) -> SysResult<u64> {
        let at = if flags & (MAP_FIXED | MAP_FIXED_NOREPLACE) != 0 {
            if !addr.is_multiple_of(PAGE) {
                return Err(EINVAL);
            }
            let end = addr
                .checked_add(len)
                .filter(|&e| e <= USER_END)
                .ok_or(ENOMEM)?;
            if flags & MAP_FIXED_NOREPLACE != 0 {
                if !self.is_free(addr, end) {
                    return Err(EEXIST);
                }
            } else {
                self.unmap(addr, len).map_err(|_| ENOMEM)?;
            }
            addr
        } else {
            self.find_free(len, addr & !(PAGE - 1)).ok_or(ENOMEM)?
        };
        if let Err(e) = self.map(at, len, prot, PageKind::Mmap) {
            self.undo_map(at, len);
            return Err(e);
        }
        Ok(at)
    }

    /// `munmap(addr, len)`.
    ///
    /// # Errors
    /// `EINVAL` for an unaligned address, a zero length, or a range over the stub or system
    /// pages; `ENOMEM` for a length that rounds past the address space.
    pub fn munmap_call(&mut self, addr: u64, len: u64) -> SysResult {
        if !addr.is_multiple_of(PAGE) || len == 0 {
            return Err(EINVAL);
        }
        self.unmap(addr, page_up(len)?).map(|()| 0)
    }

    /// `mprotect(addr, len, prot)`.
    ///
    /// # Errors
    /// `EINVAL` for an unaligned address or unknown protection bits (or the stub or system
    /// pages); `ENOMEM` if part of the range is not mapped.
    pub fn mprotect_call(&mut self, addr: u64, len: u64, prot: u64) -> SysResult {
        if !addr.is_multiple_of(PAGE) || prot & !PROT_ACCEPTED != 0 {
            return Err(EINVAL);
        }
        let len = page_up(len)?;
        if len == 0 {
            return Ok(0);
        }
        let prot = u32::try_from(prot & 7).map_err(|_| EINVAL)?;
        self.protect(addr, len, prot).map(|()| 0)
    }

    /// `mremap(old, old_len, new_len, flags, new_addr)`: shrinks in place, grows in place
    /// when the pages after it are free, else moves (`MREMAP_MAYMOVE`), or moves to
    /// `new_addr` (`MREMAP_FIXED`), keeping the frames.
    ///
    /// # Errors
    /// `EINVAL` for bad alignment, zero lengths, unknown flags, `MREMAP_FIXED` without
    /// `MREMAP_MAYMOVE` or overlapping ranges; `EFAULT` if `[old, old + old_len)` is not
    /// inside one mapping; `ENOMEM` if it cannot grow in place and may not move.
    pub fn mremap_call(&mut self, a: [u64; 6]) -> SysResult {
        let [old, old_len, new_len, flags, new_addr, _] = a;
        if !old.is_multiple_of(PAGE)
            || new_len == 0
            || old_len == 0
            || flags & !(MREMAP_MAYMOVE | MREMAP_FIXED) != 0
        {
            return Err(EINVAL);
        }
        if flags & MREMAP_FIXED != 0 && flags & MREMAP_MAYMOVE == 0 {
            return Err(EINVAL);
        }
        let (old_len, new_len) = (page_up(old_len)?, page_up(new_len)?);
        let (_, area_end, prot, kind) = self.area(old).ok_or(EFAULT)?;
        if old.checked_add(old_len).is_none_or(|e| e > area_end)
            || matches!(kind, PageKind::Stub | PageKind::System)
        {
            return Err(EFAULT);
        }
        // A move and the growth after it must not run out of frames half-way (the program
        // would be told it failed with its mapping already moved): what the whole
        // destination can need is counted before anything changes.
        let framed = prot != 0;
        if flags & MREMAP_FIXED != 0 {
            if !new_addr.is_multiple_of(PAGE)
                || new_addr
                    .checked_add(new_len)
                    .is_none_or(|e| e > USER_END || new_addr < old + old_len && old < e)
            {
                return Err(EINVAL);
            }
            if self.frames_for(new_addr, new_len, framed) > self.free_frames() {
                return Err(ENOMEM);
            }
            self.unmap(new_addr, new_len).map_err(|_| EINVAL)?;
            if new_len < old_len {
                self.unmap(old + new_len, old_len - new_len)?;
            }
            self.move_range(old, old_len.min(new_len), new_addr)?;
            if new_len > old_len {
                self.map(new_addr + old_len, new_len - old_len, prot, kind)?;
            }
            return Ok(new_addr);
        }
        if new_len <= old_len {
            if new_len < old_len {
                self.unmap(old + new_len, old_len - new_len)?;
            }
            return Ok(old);
        }
        let extra = new_len - old_len;
        if old
            .checked_add(new_len)
            .is_some_and(|e| self.is_free(old + old_len, e))
        {
            if let Err(e) = self.map(old + old_len, extra, prot, kind) {
                self.undo_map(old + old_len, extra);
                return Err(e);
            }
            return Ok(old);
        }
        if flags & MREMAP_MAYMOVE == 0 {
            return Err(ENOMEM);
        }
        let dst = self.find_free(new_len, 0).ok_or(ENOMEM)?;
        if self.frames_for(dst, new_len, framed) > self.free_frames() {
            return Err(ENOMEM);
        }
        self.move_range(old, old_len, dst)?;
        // Cannot run out of frames (counted above): only a failed page-table access, which
        // breaks the address space and stops the process.
        self.map(dst + old_len, extra, prot, kind)?;
        Ok(dst)
    }
}

#[cfg(test)]
mod tests {
    //! The memory manager and the memory system calls on plain memory, checked against an
    //! oracle: a map from virtual page to (protection, kind, has a frame, contents tag). After
    //! every call the areas, the frames, the page tables (walked in guest memory by
    //! `pagetrack_kvm::walk`) and the pages' contents must be what the oracle says.

    use std::collections::{BTreeMap, BTreeSet};

    use pagetrack_kvm::walk;
    use proptest::prelude::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::super::abi::{PROT_EXEC, PROT_READ, PROT_WRITE};
    use super::super::mm::{Frames, MMAP_TOP};
    use super::*;

    /// Guest RAM of the tests: 16 MiB; frames 1..65 for page tables, the rest general.
    const RAM_FRAMES: u64 = 4096;
    /// The window the random calls work in: 48 pages.
    const BASE: u64 = 0x4000_0000;
    const WINDOW: u64 = 48;
    const PRIVATE_ANON: u64 = 0x2 | MAP_ANONYMOUS;

    type Space = AddressSpace<GuestMemoryMmap>;

    /// An address space with `general` general frames, and a handle on its memory.
    fn space(general: u64) -> (Space, GuestMemoryMmap) {
        let bytes = usize::try_from(RAM_FRAMES * PAGE).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes)]).unwrap();
        let frames = Frames::new((1, 65), (65, (65 + general).min(RAM_FRAMES)));
        (Space::new(mem.clone(), frames, true).unwrap(), mem)
    }

    /// One page as the oracle sees it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct Page {
        prot: u32,
        kind: PageKind,
        framed: bool,
        tag: u8,
    }

    impl Page {
        fn fresh(prot: u32, kind: PageKind) -> Page {
            Page {
                prot,
                kind,
                framed: prot != 0,
                tag: 0,
            }
        }
    }

    /// Virtual page number → page.
    type Model = BTreeMap<u64, Page>;

    fn vpn(va: u64) -> u64 {
        va / PAGE
    }

    /// The oracle's area around `va`: the maximal run of pages with its protection and kind.
    fn model_area(m: &Model, va: u64) -> Option<(u64, u64, u32, PageKind)> {
        let p = *m.get(&vpn(va))?;
        let same = |v: u64| {
            m.get(&v)
                .is_some_and(|q| (q.prot, q.kind) == (p.prot, p.kind))
        };
        let (mut s, mut e) = (vpn(va), vpn(va) + 1);
        while s > 0 && same(s - 1) {
            s -= 1;
        }
        while same(e) {
            e += 1;
        }
        Some((s * PAGE, e * PAGE, p.prot, p.kind))
    }

    /// After each call: parked frames are released (the VMM does so after invalidating),
    /// then everything is compared with the oracle.
    fn check(sp: &mut Space, mem: &GuestMemoryMmap, m: &Model) {
        let freed = sp.take_pending().freed;
        sp.release(&freed);
        // Areas: exactly the oracle's pages, with their protection and kind, maximal.
        let mut probe: BTreeSet<u64> = (vpn(BASE)..vpn(BASE) + WINDOW).collect();
        probe.extend(m.keys());
        for &v in &probe {
            assert_eq!(
                sp.area(v * PAGE),
                model_area(m, v * PAGE),
                "area at {:#x}",
                v * PAGE
            );
            assert_eq!(sp.is_free(v * PAGE, (v + 1) * PAGE), !m.contains_key(&v));
        }
        // Frames: the framed pages, each its own frame, holding the page's contents.
        let pages = sp.mapped_pages();
        let framed: BTreeSet<u64> = pages.iter().map(|p| vpn(p.0)).collect();
        let want: BTreeSet<u64> = m
            .iter()
            .filter(|(_, p)| p.framed)
            .map(|(&v, _)| v)
            .collect();
        assert_eq!(framed, want, "framed pages");
        let gfns: BTreeSet<u64> = pages.iter().map(|p| p.1).collect();
        assert_eq!(gfns.len(), pages.len(), "a frame shared by two pages");
        for &(va, gfn, kind, prot) in &pages {
            let p = m[&vpn(va)];
            assert_eq!((kind, prot), (p.kind, p.prot));
            let tag: u8 = mem.read_obj(GuestAddress(gfn * PAGE)).unwrap();
            assert_eq!(tag, p.tag, "contents of {va:#x}");
            // The page tables: present exactly when accessible, to this frame, writable
            // exactly with PROT_WRITE.
            match walk::translate(mem, sp.cr3(), va) {
                Ok(t) if prot != 0 => {
                    assert_eq!(t.gpa, gfn * PAGE, "translation of {va:#x}");
                    assert_eq!(t.writable, prot & PROT_WRITE != 0, "W of {va:#x}");
                    assert!(t.user);
                }
                Ok(t) => panic!("PROT_NONE page {va:#x} translates to {:#x}", t.gpa),
                Err(_) => assert_eq!(prot, 0, "accessible page {va:#x} does not translate"),
            }
        }
        for &v in &probe {
            if !want.contains(&v) {
                assert!(
                    walk::translate(mem, sp.cr3(), v * PAGE).is_err(),
                    "{:#x}",
                    v * PAGE
                );
            }
        }
    }

    /// One memory call with page offsets in the window (lengths in pages).
    #[derive(Clone, Debug)]
    enum Call {
        MapFixed {
            at: u64,
            n: u64,
            prot: u32,
            noreplace: bool,
        },
        MapAnywhere {
            n: u64,
            prot: u32,
        },
        Unmap {
            at: u64,
            n: u64,
        },
        Protect {
            at: u64,
            n: u64,
            prot: u32,
        },
        Remap {
            at: u64,
            old: u64,
            new: u64,
            may_move: bool,
        },
        RemapFixed {
            at: u64,
            old: u64,
            new: u64,
            to: u64,
        },
        Poke {
            at: u64,
            tag: u8,
        },
    }

    fn prot() -> impl Strategy<Value = u32> {
        prop_oneof![
            Just(PROT_READ | PROT_WRITE),
            Just(PROT_READ),
            Just(0),
            Just(PROT_READ | PROT_EXEC)
        ]
    }

    fn call() -> impl Strategy<Value = Call> {
        let at = 0..WINDOW;
        let n = 1..12u64;
        prop_oneof![
            3 => (at.clone(), n.clone(), prot(), any::<bool>()).prop_map(|(at, n, prot, noreplace)| {
                Call::MapFixed { at, n, prot, noreplace }
            }),
            1 => (n.clone(), prot()).prop_map(|(n, prot)| Call::MapAnywhere { n, prot }),
            2 => (at.clone(), n.clone()).prop_map(|(at, n)| Call::Unmap { at, n }),
            2 => (at.clone(), n.clone(), prot()).prop_map(|(at, n, prot)| Call::Protect { at, n, prot }),
            2 => (at.clone(), n.clone(), n.clone(), any::<bool>())
                .prop_map(|(at, old, new, may_move)| Call::Remap { at, old, new, may_move }),
            1 => (at.clone(), n.clone(), n.clone(), at.clone())
                .prop_map(|(at, old, new, to)| Call::RemapFixed { at, old, new, to }),
            3 => (at, 1..=255u8).prop_map(|(at, tag)| Call::Poke { at, tag }),
        ]
    }

    fn va(page: u64) -> u64 {
        BASE + page * PAGE
    }

    /// Moves `n` pages from `from` to `to` in the oracle, keeping frames and contents.
    fn model_move(m: &mut Model, from: u64, to: u64, n: u64) {
        let moved: Vec<Page> = (0..n).filter_map(|i| m.remove(&(from + i))).collect();
        assert_eq!(moved.len() as u64, n, "moving unmapped pages");
        for (i, p) in moved.into_iter().enumerate() {
            m.insert(to + i as u64, p);
        }
    }

    /// Runs `c` on the space and the oracle; the results must agree.
    fn apply(sp: &mut Space, m: &mut Model, c: &Call) {
        let range = |at: u64, n: u64| vpn(va(at))..vpn(va(at)) + n;
        match *c {
            Call::MapFixed {
                at,
                n,
                prot,
                noreplace,
            } => {
                let flags = PRIVATE_ANON
                    | if noreplace {
                        MAP_FIXED_NOREPLACE
                    } else {
                        MAP_FIXED
                    };
                let got = sp.mmap_place(va(at), n * PAGE, prot, flags);
                if noreplace && range(at, n).any(|v| m.contains_key(&v)) {
                    assert_eq!(got, Err(EEXIST));
                } else {
                    assert_eq!(got, Ok(va(at)));
                    for v in range(at, n) {
                        m.insert(v, Page::fresh(prot, PageKind::Mmap));
                    }
                }
            }
            Call::MapAnywhere { n, prot } => {
                let at = sp.mmap_place(0, n * PAGE, prot, PRIVATE_ANON).unwrap();
                let first = vpn(at);
                assert!(at.is_multiple_of(PAGE) && at + n * PAGE <= MMAP_TOP);
                assert!(
                    (first..first + n).all(|v| !m.contains_key(&v)),
                    "placed over a mapping"
                );
                for v in first..first + n {
                    m.insert(v, Page::fresh(prot, PageKind::Mmap));
                }
            }
            Call::Unmap { at, n } => {
                assert_eq!(sp.munmap_call(va(at), n * PAGE), Ok(0));
                for v in range(at, n) {
                    m.remove(&v);
                }
            }
            Call::Protect { at, n, prot } => {
                let got = sp.mprotect_call(va(at), n * PAGE, u64::from(prot));
                if range(at, n).all(|v| m.contains_key(&v)) {
                    assert_eq!(got, Ok(0));
                    for v in range(at, n) {
                        let p = m.get_mut(&v).unwrap();
                        p.prot = prot;
                        if prot != 0 && !p.framed {
                            p.framed = true;
                            p.tag = 0;
                        }
                    }
                } else {
                    assert_eq!(got, Err(ENOMEM), "mprotect over a hole");
                }
            }
            Call::Remap {
                at,
                old,
                new,
                may_move,
            } => {
                let flags = if may_move { MREMAP_MAYMOVE } else { 0 };
                let got = sp.mremap_call([va(at), old * PAGE, new * PAGE, flags, 0, 0]);
                let start = vpn(va(at));
                let Some((_, end, prot, kind)) = model_area(m, va(at)) else {
                    assert_eq!(got, Err(EFAULT));
                    return;
                };
                if start + old > vpn(end) {
                    assert_eq!(got, Err(EFAULT));
                    return;
                }
                if new <= old {
                    assert_eq!(got, Ok(va(at)), "shrink in place");
                    for v in start + new..start + old {
                        m.remove(&v);
                    }
                } else if (start + old..start + new).all(|v| !m.contains_key(&v)) {
                    assert_eq!(got, Ok(va(at)), "grow in place");
                    for v in start + old..start + new {
                        m.insert(v, Page::fresh(prot, kind));
                    }
                } else if !may_move {
                    assert_eq!(got, Err(ENOMEM));
                } else {
                    let dst = vpn(got.unwrap());
                    assert!(
                        (dst..dst + new).all(|v| !m.contains_key(&v)),
                        "moved over a mapping"
                    );
                    model_move(m, start, dst, old);
                    for v in dst + old..dst + new {
                        m.insert(v, Page::fresh(prot, kind));
                    }
                }
            }
            Call::RemapFixed { at, old, new, to } => {
                let flags = MREMAP_MAYMOVE | MREMAP_FIXED;
                let got = sp.mremap_call([va(at), old * PAGE, new * PAGE, flags, va(to), 0]);
                let (start, dst) = (vpn(va(at)), vpn(va(to)));
                let Some((_, end, prot, kind)) = model_area(m, va(at)) else {
                    assert_eq!(got, Err(EFAULT));
                    return;
                };
                if start + old > vpn(end) {
                    assert_eq!(got, Err(EFAULT));
                } else if dst < start + old && start < dst + new {
                    assert_eq!(got, Err(EINVAL), "overlapping fixed move");
                } else {
                    assert_eq!(got, Ok(va(to)));
                    for v in dst..dst + new {
                        m.remove(&v);
                    }
                    for v in start + new.min(old)..start + old {
                        m.remove(&v);
                    }
                    model_move(m, start, dst, old.min(new));
                    for v in dst + old..dst + new {
                        m.insert(v, Page::fresh(prot, kind));
                    }
                }
            }
            Call::Poke { at, tag } => {
                let got = sp.poke(va(at), &[tag]);
                match m.get_mut(&vpn(va(at))) {
                    Some(p) if p.framed => {
                        assert_eq!(got, Ok(()));
                        p.tag = tag;
                    }
                    _ => assert_eq!(got, Err(EFAULT), "poke without a frame"),
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Random mmap (fixed over existing, no-replace, anywhere), munmap, mprotect
        /// (splitting, over holes), mremap (shrink, grow in place, move, fixed) and stores:
        /// areas, frames, page tables and contents equal the oracle's after every call.
        #[test]
        fn memory_calls_match_an_oracle(calls in proptest::collection::vec(call(), 1..40)) {
            let (mut sp, mem) = space(1024);
            let mut m = Model::new();
            for c in &calls {
                apply(&mut sp, &mut m, c);
                check(&mut sp, &mem, &m);
            }
        }
    }

    #[test]
    fn splitting_and_merging_areas() {
        let (mut sp, mem) = space(64);
        let rw = PROT_READ | PROT_WRITE;
        assert_eq!(
            sp.mmap_place(va(0), 8 * PAGE, rw, PRIVATE_ANON | MAP_FIXED),
            Ok(va(0))
        );
        assert_eq!(
            sp.mprotect_call(va(3), 2 * PAGE, u64::from(PROT_READ)),
            Ok(0)
        );
        assert_eq!(sp.area(va(0)), Some((va(0), va(3), rw, PageKind::Mmap)));
        assert_eq!(
            sp.area(va(3)),
            Some((va(3), va(5), PROT_READ, PageKind::Mmap))
        );
        assert_eq!(sp.area(va(5)), Some((va(5), va(8), rw, PageKind::Mmap)));
        // Back to read-write: one area again.
        assert_eq!(sp.mprotect_call(va(3), 2 * PAGE, u64::from(rw)), Ok(0));
        assert_eq!(sp.area(va(4)), Some((va(0), va(8), rw, PageKind::Mmap)));
        // A hole in the middle splits it; mprotect over the hole fails and changes nothing.
        assert_eq!(sp.munmap_call(va(3), 2 * PAGE), Ok(0));
        assert_eq!(sp.area(va(2)), Some((va(0), va(3), rw, PageKind::Mmap)));
        assert_eq!(sp.area(va(3)), None);
        assert_eq!(
            sp.mprotect_call(va(0), 8 * PAGE, u64::from(PROT_READ)),
            Err(ENOMEM)
        );
        assert_eq!(sp.area(va(0)), Some((va(0), va(3), rw, PageKind::Mmap)));
        let mut m = Model::new();
        for v in (0..3).chain(5..8) {
            m.insert(vpn(va(v)), Page::fresh(rw, PageKind::Mmap));
        }
        check(&mut sp, &mem, &m);
    }

    #[test]
    fn bad_arguments_are_refused_and_change_nothing() {
        let (mut sp, mem) = space(64);
        let rw = PROT_READ | PROT_WRITE;
        assert_eq!(
            sp.mmap_place(va(0), 4 * PAGE, rw, PRIVATE_ANON | MAP_FIXED),
            Ok(va(0))
        );
        let fixed = PRIVATE_ANON | MAP_FIXED;
        // mmap's arguments.
        assert_eq!(mmap_args(0, 3, PRIVATE_ANON, 0), Err(EINVAL), "zero length");
        assert_eq!(
            mmap_args(PAGE, 3, PRIVATE_ANON, 12),
            Err(EINVAL),
            "unaligned offset"
        );
        assert_eq!(
            mmap_args(PAGE, 8, PRIVATE_ANON, 0),
            Err(EINVAL),
            "unknown prot bit"
        );
        assert_eq!(
            mmap_args(PAGE, 3, MAP_ANONYMOUS, 0),
            Err(EINVAL),
            "no mapping type"
        );
        assert_eq!(
            mmap_args(u64::MAX, 3, PRIVATE_ANON, 0),
            Err(ENOMEM),
            "length overflows"
        );
        assert_eq!(
            mmap_args(5, 3, PRIVATE_ANON, 0),
            Ok((PAGE, 3)),
            "rounded up"
        );
        // Placement.
        assert_eq!(
            sp.mmap_place(va(0) + 1, PAGE, rw, fixed),
            Err(EINVAL),
            "unaligned fixed"
        );
        assert_eq!(
            sp.mmap_place(USER_END - PAGE, 2 * PAGE, rw, fixed),
            Err(ENOMEM)
        );
        let noreplace = PRIVATE_ANON | MAP_FIXED_NOREPLACE;
        assert_eq!(sp.mmap_place(va(3), 2 * PAGE, rw, noreplace), Err(EEXIST));
        // munmap, mprotect.
        assert_eq!(sp.munmap_call(va(0) + 8, PAGE), Err(EINVAL));
        assert_eq!(sp.munmap_call(va(0), 0), Err(EINVAL));
        assert_eq!(sp.munmap_call(va(0), u64::MAX), Err(ENOMEM));
        assert_eq!(sp.mprotect_call(va(0) + 8, PAGE, 1), Err(EINVAL));
        assert_eq!(sp.mprotect_call(va(0), PAGE, 0x10), Err(EINVAL));
        assert_eq!(sp.mprotect_call(va(0), 0, 1), Ok(0), "empty range");
        // mremap.
        let remap = |sp: &mut Space, a: [u64; 6]| sp.mremap_call(a);
        assert_eq!(
            remap(&mut sp, [va(0) + 1, PAGE, PAGE, 0, 0, 0]),
            Err(EINVAL)
        );
        assert_eq!(remap(&mut sp, [va(0), 0, PAGE, 0, 0, 0]), Err(EINVAL));
        assert_eq!(remap(&mut sp, [va(0), PAGE, 0, 0, 0, 0]), Err(EINVAL));
        assert_eq!(
            remap(&mut sp, [va(0), PAGE, PAGE, 4, 0, 0]),
            Err(EINVAL),
            "bad flag"
        );
        let fixed_only = [va(0), PAGE, PAGE, MREMAP_FIXED, va(20), 0];
        assert_eq!(
            remap(&mut sp, fixed_only),
            Err(EINVAL),
            "FIXED without MAYMOVE"
        );
        assert_eq!(
            remap(&mut sp, [va(10), PAGE, PAGE, 0, 0, 0]),
            Err(EFAULT),
            "unmapped"
        );
        assert_eq!(
            remap(&mut sp, [va(2), 4 * PAGE, PAGE, 0, 0, 0]),
            Err(EFAULT),
            "past area"
        );
        let mut m = Model::new();
        for v in 0..4 {
            m.insert(vpn(va(v)), Page::fresh(rw, PageKind::Mmap));
        }
        check(&mut sp, &mem, &m);
    }

    #[test]
    fn the_stub_page_cannot_be_unmapped_reprotected_or_moved() {
        let (mut sp, mem) = space(64);
        sp.map_fixed_frame(va(5), 3000, PROT_READ | PROT_EXEC, PageKind::Stub)
            .unwrap();
        assert_eq!(sp.munmap_call(va(4), 3 * PAGE), Err(EINVAL));
        assert_eq!(sp.mprotect_call(va(5), PAGE, 7), Err(EINVAL));
        let to = [va(5), PAGE, PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, va(20), 0];
        assert_eq!(sp.mremap_call(to), Err(EFAULT));
        assert_eq!(
            sp.area(va(5)),
            Some((va(5), va(6), PROT_READ | PROT_EXEC, PageKind::Stub))
        );
        assert_eq!(
            walk::translate(&mem, sp.cr3(), va(5)).unwrap().gpa,
            3000 * PAGE
        );
    }

    #[test]
    fn running_out_of_frames_is_enomem_and_leaves_nothing_mapped() {
        let (mut sp, mem) = space(4);
        let rw = PROT_READ | PROT_WRITE;
        assert_eq!(
            sp.mmap_place(va(0), 8 * PAGE, rw, PRIVATE_ANON | MAP_FIXED),
            Err(ENOMEM)
        );
        assert!(sp.is_free(va(0), va(8)));
        check(&mut sp, &mem, &Model::new());
        // The frames came back: four pages fit now, a fifth does not.
        assert_eq!(
            sp.mmap_place(va(0), 4 * PAGE, rw, PRIVATE_ANON | MAP_FIXED),
            Ok(va(0))
        );
        assert_eq!(sp.mmap_place(0, PAGE, rw, PRIVATE_ANON), Err(ENOMEM));
        // PROT_NONE needs no frame.
        assert!(sp.mmap_place(0, 64 * PAGE, 0, PRIVATE_ANON).is_ok());
    }

    #[test]
    fn brk_grows_shrinks_and_refuses_what_it_cannot_do() {
        let (mut sp, mem) = space(8);
        let start = va(0) + 0x800; // the break starts mid-page, after the image
        sp.init_brk(start);
        assert_eq!(sp.set_brk(start - 1), start, "below the start: unchanged");
        assert_eq!(sp.set_brk(start + 3 * PAGE), start + 3 * PAGE);
        let rw = PROT_READ | PROT_WRITE;
        // The break's pages: from the page after the start's page to the new top.
        let mut m = Model::new();
        for v in 1..4 {
            m.insert(vpn(va(v)), Page::fresh(rw, PageKind::Heap));
        }
        check(&mut sp, &mem, &m);
        sp.poke(va(2), &[9]).unwrap();
        sp.poke(va(3), &[7]).unwrap();
        m.get_mut(&vpn(va(2))).unwrap().tag = 9;
        m.get_mut(&vpn(va(3))).unwrap().tag = 7;
        check(&mut sp, &mem, &m);
        // Shrinking frees the top page; growing again gives it a zeroed frame (the freed
        // one, reused).
        assert_eq!(sp.set_brk(start + 2 * PAGE), start + 2 * PAGE);
        m.remove(&vpn(va(3)));
        check(&mut sp, &mem, &m);
        assert_eq!(sp.set_brk(start + 3 * PAGE), start + 3 * PAGE);
        m.insert(vpn(va(3)), Page::fresh(rw, PageKind::Heap));
        check(&mut sp, &mem, &m);
        // Not enough frames (5 left, 17 wanted): unchanged, the partial growth undone.
        assert_eq!(
            sp.set_brk(start + 20 * PAGE),
            start + 3 * PAGE,
            "out of frames"
        );
        check(&mut sp, &mem, &m);
        // A mapping in the way: unchanged.
        sp.mmap_place(va(6), PAGE, PROT_READ, PRIVATE_ANON | MAP_FIXED)
            .unwrap();
        m.insert(vpn(va(6)), Page::fresh(PROT_READ, PageKind::Mmap));
        assert_eq!(sp.set_brk(start + 8 * PAGE), start + 3 * PAGE);
        check(&mut sp, &mem, &m);
        assert_eq!(
            sp.set_brk(u64::MAX),
            start + 3 * PAGE,
            "past the address space"
        );
    }

    /// Guest memory whose every access fails once `fail` is set: a page-table access going
    /// wrong half-way through an edit.
    #[derive(Clone, Debug)]
    struct Flaky {
        mem: GuestMemoryMmap,
        fail: std::rc::Rc<std::cell::Cell<bool>>,
    }

    impl GuestRam for Flaky {
        fn write(&self, buf: &[u8], gpa: u64) -> SysResult<()> {
            if self.fail.get() {
                return Err(EFAULT);
            }
            GuestRam::write(&self.mem, buf, gpa)
        }

        fn read(&self, buf: &mut [u8], gpa: u64) -> SysResult<()> {
            if self.fail.get() {
                return Err(EFAULT);
            }
            GuestRam::read(&self.mem, buf, gpa)
        }
    }

    fn flaky_space(general: u64) -> (AddressSpace<Flaky>, Flaky) {
        let bytes = usize::try_from(RAM_FRAMES * PAGE).unwrap();
        let mem = Flaky {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes)]).unwrap(),
            fail: std::rc::Rc::default(),
        };
        let frames = Frames::new((1, 65), (65, 65 + general));
        (AddressSpace::new(mem.clone(), frames, true).unwrap(), mem)
    }

    #[test]
    fn brk_undo_whose_page_table_access_fails_breaks_the_space_and_refuses_every_edit() {
        let (mut sp, mem) = flaky_space(4);
        let start = va(0);
        sp.init_brk(start);
        assert_eq!(sp.set_brk(start + PAGE), start + PAGE);
        assert_eq!(sp.inconsistency(), None);
        mem.fail.set(true);
        // Out of frames (3 left, 9 wanted); the undo's page-table read fails.
        assert_eq!(sp.set_brk(start + 10 * PAGE), start + PAGE);
        let broken = sp.inconsistency().expect("the failed undo is recorded");
        assert_eq!(broken.access, crate::PageTableAccess::Read);
        // The address space refuses to change from now on, even with memory working again:
        // the tracking's commit stops the process on `inconsistency()`.
        mem.fail.set(false);
        let rw = PROT_READ | PROT_WRITE;
        let before = (sp.area(va(20)), sp.free_frames());
        // MAP_FIXED's unmap of the range is refused first (ENOMEM, as any failed unmap there).
        assert_eq!(
            sp.mmap_place(va(20), PAGE, rw, PRIVATE_ANON | MAP_FIXED),
            Err(ENOMEM)
        );
        assert_eq!(sp.mmap_place(va(20), PAGE, rw, PRIVATE_ANON), Err(EFAULT));
        assert_eq!(sp.munmap_call(start, PAGE), Err(EFAULT));
        assert_eq!(sp.mprotect_call(start, PAGE, 1), Err(EFAULT));
        assert_eq!(sp.set_brk(start + 2 * PAGE), start + PAGE);
        assert!(!sp.grow_stack(super::super::mm::STACK_TOP - PAGE));
        assert_eq!((sp.area(va(20)), sp.free_frames()), before);
        assert_eq!(
            sp.inconsistency(),
            Some(broken),
            "the first failure is kept"
        );
    }

    #[test]
    fn munmap_whose_page_table_write_fails_breaks_the_space() {
        let (mut sp, mem) = flaky_space(8);
        let rw = PROT_READ | PROT_WRITE;
        assert_eq!(
            sp.mmap_place(va(0), 2 * PAGE, rw, PRIVATE_ANON | MAP_FIXED),
            Ok(va(0))
        );
        mem.fail.set(true);
        // The records drop the pages before their entries are cleared: the entries may
        // still map frames the records consider free, so the space must be broken.
        assert_eq!(sp.munmap_call(va(0), 2 * PAGE), Err(EFAULT));
        assert!(sp.inconsistency().is_some());
    }

    #[test]
    fn mremap_move_without_frames_for_its_tables_is_enomem_and_changes_nothing() {
        // Four general frames: two pages and nothing left; the page tables of the window
        // come from the table pool, so a move elsewhere needs general frames for its own
        // tables only after the pool is gone: a pool of three (the PML4 and the window's
        // tables).
        let bytes = usize::try_from(RAM_FRAMES * PAGE).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes)]).unwrap();
        let mut sp = Space::new(mem.clone(), Frames::new((1, 5), (65, 67)), true).unwrap();
        let rw = PROT_READ | PROT_WRITE;
        assert_eq!(
            sp.mmap_place(va(0), 2 * PAGE, rw, PRIVATE_ANON | MAP_FIXED),
            Ok(va(0))
        );
        // Something in the way of growing in place (PROT_NONE: no frame).
        assert_eq!(
            sp.mmap_place(va(2), PAGE, 0, PRIVATE_ANON | MAP_FIXED),
            Ok(va(2))
        );
        sp.poke(va(0), &[5]).unwrap();
        assert_eq!(sp.free_frames(), 0);
        let mut m = Model::new();
        m.insert(
            vpn(va(0)),
            Page {
                tag: 5,
                ..Page::fresh(rw, PageKind::Mmap)
            },
        );
        m.insert(vpn(va(1)), Page::fresh(rw, PageKind::Mmap));
        m.insert(vpn(va(2)), Page::fresh(0, PageKind::Mmap));
        check(&mut sp, &mem, &m);
        let grow = [va(0), 2 * PAGE, 4 * PAGE, MREMAP_MAYMOVE, 0, 0];
        assert_eq!(sp.mremap_call(grow), Err(ENOMEM));
        check(&mut sp, &mem, &m);
        let fixed = [
            va(0),
            2 * PAGE,
            2 * PAGE,
            MREMAP_MAYMOVE | MREMAP_FIXED,
            MMAP_TOP,
            0,
        ];
        assert_eq!(sp.mremap_call(fixed), Err(ENOMEM));
        check(&mut sp, &mem, &m);
        assert_eq!(sp.inconsistency(), None);
    }

    #[test]
    fn mremap_lengths_that_overflow_are_refused_and_change_nothing() {
        let (mut sp, mem) = space(8);
        let rw = PROT_READ | PROT_WRITE;
        assert_eq!(
            sp.mmap_place(va(0), PAGE, rw, PRIVATE_ANON | MAP_FIXED),
            Ok(va(0))
        );
        let mut m = Model::new();
        m.insert(vpn(va(0)), Page::fresh(rw, PageKind::Mmap));
        let huge = u64::MAX - PAGE + 1;
        for (a, want) in [
            ([va(0), huge, PAGE, 0, 0, 0], EFAULT),
            ([va(0), PAGE, huge, MREMAP_MAYMOVE, 0, 0], ENOMEM),
            ([va(0), PAGE, u64::MAX, MREMAP_MAYMOVE, 0, 0], ENOMEM),
            (
                [va(0), PAGE, huge, MREMAP_MAYMOVE | MREMAP_FIXED, va(8), 0],
                EINVAL,
            ),
            (
                [va(0), PAGE, PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, huge, 0],
                EINVAL,
            ),
        ] {
            assert_eq!(sp.mremap_call(a), Err(want), "{a:x?}");
            check(&mut sp, &mem, &m);
        }
    }
}
