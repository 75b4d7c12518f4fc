//! KVM's own writes into guest memory (issue 10 item 14): the guest hands KVM guest-physical
//! addresses through MSRs (kvmclock, wall clock, steal time, async PF, PV EOI, Hyper-V
//! pages), and KVM writes those structures itself, bypassing the read-only memslot of a
//! tracked frame (the write is lost). pagetrack refuses both orders with a typed error: an
//! MSR write naming a tracked frame stops the vCPU (and the guest gets #GP if run on), and a
//! track of a frame KVM writes is refused. The guest runs its `wrmsr` at CPL0 (emulated by
//! PVM: a handful of instructions).

use iced_x86::code_asm::*;
use pagetrack::Gfn;
use pagetrack_kvm::{Error, Exit};
use pagetrack_testkit::assemble;
use pagetrack_vmm::x86::{GUEST_EXIT_PORT, KERNEL_CS, KERNEL_DS};

use crate::common::{ENTRY, Guest, T, U, boot, read, recorder};

const RAM: u64 = 16 << 20;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
/// The port the guest writes to between its steps.
const STEP_PORT: u16 = 0x10;

/// A guest at CPL0 that writes `value` to `msr`, exits on [`STEP_PORT`] (KVM updates the
/// pvclock on the next entry), then writes 0 to `msr` (disabling it), steps again and exits.
fn msr_guest(msr: u32, value: u64) -> Guest {
    let kvm = pagetrack_testkit::gate::open_kvm_or_skip(module_path!()).unwrap();
    let code = assemble(ENTRY, |a| {
        a.mov(ecx, msr)?;
        a.mov(eax, u32::try_from(value & 0xffff_ffff).unwrap())?;
        a.mov(edx, u32::try_from(value >> 32).unwrap())?;
        a.wrmsr()?;
        a.out(i32::from(STEP_PORT), al)?;
        a.xor(eax, eax)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.out(i32::from(STEP_PORT), al)?;
        pagetrack_testkit::exit_with(a, 0)
    });
    let g = boot(kvm, RAM, 1, &code);
    let fd = g.vcpus[0].fd();
    let mut sregs = fd.get_sregs().unwrap();
    sregs.cs.selector = KERNEL_CS;
    sregs.cs.dpl = 0;
    sregs.ss.selector = KERNEL_DS;
    sregs.ss.dpl = 0;
    fd.set_sregs(&sregs).unwrap();
    g
}

fn step(g: &mut Guest) -> Result<Exit, Error> {
    g.vcpus[0].run()
}

fn pvclock_version(g: &Guest, at: u64) -> u32 {
    u32::from_le_bytes(read(&g.vm, at, 4).try_into().unwrap())
}

/// Natively (frame untracked) KVM fills the pvclock structure; the control for the tests below.
#[test]
fn kvmclock_on_untracked_frame_is_written_by_kvm() {
    let _kvm = pagetrack_testkit::kvm_or_skip!();
    let mut g = msr_guest(MSR_KVM_SYSTEM_TIME_NEW, U | 1);
    assert!(matches!(
        step(&mut g).unwrap(),
        Exit::IoOut {
            port: STEP_PORT,
            ..
        }
    ));
    let version = pvclock_version(&g, U);
    assert!(
        version != 0 && version.is_multiple_of(2),
        "KVM wrote the pvclock (version {version})"
    );
}

/// The guest points kvmclock at a tracked frame: KVM could not write it (the update would be
/// lost without an event). The `wrmsr` stops the vCPU with a typed error naming the MSR, the
/// address and RIP, nothing is stored, and running on gives the guest #GP for the `wrmsr`.
#[test]
fn kvmclock_on_tracked_frame_is_refused() {
    let _kvm = pagetrack_testkit::kvm_or_skip!();
    let mut g = msr_guest(MSR_KVM_SYSTEM_TIME_NEW, T | 1);
    let (rec, _h) = recorder(&g.vm);
    g.vm.tracker().add_gfn(Gfn(T >> 12)).unwrap();
    let before = read(&g.vm, T, 4096);
    match step(&mut g) {
        Err(Error::KvmWritesTracked {
            vcpu,
            msr,
            gpa,
            rip,
            ..
        }) => {
            assert_eq!(
                (vcpu, msr, gpa, rip),
                (0, MSR_KVM_SYSTEM_TIME_NEW, T, ENTRY + 15)
            );
        }
        other => panic!("expected KvmWritesTracked, got {other:?}"),
    }
    // The refused write took no effect: nothing stored, no event, and the guest gets #GP.
    match step(&mut g) {
        Ok(Exit::IoOut { port, .. }) if port == pagetrack_vmm::x86::EXCEPTION_PORT => {
            let ex = pagetrack_vmm::x86::decode_exception(
                g.vcpus[0].fd(),
                &*g.vm.untracked_memory(),
                &g.layout,
            )
            .unwrap();
            assert_eq!(ex.mnemonic(), "#GP", "{ex}");
        }
        other => panic!("expected #GP for the refused wrmsr, got {other:?}"),
    }
    assert_eq!(
        read(&g.vm, T, 4096),
        before,
        "a refused MSR write stores nothing"
    );
    assert!(rec.take().is_empty(), "and reports nothing");
}

