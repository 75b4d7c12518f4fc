//! The memory system calls' own rules (arguments, placement, `MAP_FIXED`, the mremap cases)
//! over an [`AddressSpace`] on any [`GuestRam`], so they are unit-tested without a VM. The
//! file half of `mmap` (which descriptor, which bytes) stays with the system-call table.

use super::abi::{EEXIST, EFAULT, EINVAL, ENOMEM, SysResult};
use super::mm::{AddressSpace, GuestRam, PAGE, PageKind, USER_END};

/// `MAP_TYPE`: the mapping-type bits of `mmap`'s flags.
const MAP_TYPE: u64 = 0xf;
/// `MAP_FIXED`.
pub const MAP_FIXED: u64 = 0x10;
/// `MAP_ANONYMOUS`.
pub const MAP_ANONYMOUS: u64 = 0x20;
/// `MAP_FIXED_NOREPLACE`.
pub const MAP_FIXED_NOREPLACE: u64 = 0x10_0000;
/// `MREMAP_MAYMOVE`.
pub const MREMAP_MAYMOVE: u64 = 1;
/// `MREMAP_FIXED`.
pub const MREMAP_FIXED: u64 = 2;
/// The protection bits Linux accepts: `PROT_READ | PROT_WRITE | PROT_EXEC` and
/// `PROT_GROWSDOWN | PROT_GROWSUP` (accepted, not implemented).
const PROT_ACCEPTED: u64 = 0x7 | 0x0300_0000;

fn page_up(len: u64) -> SysResult<u64> {
    len.checked_next_multiple_of(PAGE).ok_or(ENOMEM)
}

/// Checks `mmap`'s length, offset, protection and flags, before any descriptor is looked at
/// (Linux's order): returns the page-rounded length and the protection.
///
/// # Errors
/// `EINVAL` for a zero length, an unaligned offset, unknown protection bits or a bad mapping
/// type; `ENOMEM` for a length that rounds past the address space.
pub fn mmap_args(len: u64, prot: u64, flags: u64, off: u64) -> SysResult<(u64, u32)> {
    if len == 0 || !off.is_multiple_of(PAGE) || prot & !PROT_ACCEPTED != 0 {
        return Err(EINVAL);
    }
    let prot = u32::try_from(prot & 7).map_err(|_| EINVAL)?;
    if !matches!(flags & MAP_TYPE, 1..=3) {
        return Err(EINVAL);
    }
    Ok((page_up(len)?, prot))
}

impl<M: GuestRam> AddressSpace<M> {
    /// Places and maps an `mmap` of `len` (page-rounded, from [`mmap_args`]) bytes: at `addr`
    /// with `MAP_FIXED` (replacing what is there) or `MAP_FIXED_NOREPLACE`, else at the hint
    /// if free or the highest free gap. Returns the address; on failure nothing stays mapped
    /// there.
    ///
    /// # Errors
    /// `EINVAL` for an unaligned fixed address; `ENOMEM` past the user range or without room
    /// or frames; `EEXIST` for `MAP_FIXED_NOREPLACE` over a mapping.
    pub fn mmap_place(&mut self, addr: u64, len: u64, prot: u32, flags: u64) -> SysResult<u64> {
        let at = if flags & (MAP_FIXED | MAP_FIXED_NOREPLACE) != 0 {
            if !addr.is_multiple_of(PAGE) {
                return Err(EINVAL);
            }
            let end = addr
                .checked_add(len)
                .filter(|&e| e <= USER_END)
                .ok_or(ENOMEM)?;
            if flags & MAP_FIXED_NOREPLACE != 0 {
                if !self.is_free(addr, end) {
                    return Err(EEXIST);
                }
            } else {
                self.unmap(addr, len).map_err(|_| ENOMEM)?;
            }
            addr
        } else {
            self.find_free(len, addr & !(PAGE - 1)).ok_or(ENOMEM)?
        };
        if let Err(e) = self.map(at, len, prot, PageKind::Mmap) {
            // Unmapping what `map` just created cannot touch the stub or system pages.
            if let Err(_never) = self.unmap(at, len) {}
            return Err(e);
        }
        Ok(at)
    }

