//! The rep-string planner: which elements of a `rep stos` / `rep movs` pagetrack may complete
//! itself after KVM trapped one of them, and what each stores.
//!
//! KVM emulates a string store into a read-only fragment one element per exit. After the
//! exit's own element is applied, the remaining elements that fall in the same destination
//! page can be run in userspace, each applied and reported exactly as a trapped store would be
//! (one event per element, in order). [`RepPlan::new`] decides whether the exit is such an
//! element; [`RepPlan::next_element`] yields the next element to store (reading a `movs`
//! source from the memory as it is *now*, after the caller applied the previous element);
//! [`RepPlan::finish`] gives the registers to load (RCX/RDI/RSI, and RIP when the count reaches
//! zero). The plan stops early, leaving the rest to the CPU, at a page boundary, an
//! untranslatable or read-only destination, an unreadable source, or anything it does not
//! recognise. This module reads guest memory but never writes it.

use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use kvm_bindings::kvm_regs;
use vm_memory::{GuestAddress, GuestMemory, Permissions};

use crate::sysregs::SysCache;
use crate::walk;

const DF: u64 = 1 << 10;

/// A `rep stos`/`rep movs` being continued in userspace, one element at a time.
#[derive(Debug, Clone)]
pub struct RepPlan {
    cr3: u64,
    /// Element size in bytes (1, 2, 4 or 8).
    size: u64,
    movs: bool,
    down: bool,
    next_ip: u64,
    /// The destination page every element must stay in.
    page: u64,
    /// The registers after the elements yielded so far.
    regs: kvm_regs,
    count: u64,
    stopped: bool,
}

/// One element to store: `bytes()` at guest-physical `gpa`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepElement {
    /// Guest-physical address of the element.
    pub gpa: u64,
    value: [u8; 8],
    len: usize,
}

impl RepElement {
    /// The bytes to store.
    #[must_use]
    pub fn bytes(&self) -> &[u8] {
        &self.value[..self.len]
    }
}

impl RepPlan {
    /// Plans the continuation of the string store whose element at `gpa` (`len` bytes) was just
    /// applied; `regs` are the registers KVM left (RCX, RDI, RSI after that element, RIP still
    /// on the instruction). None: not a plain 64-bit `rep stos`/`rep movs` whose element just
    /// done is this exit, or nothing left to do.
    pub fn new<M: GuestMemory + ?Sized>(
        mem: &M,
        sys: &SysCache,
        regs: &kvm_regs,
        gpa: u64,
        len: usize,
    ) -> Option<RepPlan> {
        if regs.rcx == 0 || !sys.long64 {
            return None;
        }
        let cr3 = sys.cr3;
        let mut bytes = [0u8; 15];
        let n = walk::read_virt_prefix(mem, cr3, regs.rip, &mut bytes);
        if !bytes[..n.min(4)].contains(&0xf3) {
            return None; // no rep prefix where one would be: not a rep string store
        }
        let insn = Decoder::with_ip(64, &bytes[..n], regs.rip, DecoderOptions::NONE).decode();
        let size: u64 = match insn.mnemonic() {
            Mnemonic::Stosb | Mnemonic::Movsb => 1,
            Mnemonic::Stosw | Mnemonic::Movsw => 2,
            Mnemonic::Stosd | Mnemonic::Movsd => 4,
            Mnemonic::Stosq | Mnemonic::Movsq => 8,
            _ => return None,
        };
        let movs = matches!(
            insn.mnemonic(),
            Mnemonic::Movsb | Mnemonic::Movsw | Mnemonic::Movsd | Mnemonic::Movsq
        );
        // 64-bit addressing, no segment override (FS/GS bases would apply), a plain rep prefix.
        if !insn.has_rep_prefix()
            || insn.is_invalid()
            || insn.memory_size().size() == 0
            || insn.segment_prefix() != iced_x86::Register::None
            || bytes[..n.min(4)].contains(&0x67)
            || len as u64 != size
        {
            return None;
        }
        let plan = RepPlan {
            cr3,
            size,
            movs,
            down: regs.rflags & DF != 0,
            next_ip: insn.next_ip(),
            page: regs.rdi & !0xfff,
            regs: *regs,
            count: 0,
            stopped: false,
        };
        // The exit must be the element just done: [rdi - size] (or + size going down).
        let done_gva = plan.back(regs.rdi);
        if walk::translate(mem, cr3, done_gva).ok()?.gpa != gpa {
            return None;
        }
        Some(plan)
    }

