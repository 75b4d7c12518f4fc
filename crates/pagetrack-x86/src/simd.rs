//! Vector, MMX and opmask stores whose bytes are a function of the vCPU's registers alone
//! (issue 10 item 10): `stmxcsr`, `pextr*`/`extractps`, `vextract*`, `kmov`, `movntq` and
//! `movd`/`movq` from MMX, `maskmovdqu`/`maskmovq`, `vmaskmov*`/`vpmaskmov*`, AVX-512
//! compresses and `vpmov*` down-converts, and `vcvtps2ph`.
//!
//! [`classify`] computes the operand image and which parts of it are written (masked-out
//! elements are neither written nor translated, so they never fault and are never reported),
//! plus the FPU state the instruction leaves (MMX stores reset the x87 stack top and tags;
//! `vcvtps2ph` sets MXCSR flags). A case whose result this module cannot prove (an unmasked
//! SIMD exception, a denormal input or a tiny result of `vcvtps2ph`) is refused with
//! [`EmulateError::Unsupported`], which stops the vCPU with a typed error naming RIP and bytes.

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use crate::bytes::{le_bytes, read_le, sub};
use crate::emulate::{CpuState, EmulateError};
use crate::regs::{mmx_register as mmx, opmask_register, vector_register};
use crate::xsave::xsave_area;

/// A store computed from registers: its written parts and bytes, and the new FPU state.
#[derive(Debug)]
pub(crate) struct Computed {
    /// Linear address of the operand.
    pub(crate) gva: u64,
    /// Written parts of the operand: (offset, len), sorted, disjoint; may be empty.
    pub(crate) ranges: Vec<(usize, usize)>,
    /// The operand image (at least as long as the last range's end).
    pub(crate) bytes: Vec<u8>,
    /// The whole XSAVE area after the instruction, when it changes FPU state.
    pub(crate) xsave: Option<Box<[u8]>>,
}

/// Offset of MXCSR in the legacy region.
const MXCSR: usize = 24;

/// Merges selected elements (bit `e` of `mask` selects element `e`) into byte ranges.
pub(crate) fn mask_ranges(mask: u64, count: usize, element: usize) -> Vec<(usize, usize)> {
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for e in (0..count).filter(|&e| e < 64 && mask >> e & 1 != 0) {
        match ranges.last_mut() {
            Some((s, l)) if *s + *l == e * element => *l += element,
            _ => ranges.push((e * element, element)),
        }
    }
    ranges
}

/// The AVX-512 write mask of `insn` (None: no masking).
fn opmask(insn: &Instruction, state: &CpuState) -> Result<Option<u64>, EmulateError> {
    let k = insn.op_mask();
    if k == Register::None {
        return Ok(None);
    }
    opmask_register(state, k).map(Some)
}

/// The XSAVE area after an MMX instruction: TOP = 0 (registers re-ordered to ST order from
/// the new top) and every tag valid.
fn after_mmx(area: &[u8]) -> Result<Box<[u8]>, EmulateError> {
    let mut new = area.to_vec();
    let top = usize::from(area.get(2).copied().unwrap_or(0) >> 3 & 7);
    for i in 0..8 {
        let from = 32 + 16 * ((i + 8 - top) % 8);
        let slot = sub(area, from, 16)?.to_vec();
        new[32 + 16 * i..32 + 16 * i + 16].copy_from_slice(&slot);
    }
    new[2] &= !(7 << 3); // FSW.TOP (bits 11..13 of the status word)
    new[4] = 0xff; // abridged tag word: all valid
    new[512] |= 1; // XSTATE_BV: x87 state in use
    Ok(new.into_boxed_slice())
}

/// The linear address of an implicit `DS:[RDI]` operand (maskmovdqu, maskmovq).
fn seg_rdi(insn: &Instruction, kind: OpKind, state: &CpuState) -> u64 {
    let rdi = if kind == OpKind::MemorySegEDI {
        state.regs.rdi & 0xffff_ffff
    } else {
        state.regs.rdi
    };
    let seg = match insn.memory_segment() {
        Register::FS => state.fs_base,
        Register::GS => state.gs_base,
        _ => 0,
    };
    seg.wrapping_add(rdi)
}

