//! A software walk of the guest's 4-level x86-64 page tables (4 KiB, 2 MiB and 1 GiB pages),
//! reading guest memory directly: cheaper than `KVM_TRANSLATE` and able to say which
//! page-table frames a translation depends on.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// x86-64 page-table entry bits, shared by everything here that reads or writes guest page
/// tables.
pub mod pte {
    /// Present.
    pub const PRESENT: u64 = 1;
    /// Writable.
    pub const WRITABLE: u64 = 1 << 1;
    /// User-accessible.
    pub const USER: u64 = 1 << 2;
    /// Accessed (set by the CPU's page walk).
    pub const ACCESSED: u64 = 1 << 5;
    /// Dirty (set by the CPU on a write through a leaf entry).
    pub const DIRTY: u64 = 1 << 6;
    /// Page size: a 2 MiB or 1 GiB leaf above level 1.
    pub const HUGE: u64 = 1 << 7;
    /// No-execute.
    pub const NX: u64 = 1 << 63;
    /// The physical-address bits of an entry.
    pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
}

use pte::{ADDR_MASK, HUGE, PRESENT, USER, WRITABLE};

/// Why a walk failed, as a page-fault error code would say it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkFault {
    /// The address that could not be translated.
    pub gva: u64,
    /// A table entry was present (a protection fault) rather than absent.
    pub present: bool,
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The guest-physical address.
    pub gpa: u64,
    /// Writable at every level.
    pub writable: bool,
    /// User-accessible at every level.
    pub user: bool,
    /// Guest-physical addresses of the entries walked, top level first (unused levels are 0).
    pub entries: [u64; 4],
}

/// Translates `gva` through the page tables rooted at `cr3` (4-level paging).
///
/// # Errors
/// A [`WalkFault`] if an entry is absent, a table is not readable guest memory, or the
/// address is not canonical.
pub fn translate<M: GuestMemory + ?Sized>(
    mem: &M,
    cr3: u64,
    gva: u64,
) -> Result<Translation, WalkFault> {
    let canonical = (gva >> 47) == 0 || (gva >> 47) == 0x1_ffff;
    let fault = |present| WalkFault { gva, present };
    if !canonical {
        return Err(fault(false));
    }
    let mut table = cr3 & ADDR_MASK;
    let mut writable = true;
    let mut user = true;
    let mut entries = [0u64; 4];
    for (depth, shift) in [39u32, 30, 21, 12].into_iter().enumerate() {
        let at = table + ((gva >> shift) & 0x1ff) * 8;
        entries[depth] = at;
        let e: u64 = mem.read_obj(GuestAddress(at)).map_err(|_| fault(false))?;
        if e & PRESENT == 0 {
            return Err(fault(false));
        }
        writable &= e & WRITABLE != 0;
        user &= e & USER != 0;
        let leaf = shift == 12 || (shift != 39 && e & HUGE != 0);
        if leaf {
            let size_mask = (1u64 << shift) - 1;
            return Ok(Translation {
                gpa: (e & ADDR_MASK & !size_mask) | (gva & size_mask),
                writable,
                user,
                entries,
            });
        }
        table = e & ADDR_MASK;
    }
    Err(fault(true))
}

/// Reads `buf.len()` bytes at virtual `gva`, page by page; false if any page does not
/// translate or is not guest memory.
pub fn read_virt<M: GuestMemory + ?Sized>(mem: &M, cr3: u64, gva: u64, buf: &mut [u8]) -> bool {
    read_virt_prefix(mem, cr3, gva, buf) == buf.len()
}

