//! The system-register facts the decoders of trapped stores need (CR3, FS/GS bases, whether
//! the vCPU runs 64-bit code), taken from the exit's special registers.

use kvm_bindings::kvm_sregs;

/// What the decoders need from the system registers, read from the exit itself (`kvm_run`'s
/// sync sregs, or KVM_GET_SREGS) at every trapped store: never a cache, which a CR3 switch or
/// `wrfsbase` would make stale.
#[derive(Debug, Default, Clone, Copy)]
pub struct SysCache {
    /// CR3: the root of the page tables.
    pub cr3: u64,
    /// FS segment base.
    pub fs_base: u64,
    /// GS segment base.
    pub gs_base: u64,
    /// 64-bit code: paging on, long mode active, CS.L set.
    pub long64: bool,
}

const CR0_PG: u64 = 1 << 31;
const EFER_LMA: u64 = 1 << 10;

impl SysCache {
    /// The facts of `s` (`kvm_run`'s sync sregs or KVM_GET_SREGS).
    #[must_use]
    pub fn from_sregs(s: &kvm_sregs) -> SysCache {
        SysCache {
            cr3: s.cr3,
            fs_base: s.fs.base,
            gs_base: s.gs.base,
            long64: s.cr0 & CR0_PG != 0 && s.efer & EFER_LMA != 0 && s.cs.l == 1,
        }
    }
}
