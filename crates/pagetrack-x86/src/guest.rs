//! The emulator's memory view over guest memory: translations by a software page walk from
//! CR3 ([`crate::walk`]), reads straight from guest-physical memory.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::emulate::{CpuAccess, EmulateError};
use crate::walk;

/// The emulator's view of the vCPU: a software page walk from CR3 over guest memory. With
/// `check_access`, translations also check the guest's write and user permissions (the
/// page fault the CPU would raise); without, they only translate (for re-executing a store
/// KVM already performed).
#[derive(Debug)]
pub struct GuestCpu<'a, M: ?Sized> {
    /// Guest memory, page tables included.
    pub mem: &'a M,
    /// The root of the page tables.
    pub cr3: u64,
    /// The access is made at CPL3 (user pages only), when `check_access`.
    pub user: bool,
    /// Check write and user permissions, not only translate.
    pub check_access: bool,
}

impl<M: GuestMemory + ?Sized> CpuAccess for GuestCpu<'_, M> {
    fn translate(&mut self, gva: u64, write: bool) -> Result<u64, EmulateError> {
        let t = walk::translate(self.mem, self.cr3, gva)
            .map_err(|_| EmulateError::PageFault { gva, write })?;
        if self.check_access && ((write && !t.writable) || (self.user && !t.user)) {
            return Err(EmulateError::PageFault { gva, write });
        }
        Ok(t.gpa)
    }

    fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), EmulateError> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| EmulateError::Memory {
                gpa,
                len: buf.len(),
            })
    }
}

/// The emulator's view of a vCPU with paging off (CR0.PG clear): linear addresses are
/// guest-physical (32 bits), reads straight from guest memory.
#[derive(Debug)]
pub struct FlatCpu<'a, M: ?Sized> {
    /// Guest memory.
    pub mem: &'a M,
}

impl<M: GuestMemory + ?Sized> CpuAccess for FlatCpu<'_, M> {
    fn translate(&mut self, gva: u64, _write: bool) -> Result<u64, EmulateError> {
        Ok(gva & 0xffff_ffff)
    }

    fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), EmulateError> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| EmulateError::Memory {
                gpa,
                len: buf.len(),
            })
    }
}