/// Source and destination element sizes and the conversion of a `vpmov*` down-convert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Narrow {
    Truncate,
    Signed,
    Unsigned,
}

#[rustfmt::skip]
fn narrowing(m: M) -> Option<(usize, usize, Narrow)> {
    use Narrow::{Signed as S, Truncate as T, Unsigned as U};
    Some(match m {
        M::Vpmovqb => (8, 1, T), M::Vpmovsqb => (8, 1, S), M::Vpmovusqb => (8, 1, U),
        M::Vpmovqw => (8, 2, T), M::Vpmovsqw => (8, 2, S), M::Vpmovusqw => (8, 2, U),
        M::Vpmovqd => (8, 4, T), M::Vpmovsqd => (8, 4, S), M::Vpmovusqd => (8, 4, U),
        M::Vpmovdb => (4, 1, T), M::Vpmovsdb => (4, 1, S), M::Vpmovusdb => (4, 1, U),
        M::Vpmovdw => (4, 2, T), M::Vpmovsdw => (4, 2, S), M::Vpmovusdw => (4, 2, U),
        M::Vpmovwb => (2, 1, T), M::Vpmovswb => (2, 1, S), M::Vpmovuswb => (2, 1, U),
        _ => return None,
    })
}

fn narrow(value: u64, from: usize, to: usize, how: Narrow) -> u64 {
    let bits = 8 * u32::try_from(to).unwrap_or(8);
    let max_u = (1u64 << bits) - 1;
    match how {
        Narrow::Truncate => value & max_u,
        Narrow::Unsigned => value.min(max_u),
        Narrow::Signed => {
            let shift = 64 - 8 * u32::try_from(from).unwrap_or(8);
            let v = (value << shift).cast_signed() >> shift;
            let (lo, hi) = (-(1i64 << (bits - 1)), (1i64 << (bits - 1)) - 1);
            v.clamp(lo, hi).cast_unsigned() & max_u
        }
    }
}