    fn step(&self, v: u64) -> u64 {
        if self.down {
            v.wrapping_sub(self.size)
        } else {
            v.wrapping_add(self.size)
        }
    }

    fn back(&self, v: u64) -> u64 {
        if self.down {
            v.wrapping_add(self.size)
        } else {
            v.wrapping_sub(self.size)
        }
    }

    /// The next element to store, or None when the plan stops (count exhausted, next page, a
    /// straddling element, an untranslatable, read-only or non-user destination, an
    /// unreadable or non-user `movs` source). The caller applies each element before asking for the next:
    /// a `movs` source is read from `mem` as it is at this call.
    pub fn next_element<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Option<RepElement> {
        if self.stopped || self.regs.rcx == 0 {
            return None;
        }
        let element = self.element(mem);
        if element.is_none() {
            self.stopped = true;
        }
        element
    }

    fn element<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Option<RepElement> {
        let len = usize::try_from(self.size).ok()?;
        let dst = self.regs.rdi;
        if dst & !0xfff != self.page || (dst & 0xfff) + self.size > 0x1000 {
            return None; // next page (or a straddling element): back to the CPU
        }
        let t = walk::translate(mem, self.cr3, dst).ok()?;
        if !t.writable
            || !t.user
            || !mem.check_range(GuestAddress(t.gpa), len, Permissions::ReadWrite)
        {
            return None;
        }
        let mut value = [0u8; 8];
        if self.movs {
            // The source must be user-readable (the CPU checks U/S at CPL3; at CPL0 the
            // element is then left to the CPU, which is never wrong).
            let rsi = self.regs.rsi;
            let user = |at: u64| walk::translate(mem, self.cr3, at).is_ok_and(|t| t.user);
            if !user(rsi) || !user(rsi.wrapping_add(self.size - 1)) {
                return None;
            }
            if !walk::read_virt(mem, self.cr3, rsi, &mut value[..len]) {
                return None;
            }
        } else {
            value[..len].copy_from_slice(&self.regs.rax.to_le_bytes()[..len]);
        }
        self.regs.rcx -= 1;
        self.regs.rdi = self.step(self.regs.rdi);
        if self.movs {
            self.regs.rsi = self.step(self.regs.rsi);
        }
        self.count += 1;
        Some(RepElement {
            gpa: t.gpa,
            value,
            len,
        })
    }

    /// The registers to load after the elements yielded, and how many were yielded; None if
    /// none was (leave the instruction to the CPU).
    #[must_use]
    pub fn finish(self) -> Option<(kvm_regs, u64)> {
        if self.count == 0 {
            return None;
        }
        let mut r = self.regs;
        if r.rcx == 0 {
            r.rip = self.next_ip;
        }
        Some((r, self.count))
    }
}

/// What is left of a `rep stos`/`rep movs` at a trapped element: where its destination
/// lies, for a policy that would rather make those frames writable than complete it here
/// (relaxed mode's promotion before a completion). Only `ES:[RDI]` matters, so unlike
/// [`RepPlan`] it takes segment overrides (they name the `movs` source) and 32-bit
/// addressing (EDI and ECX, addresses wrapping at 4 GiB). It decides nothing about the
/// elements themselves: the CPU runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepSpan {
    /// Elements left (RCX, or ECX with an address-size prefix).
    pub elements: u64,
    /// Element size in bytes.
    pub size: u64,
    /// DF=1: the elements go downwards from [`RepSpan::next`].
    pub down: bool,
    /// 32-bit addressing: addresses wrap at 4 GiB.
    pub addr32: bool,
    /// Linear address of the next element (RDI, or EDI).
    pub next: u64,
}

