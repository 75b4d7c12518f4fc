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
    /// unreadable `movs` source). The caller applies each element before asking for the next:
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
            if !walk::read_virt(mem, self.cr3, self.regs.rsi, &mut value[..len]) {
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
