//! Exits reach the VMM with their whole payload (issue 11 item 7): `rep outs` data arrives
//! whole, however KVM splits it into exits.

use iced_x86::code_asm::*;
use pagetrack_kvm::Exit;
use pagetrack_testkit::{assemble, exit_with, kvm_or_skip};
use vm_memory::{Bytes, GuestAddress};

use crate::common::*;

const CONSOLE: u16 = 0x3f8;

#[test]
fn rep_outsb_of_40_bytes_reaches_the_vmm_whole() {
    let kvm = kvm_or_skip!();
    let code = assemble(ENTRY, |a| {
        a.mov(rsi, U)?; // rsi = the message
        a.mov(edx, u32::from(CONSOLE))?; // dx = port
        a.mov(ecx, 40)?; // 40 bytes
        a.rep().outsb()?; // one string output
        exit_with(a, 0)
    });
    let mut g = boot(kvm, 16 << 20, 1, &code);
    let message: Vec<u8> = (1..=40).collect();
    g.vm.untracked_memory()
        .write_slice(&message, GuestAddress(U))
        .unwrap();

    let mut got = Vec::new();
    let mut largest = 0;
    let code = loop {
        match g.vcpus[0].run().unwrap() {
            Exit::IoOut {
                port: CONSOLE,
                data,
            } => {
                largest = largest.max(data.as_slice().len());
                got.extend_from_slice(data.as_slice());
            }
            Exit::IoOut {
                port: pagetrack_vmm::x86::GUEST_EXIT_PORT,
                data,
            } => break data.first(),
            other => panic!("unexpected exit {other:?}"),
        }
    };

    assert_eq!(code, 0);
    assert_eq!(
        got, message,
        "the console got other bytes than the guest wrote"
    );
    // How KVM splits the string is its choice (PVM: one byte per exit; hardware KVM: up to
    // a page per exit, which `IoData` keeps whole: see its unit tests in pagetrack-kvm).
    assert!(
        (1..=40).contains(&largest),
        "largest exit carried {largest} bytes"
    );
}
