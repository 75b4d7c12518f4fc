//! Guest memory that KVM writes itself, named by the guest through MSRs.
//!
//! A guest hands KVM guest-physical addresses through paravirtual MSRs: kvmclock
//! (`MSR_KVM_SYSTEM_TIME(_NEW)`), the wall clock (`MSR_KVM_WALL_CLOCK(_NEW)`), steal time,
//! async page faults, PV EOI, and the Hyper-V hypercall, reference-TSC, VP-assist and SynIC
//! pages. KVM then writes those structures from the kernel, at the `wrmsr` (wall clock,
//! hypercall page) or again and again afterwards (kvmclock on every clock update, steal time
//! on every entry). On a tracked frame, a read-only memslot, such a write fails inside KVM and
//! is lost without an exit: the guest reads stale data and no event is reported.
//!
//! pagetrack cannot report those writes (they happen in the kernel, at times of KVM's
//! choosing), so it refuses the combination, in both orders:
//! - the VM installs an MSR filter that denies guest writes of these MSRs, with user-space
//!   MSR exits (`KVM_CAP_X86_USER_SPACE_MSR` with `KVM_MSR_EXIT_REASON_FILTER`,
//!   `KVM_X86_SET_MSR_FILTER`), so every such `wrmsr` comes to [`crate::Vcpu::run`];
//! - a `wrmsr` whose structure overlaps a tracked frame is refused: `run` returns
//!   [`Error::KvmWritesTracked`] and the write takes no effect; a VMM that runs the vCPU on
//!   gives the guest #GP(0) for it;
//! - any other `wrmsr` is forwarded to KVM with `KVM_SET_MSRS` (so KVM does exactly what it
//!   does natively, #GP included when KVM refuses the value), and the frames an enabled
//!   structure covers are recorded; tracking one of them fails with
//!   [`Error::FrameWrittenByKvm`] (through the core's backend error, changing nothing) until
//!   the guest disables or moves the structure.
//!
//! One lock orders the two: the `wrmsr` path checks the tracker and records under it, and
//! the backend's protect checks the records under it after the core raised its counts, so a
//! track and a `wrmsr` racing on two threads cannot both succeed.
//!
//! Not covered: MSR writes the VMM makes itself with `KVM_SET_MSRS` (a restore), which the
//! filter does not see: the VMM must not point them at frames it tracks; and a VMM that
//! installs its own MSR filter replaces this one.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};
use pagetrack::{AsId, Gfn, PAGE_SIZE, PageTracker};

use crate::error::{Error, Result};

/// `MSR_KVM_WALL_CLOCK`.
const WALL_CLOCK: u32 = 0x11;
/// `MSR_KVM_SYSTEM_TIME`.
const SYSTEM_TIME: u32 = 0x12;
/// `MSR_KVM_WALL_CLOCK_NEW`.
const WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
/// `MSR_KVM_SYSTEM_TIME_NEW`.
const SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// `MSR_KVM_ASYNC_PF_EN`.
const ASYNC_PF_EN: u32 = 0x4b56_4d02;
/// `MSR_KVM_STEAL_TIME`.
const STEAL_TIME: u32 = 0x4b56_4d03;
/// `MSR_KVM_PV_EOI_EN`.
const PV_EOI_EN: u32 = 0x4b56_4d04;
/// `HV_X64_MSR_HYPERCALL`.
const HV_HYPERCALL: u32 = 0x4000_0001;
/// `HV_X64_MSR_REFERENCE_TSC`.
const HV_REFERENCE_TSC: u32 = 0x4000_0021;
/// `HV_X64_MSR_VP_ASSIST_PAGE`.
const HV_VP_ASSIST_PAGE: u32 = 0x4000_0073;
/// `HV_X64_MSR_SIEFP`.
const HV_SIEFP: u32 = 0x4000_0082;
/// `HV_X64_MSR_SIMP`.
const HV_SIMP: u32 = 0x4000_0083;

