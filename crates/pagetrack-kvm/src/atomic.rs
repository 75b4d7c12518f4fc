//! Locked read-modify-writes on tracked frames, made atomic: the performing half.
//!
//! [`pagetrack_x86::atomic::identify_fragments`] proves which instruction made a trapped store (see
//! its docs and docs/DESIGN-kvm.md). For a locked read-modify-write this module re-executes
//! it against the *current* memory under the frame lock, applies the true result, and returns
//! the registers to load. A compare-exchange that KVM saw fail is a failure linearized at
//! KVM's read: nothing is written and no event goes out (spec B31). Any other exit is applied
//! exactly as KVM reported it.

use kvm_bindings::kvm_regs;
use pagetrack::Source;
use pagetrack_x86::atomic::{Identified, identify_fragments, start_state};
use vm_memory::GuestMemoryMmap;

use crate::emulate::{Emulated, StorePlan};
use crate::ram::{CommitError, Write};

pub(crate) use pagetrack_x86::sysregs::SysCache;

/// What to do with a trapped store.
#[derive(Debug)]
pub(crate) enum Outcome<'a> {
    /// Not a locked read-modify-write (or not one pagetrack can rebuild): apply KVM's data.
    Plain,
    /// A compare-exchange that failed at KVM's read: nothing to write, registers are right.
    FailedCompare,
    /// A locked read-modify-write whose operand straddles into a frame KVM wrote itself: it
    /// cannot be made atomic (the instruction's address and bytes, for the error).
    Partial { rip: u64, bytes: Vec<u8> },
    /// Re-executed atomically: writes applied and reported, registers to load; the frames
    /// stay locked until the registers are loaded.
    Done(Box<Emulated>, Box<kvm_regs>, crate::vm::StoreLocks<'a>),
}

/// Decides ([`identify_fragments`]) and, for a locked read-modify-write, performs the atomic
/// re-execution. `regs` are the registers after KVM's emulation (RIP past the instruction);
/// `frags` the store's MMIO fragments in order (two for an operand straddling two frames),
/// which are all held locked while the instruction runs again; its writes are committed
/// and reported as vCPU `index`'s.
pub(crate) fn handle<'a>(
    vm: &'a crate::vm::VmInner,
    mem: &GuestMemoryMmap,
    cache: &SysCache,
    regs: &kvm_regs,
    frags: &[(u64, &[u8])],
    index: u32,
) -> Outcome<'a> {
    let c = match identify_fragments(mem, cache, regs, frags) {
        Identified::Plain => return Outcome::Plain,
        Identified::FailedCompare => return Outcome::FailedCompare,
        Identified::Partial(c) => {
            return Outcome::Partial {
                rip: c.pre.rip,
                bytes: c.bytes,
            };
        }
        Identified::Locked(c) => c,
    };
    let (mut state, mut cpu) = start_state(mem, cache, &c.pre);
    let Ok(plan) = StorePlan::new(&state, &c.bytes, &mut cpu) else {
        return Outcome::Plain;
    };
    let targets: Vec<(u64, u64)> = plan.targets().map(|t| (t.gpa, t.len as u64)).collect();
    // The sync lock first if a target is relaxed (a squeezed one traps), then the frames.
    let guard = vm.lock_for_store(&targets);
    // An operand straddling into a relaxed frame: the guest writes that frame natively (KVM
    // stored this part itself, or another vCPU may store it meanwhile), so atomicity cannot
    // be proven whether or not KVM handed both parts over this time (review 13, U5: the
    // outcome depended on it). Checked under the frame locks (a promotion takes them).
    if targets.len() > 1
        && targets
            .iter()
            .any(|&(gpa, len)| vm.backend.relaxed.touches(gpa, len))
    {
        return Outcome::Partial {
            rip: c.pre.rip,
            bytes: c.bytes.clone(),
        };
    }
    let Ok(done) = plan.execute(&mut state, &mut cpu) else {
        return Outcome::Plain;
    };
    let writes: Vec<Write<'_>> = done.writes.iter().map(Write::of).collect();
    // The commit checks that every write is RAM before it writes anything (the trapped range
    // was checked; the re-execution's writes may go elsewhere), so none fails half-way.
    match vm
        .ram
        .commit(vm, mem, &guard.frames, &writes, Source::Vcpu(index))
    {
        Ok(stale) => vm.invalidate_stale(stale),
        Err(CommitError::NotRam { .. }) => return Outcome::Plain,
        Err(CommitError::Store(never)) => match never {},
    }
    Outcome::Done(Box::new(done), Box::new(state.regs), guard)
}
