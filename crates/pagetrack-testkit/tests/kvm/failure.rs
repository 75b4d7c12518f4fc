//! Failure paths (issue 11, item 8): typed errors that keep their source, and no change.

/// Guest RAM that cannot be mapped fails with the OS error kept in the source chain, and
/// changes nothing: the VM has no RAM afterwards.
#[test]
fn add_ram_mmap_failure_keeps_os_error_as_source_and_changes_nothing() {
    let kvm = pagetrack_testkit::kvm_or_skip!();
    let vm = pagetrack_kvm::Vm::with_kvm(kvm, pagetrack_kvm::VmConfig::default()).unwrap();

    // 128 TiB: more than a 47-bit user address space can map.
    let err = vm.add_ram(0, 1 << 47).unwrap_err();

    assert!(matches!(err, pagetrack_kvm::Error::Mmap { .. }), "{err:?}");
    let mut chain = Vec::new();
    let mut cur: Option<&dyn std::error::Error> = Some(&err);
    while let Some(e) = cur {
        chain.push(e.to_string());
        cur = e.source();
    }
    assert!(chain.len() >= 2, "no source kept: {chain:?}");
    assert_eq!(vm.stats().fragments.fragments, 0);
    assert!(!vm.memory().is_ram(0, 1));
    // The slot id and range are free: a normal region still goes in.
    vm.add_ram(0, 2 << 20).unwrap();
}
