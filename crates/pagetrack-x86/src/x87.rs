//! x87 stores into tracked frames (issue 10 item 10): `fst`/`fstp` (m32, m64, m80),
//! `fist`/`fistp`/`fisttp` (m16, m32, m64), `fbstp`, `fnstcw`, `fnstsw`, `fnstenv` and `fnsave`.
//!
//! The stored bytes and the x87 state the instruction leaves (status flags and C1, the pop,
//! the instruction and data pointers, `fnstenv`'s masking and `fnsave`'s reinitialisation)
//! are computed from the XSAVE image with integer arithmetic, rounding as the control word
//! says. What this module does not model is refused with a typed error (the vCPU stops,
//! naming RIP and the bytes) rather than approximated: an empty source register (stack
//! underflow), denormal, unnormal and pseudo encodings, a result too small for the
//! destination format (underflow), an exception the control word leaves unmasked, a pending
//! exception (FSW.ES) at a waiting instruction, and the 16-bit `fnstenv`/`fnsave` formats.

use iced_x86::{Instruction, Mnemonic as M, OpKind};

use crate::bytes::read_le;
use crate::emulate::{CpuState, EmulateError};
use crate::simd::Computed;
use crate::xsave::xsave_area;

/// Status-word exception flags (the control word's masks are the same bits).
const IE: u16 = 1;
const OE: u16 = 8;
const PE: u16 = 32;
/// Error summary: an unmasked exception is pending.
const ES: u16 = 0x80;
/// Condition code C1 (round-up indicator for stores).
const C1: u16 = 0x200;

/// One x87 register: sign, biased 15-bit exponent, 64-bit significand (explicit J bit).
#[derive(Debug, Clone, Copy)]
struct Ext {
    sign: bool,
    exp: u32,
    mant: u64,
}

impl Ext {
    fn from_bytes(b: &[u8]) -> Ext {
        let se = u32::try_from(read_le(&b[8..10])).unwrap_or(0);
        Ext {
            sign: se & 0x8000 != 0,
            exp: se & 0x7fff,
            mant: read_le(&b[..8]),
        }
    }
}

/// The result of a conversion: bits, status flags, whether the magnitude was rounded up.
type Converted = (u64, u16, bool);

/// Whether to round the magnitude up, given the kept LSB, the dropped bits `rest` out of
/// `half * 2` and the rounding control (0 nearest-even, 1 down, 2 up, 3 toward zero).
fn round_up(kept_odd: bool, rest: u128, half: u128, rc: u16, negative: bool) -> bool {
    match rc {
        0 => rest > half || (rest == half && kept_odd),
        1 => negative && rest != 0,
        2 => !negative && rest != 0,
        _ => false,
    }
}

/// Converts to an IEEE binary format of `p` significand bits (implicit one included) and
/// exponent bias `bias`; Err(reason) for cases this module refuses.
fn to_float(x: Ext, p: u32, bias: i32, rc: u16) -> Result<Converted, &'static str> {
    let ebits = if p == 24 { 8 } else { 11 };
    let sign = u64::from(x.sign) << (p + ebits - 1);
    let exp_all = (1u64 << ebits) - 1;
    let frac_mask = (1u64 << (p - 1)) - 1;
    if x.exp == 0x7fff {
        if x.mant >> 63 == 0 {
            return Err("pseudo-infinity or pseudo-NaN source");
        }
        let frac = x.mant & !(1 << 63);
        if frac == 0 {
            return Ok((sign | exp_all << (p - 1), 0, false));
        }
        let quiet = frac >> 62 != 0;
        let bits = sign | exp_all << (p - 1) | 1 << (p - 2) | (frac >> (64 - p)) & frac_mask;
        return Ok((bits, if quiet { 0 } else { IE }, false));
    }
    if x.exp == 0 {
        return if x.mant == 0 {
            Ok((sign, 0, false))
        } else {
            Err("denormal source")
        };
    }
    if x.mant >> 63 == 0 {
        return Err("unnormal source");
    }
    let mut e = i32::try_from(x.exp).unwrap_or(0) - 16383;
    if e < 1 - bias {
        return Err("result below the destination's normal range (underflow)");
    }
    let shift = 64 - p;
    let mut kept = x.mant >> shift;
    let rest = u128::from(x.mant & ((1 << shift) - 1));
    let up = round_up(kept & 1 == 1, rest, 1 << (shift - 1), rc, x.sign);
    kept += u64::from(up);
    if kept >> p != 0 {
        kept >>= 1;
        e += 1;
    }
    if e > bias {
        let to_inf = match rc {
            0 => true,
            1 => x.sign,
            2 => !x.sign,
            _ => false,
        };
        let bits = if to_inf {
            sign | exp_all << (p - 1)
        } else {
            sign | (exp_all - 1) << (p - 1) | frac_mask
        };
        return Ok((bits, OE | PE, to_inf));
    }
    let biased = u64::try_from(e + bias).unwrap_or(0);
    let flags = if rest != 0 { PE } else { 0 };
    Ok((sign | biased << (p - 1) | kept & frac_mask, flags, up))
}

