//! Instructions KVM's emulator stores more than once for, in 64-bit mode (issue 10 item 3):
//! `call far` pushes CS and then the return address, and only the last push reaches
//! userspace. The caller's CS is not determined by the state after the call, so pagetrack
//! stops the vCPU with `Error::StoresLost` (natively `retf` returns; tracked, it used to
//! pop a stale CS and raise #GP). Hostile code whose bytes before a return address spell a
//! far call that did not run stays exact. Each body runs through the two-pass harness.

use iced_x86::IcedError;
use iced_x86::code_asm::*;
use pagetrack_kvm::Error;
use pagetrack_testkit::twopass::Ending;
use pagetrack_testkit::{TwoPass, TwoPassRun};
use pagetrack_vmm::x86::USER_CS;

type Asm = CodeAssembler;

fn two_pass(body: &dyn Fn(&mut Asm) -> Result<(), IcedError>) -> Option<TwoPassRun> {
    let kvm = pagetrack_testkit::gate::open_kvm_or_skip(module_path!())?;
    Some(TwoPass::new(body).run(kvm))
}

/// `call far [rdi + 0x800]` with the stack in the data frame: `rex_w` selects m16:64
/// (`48 ff 9f`, `retfq`) or m16:32 (`ff 9f`, `retf`).
fn far_call(a: &mut Asm, rex_w: bool) -> Result<(), IcedError> {
    let mut target = a.create_label();
    let mut after = a.create_label();
    a.lea(rax, ptr(target))?;
    a.mov(qword_ptr(rdi + 0x800), rax)?;
    let sel = if rex_w { 0x808 } else { 0x804 };
    a.mov(word_ptr(rdi + sel), u32::from(USER_CS))?;
    a.mov(rbp, rsp)?;
    a.lea(rsp, ptr(rdi + 0xf00))?;
    if rex_w {
        a.db(&[0x48])?;
    }
    a.db(&[0xff, 0x9f, 0x00, 0x08, 0x00, 0x00])?;
    a.jmp(after)?;
    a.set_label(&mut target)?;
    if rex_w {
        a.db(&[0x48])?;
    }
    a.db(&[0xcb])?; // retf
    a.set_label(&mut after)?;
    a.mov(rsp, rbp)?;
    a.nop()
}

fn assert_stores_lost(run: &TwoPassRun) {
    match &run.ending {
        Ending::Error(Error::StoresLost { vcpu, bytes, .. }) => {
            assert_eq!(*vcpu, 0);
            assert!(
                bytes.ends_with(&[0xff, 0x9f, 0x00, 0x08, 0x00, 0x00]),
                "the far call's bytes: {bytes:02x?}"
            );
        }
        other => panic!("expected Error::StoresLost, got {other:?}"),
    }
    // The untracked pass ran the call and returned: its witness is complete.
    assert_ne!(run.native, run.initial, "the untracked pass stored");
}

#[test]
fn call_far_m16_64_onto_a_tracked_stack_is_a_typed_error() {
    let Some(run) = two_pass(&|a| far_call(a, true)) else {
        return;
    };
    assert_stores_lost(&run);
}

#[test]
fn call_far_m16_32_onto_a_tracked_stack_is_a_typed_error() {
    let Some(run) = two_pass(&|a| far_call(a, false)) else {
        return;
    };
    assert_stores_lost(&run);
}

/// Hostile: `call rax` (ff d0) preceded by `ff 1d 00 00`, so that the six bytes before the
/// return address spell `call far [rip + 0xd0ff0000]`, whose memory does not hold the
/// target: the push is the near call's, applied exactly.
#[test]
fn near_call_after_far_call_bytes_is_exact() {
    let Some(run) = two_pass(&|a| {
        let mut target = a.create_label();
        let mut call = a.create_label();
        let mut after = a.create_label();
        a.mov(rbp, rsp)?;
        a.lea(rsp, ptr(rdi + 0xf00))?;
        a.lea(rax, ptr(target))?;
        a.jmp(call)?;
        a.db(&[0xff, 0x1d, 0x00, 0x00])?;
        a.set_label(&mut call)?;
        a.db(&[0xff, 0xd0])?; // call rax
        a.jmp(after)?;
        a.set_label(&mut target)?;
        a.ret()?;
        a.set_label(&mut after)?;
        a.mov(rsp, rbp)?;
        a.nop()
    }) else {
        return;
    };
    run.assert_exact();
    assert_eq!(run.events.len(), 1, "{:?}", run.events);
}

