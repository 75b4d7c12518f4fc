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

fn hex(bytes: &[u8]) -> String {
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
enum UnaryOp {
    Inc,
    Dec,
    Not,
    Neg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BitOp {
    Set,
    Reset,
    Complement,
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
    Unary(UnaryOp),
    Xadd(Register),
    Xchg(Register),
    Cmpxchg(Register),
    /// cmpxchg8b / cmpxchg16b (by operand size).
    CmpxchgPair,
    Bit(BitOp, u32),
    Fxsave {
        rex_w: bool,
    },
    Xsave {
        rfbm: u64,
        rex_w: bool,
    },
    Movdir64b,
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
        };
        if insn.is_invalid() {
            return Err(plan.unsupported("the bytes do not decode"));
        }
        let d = plan.classify(&insn, state)?;
        if d.align > 1 && d.gva % d.align != 0 {
            return Err(EmulateError::Fault { vector: GP_VECTOR });
        }
        plan.op = d.op;
        plan.size = d.ranges.iter().map(|&(s, l)| s + l).max().unwrap_or(0);
        let mut cache = Vec::new();
        for &(start, len) in &d.ranges {
            split(d.gva, start, len, true, cpu, &mut cache, &mut plan.pieces)?;
        }
        if let Some(src) = d.source {
            let mut cache = Vec::new();
            split(src, 0, 64, false, cpu, &mut cache, &mut plan.source)?;
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
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Always false: a decoded instruction has at least one byte.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
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
        let mut source = vec![0u8; if self.source.is_empty() { 0 } else { 64 }];
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
            M::Inc | M::Dec | M::Not | M::Neg if mem0 && gpr_size => {
                let op = match mnemonic {
                    M::Inc => UnaryOp::Inc,
                    M::Dec => UnaryOp::Dec,
                    M::Not => UnaryOp::Not,
                    _ => UnaryOp::Neg,
                };
                (Op::Unary(op), size, 1)
            }
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
                let op = match mnemonic {
                    M::Bts => BitOp::Set,
                    M::Btr => BitOp::Reset,
                    _ => BitOp::Complement,
                };
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
                return Ok(Decoded::simple(Op::Bit(op, bit), gva, size, 1));
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
                });
            }
            M::Movdir64b if insn.op0_kind() == OpKind::Register => {
                // Destination ES:[reg] (ES base is 0 in 64-bit mode), source a memory operand.
                let gva = self.gpr_value(regs, self.gpr(insn, 0)?)?;
                let source = Some(self.address(insn, 1, state, 0)?);
                let ranges = vec![(0, 64)];
                return Ok(Decoded {
                    op: Op::Movdir64b,
                    gva,
                    ranges,
                    align: 64,
                    source,
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
                if insn.op_mask() != Register::None {
                    return Err(self.unsupported("masked vector store"));
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
            Op::Unary(UnaryOp::Not) => !old_val,
            Op::Unary(UnaryOp::Neg) => {
                let (res, flags) = alu(AluOp::Sub, size, 0, old_val, regs.rflags);
                regs.rflags = flags;
                res
            }
            Op::Unary(op) => {
                let alu_op = if op == UnaryOp::Inc {
                    AluOp::Add
                } else {
                    AluOp::Sub
                };
                let (res, flags) = alu(alu_op, size, old_val, 1, regs.rflags);
                regs.rflags = (flags & !CF) | (regs.rflags & CF);
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
                    BitOp::Set => old_val | mask,
                    BitOp::Reset => old_val & !mask,
                    BitOp::Complement => old_val ^ mask,
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

/// Destination of a classified instruction.
struct Decoded {
    op: Op,
    gva: u64,
    /// Written parts of the operand: (offset, len), sorted, disjoint.
    ranges: Vec<(usize, usize)>,
    align: u64,
    source: Option<u64>,
}

impl Decoded {
    fn simple(op: Op, gva: u64, size: usize, align: u64) -> Self {
        Decoded {
            op,
            gva,
            ranges: vec![(0, size)],
            align,
            source: None,
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

fn vector_store_kind(m: Mnemonic) -> Option<VectorKind> {
    use Mnemonic as M;
    Some(match m {
        M::Movdqa
        | M::Movaps
        | M::Movapd
        | M::Movntdq
        | M::Movntps
        | M::Movntpd
        | M::Vmovdqa
        | M::Vmovaps
        | M::Vmovapd
        | M::Vmovntdq
        | M::Vmovntps
        | M::Vmovntpd
        | M::Vmovdqa32
        | M::Vmovdqa64 => VectorKind::Aligned,
        M::Movhps | M::Movhpd | M::Vmovhps | M::Vmovhpd => VectorKind::High,
        M::Movdqu
        | M::Movups
        | M::Movupd
        | M::Movq
        | M::Movd
        | M::Movss
        | M::Movsd
        | M::Movlps
        | M::Movlpd
        | M::Vmovdqu
        | M::Vmovups
        | M::Vmovupd
        | M::Vmovq
        | M::Vmovd
        | M::Vmovss
        | M::Vmovsd
        | M::Vmovlps
        | M::Vmovlpd
        | M::Vmovdqu8
        | M::Vmovdqu16
        | M::Vmovdqu32
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

fn sub(buf: &[u8], offset: usize, len: usize) -> Result<&[u8], EmulateError> {
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

fn read_le(bytes: &[u8]) -> u64 {
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

fn xsave_area(state: &CpuState) -> Result<&[u8], EmulateError> {
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
fn component_bytes(
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
fn vector_register(state: &CpuState, reg: Register) -> Result<[u8; 64], EmulateError> {
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