/// Rounds to an integer magnitude (None: NaN, infinity or ≥ 2^64).
fn to_integer(x: Ext, rc: u16) -> Result<Option<(u128, bool, bool)>, &'static str> {
    if x.exp == 0x7fff {
        return if x.mant >> 63 == 0 {
            Err("pseudo-infinity or pseudo-NaN source")
        } else {
            Ok(None)
        };
    }
    if x.exp == 0 {
        return if x.mant == 0 {
            Ok(Some((0, false, false)))
        } else {
            Err("denormal source")
        };
    }
    if x.mant >> 63 == 0 {
        return Err("unnormal source");
    }
    let e = i32::try_from(x.exp).unwrap_or(0) - 16383;
    if e > 63 {
        return Ok(None);
    }
    let m = u128::from(x.mant);
    // value = m * 2^(e - 63); shift right by 63 - e (up to 127 bits for e >= -64).
    let (int, rest, half) = if e < -64 {
        (0, 1, 2) // tiny: a non-zero rest below one half
    } else {
        let shift = u32::try_from(63 - e).unwrap_or(127);
        (m >> shift, m & ((1 << shift) - 1), 1u128 << (shift - 1))
    };
    let (int, rest, half) = if e == 63 {
        (m, 0, 1)
    } else {
        (int, rest, half)
    };
    let up = round_up(int & 1 == 1, rest, half, rc, x.sign);
    Ok(Some((int + u128::from(up), rest != 0, up)))
}

/// Stores `value` as a signed `bits`-bit integer; out of range gives the integer indefinite
/// with IE.
fn to_int(x: Ext, bits: u32, rc: u16) -> Result<Converted, &'static str> {
    let indefinite = (1u64 << (bits - 1), IE, false);
    let Some((mag, inexact, up)) = to_integer(x, rc)? else {
        return Ok(indefinite);
    };
    let limit = 1u128 << (bits - 1);
    if (x.sign && mag > limit) || (!x.sign && mag >= limit) {
        return Ok(indefinite);
    }
    let v = if x.sign { 0u128.wrapping_sub(mag) } else { mag };
    let mask = if bits == 64 {
        u64::MAX
    } else {
        (1 << bits) - 1
    };
    let v = u64::try_from(v & u128::from(u64::MAX)).unwrap_or(0) & mask;
    Ok((v, if inexact { PE } else { 0 }, up))
}

/// Packed BCD (18 digits and a sign byte) of the rounded value; out of range gives the BCD
/// indefinite with IE.
fn to_bcd(x: Ext, rc: u16) -> Result<(Vec<u8>, u16, bool), &'static str> {
    let indefinite = (vec![0, 0, 0, 0, 0, 0, 0, 0xc0, 0xff, 0xff], IE, false);
    let Some((mut mag, inexact, up)) = to_integer(x, rc)? else {
        return Ok(indefinite);
    };
    if mag >= 1_000_000_000_000_000_000 {
        return Ok(indefinite);
    }
    let mut out = vec![0u8; 10];
    for b in out.iter_mut().take(9) {
        let lo = u8::try_from(mag % 10).unwrap_or(0);
        mag /= 10;
        let hi = u8::try_from(mag % 10).unwrap_or(0);
        mag /= 10;
        *b = hi << 4 | lo;
    }
    out[9] = if x.sign { 0x80 } else { 0 };
    Ok((out, if inexact { PE } else { 0 }, up))
}

