//! Userspace emulation of guest stores to write-tracked frames.
//!
//! A tracked frame lives in a read-only KVM memslot. Most stores to it exit as `KVM_EXIT_MMIO`,
//! decoded by KVM's own emulator, but some stores stop the vCPU with `KVM_EXIT_INTERNAL_ERROR`
//! (SSE/AVX/AVX-512 stores, `fxsave`, `xsave`, `cmpxchg16b`, `movdir64b`, `movdiri`), and KVM
//! performs locked read-modify-writes as plain, non-atomic writes. This module emulates such a
//! store from the instruction bytes at RIP and the vCPU state.
//!
//! The work is split in two so that the caller can serialise against other vCPUs:
//! 1. [`StorePlan::new`] decodes the instruction, computes the destination's linear address,
//!    checks alignment and translates it. [`StorePlan::targets`] lists the guest-physical ranges
//!    (none crosses a 4 KiB page) that will be read and possibly written: lock their frames.
//! 2. [`StorePlan::execute`] reads the current bytes once, computes the new bytes, registers and
//!    flags from them, advances RIP and returns the writes: apply them, then unlock.
//!
//! [`emulate_store`] does both steps. In 64-bit mode ([`CpuState::legacy`] None) CS/DS/ES/SS
//! have base 0. In 16- and 32-bit modes the bytes are decoded at that size, addresses use the
//! segment bases and wrap at the address size, an operand beyond its segment's limit is
//! refused, RIP wraps at the code size, and only the stores whose format does not depend on
//! the mode are emulated (integer stores and read-modify-writes, vector and x87 value
//! stores); the others are refused.

use kvm_bindings::kvm_regs;

pub use iced_x86::Mnemonic;

pub use crate::plan::StorePlan;
pub use crate::regs::gpr;
pub use crate::xsave::{XSAVE_COMPONENTS, XsaveComponent, XsaveLayout};

/// Vector of the general-protection exception (#GP), raised with error code 0 for a misaligned
/// operand that must be aligned.
pub const GP_VECTOR: u8 = 13;

/// Vector of the invalid-opcode exception (#UD, no error code): `clzero` on a CPU without it.
pub const UD_VECTOR: u8 = 6;

/// Why emulation did not produce a result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EmulateError {
    /// The instruction is not a store this emulator handles (or not a store at all).
    #[error(
        "cannot emulate {} at rip {rip:#x} [{}]: {reason}",
        mnemonic_name(*.mnemonic),
        hex(.bytes)
    )]
    Unsupported {
        /// RIP of the instruction.
        rip: u64,
        /// The instruction's bytes (all bytes given when it did not decode).
        bytes: Vec<u8>,
        /// Decoded mnemonic (`Mnemonic::INVALID` when it did not decode).
        mnemonic: Mnemonic,
        /// What is missing.
        reason: &'static str,
    },
    /// The instruction raises this exception instead of storing (vector 13: #GP(0)); the caller
    /// injects it and leaves RIP unchanged.
    #[error("the instruction raises exception vector {vector}")]
    Fault {
        /// Exception vector.
        vector: u8,
    },
    /// A guest virtual address has no usable translation (for [`CpuAccess`] implementations).
    #[error("no translation for guest virtual address {gva:#x} (write: {write})")]
    PageFault {
        /// The guest virtual address.
        gva: u64,
        /// Whether write access was needed.
        write: bool,
    },
    /// Guest physical memory could not be read (for [`CpuAccess`] implementations).
    #[error("guest physical access of {len} bytes at {gpa:#x} failed")]
    Memory {
        /// The guest physical address.
        gpa: u64,
        /// Length of the access.
        len: usize,
    },
    /// The vCPU state in [`CpuState`] lacks what the instruction needs.
    #[error("vcpu state is missing or malformed: {what}")]
    State {
        /// What is missing.
        what: &'static str,
    },
}

fn mnemonic_name(m: Mnemonic) -> String {
    format!("{m:?}").to_lowercase()
}

/// Bytes as space-separated lowercase hex, for error messages.
pub fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the emulator needs from the vCPU's memory view. Implemented over `KVM_TRANSLATE` and
/// guest memory, and by a fake in tests. Writes are not done through this trait: they are
/// returned in [`Emulated::writes`] for the caller to apply.
pub trait CpuAccess {
    /// Translates `gva` to a guest physical address for a data access (a write when `write`),
    /// failing (e.g. with [`EmulateError::PageFault`]) when the vCPU could not make that access.
    /// Called once per page of an operand; the caller may cache.
    fn translate(&mut self, gva: u64, write: bool) -> Result<u64, EmulateError>;
    /// Reads guest physical memory into `buf`; a request never crosses a 4 KiB page.
    fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), EmulateError>;
}

/// The vCPU state the emulator reads and updates.
#[derive(Debug, Clone, Default)]
pub struct CpuState {
    /// General registers (KVM_GET_REGS); RIP is the instruction's address. Updated by
    /// [`StorePlan::execute`] (RIP always, RFLAGS and GPRs as the instruction does).
    pub regs: kvm_regs,
    /// FS segment base (KVM_GET_SREGS).
    pub fs_base: u64,
    /// GS segment base (KVM_GET_SREGS).
    pub gs_base: u64,
    /// Standard-format XSAVE area from KVM_GET_XSAVE(2): legacy region (XMM n at 160 + 16n),
    /// header at 512, components at their [`XsaveLayout`] offsets. Needed only for vector
    /// stores, `fxsave` and `xsave`.
    pub xsave: Option<Box<[u8]>>,
    /// XCR0 (KVM_GET_XCRS), used by `xsave`.
    pub xcr0: u64,
    /// Where the components live in `xsave` (and in the guest's XSAVE areas).
    pub xsave_layout: XsaveLayout,
    /// GDTR (base, limit), KVM_GET_SREGS; used by `sgdt`.
    pub gdtr: (u64, u16),
    /// IDTR (base, limit), KVM_GET_SREGS; used by `sidt`.
    pub idtr: (u64, u16),
    /// Outside 64-bit mode: the code size and the segments (KVM_GET_SREGS,
    /// [`crate::mode::CpuMode::from_sregs`]). None: 64-bit mode.
    pub legacy: Option<crate::mode::LegacySegments>,
    /// Whether the guest's CPU has CLZERO (CPUID 0x80000008 EBX bit 0 as the guest sees it).
    /// Without it `clzero` raises #UD, as natively.
    pub clzero: bool,
}

