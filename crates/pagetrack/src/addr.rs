//! Typed guest addresses: frame numbers, physical addresses, address-space ids and page levels.

use std::fmt;

/// Size of the tracking granule: one 4 KiB guest frame.
pub const PAGE_SIZE: u64 = 4096;
/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u32 = 12;
/// Number of 4 KiB frames in the 64-bit guest-physical space (2^52): every valid [`Gfn`] is
/// below it, and memslots end at or below it.
pub const GFN_LIMIT: u64 = 1 << (64 - PAGE_SHIFT);

/// A guest frame number (guest-physical address >> 12), the kernel's `gfn_t`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gfn(pub u64);

/// A guest-physical address, the kernel's `gpa_t`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gpa(pub u64);

/// A memslot address space. x86 has two: 0 (normal) and 1 (SMM).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AsId(pub u16);

impl AsId {
    /// The normal address space, the only one the kernel's external API reaches.
    pub const NORMAL: AsId = AsId(0);
    /// The x86 System Management Mode address space.
    pub const SMM: AsId = AsId(1);
}

/// A memslot id inside one address space (the low 16 bits of the kernel's slot id).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotId(pub u16);

/// Levels at which a guest frame can be mapped (x86: 4 KiB, 2 MiB, 1 GiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageLevel {
    /// A 4 KiB mapping (level 1, one frame).
    K4,
    /// A 2 MiB mapping (level 2, 512 frames).
    M2,
    /// A 1 GiB mapping (level 3, 262,144 frames).
    G1,
}

impl PageLevel {
    /// Every level, smallest first.
    pub const ALL: [PageLevel; 3] = [PageLevel::K4, PageLevel::M2, PageLevel::G1];

    /// log2 of the number of frames one mapping at this level covers (0, 9 or 18).
    pub const fn frame_shift(self) -> u32 {
        match self {
            PageLevel::K4 => 0,
            PageLevel::M2 => 9,
            PageLevel::G1 => 18,
        }
    }

    /// Number of 4 KiB frames one mapping at this level covers.
    pub const fn frames(self) -> u64 {
        1 << self.frame_shift()
    }

    /// Size in bytes of one mapping at this level.
    pub const fn bytes(self) -> u64 {
        PAGE_SIZE << self.frame_shift()
    }
}

impl Gfn {
    /// The first guest-physical address of this frame.
    ///
    /// # Panics
    /// If the frame is not below [`GFN_LIMIT`] (its address would not fit in 64 bits); use
    /// [`checked_gpa`](Self::checked_gpa) for frames that may be out of range.
    pub const fn gpa(self) -> Gpa {
        match self.checked_gpa() {
            Some(gpa) => gpa,
            None => panic!("a frame number at or above 2^52 has no 64-bit guest-physical address"),
        }
    }

    /// The first guest-physical address of this frame, or `None` past the 64-bit space.
    pub const fn checked_gpa(self) -> Option<Gpa> {
        if self.0 < GFN_LIMIT {
            Some(Gpa(self.0 << PAGE_SHIFT))
        } else {
            None
        }
    }

    /// The frame `n` frames after this one, or `None` on overflow.
    pub const fn checked_add(self, n: u64) -> Option<Gfn> {
        match self.0.checked_add(n) {
            Some(v) => Some(Gfn(v)),
            None => None,
        }
    }
}

impl Gpa {
    /// The frame that contains this address.
    pub const fn gfn(self) -> Gfn {
        Gfn(self.0 >> PAGE_SHIFT)
    }

    /// Offset of this address inside its 4 KiB frame.
    pub const fn page_offset(self) -> u64 {
        self.0 & (PAGE_SIZE - 1)
    }

    /// The address `n` bytes after this one, or `None` on overflow.
    pub const fn checked_add(self, n: u64) -> Option<Gpa> {
        match self.0.checked_add(n) {
            Some(v) => Some(Gpa(v)),
            None => None,
        }
    }
}

impl From<Gfn> for Gpa {
    fn from(g: Gfn) -> Gpa {
        g.gpa()
    }
}

impl fmt::Display for Gfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gfn {:#x}", self.0)
    }
}

impl fmt::Display for Gpa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gpa {:#x}", self.0)
    }
}

impl fmt::Display for AsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "address space {}", self.0)
    }
}

impl fmt::Display for SlotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "slot {}", self.0)
    }
}

impl fmt::Display for PageLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PageLevel::K4 => "4K",
            PageLevel::M2 => "2M",
            PageLevel::G1 => "1G",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpa_gfn_roundtrip_keeps_frame() {
        let gpa = Gpa(0x1234_5678);
        assert_eq!(gpa.gfn(), Gfn(0x12345));
        assert_eq!(gpa.page_offset(), 0x678);
        assert_eq!(gpa.gfn().gpa(), Gpa(0x1234_5000));
    }

    #[test]
    fn page_level_sizes_match_x86() {
        assert_eq!(PageLevel::K4.bytes(), 4096);
        assert_eq!(PageLevel::M2.frames(), 512);
        assert_eq!(PageLevel::G1.bytes(), 1 << 30);
    }

    #[test]
    fn checked_add_overflow_is_none() {
        assert_eq!(Gfn(u64::MAX).checked_add(1), None);
        assert_eq!(Gpa(u64::MAX - 1).checked_add(1), Some(Gpa(u64::MAX)));
    }
}