impl RepSpan {
    /// The span of the `rep stos`/`rep movs` at RIP with the registers KVM left at a trapped
    /// element (RCX, RDI after it). None: not 64-bit mode, not a `rep` (F3) string store, or
    /// no element left.
    pub fn at<M: GuestMemory + ?Sized>(mem: &M, sys: &SysCache, regs: &kvm_regs) -> Option<Self> {
        if !sys.long64 {
            return None;
        }
        let mut bytes = [0u8; 15];
        let n = walk::read_virt_prefix(mem, sys.cr3, regs.rip, &mut bytes);
        let insn = Decoder::with_ip(64, &bytes[..n], regs.rip, DecoderOptions::NONE).decode();
        if insn.is_invalid() || !insn.has_rep_prefix() {
            return None;
        }
        let size: u64 = match insn.mnemonic() {
            Mnemonic::Stosb | Mnemonic::Movsb => 1,
            Mnemonic::Stosw | Mnemonic::Movsw => 2,
            Mnemonic::Stosd | Mnemonic::Movsd => 4,
            Mnemonic::Stosq | Mnemonic::Movsq => 8,
            _ => return None,
        };
        let addr32 = match insn.op0_kind() {
            iced_x86::OpKind::MemoryESRDI => false,
            iced_x86::OpKind::MemoryESEDI => true,
            _ => return None,
        };
        let mask = if addr32 { 0xffff_ffff } else { u64::MAX };
        let elements = regs.rcx & mask;
        if elements == 0 {
            return None;
        }
        Some(RepSpan {
            elements,
            size,
            down: regs.rflags & DF != 0,
            addr32,
            next: regs.rdi & mask,
        })
    }