/// The x87 part of the legacy region, with helpers for the stack.
struct Fpu {
    area: Vec<u8>,
}

impl Fpu {
    fn word(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.area[at], self.area[at + 1]])
    }
    fn set_word(&mut self, at: usize, v: u16) {
        self.area[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn fcw(&self) -> u16 {
        self.word(0)
    }
    fn fsw(&self) -> u16 {
        self.word(2)
    }
    fn top(&self) -> usize {
        usize::from(self.fsw() >> 11 & 7)
    }
    fn st(&self, i: usize) -> &[u8] {
        &self.area[32 + 16 * i..42 + 16 * i]
    }
    /// Whether ST(i) holds a value (abridged tag of its physical register).
    fn valid(&self, i: usize) -> bool {
        self.area[4] >> ((self.top() + i) % 8) & 1 != 0
    }
    /// Pops ST0: its tag becomes empty, TOP moves up, the ST slots rotate.
    fn pop(&mut self) {
        let top = self.top();
        self.area[4] &= !(1 << top);
        let slot0: Vec<u8> = self.area[32..48].to_vec();
        self.area.copy_within(48..160, 32);
        self.area[144..160].copy_from_slice(&slot0);
        let fsw = self.fsw() & !(7 << 11) | u16::try_from((top + 1) % 8).unwrap_or(0) << 11;
        self.set_word(2, fsw);
    }
    /// The full two-bit tag word.
    fn full_tags(&self) -> u16 {
        let top = self.top();
        (0..8).fold(0u16, |acc, p| {
            let tag = if self.area[4] >> p & 1 == 0 {
                3
            } else {
                let x = Ext::from_bytes(self.st((p + 8 - top) % 8));
                match (x.exp, x.mant) {
                    (0, 0) => 1,
                    (0 | 0x7fff, _) => 2,
                    (_, m) if m >> 63 == 0 => 2,
                    _ => 0,
                }
            };
            acc | tag << (2 * p)
        })
    }
    /// The 28-byte protected-mode environment (fnstenv/fnsave without an operand-size
    /// prefix): control, status and tag words, FIP, FOP, FDP (selectors 0: FCS/FDS deprecated).
    fn environment(&self) -> Vec<u8> {
        let mut env = vec![0u8; 28];
        let dword = |lo: u16| (u32::from(lo) | 0xffff_0000).to_le_bytes();
        env[0..4].copy_from_slice(&dword(self.fcw()));
        env[4..8].copy_from_slice(&dword(self.fsw()));
        env[8..12].copy_from_slice(&dword(self.full_tags()));
        env[12..16].copy_from_slice(&self.area[8..12]);
        let fop = u32::from(self.word(6) & 0x7ff) << 16;
        env[16..20].copy_from_slice(&fop.to_le_bytes());
        env[20..24].copy_from_slice(&self.area[16..20]);
        env[24..28].copy_from_slice(&0xffff_0000u32.to_le_bytes());
        env
    }
}

/// Computes an x87 store, or None when `insn` is not one of this module's.
pub(crate) fn classify(
    insn: &Instruction,
    bytes_of_insn: &[u8],
    state: &CpuState,
    address: &dyn Fn() -> Result<u64, EmulateError>,
    refuse: &dyn Fn(&'static str) -> EmulateError,
) -> Result<Option<Computed>, EmulateError> {
    let m = insn.mnemonic();
    if insn.op0_kind() != OpKind::Memory
        || !matches!(
            m,
            M::Fst
                | M::Fstp
                | M::Fist
                | M::Fistp
                | M::Fisttp
                | M::Fbstp
                | M::Fnstcw
                | M::Fnstsw
                | M::Fnstenv
                | M::Fnsave
        )
    {
        return Ok(None);
    }
    let area = xsave_area(state)?;
    let mut fpu = Fpu {
        area: area.to_vec(),
    };
    let size = insn.memory_size().size();
    let gva = address()?;
    let done = |fpu: Fpu, bytes: Vec<u8>| {
        let mut area = fpu.area;
        area[512] |= 1; // XSTATE_BV: x87 state in use
        Ok(Some(Computed {
            gva,
            ranges: vec![(0, bytes.len())],
            bytes,
            xsave: Some(area.into_boxed_slice()),
        }))
    };
    match m {
        M::Fnstcw => {
            let bytes = fpu.fcw().to_le_bytes().to_vec();
            return Ok(Some(Computed {
                gva,
                ranges: vec![(0, 2)],
                bytes,
                xsave: None,
            }));
        }
        M::Fnstsw => {
            let bytes = fpu.fsw().to_le_bytes().to_vec();
            return Ok(Some(Computed {
                gva,
                ranges: vec![(0, 2)],
                bytes,
                xsave: None,
            }));
        }
        M::Fnstenv | M::Fnsave => {
            if !matches!(size, 28 | 108) {
                return Err(refuse("16-bit x87 environment format"));
            }
            let mut bytes = fpu.environment();
            if m == M::Fnstenv {
                let fcw = fpu.fcw() | 0x3f;
                fpu.set_word(0, fcw);
            } else {
                for i in 0..8 {
                    bytes.extend_from_slice(fpu.st(i));
                }
                fpu.set_word(0, 0x037f);
                fpu.set_word(2, 0);
                fpu.area[4] = 0;
                fpu.area[6..24].fill(0); // FOP, FIP, FDP
            }
            return done(fpu, bytes);
        }
        _ => {}
    }
    // Waiting, non-control instructions from here on.
    if fpu.fsw() & ES != 0 {
        return Err(refuse(
            "x87 exception pending (FSW.ES) at a waiting instruction",
        ));
    }
    if !fpu.valid(0) {
        return Err(refuse("x87 stack underflow (ST0 empty)"));
    }
    let x = Ext::from_bytes(fpu.st(0));
    let rc = fpu.fcw() >> 10 & 3;
    let (bytes, flags, up) = match (m, size) {
        (M::Fst | M::Fstp, 4) => {
            let (v, f, up) = to_float(x, 24, 127, rc).map_err(refuse)?;
            (v.to_le_bytes()[..4].to_vec(), f, up)
        }
        (M::Fst | M::Fstp, 8) => {
            let (v, f, up) = to_float(x, 53, 1023, rc).map_err(refuse)?;
            (v.to_le_bytes().to_vec(), f, up)
        }
        (M::Fstp, 10) => (fpu.st(0).to_vec(), 0, false),
        (M::Fist | M::Fistp | M::Fisttp, 2 | 4 | 8) => {
            let rc = if m == M::Fisttp { 3 } else { rc };
            let bits = u32::try_from(8 * size).unwrap_or(64);
            let (v, f, up) = to_int(x, bits, rc).map_err(refuse)?;
            (v.to_le_bytes()[..size].to_vec(), f, up)
        }
        (M::Fbstp, 10) => to_bcd(x, rc).map_err(refuse)?,
        _ => return Err(refuse("x87 store of an unexpected size")),
    };
    if flags & !fpu.fcw() & 0x3f != 0 {
        return Err(refuse(
            "x87 store raises an exception the control word leaves unmasked",
        ));
    }
    let fsw = (fpu.fsw() | flags) & !C1 | if up { C1 } else { 0 };
    fpu.set_word(2, fsw);
    // The last instruction pointer (64-bit format in the XSAVE image). The data pointer and
    // the opcode are kept: the guest runs on the host CPU, which (Intel, FDP_EXCPTN_ONLY and
    // FOP compatibility off) updates them only for unmasked exceptions, refused above.
    let rip = state.regs.rip;
    fpu.area[8..16].copy_from_slice(&rip.to_le_bytes());
    if !fdp_exception_only() {
        fpu.area[16..24].copy_from_slice(&gva.to_le_bytes());
        fpu.set_word(6, opcode(bytes_of_insn));
    }
    if matches!(m, M::Fstp | M::Fistp | M::Fisttp | M::Fbstp) {
        fpu.pop();
    }
    done(fpu, bytes)
}

/// Whether the host CPU updates the x87 data pointer only for unmasked exceptions
/// (CPUID.(7,0).EBX bit 6, FDP_EXCPTN_ONLY); such CPUs also keep FOP then.
fn fdp_exception_only() -> bool {
    static ONLY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ONLY.get_or_init(|| std::arch::x86_64::__cpuid_count(7, 0).ebx & (1 << 6) != 0)
}

/// The 11-bit x87 opcode: the low 3 bits of the escape byte (d8..df, after any prefixes),
/// then the ModRM byte.
fn opcode(bytes: &[u8]) -> u16 {
    bytes
        .iter()
        .position(|b| (0xd8..=0xdf).contains(b))
        .map_or(0, |i| {
            let modrm = bytes.get(i + 1).copied().unwrap_or(0);
            u16::from(bytes[i] & 7) << 8 | u16::from(modrm)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 80-bit form of an f64 (exact: f64 widens without rounding).
    fn ext(x: f64) -> Ext {
        let b = x.to_bits();
        let sign = b >> 63 != 0;
        let e = u32::try_from(b >> 52 & 0x7ff).unwrap();
        let f = b & ((1 << 52) - 1);
        match e {
            0 => Ext {
                sign,
                exp: 0,
                mant: 0,
            },
            0x7ff => Ext {
                sign,
                exp: 0x7fff,
                mant: 1 << 63 | f << 11,
            },
            _ => Ext {
                sign,
                exp: e - 1023 + 16383,
                mant: 1 << 63 | f << 11,
            },
        }
    }

    #[test]
    fn to_float_rounds_as_the_control_word_says() {
        let x = ext(0.1);
        let f = |rc| to_float(x, 24, 127, rc).unwrap();
        assert_eq!(f(0), (u64::from(0.1f32.to_bits()), PE, true));
        assert_eq!(f(3).0, u64::from(0.1f32.to_bits()) - 1);
        assert!(!f(3).2, "chopped: not rounded up");
        assert_eq!(to_float(ext(1.5), 24, 127, 0), Ok((0x3fc0_0000, 0, false)));
        assert_eq!(
            to_float(ext(3.0e38 * 10.0), 24, 127, 3),
            Ok((0x7f7f_ffff, OE | PE, false))
        );
        assert_eq!(
            to_float(ext(-1.0e300), 24, 127, 1),
            Ok((0xff80_0000, OE | PE, true))
        );
        assert!(
            to_float(ext(1.0e-40), 24, 127, 0).is_err(),
            "underflow refused"
        );
        let snan = Ext {
            sign: false,
            exp: 0x7fff,
            mant: 1 << 63 | 1,
        };
        assert_eq!(
            to_float(snan, 53, 1023, 0),
            Ok((0x7ff8_0000_0000_0000, IE, false))
        );
    }

    #[test]
    fn to_int_and_bcd_round_and_saturate_to_indefinite() {
        assert_eq!(to_int(ext(2.5), 32, 0), Ok((2, PE, false)), "ties to even");
        assert_eq!(to_int(ext(3.5), 32, 0), Ok((4, PE, true)));
        assert_eq!(to_int(ext(-2.7), 16, 3), Ok((0xfffe, PE, false)));
        assert_eq!(to_int(ext(-32768.0), 16, 0), Ok((0x8000, 0, false)));
        assert_eq!(to_int(ext(32768.0), 16, 0), Ok((0x8000, IE, false)));
        assert_eq!(to_int(ext(0.3), 64, 2), Ok((1, PE, true)));
        let (bcd, flags, _) = to_bcd(ext(-1234.5678), 0).unwrap();
        assert_eq!(bcd, [0x35, 0x12, 0, 0, 0, 0, 0, 0, 0, 0x80]);
        assert_eq!(flags, PE);
        assert_eq!(to_bcd(ext(1.0e18), 0).unwrap().1, IE);
    }
}