/// One guest-physical range an instruction accesses; it never crosses a 4 KiB page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Guest virtual (linear) address.
    pub gva: u64,
    /// Guest physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: usize,
}

/// One store the caller must apply to guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemWrite {
    /// Guest virtual (linear) address.
    pub gva: u64,
    /// Guest physical address; `gpa..gpa + new.len()` never crosses a 4 KiB page.
    pub gpa: u64,
    /// The bytes read before the store (the value the result was computed from).
    pub old: Vec<u8>,
    /// The bytes to store (may equal `old`: it is still a store).
    pub new: Vec<u8>,
}

/// Result of an emulated instruction.
#[derive(Debug, Clone, PartialEq)]
pub struct Emulated {
    /// Stores to apply, in memory order; empty for a failed compare-exchange.
    pub writes: Vec<MemWrite>,
    /// Whether a GPR or RFLAGS changed. RIP always advances, so the caller must write the
    /// registers back (KVM_SET_REGS) in any case.
    pub regs_changed: bool,
    /// Instruction length in bytes (RIP advanced by this much).
    pub len: usize,
    /// The emulated instruction's mnemonic.
    pub mnemonic: Mnemonic,
    /// A read-modify-write that the guest expects to be atomic (`lock` prefix or `xchg`): the
    /// frames of [`StorePlan::targets`] must stay locked from the read to the applied write.
    pub locked: bool,
    /// The whole XSAVE area (KVM_SET_XSAVE format) after the instruction, when it changed
    /// x87, MMX or SSE state (an x87 pop, status flags, MXCSR flags); None when unchanged.
    pub xsave: Option<Box<[u8]>>,
}

