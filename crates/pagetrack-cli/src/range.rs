//! Parsing of the command line's numbers: addresses (decimal or `0x` hex), sizes with K/M/G
//! suffixes, guest-physical ranges and durations.
//!
//! Every parser returns a one-line message on error; clap puts it after
//! `invalid value '…' for '--option'`.

use std::fmt;
use std::time::Duration;

use pagetrack::{Gfn, PAGE_SIZE};

/// Parses a non-negative integer: decimal (`4096`) or hexadecimal with a `0x`/`0X` prefix
/// (`0x1000`).
pub fn parse_u64(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        let kind = if radix == 16 {
            "hexadecimal"
        } else {
            "decimal"
        };
        return Err(format!(
            "'{s}' is not a {kind} number (use e.g. 4096 or 0x1000)"
        ));
    }
    u64::from_str_radix(digits, radix).map_err(|_| format!("'{s}' does not fit in 64 bits"))
}

/// Parses a size: a number as [`parse_u64`], optionally followed by `K`, `M` or `G` (binary
/// multiples, either case): `64M`, `0x4000000`, `1g`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (number, shift) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 10),
        Some((i, 'm' | 'M')) => (&s[..i], 20),
        Some((i, 'g' | 'G')) => (&s[..i], 30),
        _ => (s, 0),
    };
    let n =
        parse_u64(number).map_err(|e| format!("{e}; sizes take an optional K, M or G suffix"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("'{s}' does not fit in 64 bits"))
}

/// A size as `parse_size` reads it back: `64M`, `512K`, `1G`, or plain bytes.
pub fn format_size(n: u64) -> String {
    match n {
        0 => "0".into(),
        n if n.is_multiple_of(1 << 30) => format!("{}G", n >> 30),
        n if n.is_multiple_of(1 << 20) => format!("{}M", n >> 20),
        n if n.is_multiple_of(1 << 10) => format!("{}K", n >> 10),
        n => n.to_string(),
    }
}

/// Parses a number of seconds, whole or fractional (`1`, `0.5`), greater than zero.
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds (use e.g. 10 or 0.5)"))?;
    if v.is_nan() || v <= 0.0 {
        return Err(format!("'{s}' must be more than 0 seconds"));
    }
    Duration::try_from_secs_f64(v).map_err(|_| format!("'{s}' seconds is too long"))
}

/// Parses a positive integer (`--vcpus`, `--max-exits`).
pub fn parse_positive(s: &str) -> Result<u64, String> {
    match parse_u64(s)? {
        0 => Err("must be at least 1".into()),
        n => Ok(n),
    }
}

/// A guest-physical byte range `[start, end)`, never empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl TrackRange {
    /// Every 4 KiB frame the range touches.
    pub fn frames(&self) -> impl Iterator<Item = Gfn> + use<> {
        (self.start / PAGE_SIZE..self.end.div_ceil(PAGE_SIZE)).map(Gfn)
    }
}

impl fmt::Display for TrackRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end)
    }
}

/// Parses `ADDR` (the one byte at ADDR), `ADDR+LEN` or `ADDR-END` (END exclusive); each
/// number as [`parse_u64`].
pub fn parse_range(s: &str) -> Result<TrackRange, String> {
    let s = s.trim();
    let range = if let Some((a, len)) = s.split_once('+') {
        let start = parse_u64(a)?;
        let len = parse_u64(len)?;
        if len == 0 {
            return Err(format!("'{s}' is empty (LEN is 0)"));
        }
        let end = start
            .checked_add(len)
            .ok_or_else(|| format!("'{s}' goes past the end of the 64-bit address space"))?;
        TrackRange { start, end }
    } else if let Some((a, e)) = s.split_once('-') {
        let start = parse_u64(a)?;
        let end = parse_u64(e)?;
        if end <= start {
            return Err(format!(
                "'{s}' is empty: END must be above ADDR (END is exclusive)"
            ));
        }
        TrackRange { start, end }
    } else {
        let start = parse_u64(s)?;
        let end = start
            .checked_add(1)
            .ok_or_else(|| format!("'{s}' goes past the end of the 64-bit address space"))?;
        TrackRange { start, end }
    };
    Ok(range)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_u64_decimal_and_hex_are_accepted() {
        assert_eq!(parse_u64("4096"), Ok(4096));
        assert_eq!(parse_u64("0x1000"), Ok(0x1000));
        assert_eq!(parse_u64("0XfF"), Ok(0xff));
    }

    #[test]
    fn parse_u64_garbage_is_refused() {
        for bad in [
            "",
            "0x",
            "12a",
            "-1",
            "+5",
            "0x1g",
            "1_000",
            "18446744073709551616",
        ] {
            assert!(parse_u64(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn parse_size_suffixes_multiply() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("0x100000"), Ok(0x10_0000));
        assert!(parse_size("64X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999G").is_err());
    }

    #[test]
    fn format_size_round_trips() {
        for n in [0, 1, 4096, 512 << 10, 64 << 20, 3 << 30, 1_048_577] {
            assert_eq!(parse_size(&format_size(n)), Ok(n));
        }
        assert_eq!(format_size(64 << 20), "64M");
    }

    #[test]
    fn parse_range_three_forms_give_exclusive_ends() {
        assert_eq!(
            parse_range("0x5000"),
            Ok(TrackRange {
                start: 0x5000,
                end: 0x5001
            })
        );
        assert_eq!(
            parse_range("0x5000+16"),
            Ok(TrackRange {
                start: 0x5000,
                end: 0x5010
            })
        );
        assert_eq!(
            parse_range("0x5000-0x7000"),
            Ok(TrackRange {
                start: 0x5000,
                end: 0x7000
            })
        );
    }

    #[test]
    fn parse_range_empty_or_reversed_is_refused() {
        assert!(parse_range("0x5000+0").is_err());
        assert!(parse_range("0x5000-0x5000").is_err());
        assert!(parse_range("0x5000-0x4000").is_err());
        assert!(parse_range("0xffffffffffffffff+2").is_err());
        assert!(parse_range("0x5000+").is_err());
    }

    #[test]
    fn frames_cover_every_touched_frame() {
        let r = parse_range("0x5ffc+8").unwrap();
        assert_eq!(r.frames().collect::<Vec<_>>(), vec![Gfn(5), Gfn(6)]);
        let r = parse_range("0x5000-0x7000").unwrap();
        assert_eq!(r.frames().collect::<Vec<_>>(), vec![Gfn(5), Gfn(6)]);
    }

    #[test]
    fn parse_secs_positive_only() {
        assert_eq!(parse_secs("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_secs("0").is_err());
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("NaN").is_err());
        assert!(parse_secs("abc").is_err());
        assert!(parse_secs("1e300").is_err());
    }
}
