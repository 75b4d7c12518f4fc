//! The embedding example (`examples/embed.rs`) run as a test: a VMM with its own VM fd,
//! memfd-backed memory, vCPU thread and `KVM_RUN` loop, with pagetrack's exit handler.
//! Skips only where `/dev/kvm` is absent.

#[path = "../examples/embed.rs"]
#[allow(dead_code)] // the example's `main`
mod embed;

use std::sync::Arc;

use kvm_ioctls::Kvm;
use pagetrack::Source;
use pagetrack_kvm::{Error, HostCaps, Vm, VmConfig};
use vm_memory::{GuestAddress, GuestRegionMmap};

fn kvm_present() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("skipped: no /dev/kvm");
    false
}

/// The events are exactly the guest's two stores to the tracked page and the VMM's device
/// write, in order and with their bytes; the store to the untracked page landed but produced
/// none; the VMM's console device saw the guest's output through its own dispatch; and the
/// dirty log (on) holds exactly the two pages the guest wrote.
#[test]
fn embedded_vmm_reports_exactly_the_tracked_writes() {
    if !kvm_present() {
        return;
    }
    let out = embed::run_vmm().expect("the embedded VMM runs");
    let ev = |gpa, new: &[u8], source| embed::Event {
        gpa,
        new: new.to_vec(),
        source,
    };
    assert_eq!(
        out.events,
        vec![
            ev(embed::TRACKED, &[0x11], Source::Vcpu(0)),
            ev(embed::TRACKED + 0x10, &[0x33, 0x22], Source::Vcpu(0)),
            ev(embed::TRACKED + 0x100, &[0xaa], Source::Device),
        ]
    );
    assert_eq!(out.memory, [0x11, 0x33, 0x22, 0x44], "every store landed");
    assert_eq!(out.console, b"ok");
    assert_eq!(
        out.dirty,
        vec![embed::TRACKED >> 12, embed::UNTRACKED >> 12],
        "dirty log"
    );
}

struct Nop;
impl pagetrack::TrackNotifier for Nop {}

fn region(size: usize) -> Arc<GuestRegionMmap> {
    Arc::new(GuestRegionMmap::from_range(GuestAddress(0), size, None).expect("mmap"))
}

/// A VM fd brought by the VMM needs the slot ids pagetrack may use, inside KVM's range;
/// refused configurations change nothing (the VM takes a valid wrap afterwards).
#[test]
fn vm_from_vm_fd_refuses_missing_or_bad_slot_ranges() {
    if !kvm_present() {
        return;
    }
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm_fd = Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"));
    let caps = HostCaps::probe(&kvm);
    let nr = u32::try_from(caps.nr_memslots).expect("fits");
    for config in [
        VmConfig::default(),
        VmConfig::default().with_kvm_slots(4..4),
        VmConfig::default().with_kvm_slots(nr - 2..nr + 1),
    ] {
        let err =
            Vm::from_vm_fd(&kvm, Arc::clone(&vm_fd), caps.clone(), config).expect_err("refused");
        assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
    }
    let vm = Vm::from_vm_fd(
        &kvm,
        Arc::clone(&vm_fd),
        caps,
        VmConfig::default().with_kvm_slots(nr - 4..nr),
    )
    .expect("a valid range");
    vm.add_region(region(1 << 20)).expect("RAM in 4 slots");
}

/// When pagetrack's `Vm` drops while the VMM keeps its VM fd, pagetrack's memslots are
/// deleted: the same guest range can be registered again on that VM under other slot ids
/// (it would overlap otherwise, EEXIST).
#[test]
fn dropping_the_wrapper_deletes_its_memslots_and_keeps_the_vm() {
    if !kvm_present() {
        return;
    }
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm_fd = Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"));
    let caps = HostCaps::probe(&kvm);
    let ram = region(1 << 20);
    // Other ids the second time: KVM refuses a new slot over a live one's range (EEXIST).
    for ids in [8..40, 40..72] {
        let vm = Vm::from_vm_fd(
            &kvm,
            Arc::clone(&vm_fd),
            caps.clone(),
            VmConfig::default().with_kvm_slots(ids),
        )
        .expect("wrap");
        vm.add_region(Arc::clone(&ram)).expect("register the range");
        let _h = vm
            .tracker()
            .register(Arc::new(Nop), pagetrack::NotifierClass::Ordinary)
            .expect("register");
        vm.tracker()
            .add_gfn(pagetrack::Gfn(3))
            .expect("track (re-cuts the chunk)");
    }
}
