//! Guest memory with hand-built page tables for the unit tests (no `/dev/kvm`).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::walk::pte::{HUGE, PRESENT, USER, WRITABLE};

/// CR3 of [`identity`]: PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000.
pub(crate) const CR3: u64 = 0x1000;
/// Page table of the 4 KiB pages [`map_4k`] maps, covering [0x40_0000, 0x60_0000).
pub(crate) const PT: u64 = 0x4000;

/// 8 MiB of RAM; [0, 2 MiB) identity-mapped by one 2 MiB user-writable page; [4, 6) MiB by
/// 4 KiB pages set with [`map_4k`] (none present at first).
pub(crate) fn identity() -> GuestMemoryMmap {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let rwu = PRESENT | WRITABLE | USER;
    m.write_obj(0x2000 | rwu, GuestAddress(CR3)).unwrap();
    m.write_obj(0x3000 | rwu, GuestAddress(0x2000)).unwrap();
    m.write_obj(rwu | HUGE, GuestAddress(0x3000)).unwrap();
    m.write_obj(PT | rwu, GuestAddress(0x3000 + 2 * 8)).unwrap();
    m
}

/// Maps the 4 KiB page at virtual `va` (in [4, 6) MiB) to `pa` with `flags`.
pub(crate) fn map_4k(m: &GuestMemoryMmap, va: u64, pa: u64, flags: u64) {
    assert!((0x40_0000..0x60_0000).contains(&va));
    let index = (va - 0x40_0000) >> 12;
    m.write_obj(pa | flags, GuestAddress(PT + index * 8))
        .unwrap();
}
