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
//! [`emulate_store`] does both steps. Only 64-bit mode is handled (the caller checks EFER.LMA and
//! CS.L): the bytes are decoded as 64-bit code, and CS/DS/ES/SS have base 0.

use iced_x86::{Decoder, DecoderOptions, Instruction, OpKind, Register};
use kvm_bindings::{kvm_cpuid_entry2, kvm_regs};

pub use iced_x86::Mnemonic;

const PAGE_SIZE: u64 = 4096;
const MAX_INSN_LEN: usize = 15;

const CF: u64 = 1;
const PF: u64 = 1 << 2;
const AF: u64 = 1 << 4;
const ZF: u64 = 1 << 6;
const SF: u64 = 1 << 7;
const OF: u64 = 1 << 11;
const STATUS_FLAGS: u64 = CF | PF | AF | ZF | SF | OF;

/// Vector of the general-protection exception (#GP), raised with error code 0 for a misaligned
/// operand that must be aligned.
pub const GP_VECTOR: u8 = 13;

/// Bytes of the legacy region that `fxsave` and `xsave` use (the rest of the 512 is untouched).
const LEGACY_USED: usize = 416;
/// Offset of the XSAVE header (XSTATE_BV is its first 8 bytes).
const XSAVE_HEADER: usize = 512;
/// Smallest XSAVE area this module accepts: legacy region plus header.
const XSAVE_MIN: usize = 576;

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

/// Offset and size of one XSAVE state component in the standard (non-compacted) format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XsaveComponent {
    /// Offset from the start of the XSAVE area: CPUID(0xD, i).EBX.
    pub offset: u32,
    /// Size in bytes: CPUID(0xD, i).EAX; 0 when the component is unknown.
    pub size: u32,
}

/// Number of XSAVE state components [`XsaveLayout`] describes (0..=9: x87 to PKRU).
pub const XSAVE_COMPONENTS: usize = 10;

/// Standard-format layout of the XSAVE user state components 2..=9, from CPUID leaf 0xD. It is
/// used both for the KVM buffer and for the guest's XSAVE area: KVM reports the host's standard
/// offsets and guests normally see the same CPUID leaf 0xD.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XsaveLayout {
    /// Indexed by component number; entries 0 and 1 (legacy region) are ignored.
    pub components: [XsaveComponent; XSAVE_COMPONENTS],
}

impl XsaveLayout {
    /// The layout of current Intel CPUs: AVX at 576, MPX at 960/1024, opmask at 1088,
    /// ZMM_Hi256 at 1152, Hi16_ZMM at 1664, PKRU at 2688.
    #[must_use]
    pub const fn typical() -> Self {
        const fn c(offset: u32, size: u32) -> XsaveComponent {
            XsaveComponent { offset, size }
        }
        Self {
            components: [
                c(0, 0),
                c(0, 0),
                c(576, 256),
                c(960, 64),
                c(1024, 64),
                c(1088, 64),
                c(1152, 512),
                c(1664, 1024),
                c(0, 0),
                c(2688, 8),
            ],
        }
    }

    /// Builds the layout from CPUID entries (function 0xD, indices 2..=9); supervisor components
    /// (offset 0) stay unknown.
    #[must_use]
    pub fn from_cpuid(entries: &[kvm_cpuid_entry2]) -> Self {
        let mut layout = Self::default();
        for e in entries.iter().filter(|e| e.function == 0xd && e.ebx != 0) {
            if let Ok(i) = usize::try_from(e.index)
                && (2..XSAVE_COMPONENTS).contains(&i)
            {
                layout.components[i] = XsaveComponent {
                    offset: e.ebx,
                    size: e.eax,
                };
            }
        }
        layout
    }