/// A far call whose stack is untracked stores nothing tracked: exact, no error.
#[test]
fn call_far_with_an_untracked_stack_is_exact() {
    let Some(run) = two_pass(&|a| {
        let mut target = a.create_label();
        let mut after = a.create_label();
        a.lea(rax, ptr(target))?;
        a.mov(qword_ptr(rdi + 0x800), rax)?;
        a.mov(word_ptr(rdi + 0x808), u32::from(USER_CS))?;
        a.db(&[0x48, 0xff, 0x9f, 0x00, 0x08, 0x00, 0x00])?;
        a.jmp(after)?;
        a.set_label(&mut target)?;
        a.db(&[0x48, 0xcb])?;
        a.set_label(&mut after)?;
        a.nop()
    }) else {
        return;
    };
    run.assert_exact();
}

/// A CPL3 compatibility-mode (32-bit) code segment, written over vCPU 1's TSS slot of the
/// harness GDT (the harness runs one vCPU).
const COMPAT_CS: u16 = 0x38 | 3;

fn install_compat_segment(vm: &pagetrack_kvm::Vm) {
    use vm_memory::{Bytes, GuestAddress};
    let layout = pagetrack_vmm::x86::LongModeLayout::new(pagetrack_testkit::twopass::RAM).unwrap();
    let at = layout.gdt() + u64::from(COMPAT_CS & !3);
    vm.raw_memory()
        .write_obj(0x00cf_fb00_0000_ffff_u64, GuestAddress(at))
        .unwrap();
}

/// `call far [rdi + 0x800]` (m16:64) from 64-bit code into a compatibility-mode segment,
/// stack in the data frame; the 32-bit target drops the frame and jumps back
/// (`jmp far [edi + 0x900]`). Tracked, the exit arrives in compatibility mode with 8-byte
/// pushes: still refused, the caller's CS push being lost.
#[test]
fn call_far_into_compatibility_mode_onto_a_tracked_stack_is_a_typed_error() {
    let Some(kvm) = pagetrack_testkit::gate::open_kvm_or_skip(module_path!()) else {
        return;
    };
    let body = |a: &mut Asm| {
        let mut target = a.create_label();
        let mut back = a.create_label();
        let mut after = a.create_label();
        a.lea(rax, ptr(target))?;
        a.mov(qword_ptr(rdi + 0x800), rax)?;
        a.mov(word_ptr(rdi + 0x808), u32::from(COMPAT_CS))?;
        a.lea(rax, ptr(back))?;
        a.mov(dword_ptr(rdi + 0x900), eax)?;
        a.mov(word_ptr(rdi + 0x904), u32::from(USER_CS))?;
        a.mov(rbp, rsp)?;
        a.lea(rsp, ptr(rdi + 0xf00))?;
        a.db(&[0x48, 0xff, 0x9f, 0x00, 0x08, 0x00, 0x00])?;
        a.set_label(&mut back)?;
        a.mov(rsp, rbp)?;
        a.jmp(after)?;
        a.set_label(&mut target)?;
        a.db(&[0x83, 0xc4, 0x10])?; // add esp, 16 (32-bit code)
        a.db(&[0xff, 0xaf, 0x00, 0x09, 0x00, 0x00])?; // jmp far [edi + 0x900]
        a.set_label(&mut after)?;
        a.nop()
    };
    let run = TwoPass::new(&body).run_with(kvm, install_compat_segment);
    assert_stores_lost(&run);
}

/// The same program with the stack untracked: exact (the control; it shows the
/// compatibility-mode round trip runs).
#[test]
fn call_far_into_compatibility_mode_with_an_untracked_stack_is_exact() {
    let Some(kvm) = pagetrack_testkit::gate::open_kvm_or_skip(module_path!()) else {
        return;
    };
    let body = |a: &mut Asm| {
        let mut target = a.create_label();
        let mut back = a.create_label();
        let mut after = a.create_label();
        a.lea(rax, ptr(target))?;
        a.mov(qword_ptr(rdi + 0x800), rax)?;
        a.mov(word_ptr(rdi + 0x808), u32::from(COMPAT_CS))?;
        a.lea(rax, ptr(back))?;
        a.mov(dword_ptr(rdi + 0x900), eax)?;
        a.mov(word_ptr(rdi + 0x904), u32::from(USER_CS))?;
        a.db(&[0x48, 0xff, 0x9f, 0x00, 0x08, 0x00, 0x00])?;
        a.set_label(&mut back)?;
        a.jmp(after)?;
        a.set_label(&mut target)?;
        a.db(&[0x83, 0xc4, 0x10])?;
        a.db(&[0xff, 0xaf, 0x00, 0x09, 0x00, 0x00])?;
        a.set_label(&mut after)?;
        a.nop()
    };
    let run = TwoPass::new(&body).run_with(kvm, install_compat_segment);
    run.assert_exact();
}