    /// Bytes left to store (saturating).
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.elements.saturating_mul(self.size)
    }

    /// The linear addresses of the pages the elements left will store into, in the order the
    /// CPU reaches them (the next element's page first), at most `max` of them.
    #[must_use]
    pub fn pages(&self, max: usize) -> Vec<u64> {
        let bytes = u128::from(self.elements) * u128::from(self.size);
        let mask: u128 = if self.addr32 {
            0xffff_ffff
        } else {
            u128::from(u64::MAX)
        };
        let next = u128::from(self.next);
        // The byte the CPU stores first (upwards: the element's first byte; downwards: its
        // last) and the distance in pages to the page of the last byte stored.
        let (first, span) = if self.down {
            let top = next + u128::from(self.size) - 1;
            (top, (0xfff - (top & 0xfff)) + bytes - 1)
        } else {
            (next, (next & 0xfff) + bytes - 1)
        };
        let n = usize::try_from((span >> 12) + 1)
            .unwrap_or(usize::MAX)
            .min(max);
        let page = first & !0xfff;
        (0..n as u128)
            .map(|k| {
                let at = if self.down {
                    page.wrapping_sub(k << 12)
                } else {
                    page + (k << 12)
                };
                // Wraps as the CPU's address does (64-bit: modulo 2^64; a32: 2^32).
                u64::try_from(at & mask).unwrap_or(0)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testmem::{CR3, identity, map_4k};
    use crate::walk::pte::{PRESENT, USER, WRITABLE};
    use vm_memory::{Bytes, GuestMemoryMmap};

    const RIP: u64 = 0x1_0000;
    const RW: u64 = PRESENT | WRITABLE | USER;

    fn sys() -> SysCache {
        SysCache {
            cr3: CR3,
            fs_base: 0,
            gs_base: 0,
            long64: true,
        }
    }

    /// Runs the plan as pagetrack-kvm does: each element applied before the next is planned.
    fn run(
        m: &GuestMemoryMmap,
        regs: &kvm_regs,
        gpa: u64,
        len: usize,
    ) -> Option<(Vec<RepElement>, kvm_regs, u64)> {
        let mut plan = RepPlan::new(m, &sys(), regs, gpa, len)?;
        let mut elements = Vec::new();
        while let Some(e) = plan.next_element(m) {
            m.write_slice(e.bytes(), GuestAddress(e.gpa)).unwrap();
            elements.push(e);
        }
        let (regs, count) = plan.finish()?;
        assert_eq!(count, elements.len() as u64);
        Some((elements, regs, count))
    }

    /// `rep stosb` at RIP, RDI 1 past the element KVM just stored at `first`.
    fn stosb(m: &GuestMemoryMmap, first: u64, rcx: u64) -> kvm_regs {
        m.write_slice(&[0xf3, 0xaa], GuestAddress(RIP)).unwrap();
        kvm_regs {
            rip: RIP,
            rdi: first + 1,
            rcx,
            rax: 0x5a,
            rflags: 0x202,
            ..Default::default()
        }
    }

    #[test]
    fn stosb_finishes_within_the_page_and_advances_rip() {
        let m = identity();
        let regs = stosb(&m, 0x8000, 10);
        let (elements, after, count) = run(&m, &regs, 0x8000, 1).unwrap();
        assert_eq!(count, 10);
        let gpas: Vec<u64> = elements.iter().map(|e| e.gpa).collect();
        assert_eq!(gpas, (0x8001..0x800b).collect::<Vec<_>>());
        assert!(elements.iter().all(|e| e.bytes() == [0x5a]));
        assert_eq!((after.rcx, after.rdi, after.rip), (0, 0x800b, RIP + 2));
    }

    #[test]
    fn stosq_stops_at_the_page_boundary_and_leaves_rip() {
        let m = identity();
        // rep stosq (f3 48 ab); the element at 0x8fe8 was just done: 2 more fit in the page.
        m.write_slice(&[0xf3, 0x48, 0xab], GuestAddress(RIP))
            .unwrap();
        let regs = kvm_regs {
            rip: RIP,
            rdi: 0x8ff0,
            rcx: 100,
            rax: 0x1122_3344_5566_7788,
            rflags: 0x202,
            ..Default::default()
        };
        let (elements, after, count) = run(&m, &regs, 0x8fe8, 8).unwrap();
        assert_eq!(count, 2);
        assert_eq!(elements[0].gpa, 0x8ff0);
        assert_eq!(elements[1].gpa, 0x8ff8);
        assert_eq!(elements[1].bytes(), 0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!((after.rcx, after.rdi, after.rip), (98, 0x9000, RIP));
    }

    #[test]
    fn direction_flag_runs_downwards() {
        let m = identity();
        let mut regs = stosb(&m, 0x8005, 3);
        regs.rflags |= DF;
        regs.rdi = 0x8004; // the element at 0x8005 was done going down
        let (elements, after, _) = run(&m, &regs, 0x8005, 1).unwrap();
        let gpas: Vec<u64> = elements.iter().map(|e| e.gpa).collect();
        assert_eq!(gpas, [0x8004, 0x8003, 0x8002]);
        assert_eq!((after.rcx, after.rdi, after.rip), (0, 0x8001, RIP + 2));
    }

    #[test]
    fn overlapping_movsb_reads_what_the_previous_element_stored() {
        let m = identity();
        // rep movsb with RSI = RDI - 1: each element copies the byte just stored, the
        // classic byte-pattern fill. KVM did the first element (0x8000 -> 0x8001).
        m.write_slice(&[0xf3, 0xa4], GuestAddress(RIP)).unwrap();
        m.write_slice(&[0xab, 0xab], GuestAddress(0x8000)).unwrap();
        let regs = kvm_regs {
            rip: RIP,
            rsi: 0x8001,
            rdi: 0x8002,
            rcx: 6,
            rflags: 0x202,
            ..Default::default()
        };
        let (_, after, count) = run(&m, &regs, 0x8001, 1).unwrap();
        assert_eq!(count, 6);
        let mut got = [0u8; 9];
        m.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        assert_eq!(got, [0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0]);
        assert_eq!((after.rsi, after.rdi, after.rcx), (0x8007, 0x8008, 0));
    }

    #[test]
    fn read_only_or_supervisor_destination_is_left_to_the_cpu() {
        let m = identity();
        for flags in [PRESENT | USER, PRESENT | WRITABLE] {
            map_4k(&m, 0x40_0000, 0x10_0000, flags);
            let regs = stosb(&m, 0x40_0000, 5);
            // The exit's own element translates (it only needs to be present)...
            assert!(RepPlan::new(&m, &sys(), &regs, 0x10_0000, 1).is_some());
            // ...but nothing further is stored by pagetrack.
            assert!(run(&m, &regs, 0x10_0000, 1).is_none(), "flags {flags:#x}");
        }
        map_4k(&m, 0x40_0000, 0x10_0000, RW);
        let regs = stosb(&m, 0x40_0000, 5);
        assert_eq!(run(&m, &regs, 0x10_0000, 1).unwrap().2, 5);
    }

    #[test]
    fn unreadable_movs_source_stops_the_plan() {
        let m = identity();
        m.write_slice(&[0xf3, 0xa4], GuestAddress(RIP)).unwrap();
        // Source at 4 MiB + 4 KiB: its page is not mapped.
        let regs = kvm_regs {
            rip: RIP,
            rsi: 0x40_1000,
            rdi: 0x8001,
            rcx: 4,
            rflags: 0x202,
            ..Default::default()
        };
        assert!(run(&m, &regs, 0x8000, 1).is_none());
    }

    /// A `movs` source the CPU would refuse at CPL3 (supervisor-only) is left to the CPU,
    /// which raises the #PF; a user-readable one plans (the control).
    #[test]
    fn supervisor_movs_source_is_left_to_the_cpu() {
        let m = identity();
        m.write_slice(&[0xf3, 0xa4], GuestAddress(RIP)).unwrap();
        m.write_slice(&[0x5e; 8], GuestAddress(0x10_0000)).unwrap();
        let regs = kvm_regs {
            rip: RIP,
            rsi: 0x40_0000,
            rdi: 0x8001,
            rcx: 4,
            rflags: 0x202,
            ..Default::default()
        };
        map_4k(&m, 0x40_0000, 0x10_0000, PRESENT | WRITABLE);
        assert!(
            run(&m, &regs, 0x8000, 1).is_none(),
            "supervisor source copied"
        );
        map_4k(&m, 0x40_0000, 0x10_0000, RW);
        let (elements, _, count) = run(&m, &regs, 0x8000, 1).expect("user source plans");
        assert_eq!(count, 4);
        assert!(elements.iter().all(|e| e.bytes() == [0x5e]));
    }

    #[test]
    fn not_a_plain_rep_store_is_refused() {
        let m = identity();
        let refused = |code: &[u8], len: usize, exit_gpa: u64| {
            m.write_slice(&[0u8; 15], GuestAddress(RIP)).unwrap();
            m.write_slice(code, GuestAddress(RIP)).unwrap();
            let regs = stosb(&m, 0x8000, 4);
            m.write_slice(code, GuestAddress(RIP)).unwrap();
            RepPlan::new(&m, &sys(), &regs, exit_gpa, len).is_none()
        };
        assert!(!refused(&[0xf3, 0xaa], 1, 0x8000), "the control case plans");
        assert!(refused(&[0xaa], 1, 0x8000), "no rep prefix");
        assert!(refused(&[0xf2, 0xaa], 1, 0x8000), "repne");
        assert!(refused(&[0xf3, 0x64, 0xaa], 1, 0x8000), "fs override");
        assert!(refused(&[0x67, 0xf3, 0xaa], 1, 0x8000), "32-bit addressing");
        assert!(refused(&[0xf3, 0xa6], 1, 0x8000), "cmpsb stores nothing");
        assert!(
            refused(&[0xf3, 0xaa], 2, 0x8000),
            "exit size is not the element size"
        );
        assert!(
            refused(&[0xf3, 0xaa], 1, 0x9000),
            "exit is not the element just done"
        );
        let regs = stosb(&m, 0x8000, 0);
        assert!(
            RepPlan::new(&m, &sys(), &regs, 0x8000, 1).is_none(),
            "count done"
        );
        let legacy = SysCache {
            long64: false,
            ..sys()
        };
        let regs = stosb(&m, 0x8000, 4);
        assert!(
            RepPlan::new(&m, &legacy, &regs, 0x8000, 1).is_none(),
            "not 64-bit"
        );
    }
    fn span(code: &[u8], rdi: u64, rcx: u64, rflags: u64) -> Option<RepSpan> {
        let m = identity();
        m.write_slice(&[0u8; 15], GuestAddress(RIP)).unwrap();
        m.write_slice(code, GuestAddress(RIP)).unwrap();
        let regs = kvm_regs {
            rip: RIP,
            rdi,
            rcx,
            rflags,
            ..Default::default()
        };
        RepSpan::at(&m, &sys(), &regs)
    }

    #[test]
    fn span_upwards_covers_the_pages_left_in_order() {
        // rep stosq, 1,000 qwords from 0x8ff8: 8,000 bytes over 0x8000..0xa000 (3 pages).
        let s = span(&[0xf3, 0x48, 0xab], 0x8ff8, 1000, 0x202).unwrap();
        assert_eq!(
            (s.elements, s.size, s.down, s.addr32),
            (1000, 8, false, false)
        );
        assert_eq!(s.bytes(), 8000);
        assert_eq!(s.pages(64), [0x8000, 0x9000, 0xa000]);
        assert_eq!(s.pages(2), [0x8000, 0x9000], "capped");
        // Exactly the rest of one page.
        let s = span(&[0xf3, 0xaa], 0x8ffe, 2, 0x202).unwrap();
        assert_eq!(s.pages(64), [0x8000]);
    }

    #[test]
    fn span_downwards_starts_at_the_next_elements_page() {
        // std; rep stosd from 0x9000 (bytes 0x9000..0x9004) down: 0x402 dwords, the lowest
        // byte 0x9004 - 0x1008 = 0x7ffc.
        let s = span(&[0xf3, 0xab], 0x9000, 0x402, 0x202 | DF).unwrap();
        assert!(s.down);
        assert_eq!(s.pages(64), [0x9000, 0x8000, 0x7000]);
        // One element left, at the top of a page.
        let s = span(&[0xf3, 0xaa], 0x8fff, 1, 0x202 | DF).unwrap();
        assert_eq!(s.pages(64), [0x8000]);
    }

    #[test]
    fn span_with_32_bit_addressing_counts_ecx_and_wraps_at_4_gib() {
        // a32 rep stosb: ECX (the upper half of RCX ignored), EDI, wrapping to 0.
        let s = span(&[0x67, 0xf3, 0xaa], 0x1_ffff_f000, 0x7_0000_2000, 0x202).unwrap();
        assert!(s.addr32);
        assert_eq!((s.elements, s.next), (0x2000, 0xffff_f000));
        assert_eq!(s.pages(64), [0xffff_f000, 0]);
        assert!(
            span(&[0x67, 0xf3, 0xaa], 0x1000, 0x1_0000_0000, 0x202).is_none(),
            "ECX = 0"
        );
    }

    #[test]
    fn span_takes_a_movs_source_override_and_refuses_what_stores_nothing() {
        // fs rep movsb: the override names the source; the destination is ES:RDI.
        let s = span(&[0x64, 0xf3, 0xa4], 0x8000, 0x3000, 0x202).unwrap();
        assert_eq!(s.pages(64), [0x8000, 0x9000, 0xa000]);
        assert!(span(&[0xaa], 0x8000, 10, 0x202).is_none(), "no rep");
        assert!(span(&[0xf2, 0xaa], 0x8000, 10, 0x202).is_none(), "repne");
        assert!(span(&[0xf3, 0xa6], 0x8000, 10, 0x202).is_none(), "cmpsb");
        assert!(span(&[0xf3, 0xac], 0x8000, 10, 0x202).is_none(), "lodsb");
        assert!(
            span(&[0xf3, 0xaa], 0x8000, 0, 0x202).is_none(),
            "nothing left"
        );
    }
}