    /// Offset and size of component `i` (2..=9) if known.
    fn range(&self, i: usize) -> Option<(usize, usize)> {
        let c = self.components.get(i).filter(|_| i >= 2)?;
        let offset = usize::try_from(c.offset).ok()?;
        let size = usize::try_from(c.size).ok()?;
        (size != 0 && offset >= XSAVE_MIN).then_some((offset, size))
    }
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AluOp {
    Add,
    Adc,
    Sub,
    Sbb,
    And,
    Or,
    Xor,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    Gpr(Register),
    Imm(u64),
    /// Bytes of a vector register starting at `byte`.
    Vector {
        reg: Register,
        byte: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Store(Src),
    Alu(AluOp, Src),
    /// inc, dec, not, neg.
    Unary(Mnemonic),
    Xadd(Register),
    Xchg(Register),
    Cmpxchg(Register),
    /// cmpxchg8b / cmpxchg16b (by operand size).
    CmpxchgPair,
    /// bts, btr, btc of a bit number.
    Bit(Mnemonic, u32),
    Fxsave {
        rex_w: bool,
    },
    Xsave {
        rfbm: u64,
        rex_w: bool,
    },
    Movdir64b,
    /// sgdt / sidt (64-bit mode: 2-byte limit, 8-byte base).
    DescriptorTable {
        idt: bool,
    },
    /// enter with a nesting level: pushes RBP, `level - 1` outer frame pointers read from
    /// [RBP - 8], [RBP - 16]..., and the new frame pointer; then allocates `frame` bytes.
    Enter {
        level: u64,
        frame: u64,
    },
    /// Bytes computed from the registers when the plan was made ([`crate::simd`],
    /// [`crate::x87`]).
    Computed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    gva: u64,
    gpa: u64,
    /// Offset within the operand.
    offset: usize,
    len: usize,
}

/// A decoded and translated store, ready to execute under the caller's frame locks.
#[derive(Debug, Clone)]
pub struct StorePlan {
    rip: u64,
    next_ip: u64,
    bytes: Vec<u8>,
    mnemonic: Mnemonic,
    op: Op,
    /// Extent of the destination operand in bytes.
    size: usize,
    /// Accessed parts of the destination, in memory order.
    pieces: Vec<Piece>,
    /// Source memory operand (movdir64b).
    source: Vec<Piece>,
    locked: bool,
    /// The operand image of an [`Op::Computed`] store.
    computed: Vec<u8>,
    /// The XSAVE area after the instruction, when it changes FPU state.
    new_xsave: Option<Box<[u8]>>,
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

impl StorePlan {
    /// Decodes the instruction at `state.regs.rip`, computes its destination, checks alignment
    /// and translates every page it touches (`movdir64b`'s source too). Reads no memory.
    pub fn new<C: CpuAccess + ?Sized>(
        state: &CpuState,
        insn_bytes: &[u8],
        cpu: &mut C,
    ) -> Result<Self, EmulateError> {
        let rip = state.regs.rip;
        let given = &insn_bytes[..insn_bytes.len().min(MAX_INSN_LEN)];
        let mut decoder = Decoder::with_ip(64, given, rip, DecoderOptions::NONE);
        let insn = decoder.decode();
        let bytes = if insn.is_invalid() {
            given
        } else {
            given.get(..insn.len()).unwrap_or(given)
        };
        let mut plan = StorePlan {
            rip,
            next_ip: insn.next_ip(),
            bytes: bytes.to_vec(),
            mnemonic: insn.mnemonic(),
            op: Op::Movdir64b,
            size: 0,
            pieces: Vec::new(),
            source: Vec::new(),
            locked: insn.has_lock_prefix() || insn.mnemonic() == Mnemonic::Xchg,
            computed: Vec::new(),
            new_xsave: None,
        };
        if insn.is_invalid() {
            return Err(plan.unsupported("the bytes do not decode"));
        }
        let mut d = plan.classify(&insn, state)?;
        if let Some((bytes, xsave)) = d.computed.take() {
            plan.computed = bytes;
            plan.new_xsave = xsave;
        }
        if d.align > 1 && d.gva % d.align != 0 {
            return Err(EmulateError::Fault { vector: GP_VECTOR });
        }
        plan.op = d.op;
        plan.size = d.ranges.iter().map(|&(s, l)| s + l).max().unwrap_or(0);
        let mut cache = Vec::new();
        for &(start, len) in &d.ranges {
            split(d.gva, start, len, true, cpu, &mut cache, &mut plan.pieces)?;
        }
        if let Some((src, len)) = d.source {
            let mut cache = Vec::new();
            split(src, 0, len, false, cpu, &mut cache, &mut plan.source)?;
        }
        Ok(plan)
    }

    /// The guest-physical ranges the instruction will read and possibly write, in memory order.
    pub fn targets(&self) -> impl Iterator<Item = Target> + '_ {
        self.pieces.iter().map(|p| Target {
            gva: p.gva,
            gpa: p.gpa,
            len: p.len,
        })
    }

    /// The instruction's mnemonic.
    #[must_use]
    pub fn mnemonic(&self) -> Mnemonic {
        self.mnemonic
    }

    /// The instruction's length in bytes.
    #[must_use]
    pub fn insn_len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the guest expects the read-modify-write to be atomic (`lock` prefix or `xchg`).
    #[must_use]
    pub fn locked(&self) -> bool {
        self.locked
    }

    /// Reads the current bytes of [`targets`](Self::targets) (once, through `read_phys`),
    /// computes the stored bytes and the register and flag results from them, updates
    /// `state.regs` (RIP advances) and returns the writes for the caller to apply. `state` must be
    /// the state this plan was made from. On error `state` is unchanged.
    pub fn execute<C: CpuAccess + ?Sized>(
        &self,
        state: &mut CpuState,
        cpu: &mut C,
    ) -> Result<Emulated, EmulateError> {
        let mut old = vec![0u8; self.size];
        for p in &self.pieces {
            cpu.read_phys(p.gpa, sub_mut(&mut old, p.offset, p.len)?)?;
        }
        let source_len = self.source.iter().map(|p| p.offset + p.len).max();
        let mut source = vec![0u8; source_len.unwrap_or(0)];
        for p in &self.source {
            cpu.read_phys(p.gpa, sub_mut(&mut source, p.offset, p.len)?)?;
        }
        let mut regs = state.regs;
        let new = self.compute(state, &mut regs, &old, &source)?;
        let mut writes = Vec::new();
        if let Some(new) = new {
            for p in &self.pieces {
                writes.push(MemWrite {
                    gva: p.gva,
                    gpa: p.gpa,
                    old: sub(&old, p.offset, p.len)?.to_vec(),
                    new: sub(&new, p.offset, p.len)?.to_vec(),
                });
            }
        }
        let regs_changed = regs != state.regs;
        regs.rip = self.next_ip;
        state.regs = regs;
        Ok(Emulated {
            writes,
            regs_changed,
            len: self.bytes.len(),
            mnemonic: self.mnemonic,
            locked: self.locked,
            xsave: self.new_xsave.clone(),
        })
    }

    fn unsupported(&self, reason: &'static str) -> EmulateError {
        EmulateError::Unsupported {
            rip: self.rip,
            bytes: self.bytes.clone(),
            mnemonic: self.mnemonic,
            reason,
        }
    }

    /// Works out the operation and where its destination is.
    fn classify(&self, insn: &Instruction, state: &CpuState) -> Result<Decoded, EmulateError> {
        use Mnemonic as M;
        let regs = &state.regs;
        let mem0 = insn.op0_kind() == OpKind::Memory;
        let size = insn.memory_size().size();
        let gpr_size = matches!(size, 1 | 2 | 4 | 8);
        let mnemonic = insn.mnemonic();
        let address = || self.address(insn, 0, state, 0);
        let refuse = |reason| self.unsupported(reason);
        let computed = match crate::simd::classify(insn, state, &address, &refuse)? {
            Some(c) => Some(c),
            None => crate::x87::classify(insn, &self.bytes, state, &address, &refuse)?,
        };
        if let Some(c) = computed {
            return Ok(Decoded {
                op: Op::Computed,
                gva: c.gva,
                ranges: c.ranges,
                align: 1,
                source: None,
                computed: Some((c.bytes, c.xsave)),
            });
        }
        let (op, size, align) = match mnemonic {
            M::Mov | M::Movnti | M::Movdiri if mem0 && gpr_size => {
                (Op::Store(self.gpr_or_imm(insn, 1)?), size, 1)
            }
            M::Add | M::Adc | M::Sub | M::Sbb | M::And | M::Or | M::Xor if mem0 && gpr_size => {
                let op = match mnemonic {
                    M::Add => AluOp::Add,
                    M::Adc => AluOp::Adc,
                    M::Sub => AluOp::Sub,
                    M::Sbb => AluOp::Sbb,
                    M::And => AluOp::And,
                    M::Or => AluOp::Or,
                    _ => AluOp::Xor,
                };
                (Op::Alu(op, self.gpr_or_imm(insn, 1)?), size, 1)
            }
            M::Inc | M::Dec | M::Not | M::Neg if mem0 && gpr_size => (Op::Unary(mnemonic), size, 1),
            M::Xadd if mem0 && gpr_size => (Op::Xadd(self.gpr(insn, 1)?), size, 1),
            M::Cmpxchg if mem0 && gpr_size => (Op::Cmpxchg(self.gpr(insn, 1)?), size, 1),
            M::Xchg if gpr_size && (mem0 || insn.op1_kind() == OpKind::Memory) => {
                let (reg_op, mem_op) = if mem0 { (1, 0) } else { (0, 1) };
                let reg = self.gpr(insn, reg_op)?;
                let gva = self.address(insn, mem_op, state, 0)?;
                return Ok(Decoded::simple(Op::Xchg(reg), gva, size, 1));
            }
            M::Cmpxchg8b if mem0 && size == 8 => (Op::CmpxchgPair, 8, 1),
            M::Cmpxchg16b if mem0 && size == 16 => (Op::CmpxchgPair, 16, 16),
            M::Bts | M::Btr | M::Btc if mem0 && matches!(size, 2 | 4 | 8) => {
                let bits = size * 8;
                let (bit, delta) = if insn.op1_kind() == OpKind::Register {
                    // The bit offset is a signed operand-size value that can reach other units.
                    let offset = sign_extend(self.gpr_value(regs, self.gpr(insn, 1)?)?, size);
                    let unit = offset >> bits.trailing_zeros();
                    let delta = unit.wrapping_mul(i64::try_from(size).unwrap_or(8));
                    (
                        offset.cast_unsigned() & (bits as u64 - 1),
                        delta.cast_unsigned(),
                    )
                } else {
                    let imm = insn
                        .try_immediate(1)
                        .map_err(|_| self.unsupported("bad operand"))?;
                    (imm & (bits as u64 - 1), 0)
                };
                let bit = u32::try_from(bit).unwrap_or(0);
                let gva = self.address(insn, 0, state, delta)?;
                return Ok(Decoded::simple(Op::Bit(mnemonic, bit), gva, size, 1));
            }
            M::Enter if insn.code() == iced_x86::Code::Enterq_imm16_imm8 => {
                let frame = insn.immediate(0) & 0xffff;
                let level = insn.immediate(1) & 31;
                let gva = regs.rsp.wrapping_sub(8 * (level + 1));
                let size = usize::try_from(8 * (level + 1)).unwrap_or(0);
                let source = (level > 1).then(|| {
                    let n = 8 * (level - 1);
                    (regs.rbp.wrapping_sub(n), usize::try_from(n).unwrap_or(0))
                });
                return Ok(Decoded {
                    op: Op::Enter { level, frame },
                    gva,
                    ranges: vec![(0, size)],
                    align: 1,
                    source,
                    computed: None,
                });
            }
            M::Sgdt | M::Sidt if mem0 => {
                let gva = self.address(insn, 0, state, 0)?;
                let op = Op::DescriptorTable {
                    idt: mnemonic == M::Sidt,
                };
                return Ok(Decoded::simple(op, gva, 10, 1));
            }
            M::Fxsave | M::Fxsave64 if mem0 => {
                let gva = self.address(insn, 0, state, 0)?;
                let rex_w = mnemonic == M::Fxsave64;
                return Ok(Decoded::simple(Op::Fxsave { rex_w }, gva, LEGACY_USED, 16));
            }
            M::Xsave | M::Xsave64 | M::Xsaveopt | M::Xsaveopt64 if mem0 => {
                // xsaveopt may skip unmodified or initial components; saving them is allowed.
                let mask = ((regs.rdx & 0xffff_ffff) << 32) | (regs.rax & 0xffff_ffff);
                let rfbm = state.xcr0 & mask;
                let ranges = self.xsave_ranges(&state.xsave_layout, rfbm)?;
                let gva = self.address(insn, 0, state, 0)?;
                let rex_w = matches!(mnemonic, M::Xsave64 | M::Xsaveopt64);
                let op = Op::Xsave { rfbm, rex_w };
                return Ok(Decoded {
                    op,
                    gva,
                    ranges,
                    align: 64,
                    source: None,
                    computed: None,
                });
            }
            M::Movdir64b if insn.op0_kind() == OpKind::Register => {
                // Destination ES:[reg] (ES base is 0 in 64-bit mode), source a memory operand.
                let gva = self.gpr_value(regs, self.gpr(insn, 0)?)?;
                let source = Some((self.address(insn, 1, state, 0)?, 64));
                let ranges = vec![(0, 64)];
                return Ok(Decoded {
                    op: Op::Movdir64b,
                    gva,
                    ranges,
                    align: 64,
                    source,
                    computed: None,
                });
            }
            _ if mem0 && insn.op1_kind() == OpKind::Register => {
                let Some(kind) = vector_store_kind(mnemonic) else {
                    return Err(self.unsupported("not a supported store"));
                };
                let reg = insn.op1_register();
                if !(reg.is_xmm() || reg.is_ymm() || reg.is_zmm()) {
                    return Err(self.unsupported("source is not an xmm/ymm/zmm register"));
                }
                let byte = if kind == VectorKind::High { 8 } else { 0 };
                if size == 0 || byte + size > reg.size() {
                    return Err(self.unsupported("unexpected vector operand size"));
                }
                let align = if kind == VectorKind::Aligned {
                    size as u64
                } else {
                    1
                };
                if insn.op_mask() != Register::None {
                    // Merge-masked store: only the elements whose mask bit is set are written
                    // (and translated: masked-out elements never fault).
                    let element = insn.memory_size().element_size();
                    if insn.zeroing_masking() || element == 0 || !size.is_multiple_of(element) {
                        return Err(self.unsupported("masked vector store of an unexpected form"));
                    }
                    let k = insn.op_mask().number() - Register::K0.number();
                    let mask = read_le(&component_bytes(state, 5, 8 * k, 8)?);
                    let mut ranges: Vec<(usize, usize)> = Vec::new();
                    for e in 0..size / element {
                        if mask >> e & 1 == 0 {
                            continue;
                        }
                        match ranges.last_mut() {
                            Some((s, l)) if *s + *l == e * element => *l += element,
                            _ => ranges.push((e * element, element)),
                        }
                    }
                    let gva = self.address(insn, 0, state, 0)?;
                    return Ok(Decoded {
                        op: Op::Store(Src::Vector { reg, byte }),
                        gva,
                        ranges,
                        align,
                        source: None,
                        computed: None,
                    });
                }
                (Op::Store(Src::Vector { reg, byte }), size, align)
            }
            _ => return Err(self.unsupported("not a supported store")),
        };
        let gva = self.address(insn, 0, state, 0)?;
        Ok(Decoded::simple(op, gva, size, align))
    }

    fn gpr(&self, insn: &Instruction, operand: u32) -> Result<Register, EmulateError> {
        let reg = insn.op_register(operand);
        if insn.op_kind(operand) == OpKind::Register && reg.is_gpr() {
            Ok(reg)
        } else {
            Err(self.unsupported("operand is not a general register"))
        }
    }

    fn gpr_value(&self, regs: &kvm_regs, reg: Register) -> Result<u64, EmulateError> {
        read_gpr(regs, reg).ok_or_else(|| self.unsupported("operand is not a general register"))
    }

    fn gpr_or_imm(&self, insn: &Instruction, operand: u32) -> Result<Src, EmulateError> {
        if insn.op_kind(operand) == OpKind::Register {
            return self.gpr(insn, operand).map(Src::Gpr);
        }
        insn.try_immediate(operand)
            .map(Src::Imm)
            .map_err(|_| self.unsupported("source is neither a general register nor an immediate"))
    }

    /// Linear address of memory operand `operand`, with `delta` added to the effective address
    /// before address-size truncation (bit-string offsets).
    fn address(
        &self,
        insn: &Instruction,
        operand: u32,
        state: &CpuState,
        delta: u64,
    ) -> Result<u64, EmulateError> {
        if insn.op_kind(operand) != OpKind::Memory {
            return Err(self.unsupported("operand is not in memory"));
        }
        let regs = &state.regs;
        let ea = insn
            .virtual_address(operand, 0, |reg, _, _| {
                if reg.is_segment_register() {
                    Some(0)
                } else {
                    read_gpr(regs, reg)
                }
            })
            .ok_or_else(|| self.unsupported("unsupported addressing form"))?;
        let (base, index) = (insn.memory_base(), insn.memory_index());
        let addr32 = if base == Register::None && index == Register::None {
            insn.memory_displ_size() == 4
        } else {
            base.is_gpr32() || base == Register::EIP || index.is_gpr32()
        };
        let mask = if addr32 { 0xffff_ffff } else { u64::MAX };
        let seg = match insn.memory_segment() {
            Register::FS => state.fs_base,
            Register::GS => state.gs_base,
            _ => 0,
        };
        Ok(seg.wrapping_add(ea.wrapping_add(delta) & mask))
    }

    /// The parts of an XSAVE area that `xsave` writes for `rfbm`, sorted and merged.
    fn xsave_ranges(
        &self,
        layout: &XsaveLayout,
        rfbm: u64,
    ) -> Result<Vec<(usize, usize)>, EmulateError> {
        let mut ranges = Vec::new();
        if rfbm & 1 != 0 {
            ranges.extend([(0, 24), (32, 128)]);
        }
        if rfbm & 0b110 != 0 {
            ranges.push((24, 8)); // MXCSR and MXCSR_MASK go with SSE or AVX
        }
        if rfbm & 0b10 != 0 {
            ranges.push((160, 256));
        }
        ranges.push((XSAVE_HEADER, 8));
        for i in 2..64 {
            if rfbm & (1 << i) == 0 {
                continue;
            }
            if i >= XSAVE_COMPONENTS {
                return Err(self.unsupported("xsave of a state component beyond pkru"));
            }
            let range = layout.range(i);
            ranges.push(range.ok_or_else(|| self.unsupported("xsave component not in layout"))?);
        }
        ranges.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
        for (start, len) in ranges {
            match merged.last_mut() {
                Some((s, l)) if *s + *l >= start => *l = (*l).max(start + len - *s),
                _ => merged.push((start, len)),
            }
        }
        Ok(merged)
    }

    /// Computes the new operand bytes (None: no store) and updates `regs`.
    fn compute(
        &self,
        state: &CpuState,
        regs: &mut kvm_regs,
        old: &[u8],
        source: &[u8],
    ) -> Result<Option<Vec<u8>>, EmulateError> {
        let size = self.size;
        let old_val = read_le(old);
        let new_val = match self.op {
            Op::Store(Src::Vector { reg, byte }) => {
                let value = vector_register(state, reg)?;
                return Ok(Some(sub(&value, byte, size)?.to_vec()));
            }
            Op::Store(src) => self.src_value(regs, src)?,
            Op::Alu(op, src) => {
                let (res, flags) = alu(op, size, old_val, self.src_value(regs, src)?, regs.rflags);
                regs.rflags = flags;
                res
            }
            Op::Unary(Mnemonic::Not) => !old_val,
            Op::Unary(Mnemonic::Neg) => {
                let (res, flags) = alu(AluOp::Sub, size, 0, old_val, regs.rflags);
                regs.rflags = flags;
                res
            }
            Op::Unary(m) => {
                let op = if m == Mnemonic::Inc {
                    AluOp::Add
                } else {
                    AluOp::Sub
                };
                let (res, flags) = alu(op, size, old_val, 1, regs.rflags);
                regs.rflags = (flags & !CF) | (regs.rflags & CF); // inc/dec keep CF
                res
            }
            Op::Xadd(reg) => {
                let src = self.gpr_value(regs, reg)?;
                let (res, flags) = alu(AluOp::Add, size, old_val, src, regs.rflags);
                self.set_gpr(regs, reg, old_val)?;
                regs.rflags = flags;
                res
            }
            Op::Xchg(reg) => {
                let src = self.gpr_value(regs, reg)?;
                self.set_gpr(regs, reg, old_val)?;
                src
            }
            Op::Cmpxchg(reg) => {
                let acc_reg = match size {
                    1 => Register::AL,
                    2 => Register::AX,
                    4 => Register::EAX,
                    _ => Register::RAX,
                };
                let acc = self.gpr_value(regs, acc_reg)?;
                let (_, flags) = alu(AluOp::Sub, size, acc, old_val, regs.rflags);
                regs.rflags = flags;
                if acc != old_val {
                    self.set_gpr(regs, acc_reg, old_val)?;
                    return Ok(None);
                }
                self.gpr_value(regs, reg)?
            }
            Op::CmpxchgPair => {
                let half = size / 2;
                let (lo_reg, hi_reg, new_lo, new_hi) = if half == 8 {
                    (Register::RAX, Register::RDX, Register::RBX, Register::RCX)
                } else {
                    (Register::EAX, Register::EDX, Register::EBX, Register::ECX)
                };
                let old_lo = read_le(sub(old, 0, half)?);
                let old_hi = read_le(sub(old, half, half)?);
                let equal = self.gpr_value(regs, lo_reg)? == old_lo
                    && self.gpr_value(regs, hi_reg)? == old_hi;
                if !equal {
                    regs.rflags &= !ZF;
                    self.set_gpr(regs, lo_reg, old_lo)?;
                    self.set_gpr(regs, hi_reg, old_hi)?;
                    return Ok(None);
                }
                regs.rflags |= ZF;
                let mut new = le_bytes(self.gpr_value(regs, new_lo)?, half);
                new.extend(le_bytes(self.gpr_value(regs, new_hi)?, half));
                return Ok(Some(new));
            }
            Op::Bit(op, bit) => {
                let mask = 1u64 << bit;
                regs.rflags = (regs.rflags & !CF) | u64::from(old_val & mask != 0);
                match op {
                    Mnemonic::Bts => old_val | mask,
                    Mnemonic::Btr => old_val & !mask,
                    _ => old_val ^ mask,
                }
            }
            Op::Fxsave { rex_w } => {
                let area = xsave_area(state)?;
                let mut new = sub(area, 0, LEGACY_USED)?.to_vec();
                if !rex_w {
                    narrow_fpu_pointers(&mut new);
                }
                return Ok(Some(new));
            }
            Op::Xsave { rfbm, rex_w } => return xsave_image(state, &self.pieces, rfbm, rex_w, old),
            Op::Movdir64b => return Ok(Some(source.to_vec())),
            Op::Computed => return Ok(Some(self.computed.clone())),
            Op::Enter { level, frame } => return Ok(Some(enter(regs, old, source, level, frame))),
            Op::DescriptorTable { idt } => {
                let (base, limit) = if idt { state.idtr } else { state.gdtr };
                let mut v = limit.to_le_bytes().to_vec();
                v.extend_from_slice(&base.to_le_bytes());
                return Ok(Some(v));
            }
        };
        Ok(Some(le_bytes(new_val, size)))
    }

    fn src_value(&self, regs: &kvm_regs, src: Src) -> Result<u64, EmulateError> {
        match src {
            Src::Gpr(reg) => self.gpr_value(regs, reg),
            Src::Imm(v) => Ok(v),
            Src::Vector { .. } => Err(self.unsupported("vector source in integer operation")),
        }
    }

    fn set_gpr(&self, regs: &mut kvm_regs, reg: Register, value: u64) -> Result<(), EmulateError> {
        write_gpr(regs, reg, value)
            .ok_or_else(|| self.unsupported("operand is not a general register"))
    }
}

/// Executes `enter frame, level` (level >= 1, 64-bit operands) over `old`, the bytes of the
/// pushed slots [RSP - 8 * (level + 1), RSP), and `source`, the bytes of
/// [RBP - 8 * (level - 1), RBP) before the instruction. A frame pointer read from a slot this
/// instruction already pushed sees the pushed bytes, as on the CPU. Updates RBP and RSP.
fn enter(regs: &mut kvm_regs, old: &[u8], source: &[u8], level: u64, frame: u64) -> Vec<u8> {
    let base = regs.rsp.wrapping_sub(8 * (level + 1));
    let src_base = regs.rbp.wrapping_sub(8 * level.saturating_sub(1));
    let mut new = old.to_vec();
    let mut written = vec![false; new.len()];
    let push = |new: &mut [u8], written: &mut [bool], slot: u64, value: [u8; 8]| {
        // Slot k (0 = the first push) sits at RSP - 8 * (k + 1).
        let at = usize::try_from(8 * (level - slot)).unwrap_or(0);
        new[at..at + 8].copy_from_slice(&value);
        written[at..at + 8].fill(true);
    };
    push(&mut new, &mut written, 0, regs.rbp.to_le_bytes());
    for i in 1..level {
        let addr = regs.rbp.wrapping_sub(8 * i);
        let mut value = [0u8; 8];
        for (b, v) in value.iter_mut().enumerate() {
            let a = addr.wrapping_add(b as u64);
            let d = usize::try_from(a.wrapping_sub(base)).unwrap_or(usize::MAX);
            *v = if d < new.len() && written[d] {
                new[d]
            } else {
                let s = usize::try_from(a.wrapping_sub(src_base)).unwrap_or(0);
                source.get(s).copied().unwrap_or(0)
            };
        }
        push(&mut new, &mut written, i, value);
    }
    let frame_temp = regs.rsp.wrapping_sub(8);
    push(&mut new, &mut written, level, frame_temp.to_le_bytes());
    regs.rbp = frame_temp;
    regs.rsp = base.wrapping_sub(frame);
    new
}

/// The operand image and the new XSAVE area (if any) of an [`Op::Computed`] store.
type ComputedStore = (Vec<u8>, Option<Box<[u8]>>);

/// Destination of a classified instruction.
struct Decoded {
    op: Op,
    gva: u64,
    /// Written parts of the operand: (offset, len), sorted, disjoint.
    ranges: Vec<(usize, usize)>,
    align: u64,
    /// A memory source: linear address and length.
    source: Option<(u64, usize)>,
    /// The operand image and new XSAVE area of an [`Op::Computed`] store.
    computed: Option<ComputedStore>,
}

impl Decoded {
    fn simple(op: Op, gva: u64, size: usize, align: u64) -> Self {
        Decoded {
            op,
            gva,
            ranges: vec![(0, size)],
            align,
            source: None,
            computed: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VectorKind {
    /// Stores the low bytes of the register.
    Plain,
    /// Like `Plain`, but the operand must be aligned to its size (#GP otherwise).
    Aligned,
    /// Stores bytes 8..16 of the register (movhps/movhpd).
    High,
}

#[rustfmt::skip]
fn vector_store_kind(m: Mnemonic) -> Option<VectorKind> {
    use Mnemonic as M;
    Some(match m {
        M::Movdqa | M::Movaps | M::Movapd | M::Movntdq | M::Movntps | M::Movntpd | M::Vmovdqa
        | M::Vmovaps | M::Vmovapd | M::Vmovntdq | M::Vmovntps | M::Vmovntpd | M::Vmovdqa32
        | M::Vmovdqa64 => VectorKind::Aligned,
        M::Movhps | M::Movhpd | M::Vmovhps | M::Vmovhpd => VectorKind::High,
        M::Movdqu | M::Movups | M::Movupd | M::Movq | M::Movd | M::Movss | M::Movsd | M::Movlps
        | M::Movlpd | M::Vmovdqu | M::Vmovups | M::Vmovupd | M::Vmovq | M::Vmovd | M::Vmovss
        | M::Vmovsd | M::Vmovlps | M::Vmovlpd | M::Vmovdqu8 | M::Vmovdqu16 | M::Vmovdqu32
        | M::Vmovdqu64 => VectorKind::Plain,
        _ => return None,
    })
}

/// Splits `len` bytes at `gva + offset` at page boundaries and translates each part.
fn split<C: CpuAccess + ?Sized>(
    gva: u64,
    offset: usize,
    len: usize,
    write: bool,
    cpu: &mut C,
    cache: &mut Vec<(u64, u64)>,
    out: &mut Vec<Piece>,
) -> Result<(), EmulateError> {
    let mut done = 0;
    while done < len {
        let addr = gva.wrapping_add((offset + done) as u64);
        let in_page = addr & (PAGE_SIZE - 1);
        let n = usize::try_from(PAGE_SIZE - in_page)
            .unwrap_or(len)
            .min(len - done);
        let page = addr - in_page;
        let gpa_page = match cache.iter().find(|(p, _)| *p == page) {
            Some(&(_, g)) => g,
            None => {
                let g = cpu.translate(addr, write)?.wrapping_sub(in_page);
                cache.push((page, g));
                g
            }
        };
        out.push(Piece {
            gva: addr,
            gpa: gpa_page.wrapping_add(in_page),
            offset: offset + done,
            len: n,
        });
        done += n;
    }
    Ok(())
}

pub(crate) fn sub(buf: &[u8], offset: usize, len: usize) -> Result<&[u8], EmulateError> {
    offset
        .checked_add(len)
        .and_then(|end| buf.get(offset..end))
        .ok_or(EmulateError::State {
            what: "buffer shorter than an operand",
        })
}

fn sub_mut(buf: &mut [u8], offset: usize, len: usize) -> Result<&mut [u8], EmulateError> {
    offset
        .checked_add(len)
        .and_then(|end| buf.get_mut(offset..end))
        .ok_or(EmulateError::State {
            what: "buffer shorter than an operand",
        })
}

pub(crate) fn read_le(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = bytes.len().min(8);
    b[..n].copy_from_slice(&bytes[..n]);
    u64::from_le_bytes(b)
}

fn le_bytes(value: u64, size: usize) -> Vec<u8> {
    value.to_le_bytes()[..size.min(8)].to_vec()
}

fn size_mask(size: usize) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

fn sign_extend(value: u64, size: usize) -> i64 {
    let shift = 64 - 8 * size.clamp(1, 8);
    (value << shift).cast_signed() >> shift
}

fn is_high8(reg: Register) -> bool {
    matches!(
        reg,
        Register::AH | Register::CH | Register::DH | Register::BH
    )
}

fn gpr_slot(regs: &mut kvm_regs, full: Register) -> Option<&mut u64> {
    Some(match full {
        Register::RAX => &mut regs.rax,
        Register::RCX => &mut regs.rcx,
        Register::RDX => &mut regs.rdx,
        Register::RBX => &mut regs.rbx,
        Register::RSP => &mut regs.rsp,
        Register::RBP => &mut regs.rbp,
        Register::RSI => &mut regs.rsi,
        Register::RDI => &mut regs.rdi,
        Register::R8 => &mut regs.r8,
        Register::R9 => &mut regs.r9,
        Register::R10 => &mut regs.r10,
        Register::R11 => &mut regs.r11,
        Register::R12 => &mut regs.r12,
        Register::R13 => &mut regs.r13,
        Register::R14 => &mut regs.r14,
        Register::R15 => &mut regs.r15,
        _ => return None,
    })
}

/// Value of a general register of any size (AH..BH included), zero-extended; RIP as is.
pub fn gpr(regs: &kvm_regs, reg: Register) -> Option<u64> {
    if reg == Register::RIP {
        return Some(regs.rip);
    }
    read_gpr(regs, reg)
}

/// Value of a general register of any size (AH..BH included), zero-extended.
fn read_gpr(regs: &kvm_regs, reg: Register) -> Option<u64> {
    if !reg.is_gpr() {
        return None;
    }
    let mut copy = *regs;
    let full = *gpr_slot(&mut copy, reg.full_register())?;
    Some(if is_high8(reg) {
        (full >> 8) & 0xff
    } else {
        full & size_mask(reg.size())
    })
}

/// Writes a general register as x86 does: 8/16-bit writes keep the other bits, 32-bit writes
/// zero-extend.
fn write_gpr(regs: &mut kvm_regs, reg: Register, value: u64) -> Option<()> {
    if !reg.is_gpr() {
        return None;
    }
    let slot = gpr_slot(regs, reg.full_register())?;
    *slot = if is_high8(reg) {
        (*slot & !0xff00) | ((value & 0xff) << 8)
    } else {
        match reg.size() {
            1 => (*slot & !0xff) | (value & 0xff),
            2 => (*slot & !0xffff) | (value & 0xffff),
            4 => value & 0xffff_ffff,
            _ => value,
        }
    };
    Some(())
}

/// Result and new RFLAGS of `a op b` at `size` bytes, with CF/PF/AF/ZF/SF/OF set as the CPU sets
/// them (AF is cleared by the logical operations, where it is architecturally undefined).
fn alu(op: AluOp, size: usize, a: u64, b: u64, rflags: u64) -> (u64, u64) {
    let mask = size_mask(size);
    let sign = 1u64 << (size.clamp(1, 8) * 8 - 1);
    let (a, b) = (a & mask, b & mask);
    let carry_in = if matches!(op, AluOp::Adc | AluOp::Sbb) {
        rflags & CF
    } else {
        0
    };
    let (res, cf, of) = match op {
        AluOp::Add | AluOp::Adc => {
            let res = a.wrapping_add(b).wrapping_add(carry_in) & mask;
            let cf = u128::from(a) + u128::from(b) + u128::from(carry_in) > u128::from(mask);
            (res, cf, (a ^ res) & (b ^ res) & sign != 0)
        }
        AluOp::Sub | AluOp::Sbb => {
            let res = a.wrapping_sub(b).wrapping_sub(carry_in) & mask;
            let cf = u128::from(b) + u128::from(carry_in) > u128::from(a);
            (res, cf, (a ^ b) & (a ^ res) & sign != 0)
        }
        AluOp::And => (a & b, false, false),
        AluOp::Or => (a | b, false, false),
        AluOp::Xor => (a ^ b, false, false),
    };
    let logical = matches!(op, AluOp::And | AluOp::Or | AluOp::Xor);
    let mut flags = rflags & !STATUS_FLAGS;
    if cf {
        flags |= CF;
    }
    if (res & 0xff).count_ones() % 2 == 0 {
        flags |= PF;
    }
    if !logical && (a ^ b ^ res) & 0x10 != 0 {
        flags |= AF;
    }
    if res == 0 {
        flags |= ZF;
    }
    if res & sign != 0 {
        flags |= SF;
    }
    if of {
        flags |= OF;
    }
    (res, flags)
}

pub(crate) fn xsave_area(state: &CpuState) -> Result<&[u8], EmulateError> {
    state
        .xsave
        .as_deref()
        .filter(|a| a.len() >= XSAVE_MIN)
        .ok_or(EmulateError::State {
            what: "no xsave area (or shorter than 576 bytes)",
        })
}

/// `len` bytes at `offset` inside component `i` (>= 2) of the KVM XSAVE area; zeros (the
/// initial value of components 2..=9) when XSTATE_BV says the component is in its initial state.
pub(crate) fn component_bytes(
    state: &CpuState,
    i: usize,
    offset: usize,
    len: usize,
) -> Result<Vec<u8>, EmulateError> {
    let area = xsave_area(state)?;
    let missing = EmulateError::State {
        what: "xsave layout lacks a needed component",
    };
    let (start, size) = state.xsave_layout.range(i).ok_or(missing)?;
    if offset + len > size {
        return Err(EmulateError::State {
            what: "xsave component smaller than expected",
        });
    }
    if read_le(sub(area, XSAVE_HEADER, 8)?) & (1 << i) == 0 {
        return Ok(vec![0; len]);
    }
    Ok(sub(area, start + offset, len)?.to_vec())
}

/// The 64 bytes of the zmm register containing `reg` (only `reg.size()` of them filled).
pub(crate) fn vector_register(state: &CpuState, reg: Register) -> Result<[u8; 64], EmulateError> {
    let (n, size) = (reg.number(), reg.size().min(64));
    let mut out = [0u8; 64];
    if n < 16 {
        out[..16].copy_from_slice(sub(xsave_area(state)?, 160 + 16 * n, 16)?);
        if size >= 32 {
            out[16..32].copy_from_slice(&component_bytes(state, 2, 16 * n, 16)?);
        }
        if size >= 64 {
            out[32..64].copy_from_slice(&component_bytes(state, 6, 32 * n, 32)?);
        }
    } else {
        out[..size].copy_from_slice(&component_bytes(state, 7, 64 * (n - 16), size)?);
    }
    Ok(out)
}

/// Rewrites the FPU IP/DP fields of a legacy region from the 64-bit format (what KVM returns)
/// to the format of `fxsave`/`xsave` without REX.W: 32-bit offsets followed by the selectors,
/// which modern CPUs (FCS/FDS deprecated) store as 0.
fn narrow_fpu_pointers(legacy: &mut [u8]) {
    for field in [8..16, 16..24] {
        if let Some(f) = legacy.get_mut(field) {
            f[4..].fill(0);
        }
    }
}

/// New bytes of an XSAVE area operand (`old` is the current memory over the operand extent).
fn xsave_image(
    state: &CpuState,
    pieces: &[Piece],
    rfbm: u64,
    rex_w: bool,
    old: &[u8],
) -> Result<Option<Vec<u8>>, EmulateError> {
    let area = xsave_area(state)?;
    let mut new = old.to_vec();
    for p in pieces {
        sub_mut(&mut new, p.offset, p.len)?.copy_from_slice(sub(area, p.offset, p.len)?);
    }
    if rfbm & 1 != 0 && !rex_w {
        narrow_fpu_pointers(&mut new);
    }
    let kvm_bv = read_le(sub(area, XSAVE_HEADER, 8)?);
    for i in 2..XSAVE_COMPONENTS {
        if rfbm & (1 << i) != 0
            && kvm_bv & (1 << i) == 0
            && let Some((start, size)) = state.xsave_layout.range(i)
        {
            sub_mut(&mut new, start, size)?.fill(0);
        }
    }
    let old_bv = read_le(sub(old, XSAVE_HEADER, 8)?);
    let bv = (old_bv & !rfbm) | (kvm_bv & rfbm);
    sub_mut(&mut new, XSAVE_HEADER, 8)?.copy_from_slice(&bv.to_le_bytes());
    Ok(Some(new))
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::IcedError;
    use iced_x86::code_asm::*;
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
    fn flags_known_values() {
        use AluOp::*;
        assert_eq!(alu(Add, 1, 0x7f, 1, 0), (0x80, OF | SF | AF));
        assert_eq!(alu(Sub, 1, 0, 1, 0), (0xff, CF | SF | AF | PF));
        assert_eq!(alu(Add, 8, u64::MAX, 1, 0), (0, CF | ZF | PF | AF));
        assert_eq!(alu(Sub, 4, 0x8000_0000, 1, 0), (0x7fff_ffff, OF | AF | PF));
        assert_eq!(alu(Adc, 2, 0xffff, 0, CF), (0, CF | ZF | PF | AF));
        assert_eq!(alu(Sbb, 1, 0, 0, CF), (0xff, CF | SF | AF | PF));
        assert_eq!(
            alu(Xor, 1, 0xff, 0xff, 0x202 | STATUS_FLAGS),
            (0, 0x202 | ZF | PF)
        );
        assert_eq!(alu(Or, 2, 0x8000, 1, 0), (0x8001, SF));
        assert_eq!(alu(And, 8, 3, 1, CF | OF), (1, 0));
        assert_eq!(
            alu(Add, 4, 0xffff_ffff, 0xffff_ffff, 0),
            (0xffff_fffe, CF | SF | AF)
        );
        // Operands are truncated to the operation size; other RFLAGS bits are kept.
        assert_eq!(alu(Sub, 1, 0x105, 0x205, 0x202), (0, 0x202 | ZF | PF));
    }

    #[test]
    fn flags_match_an_oracle_at_8_bits() {
        let s8 = |v: u64| i32::from(i8::from_le_bytes([v.to_le_bytes()[0]]));
        let ops = [
            (AluOp::Add, 0),
            (AluOp::Adc, 1),
            (AluOp::Sub, 0),
            (AluOp::Sbb, 1),
        ];
        for a in 0..256u64 {
            for b in 0..256u64 {
                for (op, c) in ops {
                    let add = matches!(op, AluOp::Add | AluOp::Adc);
                    let (res, flags) = alu(op, 1, a, b, c);
                    let (wide, signed, af, cf) = if add {
                        let af = (a & 15) + (b & 15) + c > 15;
                        (a + b + c, s8(a) + s8(b) + s8(c), af, a + b + c > 255)
                    } else {
                        let af = (a & 15) < (b & 15) + c;
                        (a.wrapping_sub(b + c), s8(a) - s8(b) - s8(c), af, a < b + c)
                    };
                    let r = wide & 0xff;
                    assert_eq!(res, r);
                    let want = [
                        (cf, CF),
                        (r.count_ones() % 2 == 0, PF),
                        (af, AF),
                        (r == 0, ZF),
                        (r & 0x80 != 0, SF),
                        (!(-128..=127).contains(&signed), OF),
                    ];
                    let want = want
                        .iter()
                        .filter(|(on, _)| *on)
                        .fold(0, |f, (_, bit)| f | bit);
                    assert_eq!(flags, want, "{op:?} {a:#x} {b:#x}");
                }
            }
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
    fn vector_store_errors() {
        let mut r = Rig::vector();
        r.s.regs.rdi = BUF + 8;
        assert_eq!(r.err(|a| a.movaps(xmmword_ptr(rdi), xmm1)), GP);
        assert_eq!(r.err(|a| a.vmovdqa(ymmword_ptr(rdi), ymm1)), GP);
        assert_eq!(r.err(|a| a.vmovntdq(zmmword_ptr(rdi), zmm1)), GP);
        r.s.regs.rdi = BUF;
        let scatter = r.err(|a| a.vpscatterdd(dword_ptr(rdi + zmm2).k1(), zmm1));
        assert_eq!(reason(scatter), "not a supported store");
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
                size: 256
            }
        );
        assert_eq!(
            layout.components[9],
            XsaveComponent {
                offset: 2688,
                size: 8
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
            &[0x0f, 0xc7, 0x27],     // xsavec [rdi]
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