/// Computes a register-sourced store, or None when `insn` is not one of this module's.
///
/// `address` gives the linear address of memory operand 0 and `refuse` builds the error for a
/// case that cannot be made exact.
pub(crate) fn classify(
    insn: &Instruction,
    state: &CpuState,
    address: &dyn Fn() -> Result<u64, EmulateError>,
    refuse: &dyn Fn(&'static str) -> EmulateError,
) -> Result<Option<Computed>, EmulateError> {
    let m = insn.mnemonic();
    let mem0 = insn.op0_kind() == OpKind::Memory;
    let size = insn.memory_size().size();
    let reg1 = insn.op1_register();
    let imm = |op: u32| insn.try_immediate(op).map_err(|_| refuse("bad immediate"));
    let simple = |bytes: Vec<u8>| -> Result<Option<Computed>, EmulateError> {
        Ok(Some(Computed {
            gva: address()?,
            ranges: vec![(0, bytes.len())],
            bytes,
            xsave: None,
        }))
    };
    let masked = |bytes: Vec<u8>, elem: usize| -> Result<Option<Computed>, EmulateError> {
        if insn.zeroing_masking() {
            return Err(refuse("zero-masked store (invalid encoding)"));
        }
        let count = bytes.len() / elem.max(1);
        let ranges = match opmask(insn, state)? {
            Some(mask) => mask_ranges(mask, count, elem),
            None => vec![(0, bytes.len())],
        };
        Ok(Some(Computed {
            gva: address()?,
            ranges,
            bytes,
            xsave: None,
        }))
    };
    match m {
        M::Stmxcsr | M::Vstmxcsr if mem0 => simple(sub(xsave_area(state)?, MXCSR, 4)?.to_vec()),
        M::Pextrb
        | M::Vpextrb
        | M::Pextrw
        | M::Vpextrw
        | M::Pextrd
        | M::Vpextrd
        | M::Pextrq
        | M::Vpextrq
        | M::Extractps
        | M::Vextractps
            if mem0 && matches!(size, 1 | 2 | 4 | 8) && reg1.is_xmm() =>
        {
            let index = usize::try_from(imm(2)?).unwrap_or(0) % (16 / size);
            let v = vector_register(state, reg1)?;
            simple(sub(&v, index * size, size)?.to_vec())
        }
        M::Vextractf128
        | M::Vextracti128
        | M::Vextractf32x4
        | M::Vextracti32x4
        | M::Vextractf64x2
        | M::Vextracti64x2
        | M::Vextractf32x8
        | M::Vextracti32x8
        | M::Vextractf64x4
        | M::Vextracti64x4
            if mem0 && matches!(size, 16 | 32) && reg1.size() > size =>
        {
            let lanes = reg1.size() / size;
            let index = usize::try_from(imm(2)?).unwrap_or(0) % lanes;
            let v = vector_register(state, reg1)?;
            let elem = match m {
                M::Vextractf32x4 | M::Vextracti32x4 | M::Vextractf32x8 | M::Vextracti32x8 => 4,
                _ => 8,
            };
            masked(sub(&v, index * size, size)?.to_vec(), elem)
        }
        M::Kmovb | M::Kmovw | M::Kmovd | M::Kmovq if mem0 && reg1.is_k() => {
            simple(le_bytes(opmask_register(state, reg1)?, size))
        }
        M::Movntq | M::Movq | M::Movd if mem0 && reg1.is_mm() && matches!(size, 4 | 8) => {
            let area = xsave_area(state)?;
            let n = reg1.number() - Register::MM0.number();
            let mut c = simple(mmx(area, n)?[..size].to_vec())?;
            if let Some(c) = c.as_mut() {
                c.xsave = Some(after_mmx(area)?);
            }
            Ok(c)
        }
        M::Maskmovdqu | M::Vmaskmovdqu | M::Maskmovq => {
            let kind = insn.op0_kind();
            if !matches!(kind, OpKind::MemorySegRDI | OpKind::MemorySegEDI) {
                return Err(refuse("maskmov with an unexpected address size"));
            }
            let (src, sel) = (insn.op1_register(), insn.op2_register());
            let (data, mask, xsave) = if m == M::Maskmovq {
                let area = xsave_area(state)?;
                let mmx_n = |r: Register| r.number() - Register::MM0.number();
                (
                    mmx(area, mmx_n(src))?,
                    mmx(area, mmx_n(sel))?,
                    Some(after_mmx(area)?),
                )
            } else {
                (
                    vector_register(state, src)?[..16].to_vec(),
                    vector_register(state, sel)?[..16].to_vec(),
                    None,
                )
            };
            let bits = mask
                .iter()
                .enumerate()
                .fold(0u64, |acc, (i, b)| acc | (u64::from(b >> 7) << i));
            Ok(Some(Computed {
                gva: seg_rdi(insn, kind, state),
                ranges: mask_ranges(bits, data.len(), 1),
                bytes: data,
                xsave,
            }))
        }
        M::Vmaskmovps | M::Vmaskmovpd | M::Vpmaskmovd | M::Vpmaskmovq
            if mem0 && matches!(size, 16 | 32) =>
        {
            let elem = if matches!(m, M::Vmaskmovps | M::Vpmaskmovd) {
                4
            } else {
                8
            };
            let sel = vector_register(state, insn.op1_register())?;
            let data = vector_register(state, insn.op2_register())?[..size].to_vec();
            let bits = (0..size / elem).fold(0u64, |acc, e| {
                acc | (u64::from(sel[e * elem + elem - 1] >> 7) << e)
            });
            Ok(Some(Computed {
                gva: address()?,
                ranges: mask_ranges(bits, size / elem, elem),
                bytes: data,
                xsave: None,
            }))
        }
        M::Vpcompressb
        | M::Vpcompressw
        | M::Vpcompressd
        | M::Vpcompressq
        | M::Vcompressps
        | M::Vcompresspd
            if mem0 =>
        {
            let elem = match m {
                M::Vpcompressb => 1,
                M::Vpcompressw => 2,
                M::Vpcompressd | M::Vcompressps => 4,
                _ => 8,
            };
            let v = vector_register(state, reg1)?;
            let count = reg1.size() / elem;
            let mask = opmask(insn, state)?.unwrap_or(u64::MAX);
            let mut bytes = Vec::with_capacity(reg1.size());
            for e in (0..count).filter(|&e| mask >> e & 1 != 0) {
                bytes.extend_from_slice(sub(&v, e * elem, elem)?);
            }
            let ranges = if bytes.is_empty() {
                Vec::new()
            } else {
                vec![(0, bytes.len())]
            };
            Ok(Some(Computed {
                gva: address()?,
                ranges,
                bytes,
                xsave: None,
            }))
        }
        _ if mem0 && narrowing(m).is_some() => {
            let (from, to, how) = narrowing(m).ok_or_else(|| refuse("not a down-convert"))?;
            let v = vector_register(state, reg1)?;
            let count = reg1.size() / from;
            if count * to != size {
                return Err(refuse("down-convert of an unexpected size"));
            }
            let mut bytes = Vec::with_capacity(size);
            for e in 0..count {
                let x = narrow(read_le(sub(&v, e * from, from)?), from, to, how);
                bytes.extend_from_slice(&x.to_le_bytes()[..to]);
            }
            masked(bytes, to)
        }
        M::Vcvtps2ph if mem0 => {
            let area = xsave_area(state)?;
            let mxcsr = u32::try_from(read_le(sub(area, MXCSR, 4)?)).unwrap_or(0);
            let imm8 = imm(2)?;
            let rc = if imm8 & 4 != 0 {
                mxcsr >> 13 & 3
            } else {
                u32::try_from(imm8 & 3).unwrap_or(0)
            };
            let v = vector_register(state, reg1)?;
            let count = size / 2;
            let mut flags = 0u32;
            let mut bytes = Vec::with_capacity(size);
            for e in 0..count {
                let x = u32::try_from(read_le(sub(&v, 4 * e, 4)?)).unwrap_or(0);
                let (h, f) = f32_to_f16(x, rc)
                    .ok_or_else(|| refuse("vcvtps2ph of a denormal input or to a tiny result"))?;
                flags |= f;
                bytes.extend_from_slice(&h.to_le_bytes());
            }
            // Every element's flags count, masked-out ones too: the CPU does the same
            // (tests/kvm/refused.rs, vcvtps2ph_masked_flags_as_the_cpu).
            let masks = mxcsr >> 7 & 0x3f;
            if flags & !masks != 0 {
                return Err(refuse("vcvtps2ph raises an unmasked SIMD exception"));
            }
            let mut c = masked(bytes, 2)?;
            if let Some(c) = c.as_mut()
                && flags & !mxcsr != 0
            {
                let mut new = area.to_vec();
                new[MXCSR..MXCSR + 4].copy_from_slice(&(mxcsr | flags).to_le_bytes());
                new[512] |= 2; // XSTATE_BV: SSE state in use
                c.xsave = Some(new.into_boxed_slice());
            }
            Ok(c)
        }
        _ => Ok(None),
    }
}

/// MXCSR exception flags.
const IE: u32 = 1;
const OE: u32 = 8;
const PE: u32 = 32;

/// Converts an f32 to f16 with rounding control `rc` (0 nearest-even, 1 down, 2 up, 3 toward
/// zero), returning the result and the MXCSR flags it raises; None for a denormal input or a
/// tiny (below the f16 normal range) non-zero result, whose exact flags are not modelled.
pub(crate) fn f32_to_f16(x: u32, rc: u32) -> Option<(u16, u32)> {
    let sign = u16::try_from(x >> 31).unwrap_or(0) << 15;
    let exp = (x >> 23 & 0xff).cast_signed();
    let frac = x & 0x7f_ffff;
    match (exp, frac) {
        (0, 0) => return Some((sign, 0)),
        (0, _) => return None,
        (0xff, 0) => return Some((sign | 0x7c00, 0)),
        (0xff, f) => {
            let quiet = f & 0x40_0000 != 0;
            let h = sign | 0x7e00 | u16::try_from(f >> 13 & 0x3ff).unwrap_or(0);
            return Some((h, if quiet { 0 } else { IE }));
        }
        _ => {}
    }
    let e = exp - 127; // unbiased
    if e < -14 {
        return None;
    }
    let m = frac | 0x80_0000; // 24 bits
    let kept = m >> 13; // 11 bits
    let rest = m & 0x1fff;
    let negative = sign != 0;
    let up = match rc {
        0 => rest > 0x1000 || (rest == 0x1000 && kept & 1 == 1),
        1 => negative && rest != 0,
        2 => !negative && rest != 0,
        _ => false,
    };
    let (mut kept, mut e) = (kept + u32::from(up), e);
    if kept == 0x800 {
        kept >>= 1;
        e += 1;
    }
    let inexact = if rest != 0 { PE } else { 0 };
    if e > 15 {
        let to_inf = match rc {
            0 => true,
            1 => negative,
            2 => !negative,
            _ => false,
        };
        let h = if to_inf { 0x7c00 } else { 0x7bff };
        return Some((sign | h, OE | PE));
    }
    let biased = u32::try_from(e + 15).unwrap_or(0);
    let h = (biased << 10) | (kept & 0x3ff);
    Some((sign | u16::try_from(h).unwrap_or(0), inexact))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_matches_known_values() {
        assert_eq!(f32_to_f16(1.0f32.to_bits(), 0), Some((0x3c00, 0)));
        assert_eq!(f32_to_f16((-2.0f32).to_bits(), 0), Some((0xc000, 0)));
        assert_eq!(f32_to_f16(65504.0f32.to_bits(), 0), Some((0x7bff, 0)));
        assert_eq!(f32_to_f16(1.0e6f32.to_bits(), 0), Some((0x7c00, OE | PE)));
        assert_eq!(f32_to_f16(1.0e6f32.to_bits(), 3), Some((0x7bff, OE | PE)));
        // 1 + 2^-11 is halfway: ties to even (down), up rounds up.
        let half = (1.0f32 + 2f32.powi(-11)).to_bits();
        assert_eq!(f32_to_f16(half, 0), Some((0x3c00, PE)));
        assert_eq!(f32_to_f16(half, 2), Some((0x3c01, PE)));
        assert_eq!(f32_to_f16(0x7f80_0001, 0), Some((0x7e00, IE)));
        assert_eq!(f32_to_f16(1.0e-6f32.to_bits(), 0), None);
    }

    #[test]
    fn narrowing_saturates() {
        assert_eq!(narrow(0x1_0000_0080, 8, 1, Narrow::Truncate), 0x80);
        assert_eq!(narrow(0x1_0000_0080, 8, 1, Narrow::Unsigned), 0xff);
        assert_eq!(narrow(0xffff_ff00, 4, 1, Narrow::Signed), 0x80);
        assert_eq!(narrow(0x0000_0100, 4, 1, Narrow::Signed), 0x7f);
        assert_eq!(narrow(0xffff_fffe, 4, 2, Narrow::Signed), 0xfffe);
    }

    #[test]
    fn mask_ranges_merge_runs() {
        assert_eq!(mask_ranges(0b1101, 4, 4), vec![(0, 4), (8, 8)]);
        assert_eq!(mask_ranges(0, 8, 1), Vec::<(usize, usize)>::new());
    }
}