/// The filter ranges: (first MSR, count). Every MSR in them is one [`target`] knows.
const RANGES: [(u32, u32); 6] = [
    (WALL_CLOCK, 2),
    (WALL_CLOCK_NEW, 5),
    (HV_HYPERCALL, 1),
    (HV_REFERENCE_TSC, 1),
    (HV_VP_ASSIST_PAGE, 1),
    (HV_SIEFP, 2),
];

/// What a write of `data` to `msr` makes KVM write: the guest-physical range and whether KVM
/// keeps writing it afterwards (`persistent`), or `None` if the write names no memory (an
/// enable bit clear) or `msr` is not one of the filtered MSRs.
fn target(msr: u32, data: u64) -> Option<Target> {
    let enabled = data & 1 != 0;
    let page = data & !(PAGE_SIZE - 1);
    let (gpa, len, persistent) = match msr {
        // struct pvclock_wall_clock, written once at the wrmsr.
        WALL_CLOCK | WALL_CLOCK_NEW => (data, 12, false),
        // struct pvclock_vcpu_time_info, bit 0 enables.
        SYSTEM_TIME | SYSTEM_TIME_NEW if enabled => (data & !1, 32, true),
        // struct kvm_vcpu_pv_apf_data / kvm_steal_time: 64 bytes, 64-aligned, bit 0 enables.
        ASYNC_PF_EN | STEAL_TIME if enabled => (data & !0x3f, 64, true),
        // The PV EOI byte (KVM maps a u8 at a 4-aligned address), bit 0 enables.
        PV_EOI_EN if enabled => (data & !3, 4, true),
        // The hypercall page, written once at the wrmsr.
        HV_HYPERCALL if enabled => (page, PAGE_SIZE, false),
        HV_REFERENCE_TSC | HV_VP_ASSIST_PAGE | HV_SIEFP | HV_SIMP if enabled => {
            (page, PAGE_SIZE, true)
        }
        _ => return None,
    };
    Some(Target {
        gpa,
        len,
        persistent,
    })
}