/// Emulates the store instruction `insn_bytes` (the bytes at RIP, up to 15) on `state`: decodes,
/// translates, reads the current destination bytes once, computes the result and advances RIP.
/// Equivalent to [`StorePlan::new`] followed by [`StorePlan::execute`].
pub fn emulate_store<C: CpuAccess + ?Sized>(
    state: &mut CpuState,
    insn_bytes: &[u8],
    cpu: &mut C,
) -> Result<Emulated, EmulateError> {
    StorePlan::new(state, insn_bytes, cpu)?.execute(state, cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alu::{AF, AluOp, CF, OF, PF, SF, STATUS_FLAGS, ZF, alu};
    use crate::bytes::read_le;
    use crate::plan::{MAX_INSN_LEN, PAGE_SIZE};
    use iced_x86::IcedError;
    use iced_x86::code_asm::*;
    use kvm_bindings::kvm_cpuid_entry2;
    use std::collections::HashMap;

    const RIP: u64 = 0x40_1000;
    const BUF: u64 = 0x7000;

    /// Guest memory with an optional page remapping (gva page -> gpa page; identity otherwise).
    #[derive(Default)]
    struct Fake {
        mem: HashMap<u64, u8>,
        map: HashMap<u64, u64>,
        reads: usize,
    }

    impl Fake {
        fn gpa(&self, gva: u64) -> u64 {
            let page = gva & !(PAGE_SIZE - 1);
            self.map.get(&page).copied().unwrap_or(page) | (gva & (PAGE_SIZE - 1))
        }
    }

    fn same_page(gpa: u64, len: usize) -> bool {
        gpa / PAGE_SIZE == (gpa + len as u64 - 1) / PAGE_SIZE
    }

    impl CpuAccess for Fake {
        fn translate(&mut self, gva: u64, _write: bool) -> Result<u64, EmulateError> {
            Ok(self.gpa(gva))
        }
        fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), EmulateError> {
            assert!(same_page(gpa, buf.len()));
            self.reads += 1;
            for (i, b) in buf.iter_mut().enumerate() {
                *b = self.mem.get(&(gpa + i as u64)).copied().unwrap_or(0);
            }
            Ok(())
        }
    }

    fn asm(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
        let mut a = CodeAssembler::new(64).unwrap();
        f(&mut a).unwrap();
        a.assemble(RIP).unwrap()
    }

    /// A vCPU state and its memory.
    struct Rig {
        s: CpuState,
        m: Fake,
    }

    impl Rig {
        fn new() -> Self {
            let mut s = CpuState::default();
            s.regs.rflags = 0x202;
            s.regs.rdi = BUF;
            Rig {
                s,
                m: Fake::default(),
            }
        }

        /// With an XSAVE area whose every byte is `area(offset, 1)`, all of XCR0 0xe7 in use.
        fn vector() -> Self {
            let mut r = Rig::new();
            let mut xsave = area(0, 4096);
            xsave[512..520].copy_from_slice(&0xe7u64.to_le_bytes());
            r.s.xsave = Some(xsave.into_boxed_slice());
            r.s.xsave_layout = XsaveLayout::typical();
            r.s.xcr0 = 0xe7;
            r
        }

        /// Emulates at RIP; on success checks RIP and applies the writes, on error checks that
        /// RIP did not move.
        fn exec(&mut self, bytes: &[u8]) -> Result<Emulated, EmulateError> {
            self.s.regs.rip = RIP;
            let result = emulate_store(&mut self.s, bytes, &mut self.m);
            match &result {
                Ok(out) => {
                    assert_eq!(out.len, bytes.len());
                    assert_eq!(self.s.regs.rip, RIP + bytes.len() as u64);
                    for w in &out.writes {
                        assert!(same_page(w.gpa, w.new.len()) && w.old.len() == w.new.len());
                        for (i, b) in w.new.iter().enumerate() {
                            self.m.mem.insert(w.gpa + i as u64, *b);
                        }
                    }
                }
                Err(_) => assert_eq!(self.s.regs.rip, RIP),
            }
            result
        }

        fn run(&mut self, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Emulated {
            self.exec(&asm(f)).unwrap()
        }

        fn err(
            &mut self,
            f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
        ) -> EmulateError {
            self.exec(&asm(f)).unwrap_err()
        }

        fn put(&mut self, gva: u64, bytes: &[u8]) {
            for (i, b) in bytes.iter().enumerate() {
                let gpa = self.m.gpa(gva + i as u64);
                self.m.mem.insert(gpa, *b);
            }
        }

        fn get(&self, gva: u64, len: usize) -> Vec<u8> {
            let byte = |i| self.m.mem.get(&self.m.gpa(gva + i)).copied().unwrap_or(0);
            (0..len as u64).map(byte).collect()
        }

        fn get_u64(&self, gva: u64, len: usize) -> u64 {
            read_le(&self.get(gva, len))
        }

        fn flags(&self) -> u64 {
            self.s.regs.rflags & STATUS_FLAGS
        }
    }

    /// Bytes of the XSAVE area built by `Rig::vector`.
    fn area(offset: usize, len: usize) -> Vec<u8> {
        (offset..offset + len)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect()
    }

    const GP: EmulateError = EmulateError::Fault { vector: GP_VECTOR };

    fn reason(e: EmulateError) -> &'static str {
        match e {
            EmulateError::Unsupported { reason, .. } => reason,
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }

    #[test]
    fn plain_stores_all_sizes() {
        let mut r = Rig::new();
        (r.s.regs.rax, r.s.regs.rcx) = (0x1234, 0xbeef);
        (r.s.regs.rdx, r.s.regs.rbx) = (0x1122_3344_5566_7788, 0xdead_beef_cafe_f00d);
        let out = r.run(|a| a.mov(byte_ptr(rdi), ah));
        assert!(!out.regs_changed && !out.locked && out.mnemonic == Mnemonic::Mov);
        assert_eq!(r.get(BUF, 1), [0x12]);
        r.run(|a| a.mov(word_ptr(rdi + 8), cx));
        assert_eq!(r.get_u64(BUF + 8, 2), 0xbeef);
        r.s.regs.rcx = 2;
        r.run(|a| a.mov(qword_ptr(rdi + rcx * 8 + 0x10), rdx));
        assert_eq!(r.get_u64(BUF + 0x20, 8), 0x1122_3344_5566_7788);
        r.run(|a| a.mov(dword_ptr(rdi + 0x30), ebx));
        assert_eq!(r.get_u64(BUF + 0x30, 8), 0xcafe_f00d);
        let out = r.run(|a| a.mov(qword_ptr(rdi + 0x40), -5));
        assert_eq!(
            (&out.writes[0].old[..], &out.writes[0].new[..]),
            (&[0; 8][..], &(-5i64).to_le_bytes()[..])
        );
        r.run(|a| a.mov(byte_ptr(rdi + 0x48), 0x99));
        assert_eq!(r.get(BUF + 0x48, 2), [0x99, 0]);
        r.run(|a| a.movnti(qword_ptr(rdi + 0x50), rbx));
        assert_eq!(r.get_u64(BUF + 0x50, 8), 0xdead_beef_cafe_f00d);
        r.run(|a| a.movdiri(dword_ptr(rdi + 0x58), ebx));
        assert_eq!(r.get_u64(BUF + 0x58, 8), 0xcafe_f00d);
        let out = r.run(|a| a.movdiri(qword_ptr(rdi + 0x60), rbx));
        assert_eq!(out.mnemonic, Mnemonic::Movdiri);
        assert_eq!(r.get_u64(BUF + 0x60, 8), 0xdead_beef_cafe_f00d);
        // mov [moffs64], rax
        let bytes = [&[0x48, 0xa3][..], &(BUF + 0x68).to_le_bytes()].concat();
        r.exec(&bytes).unwrap();
        assert_eq!(r.get_u64(BUF + 0x68, 8), 0x1234);
        assert_eq!(r.s.regs.rflags, 0x202);
    }

    #[test]
    fn address_forms() {
        let mut r = Rig::new();
        (r.s.regs.rax, r.s.fs_base, r.s.gs_base) = (0xabcd, 0x10_0000, 0x20_0000);
        r.run(|a| a.mov(qword_ptr(rdi + 8).fs(), rax));
        assert_eq!(r.get_u64(0x10_0000 + BUF + 8, 8), 0xabcd);
        r.run(|a| a.mov(word_ptr(rdi).gs(), ax));
        assert_eq!(r.get_u64(0x20_0000 + BUF, 8), 0xabcd);
        // A 32-bit address size truncates the effective address.
        r.s.regs.rsi = 0x1_0000_3000;
        let out = r.run(|a| a.mov(dword_ptr(esi + 0x10), eax));
        assert_eq!(out.writes[0].gva, 0x3010);
        // RIP-relative: relative to the next instruction.
        let bytes = asm(|a| {
            let mut l = a.create_label();
            a.mov(qword_ptr(l), rax)?;
            a.set_label(&mut l)?;
            a.db(&[0; 8])
        });
        let out = r.exec(&bytes[..7]).unwrap();
        assert_eq!(out.writes[0].gva, RIP + 7);
    }

    #[test]
    fn lock_xadd() {
        let mut r = Rig::new();
        r.put(BUF, &[0x7f]);
        r.s.regs.rax = 0x1101;
        let out = r.run(|a| a.lock().xadd(byte_ptr(rdi), al));
        assert!(out.locked && out.regs_changed);
        assert_eq!(
            (r.get(BUF, 1), r.s.regs.rax, r.flags()),
            (vec![0x80], 0x117f, OF | SF | AF)
        );
        r.put(BUF, &5u32.to_le_bytes());
        r.s.regs.rcx = 0xffff_ffff_ffff_fffb;
        r.run(|a| a.lock().xadd(dword_ptr(rdi), ecx));
        assert_eq!(r.get_u64(BUF, 4), 0);
        assert_eq!(r.s.regs.rcx, 5, "a 32-bit register write zero-extends");
        assert_eq!(r.flags(), CF | ZF | PF | AF);
        r.put(BUF, &40u64.to_le_bytes());
        r.s.regs.rdx = 2;
        let out = r.run(|a| a.lock().xadd(qword_ptr(rdi), rdx));
        assert_eq!(out.writes[0].old, 40u64.to_le_bytes());
        assert_eq!((r.get_u64(BUF, 8), r.s.regs.rdx), (42, 40));
    }

    #[test]
    fn lock_cmpxchg_success_and_failure() {
        let mut r = Rig::new();
        r.put(BUF, &10u64.to_le_bytes());
        (r.s.regs.rax, r.s.regs.rcx) = (10, 42);
        let bytes = asm(|a| a.lock().cmpxchg(qword_ptr(rdi), rcx));
        assert_eq!(r.exec(&bytes).unwrap().writes.len(), 1);
        assert_eq!(
            (r.get_u64(BUF, 8), r.s.regs.rax, r.flags()),
            (42, 10, ZF | PF)
        );
        // Failure: no write at all, the accumulator gets the current value, flags as cmp.
        let out = r.exec(&bytes).unwrap();
        assert!(out.writes.is_empty() && out.regs_changed && out.locked);
        assert_eq!(
            (r.s.regs.rax, r.flags()),
            (42, alu(AluOp::Sub, 8, 10, 42, 0).1)
        );
        // A 32-bit failure zero-extends RAX; a 32-bit success leaves it alone.
        r.put(BUF, &2u32.to_le_bytes());
        r.s.regs.rax = 0xdead_beef_0000_0001;
        let bytes = asm(|a| a.lock().cmpxchg(dword_ptr(rdi), ecx));
        assert!(r.exec(&bytes).unwrap().writes.is_empty());
        assert_eq!(r.s.regs.rax, 2);
        r.s.regs.rax = 0xdead_beef_0000_0002;
        assert_eq!(r.exec(&bytes).unwrap().writes.len(), 1);
        assert_eq!(
            (r.s.regs.rax, r.get_u64(BUF, 4)),
            (0xdead_beef_0000_0002, 42)
        );
        // 8 bits, high-byte source.
        r.put(BUF, &[7]);
        r.s.regs.rax = 0x07;
        r.run(|a| a.cmpxchg(byte_ptr(rdi), ah));
        assert_eq!((r.get(BUF, 1), r.flags()), (vec![0], ZF | PF));
    }

    #[test]
    fn cmpxchg8b_and_16b() {
        let mut r = Rig::new();
        r.put(BUF, &0x2222_2222_1111_1111u64.to_le_bytes());
        (r.s.regs.rax, r.s.regs.rdx) = (0xffff_ffff_1111_1111, 0x2222_2222);
        (r.s.regs.rbx, r.s.regs.rcx) = (0x3333_3333, 0x4444_4444);
        let b8 = asm(|a| a.lock().cmpxchg8b(qword_ptr(rdi)));
        assert_eq!(r.exec(&b8).unwrap().writes.len(), 1);
        assert_eq!((r.get_u64(BUF, 8), r.flags()), (0x4444_4444_3333_3333, ZF));
        assert!(r.exec(&b8).unwrap().writes.is_empty());
        assert_eq!(
            (r.s.regs.rax, r.s.regs.rdx, r.flags()),
            (0x3333_3333, 0x4444_4444, 0)
        );

        r.put(BUF + 0x40, &[1, 0, 0, 0, 0, 0, 0, 0, 2]);
        r.s.regs.rdi = BUF + 0x40;
        (r.s.regs.rax, r.s.regs.rdx, r.s.regs.rbx, r.s.regs.rcx) = (1, 2, 5, 6);
        let b16 = asm(|a| a.lock().cmpxchg16b(xmmword_ptr(rdi)));
        assert_eq!(r.exec(&b16).unwrap().mnemonic, Mnemonic::Cmpxchg16b);
        assert_eq!(
            (
                r.get_u64(BUF + 0x40, 8),
                r.get_u64(BUF + 0x48, 8),
                r.flags()
            ),
            (5, 6, ZF)
        );
        assert!(r.exec(&b16).unwrap().writes.is_empty());
        assert_eq!((r.s.regs.rax, r.s.regs.rdx, r.flags()), (5, 6, 0));
        r.s.regs.rdi = BUF + 8;
        assert_eq!(r.exec(&b16).unwrap_err(), GP);
    }

    #[test]
    fn xchg_with_memory() {
        let mut r = Rig::new();
        r.put(BUF, &0x1122_3344u32.to_le_bytes());
        r.s.regs.rbx = 0xffff_ffff_5566_7788;
        let out = r.run(|a| a.xchg(dword_ptr(rdi), ebx));
        assert!(out.locked, "xchg with memory is implicitly locked");
        assert_eq!(
            (r.get_u64(BUF, 4), r.s.regs.rbx),
            (0x5566_7788, 0x1122_3344)
        );
        r.s.regs.rcx = 0xaabb;
        r.run(|a| a.xchg(byte_ptr(rdi), ch));
        assert_eq!((r.get(BUF, 1), r.s.regs.rcx), (vec![0xaa], 0x88bb));
    }

    #[test]
    fn locked_arithmetic() {
        let mut r = Rig::new();
        let step = |r: &mut Rig, old: u64, size: usize, bytes: Vec<u8>, cf_in: bool| {
            r.put(BUF, &old.to_le_bytes()[..size]);
            r.s.regs.rflags = 0x202 | u64::from(cf_in);
            r.exec(&bytes).unwrap();
            (r.get_u64(BUF, size), r.flags())
        };
        r.s.regs.rax = 0x10;
        #[rustfmt::skip]
        let cases = [
            (asm(|a| a.lock().sub(byte_ptr(rdi), 1)), 0, 1, false, 0xff, CF | SF | AF | PF),
            (asm(|a| a.lock().add(dword_ptr(rdi), eax)), 0x7fff_fff0, 4, false, 1 << 31, OF | SF | PF),
            (asm(|a| a.lock().adc(qword_ptr(rdi), rax)), 1, 8, true, 0x12, PF),
            (asm(|a| a.lock().sbb(word_ptr(rdi), 1)), 2, 2, true, 0, ZF | PF),
            (asm(|a| a.lock().and(qword_ptr(rdi), -0x100)), 0x1234, 8, true, 0x1200, PF),
            (asm(|a| a.lock().or(byte_ptr(rdi), 0x80)), 1, 1, false, 0x81, SF | PF),
            (asm(|a| a.lock().xor(dword_ptr(rdi), 0x0f)), 0x0f, 4, false, 0, ZF | PF),
            // inc/dec keep CF; not changes no flags; neg sets CF unless the operand is 0.
            (asm(|a| a.lock().inc(byte_ptr(rdi))), 0xff, 1, true, 0, CF | ZF | AF | PF),
            (asm(|a| a.lock().dec(qword_ptr(rdi))), 0, 8, false, u64::MAX, SF | AF | PF),
            (asm(|a| a.lock().not(word_ptr(rdi))), 0xff, 2, true, 0xff00, CF),
            (asm(|a| a.lock().neg(dword_ptr(rdi))), 5, 4, false, 0xffff_fffb, CF | SF | AF),
            (asm(|a| a.lock().neg(dword_ptr(rdi))), 0, 4, true, 0, ZF | PF),
            (asm(|a| a.lock().neg(dword_ptr(rdi))), 1 << 31, 4, false, 1 << 31, CF | OF | SF | PF),
        ];
        for (bytes, old, size, cf_in, want, flags) in cases {
            assert_eq!(
                step(&mut r, old, size, bytes, cf_in),
                (want, flags),
                "{old:#x}"
            );
        }
    }

    #[test]
    fn bit_string_operations() {
        let mut r = Rig::new();
        // Immediate form: the offset is taken modulo the operand size.
        assert!(r.run(|a| a.lock().bts(dword_ptr(rdi), 35)).locked);
        assert_eq!((r.get_u64(BUF, 4), r.flags()), (8, 0));
        r.run(|a| a.lock().btc(dword_ptr(rdi), 3));
        assert_eq!((r.get_u64(BUF, 4), r.flags()), (0, CF));
        // Register form: the signed offset selects another unit.
        r.s.regs.rax = 70;
        assert_eq!(
            r.run(|a| a.lock().bts(qword_ptr(rdi), rax)).writes[0].gva,
            BUF + 8
        );
        assert_eq!(r.get_u64(BUF + 8, 8), 0x40);
        r.s.regs.rax = u64::MAX; // -1: bit 63 of the qword below
        r.put(BUF - 8, &u64::MAX.to_le_bytes());
        assert_eq!(
            r.run(|a| a.lock().btr(qword_ptr(rdi), rax)).writes[0].gva,
            BUF - 8
        );
        assert_eq!((r.get_u64(BUF - 8, 8), r.flags()), (u64::MAX >> 1, CF));
        r.s.regs.rax = 0x1234_fff0; // 16-bit offset -16: bit 0 of the word below
        r.put(BUF - 2, &[0xfe, 0x7f]);
        assert_eq!(
            r.run(|a| a.lock().bts(word_ptr(rdi), ax)).writes[0].gva,
            BUF - 2
        );
        assert_eq!((r.get_u64(BUF - 2, 2), r.flags()), (0x7fff, 0));
        r.s.regs.rcx = 0x8000_0000; // the most negative 32-bit offset
        let out = r.run(|a| a.bts(dword_ptr(rdi), ecx));
        assert_eq!(out.writes[0].gva, BUF.wrapping_sub(0x1000_0000));
    }

    #[test]
    fn stores_straddling_pages_are_split() {
        let mut r = Rig::new();
        r.m.map.extend([(0x2000, 0x9000), (0x3000, 0x5000)]);
        (r.s.regs.rdi, r.s.regs.rax) = (0x2ffd, 0x0807_0605_0403_0201);
        let bytes = asm(|a| a.mov(qword_ptr(rdi), rax));
        let plan = StorePlan::new(&r.s, &bytes, &mut r.m).unwrap();
        assert_eq!(
            (r.m.reads, plan.insn_len(), plan.mnemonic()),
            (0, 3, Mnemonic::Mov)
        );
        let targets: Vec<_> = plan.targets().collect();
        let t = |gva, gpa, len| Target { gva, gpa, len };
        assert_eq!(targets, [t(0x2ffd, 0x9ffd, 3), t(0x3000, 0x5000, 5)]);
        let out = plan.execute(&mut r.s, &mut r.m).unwrap();
        assert_eq!(r.m.reads, 2);
        let writes: Vec<_> = out.writes.iter().map(|w| (w.gpa, w.new.clone())).collect();
        assert_eq!(
            writes,
            [(0x9ffd, vec![1, 2, 3]), (0x5000, vec![4, 5, 6, 7, 8])]
        );
        // A split-locked read-modify-write computes on the whole value.
        r.put(0x2ffd, &0x0807_0605_0403_0201u64.to_le_bytes());
        r.s.regs.rax = 0xff;
        assert_eq!(
            r.run(|a| a.lock().xadd(qword_ptr(rdi), rax)).writes.len(),
            2
        );
        assert_eq!(r.get_u64(0x2ffd, 8), 0x0807_0605_0403_0300);
        assert_eq!(r.s.regs.rax, 0x0807_0605_0403_0201);
    }

    #[test]
    fn vector_stores() {
        let mut r = Rig::vector();
        let b = asm(|a| a.movq(qword_ptr(rdi), xmm3));
        assert_eq!(b[..3], [0x66, 0x0f, 0xd6]);
        let y5 = [area(240, 16), area(576 + 80, 16)].concat();
        let z4 = [area(224, 16), area(576 + 64, 16), area(1152 + 128, 32)].concat();
        let cases = [
            (b, area(160 + 48, 8)),
            (asm(|a| a.movdqu(xmmword_ptr(rdi), xmm15)), area(400, 16)),
            (asm(|a| a.movaps(xmmword_ptr(rdi), xmm1)), area(176, 16)),
            (asm(|a| a.movntdq(xmmword_ptr(rdi), xmm2)), area(192, 16)),
            (asm(|a| a.movhps(qword_ptr(rdi), xmm2)), area(200, 8)),
            (asm(|a| a.movd(dword_ptr(rdi), xmm4)), area(224, 4)),
            (asm(|a| a.vmovsd(qword_ptr(rdi), xmm5)), area(240, 8)),
            (asm(|a| a.vmovdqu(ymmword_ptr(rdi), ymm5)), y5.clone()),
            (asm(|a| a.vmovdqa(ymmword_ptr(rdi), ymm5)), y5),
            (asm(|a| a.vmovdqu64(zmmword_ptr(rdi), zmm4)), z4.clone()),
            (asm(|a| a.vmovdqa64(zmmword_ptr(rdi), zmm4)), z4),
            (
                asm(|a| a.vmovdqu8(zmmword_ptr(rdi), zmm17)),
                area(1664 + 64, 64),
            ),
            (
                asm(|a| a.vmovdqu64(ymmword_ptr(rdi), ymm16)),
                area(1664, 32),
            ),
            (
                asm(|a| a.vmovdqu32(xmmword_ptr(rdi), xmm31)),
                area(1664 + 960, 16),
            ),
        ];
        for (bytes, want) in cases {
            let out = r.exec(&bytes).unwrap();
            assert!(!out.regs_changed);
            assert_eq!(r.get(BUF, want.len()), want, "{:?}", out.mnemonic);
            assert_eq!(
                out.writes.iter().map(|w| w.new.len()).sum::<usize>(),
                want.len()
            );
        }
        // A component in its initial state (XSTATE_BV bit clear) reads as zeros.
        r.s.xsave.as_mut().unwrap()[512] = 0x03;
        r.run(|a| a.vmovdqu(ymmword_ptr(rdi), ymm1));
        assert_eq!(r.get(BUF, 32), [area(176, 16), vec![0; 16]].concat());
    }

    #[test]
    fn clzero_zeroes_the_line_only_where_the_cpu_has_it() {
        let mut r = Rig::new();
        r.put(BUF, &[0xaa; 128]);
        r.s.regs.rax = BUF + 64 + 13;
        let ud = EmulateError::Fault { vector: UD_VECTOR };
        assert_eq!(r.exec(&[0x0f, 0x01, 0xfc]).unwrap_err(), ud);
        assert_eq!(r.get(BUF, 128), vec![0xaa; 128], "nothing stored");
        r.s.clzero = true;
        let out = r.exec(&[0x0f, 0x01, 0xfc]).unwrap();
        assert_eq!(out.writes.len(), 1);
        assert_eq!(out.writes[0].gva, BUF + 64, "the aligned line");
        assert_eq!(out.writes[0].old, vec![0xaa; 64]);
        assert_eq!(r.get(BUF, 128), [vec![0xaa; 64], vec![0; 64]].concat());
        // 32-bit address size: the low half of RAX.
        r.s.regs.rax = BUF | 0xffff_ffff_0000_0000;
        let out = r.exec(&[0x67, 0x0f, 0x01, 0xfc]).unwrap();
        assert_eq!(out.writes[0].gva, BUF);
    }

    #[test]
    fn vector_store_errors() {
        let mut r = Rig::vector();
        r.s.regs.rdi = BUF + 8;
        assert_eq!(r.err(|a| a.movaps(xmmword_ptr(rdi), xmm1)), GP);
        assert_eq!(r.err(|a| a.vmovdqa(ymmword_ptr(rdi), ymm1)), GP);
        assert_eq!(r.err(|a| a.vmovntdq(zmmword_ptr(rdi), zmm1)), GP);
        r.s.regs.rdi = BUF;
        r.s.xsave = None;
        let err = r.err(|a| a.movq(qword_ptr(rdi), xmm1));
        assert!(matches!(err, EmulateError::State { .. }));
        assert!(r.m.mem.is_empty());
        let mut r = Rig::vector();
        r.s.regs.rdi = BUF;
        // An MMX store: mm1 is physical register 1 (ST1 at TOP = 0); all tags become valid.
        let out = r.run(|a| a.movq(qword_ptr(rdi), mm1));
        assert_eq!(out.writes[0].new, (48..56).collect::<Vec<u8>>());
        assert_eq!(out.xsave.as_ref().map(|x| x[4]), Some(0xff));
    }

    #[test]
    fn fxsave_formats() {
        let mut r = Rig::vector();
        r.put(BUF, &[0xaa; 512]);
        assert_eq!(r.run(|a| a.fxsave64(ptr(rdi))).writes.len(), 1);
        assert_eq!(r.get(BUF, 416), area(0, 416));
        assert_eq!(
            r.get(BUF + 416, 96),
            [0xaa; 96],
            "bytes 416..512 are not written"
        );
        // Without REX.W the FPU IP/DP are 32-bit offsets followed by (deprecated) selectors.
        r.put(BUF, &[0xaa; 512]);
        r.run(|a| a.fxsave(ptr(rdi)));
        let mut want = area(0, 416);
        want[12..16].fill(0);
        want[20..24].fill(0);
        assert_eq!(r.get(BUF, 416), want);
        r.s.regs.rdi = BUF + 8;
        assert_eq!(r.err(|a| a.fxsave64(ptr(rdi))), GP);
    }

    #[test]
    fn xsave_full_and_partial() {
        let mut r = Rig::vector();
        // KVM says ZMM_Hi256 and Hi16_ZMM are in their initial state.
        r.s.xsave.as_mut().unwrap()[512..520].copy_from_slice(&0x27u64.to_le_bytes());
        r.put(BUF, &[0xaa; 3072]);
        r.put(BUF + 512, &0x308u64.to_le_bytes()); // MPX + PKRU bits of an earlier save
        (r.s.regs.rax, r.s.regs.rdx) = (u64::MAX, u64::MAX);
        let out = r.run(|a| a.xsave64(ptr(rdi)));
        let total: usize = out.writes.iter().map(|w| w.new.len()).sum();
        assert_eq!(total, 416 + 8 + 256 + 64 + 512 + 1024);
        assert_eq!(r.get(BUF, 416), area(0, 416));
        assert_eq!(
            r.get(BUF + 416, 96),
            [0xaa; 96],
            "bytes 416..512 are not written"
        );
        assert_eq!(r.get_u64(BUF + 512, 8), 0x308 | 0x27, "XSTATE_BV merged");
        assert_eq!(
            r.get(BUF + 520, 56),
            [0xaa; 56],
            "rest of the header untouched"
        );
        assert_eq!(r.get(BUF + 576, 256), area(576, 256));
        assert_eq!(r.get(BUF + 960, 128), [0xaa; 128], "MPX not requested");
        assert_eq!(r.get(BUF + 1088, 64), area(1088, 64));
        assert_eq!(
            r.get(BUF + 1152, 1536),
            [0; 1536],
            "initial components save as zeros"
        );
        assert_eq!(r.get(BUF + 2688, 8), [0xaa; 8], "PKRU not in XCR0");
        // AVX only: MXCSR goes with it, x87 and XMM registers do not.
        r.put(BUF, &[0xbb; 3072]);
        (r.s.regs.rax, r.s.regs.rdx) = (0b100, 0);
        let out = r.run(|a| a.xsave(ptr(rdi)));
        let ranges: Vec<_> = out
            .writes
            .iter()
            .map(|w| (w.gva - BUF, w.new.len()))
            .collect();
        assert_eq!(ranges, [(24, 8), (512, 8), (576, 256)]);
        assert_eq!(r.get(BUF + 24, 8), area(24, 8));
        assert_eq!(r.get_u64(BUF + 512, 8), 0xbbbb_bbbb_bbbb_bbbf);
        // x87 only, without REX.W.
        (r.s.regs.rax, r.s.regs.rdx) = (1, 0);
        r.run(|a| a.xsaveopt(ptr(rdi)));
        let mut want = area(0, 24);
        want[12..16].fill(0);
        want[20..24].fill(0);
        assert_eq!(r.get(BUF, 24), want);
        assert_eq!(r.get(BUF + 32, 128), area(32, 128));
        assert_eq!(r.get(BUF + 160, 16), [0xbb; 16]);
        // Alignment and unknown components.
        r.s.regs.rdi = BUF + 32;
        assert_eq!(r.err(|a| a.xsave(ptr(rdi))), GP);
        r.s.regs.rdi = BUF;
        (r.s.xcr0, r.s.regs.rax, r.s.regs.rdx) = (0x6_0007, u64::MAX, u64::MAX);
        let err = r.err(|a| a.xsave(ptr(rdi)));
        assert_eq!(reason(err), "xsave of a state component beyond pkru");
    }

    #[test]
    fn xsave_layout_from_cpuid() {
        let entry = |function, index, size, offset| kvm_cpuid_entry2 {
            function,
            index,
            eax: size,
            ebx: offset,
            ..Default::default()
        };
        let layout = XsaveLayout::from_cpuid(&[
            entry(0xd, 0, 2696, 2696),
            entry(0xd, 2, 256, 576),
            entry(0xd, 8, 128, 0),
            entry(0xd, 9, 8, 2688),
            entry(7, 3, 1, 1000),
        ]);
        assert_eq!(
            layout.components[2],
            XsaveComponent {
                offset: 576,
                size: 256,
                align: false
            }
        );
        assert_eq!(
            layout.components[9],
            XsaveComponent {
                offset: 2688,
                size: 8,
                align: false
            }
        );
        assert_eq!(
            (layout.range(8), layout.range(3), layout.range(0)),
            (None, None, None)
        );
        assert_eq!(XsaveLayout::typical().range(7), Some((1664, 1024)));
    }

    #[test]
    fn movdir64b_copies_64_bytes() {
        let mut r = Rig::new();
        let src: Vec<u8> = (0..64).collect();
        r.put(0x5ff0, &src);
        (r.s.regs.rsi, r.s.regs.rax) = (0x5ff0, BUF + 0x40);
        let out = r.run(|a| a.movdir64b(rax, zmmword_ptr(rsi)));
        assert_eq!((out.mnemonic, out.writes.len()), (Mnemonic::Movdir64b, 1));
        assert_eq!(r.get(BUF + 0x40, 64), src);
        r.s.regs.rax = BUF + 0x48;
        assert_eq!(r.err(|a| a.movdir64b(rax, zmmword_ptr(rsi))), GP);
    }

    #[test]
    fn unsupported_instructions() {
        let mut r = Rig::new();
        for bytes in [
            &[0xf3, 0x48, 0xab][..], // rep stosq
            &[0xa4],                 // movsb
            &[0x50],                 // push rax
            &[0x48, 0x8b, 0x07],     // mov rax, [rdi]
            &[0x48, 0x39, 0x07],     // cmp [rdi], rax
            &[0x8c, 0x07],           // mov [rdi], es
            &[0xd1, 0x27],           // shl dword [rdi], 1
            &[0x0f, 0xc7, 0x2f],     // xsaves [rdi]
            &[0x06],                 // invalid in 64-bit mode
            &[0x48],                 // truncated
            &[],
        ] {
            let err = r.exec(bytes).unwrap_err();
            assert!(
                matches!(err, EmulateError::Unsupported { .. }),
                "{bytes:02x?}: {err}"
            );
        }
        let err = r.exec(&[0xf3, 0x48, 0xab, 0x90]).unwrap_err();
        let text = "cannot emulate stosq at rip 0x401000 [f3 48 ab]: not a supported store";
        assert_eq!(err.to_string(), text);
        let err = r.exec(&[0x06, 0x90]).unwrap_err().to_string();
        assert!(
            err.contains("rip 0x401000 [06 90]: the bytes do not decode"),
            "{err}"
        );
    }

    #[test]
    fn errors_leave_state_unchanged() {
        struct Failing;
        impl CpuAccess for Failing {
            fn translate(&mut self, gva: u64, _: bool) -> Result<u64, EmulateError> {
                Ok(gva)
            }
            fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), EmulateError> {
                Err(EmulateError::Memory {
                    gpa,
                    len: buf.len(),
                })
            }
        }
        let mut s = Rig::new().s;
        s.regs.rax = 1;
        let before = s.regs;
        let bytes = asm(|a| a.lock().xadd(qword_ptr(rdi), rax));
        let err = emulate_store(&mut s, &bytes, &mut Failing).unwrap_err();
        assert_eq!(err, EmulateError::Memory { gpa: BUF, len: 8 });
        assert_eq!(s.regs, before);
    }

    fn real_mode_rig() -> Rig {
        let mut r = Rig::vector();
        let mut s = kvm_bindings::kvm_sregs::default();
        crate::boot::load_real_mode_sregs(&mut s);
        s.ds.base = 0x9000;
        s.es.base = 0x5_0000;
        r.s.legacy = crate::mode::CpuMode::from_sregs(&s).legacy;
        r
    }

    /// Emulates 16-bit code at IP 0x1000, applying the writes.
    fn exec16(r: &mut Rig, bytes: &[u8]) -> Result<Emulated, EmulateError> {
        r.s.regs.rip = 0x1000;
        let out = emulate_store(&mut r.s, bytes, &mut r.m)?;
        assert_eq!(r.s.regs.rip, 0x1000 + out.len as u64);
        for w in &out.writes {
            for (i, b) in w.new.iter().enumerate() {
                r.m.mem.insert(w.gpa + i as u64, *b);
            }
        }
        Ok(out)
    }

    #[test]
    fn real_mode_stores_use_segment_bases_16_bit_wrap_and_ip_wrap() {
        let mut r = real_mode_rig();
        (r.s.regs.rbx, r.s.regs.rsi, r.s.regs.rax) = (0xfff0, 0x130, 0xabcd);
        // mov [bx+si], ax (89 00): DS.base + ((BX + SI) & 0xffff).
        let out = exec16(&mut r, &[0x89, 0x00]).unwrap();
        assert_eq!((out.writes[0].gva, out.len), (0x9120, 2));
        assert_eq!(r.get_u64(0x9120, 2), 0xabcd);
        // es: mov [di], eax (26 66 89 05) with a 32-bit operand.
        r.s.regs.rdi = 0x10;
        let out = exec16(&mut r, &[0x26, 0x66, 0x89, 0x05]).unwrap();
        assert_eq!((out.writes[0].gva, out.writes[0].new.len()), (0x5_0010, 4));
        // IP wraps at 16 bits.
        r.s.regs.rip = 0xfffe;
        let plan = StorePlan::new(&r.s, &[0x89, 0x00], &mut r.m).unwrap();
        let mut s = r.s.clone();
        plan.execute(&mut s, &mut r.m).unwrap();
        assert_eq!(s.regs.rip, 0);
    }

    #[test]
    fn real_mode_refuses_operands_beyond_the_limit_and_mode_dependent_formats() {
        let mut r = real_mode_rig();
        // mov [0xfffe], eax (66 a3 fe ff): bytes 0xfffe..=0x10001 cross the 64 KiB limit.
        assert_eq!(
            reason(exec16(&mut r, &[0x66, 0xa3, 0xfe, 0xff]).unwrap_err()),
            "operand beyond its segment limit"
        );
        exec16(&mut r, &[0xa3, 0xfe, 0xff]).unwrap(); // a word there fits
        for bytes in [
            &[0x0f, 0xae, 0x07][..], // fxsave [bx]
            &[0x0f, 0x01, 0x07],     // sgdt [bx]
            &[0xd9, 0x37],           // fnstenv [bx]
            &[0x0f, 0xab, 0x07],     // bts [bx], ax
        ] {
            let why = reason(exec16(&mut r, bytes).unwrap_err());
            assert!(
                why == "not emulated outside 64-bit mode" || why.starts_with("16-bit"),
                "{bytes:02x?}: {why}"
            );
        }
        assert!(
            r.m.mem
                .keys()
                .all(|&a| (0x9000..0x1_0000 + 0x9000).contains(&a))
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let prefixes: [&[u8]; 8] = [
            &[],
            &[0xf0],
            &[0x66],
            &[0x48],
            &[0x0f],
            &[0x62],
            &[0xc5],
            &[0x67, 0xf0, 0x48],
        ];
        let mut ok = 0;
        for i in 0..6000 {
            let mut r = Rig::vector();
            (r.s.regs.rax, r.s.regs.rcx, r.s.regs.rdx) = (next(), next(), next());
            (r.s.regs.rsi, r.s.regs.rdi) = (next(), next() & 0xffff_ffc0);
            (r.s.xcr0, r.s.fs_base) = (next() | 3, next());
            let mut bytes = prefixes[i % prefixes.len()].to_vec();
            bytes.extend(next().to_le_bytes());
            bytes.extend(next().to_le_bytes());
            bytes.truncate(MAX_INSN_LEN);
            ok += usize::from(emulate_store(&mut r.s, &bytes, &mut r.m).is_ok());
        }
        assert!(ok > 0);
    }
}