/// The other order: kvmclock lives on an untracked frame, then the VMM tracks it. The track
/// is refused with a typed error (changing nothing) while the MSR points there, and allowed
/// once the guest disabled it.
#[test]
fn tracking_a_frame_kvm_writes_is_refused() {
    let _kvm = pagetrack_testkit::kvm_or_skip!();
    let mut g = msr_guest(MSR_KVM_SYSTEM_TIME_NEW, U | 1);
    let (_rec, _h) = recorder(&g.vm);
    assert!(matches!(
        step(&mut g).unwrap(),
        Exit::IoOut {
            port: STEP_PORT,
            ..
        }
    ));
    let err = g.vm.tracker().add_gfn(Gfn(U >> 12)).unwrap_err();
    let pagetrack::Error::Backend { source, .. } = &err else {
        panic!("expected a backend error, got {err:?}");
    };
    let inner = source.0.downcast_ref::<Error>();
    assert!(
        matches!(inner, Some(Error::FrameWrittenByKvm { gfn, msr: MSR_KVM_SYSTEM_TIME_NEW, vcpu: Some(0) }) if *gfn == U >> 12),
        "{err}: {inner:?}"
    );
    assert!(
        !g.vm
            .tracker()
            .is_write_tracked(pagetrack::AsId::NORMAL, Gfn(U >> 12))
    );
    // The guest disables kvmclock: the frame may be tracked now.
    assert!(matches!(
        step(&mut g).unwrap(),
        Exit::IoOut {
            port: STEP_PORT,
            ..
        }
    ));
    g.vm.tracker().add_gfn(Gfn(U >> 12)).unwrap();
    assert!(matches!(
        step(&mut g).unwrap(),
        Exit::IoOut {
            port: GUEST_EXIT_PORT,
            ..
        }
    ));
}

/// The wall clock is written once, at the `wrmsr`: on a tracked frame it is refused too.
#[test]
fn wall_clock_on_tracked_frame_is_refused() {
    let _kvm = pagetrack_testkit::kvm_or_skip!();
    let mut g = msr_guest(MSR_KVM_WALL_CLOCK_NEW, T + 0x40);
    let (_rec, _h) = recorder(&g.vm);
    g.vm.tracker().add_gfn(Gfn(T >> 12)).unwrap();
    assert!(
        matches!(step(&mut g), Err(Error::KvmWritesTracked { msr: MSR_KVM_WALL_CLOCK_NEW, gpa, .. }) if gpa == T + 0x40),
    );
}

/// Forwarded writes take effect as natively: steal time on an untracked frame is filled by
/// KVM (its version field moves), and the same MSR naming a tracked frame is refused.
#[test]
fn steal_time_is_forwarded_or_refused() {
    const MSR_KVM_STEAL_TIME: u32 = 0x4b56_4d03;
    let _kvm = pagetrack_testkit::kvm_or_skip!();
    let mut g = msr_guest(MSR_KVM_STEAL_TIME, (U + 0x40) | 1);
    let (_rec, _h) = recorder(&g.vm);
    assert!(matches!(
        step(&mut g).unwrap(),
        Exit::IoOut {
            port: STEP_PORT,
            ..
        }
    ));
    let version = u32::from_le_bytes(read(&g.vm, U + 0x48, 4).try_into().unwrap());
    assert_ne!(version, 0, "KVM wrote the steal-time structure");
    let mut g = msr_guest(MSR_KVM_STEAL_TIME, (T + 0x40) | 1);
    let (_rec, _h) = recorder(&g.vm);
    g.vm.tracker().add_gfn(Gfn(T >> 12)).unwrap();
    assert!(matches!(
        step(&mut g),
        Err(Error::KvmWritesTracked { msr: MSR_KVM_STEAL_TIME, gfn, .. }) if gfn == T >> 12
    ));
}