/// Partition-wide MSRs (one structure per VM, whichever vCPU wrote it).
fn per_vm(msr: u32) -> bool {
    matches!(
        msr,
        WALL_CLOCK | WALL_CLOCK_NEW | HV_HYPERCALL | HV_REFERENCE_TSC
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Target {
    gpa: u64,
    len: u64,
    persistent: bool,
}

impl Target {
    fn gfns(self) -> impl Iterator<Item = Gfn> {
        let first = self.gpa / PAGE_SIZE;
        let last = self.gpa.saturating_add(self.len - 1) / PAGE_SIZE;
        (first..=last).map(Gfn)
    }
}

/// The structures KVM writes, by (vCPU, MSR): `None` for partition-wide MSRs.
#[derive(Debug, Default)]
pub(crate) struct KvmWritten {
    by_msr: Mutex<HashMap<(Option<u32>, u32), Target>>,
}

impl KvmWritten {
    fn lock(&self) -> MutexGuard<'_, HashMap<(Option<u32>, u32), Target>> {
        self.by_msr.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first of `gfns` that KVM writes, with who asked for it (for the backend's protect).
    pub(crate) fn check_protect(&self, gfns: impl Iterator<Item = Gfn>) -> Result<()> {
        let map = self.lock();
        if map.is_empty() {
            return Ok(());
        }
        for gfn in gfns {
            for (&(vcpu, msr), t) in map.iter() {
                if t.gfns().any(|g| g == gfn) {
                    return Err(Error::FrameWrittenByKvm {
                        gfn: gfn.0,
                        msr,
                        vcpu,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Installs the filter on a new VM. Returns false (nothing installed) when KVM lacks
/// user-space MSR exits or MSR filters (`HostCaps::msr_filter`).
pub(crate) fn install(vm: &VmFd, available: bool) -> Result<bool> {
    if !available {
        return Ok(false);
    }
    let mut cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
        ..Default::default()
    };
    cap.args[0] = u64::from(kvm_bindings::KVM_MSR_EXIT_REASON_FILTER);
    vm.enable_cap(&cap)
        .map_err(Error::kvm("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)"))?;
    // A zero bit denies the access: every write of these MSRs exits; reads stay with KVM.
    let deny = [0u8; 1];
    let ranges: Vec<MsrFilterRange<'_>> = RANGES
        .iter()
        .map(|&(base, msr_count)| MsrFilterRange {
            flags: MsrFilterRangeFlags::WRITE,
            base,
            msr_count,
            bitmap: &deny,
        })
        .collect();
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
        .map_err(Error::kvm("KVM_X86_SET_MSR_FILTER"))?;
    Ok(true)
}

/// What [`handle_wrmsr`] decided.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Wrmsr {
    /// KVM took the write (the guest continues after the `wrmsr`).
    Done,
    /// KVM refused the value: the guest gets #GP, as natively.
    Fault,
}

/// A guest `wrmsr` of a filtered MSR on vCPU `vcpu` (RIP `rip`, for the error): refused if the
/// structure overlaps a tracked frame, otherwise forwarded to KVM through `set_msrs` and
/// recorded.
pub(crate) fn handle_wrmsr(
    written: &KvmWritten,
    tracker: &PageTracker,
    vcpu_fd: &kvm_ioctls::VcpuFd,
    vcpu: u32,
    rip: u64,
    msr: u32,
    data: u64,
) -> Result<Wrmsr> {
    let key = (if per_vm(msr) { None } else { Some(vcpu) }, msr);
    let target = target(msr, data);
    let mut map = written.lock();
    if let Some(t) = target
        && let Some(gfn) = t
            .gfns()
            .find(|g| tracker.is_write_tracked(AsId::NORMAL, *g))
    {
        return Err(Error::KvmWritesTracked {
            vcpu,
            rip,
            msr,
            gpa: t.gpa,
            gfn: gfn.0,
        });
    }
    let msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: msr,
        data,
        ..Default::default()
    }])
    .expect("one entry is within KVM_MAX_MSR_ENTRIES");
    let set = vcpu_fd
        .set_msrs(&msrs)
        .map_err(Error::kvm("KVM_SET_MSRS"))?;
    if set != 1 {
        return Ok(Wrmsr::Fault);
    }
    match target {
        Some(t) if t.persistent => {
            map.insert(key, t);
        }
        _ => {
            map.remove(&key);
        }
    }
    Ok(Wrmsr::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = |msr, data| target(msr, data).map(|t| (t.gpa, t.len, t.persistent));
        assert_eq!(t(SYSTEM_TIME_NEW, 0x10_0001), Some((0x10_0000, 32, true)));
        assert_eq!(t(SYSTEM_TIME_NEW, 0x10_0000), None, "disabled");
        assert_eq!(t(WALL_CLOCK, 0x10_0040), Some((0x10_0040, 12, false)));
        assert_eq!(t(STEAL_TIME, 0x10_007f), Some((0x10_0040, 64, true)));
        assert_eq!(t(PV_EOI_EN, 0x10_0005), Some((0x10_0004, 4, true)));
        assert_eq!(t(HV_SIMP, 0x10_0fff), Some((0x10_0000, 4096, true)));
        assert_eq!(t(HV_HYPERCALL, 0x10_0001), Some((0x10_0000, 4096, false)));
        assert_eq!(t(0x4b56_4d05, 1), None, "poll control names no memory");
        for (base, n) in RANGES {
            for msr in base..base + n {
                assert!(target(msr, 0x1001).is_some(), "{msr:#x} is understood");
            }
        }
    }

    #[test]
    fn straddling_structure_covers_both_frames() {
        let t = target(SYSTEM_TIME_NEW, 0x1ff1).unwrap();
        assert_eq!(t.gfns().collect::<Vec<_>>(), [Gfn(1), Gfn(2)]);
    }
}