/// Reads up to `buf.len()` bytes at virtual `gva`, page by page, stopping at the first page
/// that does not translate or is not guest memory; returns how many bytes were read.
pub fn read_virt_prefix<M: GuestMemory + ?Sized>(
    mem: &M,
    cr3: u64,
    gva: u64,
    buf: &mut [u8],
) -> usize {
    let mut done = 0usize;
    while done < buf.len() {
        let at = gva.wrapping_add(done as u64);
        let Ok(t) = translate(mem, cr3, at) else {
            break;
        };
        let room = usize::try_from(0x1000 - (at & 0xfff)).unwrap_or(0);
        let n = room.min(buf.len() - done);
        if mem
            .read_slice(&mut buf[done..done + n], GuestAddress(t.gpa))
            .is_err()
        {
            break;
        }
        done += n;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap()
    }

    #[test]
    fn translate_4k_2m_and_absent() {
        let m = mem();
        // PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000; PD[0] -> PT 0x4000; PD[1] = 2M page at 4M.
        m.write_obj(0x2000u64 | 7, GuestAddress(0x1000)).unwrap();
        m.write_obj(0x3000u64 | 7, GuestAddress(0x2000)).unwrap();
        m.write_obj(0x4000u64 | 7, GuestAddress(0x3000)).unwrap();
        m.write_obj(0x40_0000u64 | 0x87, GuestAddress(0x3008))
            .unwrap();
        m.write_obj(0x5000u64 | 5, GuestAddress(0x4000 + 8 * 3))
            .unwrap(); // read-only user
        let t = translate(&m, 0x1000, 0x3123).unwrap();
        assert_eq!(t.gpa, 0x5123);
        assert!(!t.writable && t.user);
        assert_eq!(t.entries, [0x1000, 0x2000, 0x3000, 0x4018]);
        assert_eq!(translate(&m, 0x1000, 0x20_0042).unwrap().gpa, 0x40_0042);
        assert_eq!(
            translate(&m, 0x1000, 0x4000),
            Err(WalkFault {
                gva: 0x4000,
                present: false
            })
        );
        assert!(translate(&m, 0x1000, 0x8000_0000_0000).is_err());
    }

    #[test]
    fn translate_1g_page_and_the_higher_half() {
        let m = mem();
        // PML4[0] -> PDPT 0x2000 whose entry 1 is a 1 GiB page at 3 GiB; PML4[511] (the top
        // of the higher half) -> PDPT 0x6000 whose entry 511 -> PD 0x7000 -> 2 MiB page at 6M.
        m.write_obj(0x2000u64 | 7, GuestAddress(0x1000)).unwrap();
        m.write_obj(0xc000_0000u64 | 0x87, GuestAddress(0x2008))
            .unwrap();
        m.write_obj(0x6000u64 | 7, GuestAddress(0x1000 + 511 * 8))
            .unwrap();
        m.write_obj(0x7000u64 | 7, GuestAddress(0x6000 + 511 * 8))
            .unwrap();
        m.write_obj(0x60_0000u64 | 0x87, GuestAddress(0x7000 + 511 * 8))
            .unwrap();
        let t = translate(&m, 0x1000, 0x4123_4567).unwrap();
        assert_eq!(t.gpa, 0xc123_4567);
        assert_eq!(t.entries, [0x1000, 0x2008, 0, 0]);
        let t = translate(&m, 0x1000, 0xffff_ffff_ffff_f123).unwrap();
        assert_eq!(t.gpa, 0x7f_f123);
        assert_eq!(t.entries[3], 0);
        // Bits 48..63 must copy bit 47: one flipped bit is a non-canonical address, which
        // faults as absent without reading any table.
        for gva in [
            0x0000_8000_0000_0000,
            0xfffe_ffff_ffff_f123,
            0x8000_0000_0000_0000,
        ] {
            assert_eq!(
                translate(&m, 0x1000, gva),
                Err(WalkFault {
                    gva,
                    present: false
                })
            );
        }
    }

    #[test]
    fn permissions_are_the_and_of_every_level() {
        let m = mem();
        m.write_obj(0x2000u64 | 7, GuestAddress(0x1000)).unwrap();
        m.write_obj(0x3000u64 | 7, GuestAddress(0x2000)).unwrap();
        let pd = |flags: u64| {
            m.write_obj(0x4000u64 | flags, GuestAddress(0x3000))
                .unwrap()
        };
        let leaf = |flags: u64| {
            m.write_obj(0x5000u64 | flags, GuestAddress(0x4000))
                .unwrap()
        };
        let perms = || {
            let t = translate(&m, 0x1000, 0x10).unwrap();
            assert_eq!(t.gpa, 0x5010);
            (t.writable, t.user)
        };
        pd(7);
        leaf(7);
        assert_eq!(perms(), (true, true));
        leaf(pte::PRESENT | pte::USER);
        assert_eq!(perms(), (false, true), "read-only leaf");
        leaf(7);
        pd(pte::PRESENT | pte::WRITABLE);
        assert_eq!(perms(), (true, false), "supervisor-only directory");
        pd(pte::PRESENT);
        assert_eq!(perms(), (false, false));
        // NX, accessed and dirty bits do not change the translation.
        pd(7 | pte::ACCESSED);
        leaf(7 | pte::NX | pte::ACCESSED | pte::DIRTY);
        assert_eq!(perms(), (true, true));
        // A non-present middle level is an absent fault whatever else is set.
        pd(pte::WRITABLE | pte::USER);
        assert_eq!(
            translate(&m, 0x1000, 0x10),
            Err(WalkFault {
                gva: 0x10,
                present: false
            })
        );
    }

    #[test]
    fn tables_outside_guest_memory_fault() {
        let m = mem();
        // PML4[0] points beyond the 8 MiB of RAM.
        m.write_obj(0x1_0000_0000u64 | 7, GuestAddress(0x1000))
            .unwrap();
        assert!(translate(&m, 0x1000, 0x1000).is_err());
        assert!(
            translate(&m, 0x1_0000_0000, 0x1000).is_err(),
            "cr3 beyond RAM"
        );
    }

    #[test]
    fn read_virt_crosses_pages_and_stops_at_a_hole() {
        let m = mem();
        m.write_obj(0x2000u64 | 7, GuestAddress(0x1000)).unwrap();
        m.write_obj(0x3000u64 | 7, GuestAddress(0x2000)).unwrap();
        m.write_obj(0x4000u64 | 7, GuestAddress(0x3000)).unwrap();
        // Virtual pages 0 and 1 map to physical 0x9000 and 0x5000 (not contiguous); 2 is absent.
        m.write_obj(0x9000u64 | 7, GuestAddress(0x4000)).unwrap();
        m.write_obj(0x5000u64 | 7, GuestAddress(0x4008)).unwrap();
        m.write_slice(&[1, 2], GuestAddress(0x9ffe)).unwrap();
        m.write_slice(&[3, 4], GuestAddress(0x5000)).unwrap();
        let mut buf = [0u8; 4];
        assert!(read_virt(&m, 0x1000, 0xffe, &mut buf));
        assert_eq!(buf, [1, 2, 3, 4]);
        let mut buf = [0u8; 8];
        assert_eq!(read_virt_prefix(&m, 0x1000, 0x1ffc, &mut buf), 4);
        assert!(!read_virt(&m, 0x1000, 0x1ffc, &mut buf));
    }
}
