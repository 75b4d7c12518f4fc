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

/// A single-step trap the VMM asked for (`KVM_SET_GUEST_DEBUG`) comes back as
/// [`Exit::Debug`] with KVM's vector and RIP, one per instruction; with debugging off the
/// guest runs on to its end. Real-mode code, because PVM honours guest debugging only for
/// the code it emulates (CPL0 and real mode): native CPL3 code gets the #DB itself
/// (`shared/reference/kvm-readonly-memslot-findings.md`, Q1).
#[test]
fn single_step_reaches_the_vmm_as_debug_exits_one_per_instruction() {
    use kvm_bindings::{KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, kvm_guest_debug};
    let Some(kvm) = pagetrack_testkit::gate::open_kvm_or_skip(module_path!()) else {
        return;
    };
    const CODE: u16 = 0x1000;
    let code = pagetrack_testkit::assemble16(u64::from(CODE), |a| {
        a.mov(ax, 1)?; // 3 bytes
        a.mov(bx, 2)?; // 3 bytes
        a.add(ax, bx)?; // 2 bytes
        a.mov(al, 0)?;
        a.out(u32::from(pagetrack_vmm::x86::GUEST_EXIT_PORT), al)
    });
    let vm = pagetrack_kvm::Vm::with_kvm(kvm, pagetrack_kvm::VmConfig::default().with_ram(1 << 20))
        .unwrap();
    vm.add_ram(0, 1 << 20).unwrap();
    vm.untracked_memory()
        .write_slice(&code, GuestAddress(u64::from(CODE)))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    pagetrack_vmm::x86::setup_real_mode(vcpu.fd(), CODE).unwrap();
    let debug = kvm_guest_debug {
        control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP,
        ..Default::default()
    };
    vcpu.fd().set_guest_debug(&debug).unwrap();
    let mut pcs = Vec::new();
    while pcs.len() < 3 {
        match vcpu.run().unwrap() {
            Exit::Debug { exception, pc, .. } => {
                assert_eq!(exception, 1, "a single step is #DB (vector 1)");
                pcs.push(pc);
            }
            other => panic!("unexpected exit {other:?} after steps at {pcs:x?}"),
        }
    }
    let at = u64::from(CODE);
    assert_eq!(
        pcs,
        [at + 3, at + 6, at + 8],
        "each step stops after one instruction, at the next one's RIP"
    );
    assert_eq!(vcpu.fd().get_regs().unwrap().rax & 0xffff, 3);
    vcpu.fd()
        .set_guest_debug(&kvm_guest_debug::default())
        .unwrap();
    match vcpu.run().unwrap() {
        Exit::IoOut {
            port: pagetrack_vmm::x86::GUEST_EXIT_PORT,
            data,
        } => assert_eq!(data.first(), 0),
        other => panic!("unexpected exit {other:?} with debugging off"),
    }
}
