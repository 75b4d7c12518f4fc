//! Instruction classification: what a store instruction does (the operation, its source) and
//! where its destination is (linear address, written ranges, alignment).

use iced_x86::{Instruction, Mnemonic, OpKind, Register};
use kvm_bindings::kvm_regs;

use crate::alu::AluOp;
use crate::bytes::{read_le, sign_extend, sub, sub_mut};
use crate::emulate::{CpuState, EmulateError};
use crate::plan::StorePlan;
use crate::regs::{opmask_register, read_gpr, vector_register};
use crate::xsave::{LEGACY_USED, XSAVE_HEADER, xsave_area, xsave_ranges, xsavec_image};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Src {
    Gpr(Register),
    Imm(u64),
    /// Bytes of a vector register starting at `byte`.
    Vector {
        reg: Register,
        byte: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
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
    /// An AVX-512 scatter: the selected elements of the computed image, each at its own
    /// address ([`Decoded::elements`]), stored in element order; the mask is cleared.
    Scatter,
}

impl StorePlan {
    /// Works out the operation and where its destination is.
    pub(crate) fn classify(
        &self,
        insn: &Instruction,
        state: &CpuState,
    ) -> Result<Decoded, EmulateError> {
        use Mnemonic as M;
        let regs = &state.regs;
        let mem0 = insn.op0_kind() == OpKind::Memory;
        let size = insn.memory_size().size();
        let gpr_size = matches!(size, 1 | 2 | 4 | 8);
        let mnemonic = insn.mnemonic();
        let address = || self.address(insn, 0, state, 0);
        let refuse = |reason| self.unsupported(reason);
        if let Some(d) = self.scatter(insn, state)? {
            return Ok(d);
        }
        if mnemonic == M::Clzero {
            return self.clzero(insn, state);
        }
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
                elements: Vec::new(),
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
                    elements: Vec::new(),
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
                let ranges =
                    xsave_ranges(&state.xsave_layout, rfbm).map_err(|r| self.unsupported(r))?;
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
                    elements: Vec::new(),
                });
            }
            M::Xsavec | M::Xsavec64 if mem0 => {
                if state.legacy.is_some() {
                    return Err(self.unsupported("xsavec outside 64-bit mode"));
                }
                let mask = ((regs.rdx & 0xffff_ffff) << 32) | (regs.rax & 0xffff_ffff);
                let rex_w = mnemonic == M::Xsavec64;
                let (image, ranges) =
                    xsavec_image(state, mask, rex_w).map_err(|r| self.unsupported(r))?;
                let gva = self.address(insn, 0, state, 0)?;
                return Ok(Decoded {
                    op: Op::Computed,
                    gva,
                    ranges,
                    align: 64,
                    source: None,
                    computed: Some((image, None)),
                    elements: Vec::new(),
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
                    elements: Vec::new(),
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
                    let mask = opmask_register(state, insn.op_mask())?;
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
                        elements: Vec::new(),
                    });
                }
                (Op::Store(Src::Vector { reg, byte }), size, align)
            }
            _ => return Err(self.unsupported("not a supported store")),
        };
        let gva = self.address(insn, 0, state, 0)?;
        Ok(Decoded::simple(op, gva, size, align))
    }

    /// An AVX-512 scatter (`vpscatter{dd,dq,qd,qq}`, `vscatter{dps,dpd,qps,qpd}`), or None.
    ///
    /// Element `e` (data element `e` of the source register) goes to base + sign-extended
    /// index element `e` * scale + displacement when mask bit `e` is set. The image holds
    /// the register's elements at `e * size`; the new XSAVE area has the mask register zeroed
    /// (the CPU clears each bit as its element completes, so a completed scatter leaves 0).
    fn scatter(
        &self,
        insn: &Instruction,
        state: &CpuState,
    ) -> Result<Option<Decoded>, EmulateError> {
        use Mnemonic as M;
        let (index_size, elem) = match insn.mnemonic() {
            M::Vpscatterdd | M::Vscatterdps => (4, 4),
            M::Vpscatterdq | M::Vscatterdpd => (4, 8),
            M::Vpscatterqd | M::Vscatterqps => (8, 4),
            M::Vpscatterqq | M::Vscatterqpd => (8, 8),
            _ => return Ok(None),
        };
        let (k, data, index) = (insn.op_mask(), insn.op1_register(), insn.memory_index());
        if state.legacy.is_some() {
            return Err(self.unsupported("scatter outside 64-bit mode"));
        }
        if k == Register::None
            || insn.zeroing_masking()
            || insn.op0_kind() != OpKind::Memory
            || !(data.is_xmm() || data.is_ymm() || data.is_zmm())
            || !(index.is_xmm() || index.is_ymm() || index.is_zmm())
        {
            return Err(self.unsupported("scatter of an unexpected form"));
        }
        let count = (data.size() / elem).min(index.size() / index_size);
        let value = vector_register(state, data)?;
        let indices = vector_register(state, index)?;
        let mask = opmask_register(state, k)?;
        let regs = &state.regs;
        let base = insn.memory_base();
        let mask32 = if base.is_gpr32() {
            0xffff_ffff
        } else {
            u64::MAX
        };
        let seg = match insn.memory_segment() {
            Register::FS => state.fs_base,
            Register::GS => state.gs_base,
            _ => 0,
        };
        let mut elements = Vec::new();
        for e in (0..count).filter(|&e| mask >> e & 1 != 0) {
            let ea = insn
                .virtual_address(0, e, |reg, i, size| {
                    if reg.is_segment_register() {
                        Some(0)
                    } else if reg == index {
                        let v = read_le(indices.get(i * size..(i + 1) * size)?);
                        Some(sign_extend(v, size).cast_unsigned())
                    } else {
                        read_gpr(regs, reg)
                    }
                })
                .ok_or_else(|| self.unsupported("unsupported addressing form"))?;
            elements.push((seg.wrapping_add(ea & mask32), e * elem, elem));
        }
        let mut xsave = xsave_area(state)?.to_vec();
        if read_le(sub(&xsave, XSAVE_HEADER, 8)?) & 1 << 5 != 0 {
            let (start, _) = state.xsave_layout.range(5).ok_or(EmulateError::State {
                what: "xsave layout lacks a needed component",
            })?;
            let n = k.number() - Register::K0.number();
            sub_mut(&mut xsave, start + 8 * n, 8)?.fill(0);
        }
        Ok(Some(Decoded {
            op: Op::Scatter,
            gva: 0,
            ranges: elements.iter().map(|&(_, o, l)| (o, l)).collect(),
            align: 1,
            source: None,
            computed: Some((
                value[..count * elem].to_vec(),
                Some(xsave.into_boxed_slice()),
            )),
            elements,
        }))
    }

    /// `clzero`: #UD where the guest's CPU lacks it; otherwise the 64 zero bytes of the cache
    /// line containing rAX (the address size's part of RAX).
    fn clzero(&self, insn: &Instruction, state: &CpuState) -> Result<Decoded, EmulateError> {
        if !state.clzero {
            return Err(EmulateError::Fault {
                vector: crate::emulate::UD_VECTOR,
            });
        }
        if state.legacy.is_some() {
            return Err(self.unsupported("clzero outside 64-bit mode"));
        }
        let rax = match insn.code() {
            iced_x86::Code::Clzerod => state.regs.rax & 0xffff_ffff,
            iced_x86::Code::Clzeroq => state.regs.rax,
            _ => return Err(self.unsupported("clzero with an unexpected address size")),
        };
        let seg = match insn.segment_prefix() {
            Register::FS => state.fs_base,
            Register::GS => state.gs_base,
            _ => 0,
        };
        Ok(Decoded {
            op: Op::Computed,
            gva: seg.wrapping_add(rax) & !63,
            ranges: vec![(0, 64)],
            align: 1,
            source: None,
            computed: Some((vec![0; 64], None)),
            elements: Vec::new(),
        })
    }

    /// Outside 64-bit mode: refuses the stores whose format or operands depend on the mode
    /// in ways not modelled here, and operands beyond their segment's limit (the CPU raises
    /// #GP or #SS there).
    pub(crate) fn check_legacy(
        &self,
        insn: &Instruction,
        d: &Decoded,
        legacy: &crate::mode::LegacySegments,
    ) -> Result<(), EmulateError> {
        use Mnemonic as M;
        let modelled = match d.op {
            Op::Store(_)
            | Op::Alu(..)
            | Op::Unary(_)
            | Op::Xadd(_)
            | Op::Xchg(_)
            | Op::Cmpxchg(_)
            | Op::CmpxchgPair => true,
            // The environment formats depend on the operand size and mode.
            Op::Computed => !matches!(
                insn.mnemonic(),
                M::Fnstenv | M::Fstenv | M::Fnsave | M::Fsave
            ),
            _ => false,
        };
        if !modelled {
            return Err(self.unsupported("not emulated outside 64-bit mode"));
        }
        let seg = legacy.get(insn.memory_segment());
        if seg.expand_down {
            return Err(self.unsupported("expand-down segment"));
        }
        let offset = d.gva.wrapping_sub(seg.base) & 0xffff_ffff;
        for &(start, len) in &d.ranges {
            let last = offset + (start + len) as u64 - 1;
            if last > u64::from(seg.limit) {
                return Err(self.unsupported("operand beyond its segment limit"));
            }
        }
        Ok(())
    }

    pub(crate) fn gpr(&self, insn: &Instruction, operand: u32) -> Result<Register, EmulateError> {
        let reg = insn.op_register(operand);
        if insn.op_kind(operand) == OpKind::Register && reg.is_gpr() {
            Ok(reg)
        } else {
            Err(self.unsupported("operand is not a general register"))
        }
    }

    pub(crate) fn gpr_value(&self, regs: &kvm_regs, reg: Register) -> Result<u64, EmulateError> {
        read_gpr(regs, reg).ok_or_else(|| self.unsupported("operand is not a general register"))
    }

    pub(crate) fn gpr_or_imm(&self, insn: &Instruction, operand: u32) -> Result<Src, EmulateError> {
        if insn.op_kind(operand) == OpKind::Register {
            return self.gpr(insn, operand).map(Src::Gpr);
        }
        insn.try_immediate(operand)
            .map(Src::Imm)
            .map_err(|_| self.unsupported("source is neither a general register nor an immediate"))
    }

    /// Linear address of memory operand `operand`, with `delta` added to the effective address
    /// before address-size truncation (bit-string offsets).
    pub(crate) fn address(
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
        if let Some(legacy) = &state.legacy {
            // The offset wraps at the address size (iced masks it), then the segment base is
            // added; linear addresses wrap at 32 bits.
            let la = insn
                .virtual_address(operand, 0, |reg, _, _| {
                    if reg.is_segment_register() {
                        Some(legacy.get(reg).base)
                    } else {
                        read_gpr(regs, reg)
                    }
                })
                .ok_or_else(|| self.unsupported("unsupported addressing form"))?;
            return Ok(la.wrapping_add(delta) & 0xffff_ffff);
        }
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
}

/// The operand image and the new XSAVE area (if any) of an [`Op::Computed`] store.
pub(crate) type ComputedStore = (Vec<u8>, Option<Box<[u8]>>);

/// Destination of a classified instruction.
pub(crate) struct Decoded {
    pub(crate) op: Op,
    pub(crate) gva: u64,
    /// Written parts of the operand: (offset, len), sorted, disjoint.
    pub(crate) ranges: Vec<(usize, usize)>,
    pub(crate) align: u64,
    /// A memory source: linear address and length.
    pub(crate) source: Option<(u64, usize)>,
    /// The operand image and new XSAVE area of an [`Op::Computed`] or [`Op::Scatter`] store.
    pub(crate) computed: Option<ComputedStore>,
    /// The elements of an [`Op::Scatter`], in element order: (linear address, offset in the
    /// image, length). Empty for every other store.
    pub(crate) elements: Vec<(u64, usize, usize)>,
}

impl Decoded {
    pub(crate) fn simple(op: Op, gva: u64, size: usize, align: u64) -> Self {
        Decoded {
            op,
            gva,
            ranges: vec![(0, size)],
            align,
            source: None,
            computed: None,
            elements: Vec::new(),
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