    /// `munmap(addr, len)`.
    ///
    /// # Errors
    /// `EINVAL` for an unaligned address, a zero length, or a range over the stub or system
    /// pages; `ENOMEM` for a length that rounds past the address space.
    pub fn munmap_call(&mut self, addr: u64, len: u64) -> SysResult {
        if !addr.is_multiple_of(PAGE) || len == 0 {
            return Err(EINVAL);
        }
        self.unmap(addr, page_up(len)?).map(|()| 0)
    }

    /// `mprotect(addr, len, prot)`.
    ///
    /// # Errors
    /// `EINVAL` for an unaligned address or unknown protection bits (or the stub or system
    /// pages); `ENOMEM` if part of the range is not mapped.
    pub fn mprotect_call(&mut self, addr: u64, len: u64, prot: u64) -> SysResult {
        if !addr.is_multiple_of(PAGE) || prot & !PROT_ACCEPTED != 0 {
            return Err(EINVAL);
        }
        let len = page_up(len)?;
        if len == 0 {
            return Ok(0);
        }
        let prot = u32::try_from(prot & 7).map_err(|_| EINVAL)?;
        self.protect(addr, len, prot).map(|()| 0)
    }

    /// `mremap(old, old_len, new_len, flags, new_addr)`: shrinks in place, grows in place
    /// when the pages after it are free, else moves (`MREMAP_MAYMOVE`), or moves to
    /// `new_addr` (`MREMAP_FIXED`), keeping the frames.
    ///
    /// # Errors
    /// `EINVAL` for bad alignment, zero lengths, unknown flags, `MREMAP_FIXED` without
    /// `MREMAP_MAYMOVE` or overlapping ranges; `EFAULT` if `[old, old + old_len)` is not
    /// inside one mapping; `ENOMEM` if it cannot grow in place and may not move.
    pub fn mremap_call(&mut self, a: [u64; 6]) -> SysResult {
        let [old, old_len, new_len, flags, new_addr, _] = a;
        if !old.is_multiple_of(PAGE)
            || new_len == 0
            || old_len == 0
            || flags & !(MREMAP_MAYMOVE | MREMAP_FIXED) != 0
        {
            return Err(EINVAL);
        }
        if flags & MREMAP_FIXED != 0 && flags & MREMAP_MAYMOVE == 0 {
            return Err(EINVAL);
        }
        let (old_len, new_len) = (page_up(old_len)?, page_up(new_len)?);
        let (_, area_end, prot, kind) = self.area(old).ok_or(EFAULT)?;
        if old + old_len > area_end || matches!(kind, PageKind::Stub | PageKind::System) {
            return Err(EFAULT);
        }
        if flags & MREMAP_FIXED != 0 {
            if !new_addr.is_multiple_of(PAGE)
                || new_addr < old + old_len && old < new_addr + new_len
            {
                return Err(EINVAL);
            }
            self.unmap(new_addr, new_len).map_err(|_| EINVAL)?;
            if new_len < old_len {
                self.unmap(old + new_len, old_len - new_len)?;
            }
            self.move_range(old, old_len.min(new_len), new_addr)?;
            if new_len > old_len {
                self.map(new_addr + old_len, new_len - old_len, prot, kind)?;
            }
            return Ok(new_addr);
        }
        if new_len <= old_len {
            if new_len < old_len {
                self.unmap(old + new_len, old_len - new_len)?;
            }
            return Ok(old);
        }
        let extra = new_len - old_len;
        if self.is_free(old + old_len, old + new_len) {
            self.map(old + old_len, extra, prot, kind)?;
            return Ok(old);
        }
        if flags & MREMAP_MAYMOVE == 0 {
            return Err(ENOMEM);
        }
        let dst = self.find_free(new_len, 0).ok_or(ENOMEM)?;
        self.move_range(old, old_len, dst)?;
        self.map(dst + old_len, extra, prot, kind)?;
        Ok(dst)
    }
}
