//! Integer ALU results and the status flags (CF, PF, AF, ZF, SF, OF) as the CPU sets them.

use crate::bytes::size_mask;

pub(crate) const CF: u64 = 1;
pub(crate) const PF: u64 = 1 << 2;
pub(crate) const AF: u64 = 1 << 4;
pub(crate) const ZF: u64 = 1 << 6;
pub(crate) const SF: u64 = 1 << 7;
pub(crate) const OF: u64 = 1 << 11;
pub(crate) const STATUS_FLAGS: u64 = CF | PF | AF | ZF | SF | OF;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AluOp {
    Add,
    Adc,
    Sub,
    Sbb,
    And,
    Or,
    Xor,
}

/// Result and new RFLAGS of `a op b` at `size` bytes, with CF/PF/AF/ZF/SF/OF set as the CPU sets
/// them (AF is cleared by the logical operations, where it is architecturally undefined).
pub(crate) fn alu(op: AluOp, size: usize, a: u64, b: u64, rflags: u64) -> (u64, u64) {
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

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Every operation at 16, 32 and 64 bits against a 128-bit oracle, over the values where
    /// the flags change: 0, 1, the sign boundary, the all-ones value and the nibble carry.
    #[test]
    fn flags_match_an_oracle_at_every_size() {
        for size in [2usize, 4, 8] {
            let bits = 8 * u32::try_from(size).unwrap();
            let mask = u128::MAX >> (128 - bits);
            let sign = 1u128 << (bits - 1);
            let signed = |v: u128| {
                if v & sign != 0 {
                    v as i128 - (mask as i128 + 1)
                } else {
                    v as i128
                }
            };
            let values = [0, 1, 0xf, 0x10, sign - 1, sign, sign + 1, mask - 1, mask];
            for &a in &values {
                for &b in &values {
                    for (op, c) in [
                        (AluOp::Add, 0),
                        (AluOp::Adc, 1),
                        (AluOp::Sub, 0),
                        (AluOp::Sbb, 1),
                        (AluOp::And, 0),
                        (AluOp::Or, 0),
                        (AluOp::Xor, 0),
                    ] {
                        let (r, cf, of, af) = match op {
                            AluOp::Add | AluOp::Adc => {
                                let wide = a + b + c;
                                let s = signed(a) + signed(b) + c as i128;
                                let af = (a & 15) + (b & 15) + c > 15;
                                (wide & mask, wide > mask, s != signed(wide & mask), af)
                            }
                            AluOp::Sub | AluOp::Sbb => {
                                let wide = a.wrapping_sub(b + c) & mask;
                                let s = signed(a) - signed(b) - c as i128;
                                let af = (a & 15) < (b & 15) + c;
                                (wide, a < b + c, s != signed(wide), af)
                            }
                            AluOp::And => (a & b, false, false, false),
                            AluOp::Or => (a | b, false, false, false),
                            AluOp::Xor => (a ^ b, false, false, false),
                        };
                        let want = [
                            (cf, CF),
                            ((r & 0xff).count_ones() % 2 == 0, PF),
                            (af, AF),
                            (r == 0, ZF),
                            (r & sign != 0, SF),
                            (of, OF),
                        ]
                        .iter()
                        .filter(|(on, _)| *on)
                        .fold(0x202, |f, (_, bit)| f | bit);
                        let carry_in = if c == 1 { CF } else { 0 };
                        let a64 = u64::try_from(a).unwrap();
                        let b64 = u64::try_from(b).unwrap();
                        let got = alu(op, size, a64, b64, 0x202 | carry_in);
                        assert_eq!(
                            got,
                            (u64::try_from(r).unwrap(), want),
                            "{op:?} size {size} {a:#x} {b:#x}"
                        );
                    }
                }
            }
        }
    }
}
