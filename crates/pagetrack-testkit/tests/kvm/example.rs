//! The README's example program runs and reports exactly the tracked writes.

#[path = "../../../pagetrack-vmm/examples/watch.rs"]
#[expect(dead_code, reason = "the example's main is not called here")]
mod watch;

#[test]
fn watch_example_reports_the_tracked_writes_only() {
    let _kvm = pagetrack_testkit::kvm_or_skip!();
    let lines = watch::watch().unwrap();
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert!(lines[0].starts_with("vcpu 0 wrote [88, 77, 66, 55, 44, 33, 22, 11] at 0x5000"));
    assert!(lines[2].starts_with("device wrote [de, ad] at 0x5100"));
}
