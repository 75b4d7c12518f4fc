//! Configurations pagetrack would accept and then ignore are refused with a typed error,
//! before anything is done to the VM (issue 11 item 7).

use std::sync::Arc;

use pagetrack::TrackerConfig;
use pagetrack_kvm::{Error, HostCaps, Vm, VmConfig};
use pagetrack_testkit::kvm_or_skip;

#[test]
fn vm_with_a_second_address_space_is_refused() {
    let kvm = kvm_or_skip!();
    let mut config = VmConfig::default();
    config.tracker = TrackerConfig::default().with_address_spaces(2); // SMM: not enforced

    let err = Vm::with_kvm(kvm, config).unwrap_err();

    assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
    assert!(err.to_string().contains("address space 0 only"), "{err}");
}

#[test]
fn from_vm_fd_with_reserved_slots_and_a_slot_range_is_refused_and_keeps_nothing() {
    let kvm = kvm_or_skip!();
    let vm_fd = Arc::new(kvm.create_vm().unwrap());
    let caps = HostCaps::from_kvm(&kvm, true, true);
    let mut config = VmConfig::default().with_kvm_slots(8..40);
    config.reserved_slots = 4; // would have no effect with a range

    let err = Vm::from_vm_fd(&kvm, Arc::clone(&vm_fd), caps.clone(), config).unwrap_err();

    assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
    assert!(err.to_string().contains("reserved_slots"), "{err}");
    assert_eq!(
        Arc::strong_count(&vm_fd),
        1,
        "the refused VM kept the VMM's fd"
    );
    // The same range without the ignored field is accepted.
    let ok = VmConfig::default().with_kvm_slots(8..40);
    assert_eq!(ok.reserved_slots, 0);
    Vm::from_vm_fd(&kvm, vm_fd, caps, ok).unwrap();
}

#[test]
fn from_vm_fd_with_an_empty_slot_range_is_refused_and_keeps_nothing() {
    let kvm = kvm_or_skip!();
    let vm_fd = Arc::new(kvm.create_vm().unwrap());
    let caps = HostCaps::from_kvm(&kvm, true, true);

    let err = Vm::from_vm_fd(
        &kvm,
        Arc::clone(&vm_fd),
        caps,
        VmConfig::default().with_kvm_slots(8..8),
    )
    .unwrap_err();

    assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
    assert_eq!(Arc::strong_count(&vm_fd), 1);
}
