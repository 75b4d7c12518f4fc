//! `rep stos` / `rep movs` into tracked frames, completed in userspace a page at a time: the
//! performing half of [`pagetrack_x86::rep`], which plans each element.
//!
//! KVM emulates a string store into a read-only fragment one element per exit (17 µs each
//! here: 4,096 exits for a `rep stosb` over one page). After the exit's own element is
//! applied, pagetrack runs the remaining elements that fall in the same destination page
//! itself, each applied and reported exactly as a trapped store would be (one event per
//! element, in order), then updates RCX/RDI/RSI (and RIP when the count reaches zero). It stops
//! early, leaving the rest to the CPU, at a page boundary, an untranslatable or read-only
//! destination, an unreadable source, or anything it does not recognise.
//!
//! In relaxed mode a `rep` with many elements left is not completed here at all when its
//! destination can be promoted first (`ExitHandler::promote_rep`, `relaxed::before_rep`): the
//! CPU then runs it on the relaxed frames, one coalesced change per frame.

use kvm_bindings::kvm_regs;
use pagetrack::Source;
use pagetrack_x86::rep::RepPlan;
use vm_memory::GuestMemoryMmap;

use crate::atomic::SysCache;
use crate::memory::apply_write;
use crate::vm::VmInner;

/// Continues the string store whose element at `gpa` (`len` bytes) was just applied. Returns
/// the registers to load and the number of elements completed, or None to leave it to the CPU.
pub(crate) fn continue_rep(
    vm: &VmInner,
    mem: &GuestMemoryMmap,
    sys: &SysCache,
    regs: &kvm_regs,
    gpa: u64,
    len: usize,
    vcpu: u32,
) -> Option<(kvm_regs, u64)> {
    let mut plan = RepPlan::new(mem, sys, regs, gpa, len)?;
    // Each element is applied and reported before the next is planned: a `movs` whose source
    // overlaps its destination reads what the previous element stored, as on the CPU.
    while let Some(element) = plan.next_element(mem) {
        apply_write(vm, element.gpa, element.bytes(), Source::Vcpu(vcpu));
    }
    plan.finish()
}
