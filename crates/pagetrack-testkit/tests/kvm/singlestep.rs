//! Single-stepping (RFLAGS.TF) across stores that pagetrack handles (issue 10 items 12 and 4):
//! the #DB trap must come after exactly the instructions it comes after natively, with the
//! same frame RIPs. The guest's #DB handler (CPL0) logs each frame's RIP; the body copies the
//! log into its data region, so the two-pass harness compares the tracked pass's #DB RIPs with
//! the untracked pass's.

use iced_x86::IcedError;
use iced_x86::code_asm::*;
use pagetrack_kvm::Vm;
use pagetrack_testkit::twopass::RAM;
use pagetrack_testkit::{TwoPass, assemble, kvm_or_skip};
use pagetrack_vmm::x86::LongModeLayout;
use vm_memory::{Bytes, GuestAddress};

/// The guest's #DB handler.
const HANDLER: u64 = 0x60_0000;
/// Its log: a count, then the frame RIPs.
const LOG: u64 = 0x61_0000;
/// The most RIPs logged.
pub(crate) const MAX_LOG: u64 = 200;
/// Where in the data region the body copies the log.
pub(crate) const LOG_COPY: u64 = 0x800;

/// Installs the #DB handler: the layout's stub for vector 1 jumps to it.
pub(crate) fn install_handler(vm: &Vm) {
    let handler = assemble(HANDLER, |a| {
        let mut skip = a.create_label();
        a.push(rax)?;
        a.push(rbx)?;
        a.push(rcx)?;
        a.mov(rax, LOG)?;
        a.mov(rbx, qword_ptr(rax))?;
        a.cmp(rbx, i32::try_from(MAX_LOG).unwrap())?;
        a.jae(skip)?;
        a.mov(rcx, qword_ptr(rsp + 24))?; // the frame's RIP
        a.mov(qword_ptr(rax + rbx * 8 + 8), rcx)?;
        a.set_label(&mut skip)?;
        a.inc(qword_ptr(rax))?;
        a.pop(rcx)?;
        a.pop(rbx)?;
        a.pop(rax)?;
        a.iretq()
    });
    let stub = LongModeLayout::new(RAM).unwrap().exception_stub(1).unwrap();
    let jmp = assemble(stub, |a| a.jmp(HANDLER));
    let mem = vm.untracked_memory();
    mem.write_slice(&handler, GuestAddress(HANDLER)).unwrap();
    mem.write_slice(&jmp, GuestAddress(stub)).unwrap();
    mem.write_obj(0u64, GuestAddress(LOG)).unwrap();
}

/// Runs `steps` with TF set, then copies the #DB log to `[rdi + LOG_COPY]` (RDI as at the
/// start of the body) and resets it.
pub(crate) fn stepped(
    a: &mut CodeAssembler,
    steps: &dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Result<(), IcedError> {
    a.mov(r15, rdi)?;
    a.pushfq()?;
    a.or(qword_ptr(rsp), 0x100)?;
    a.popfq()?;
    steps(a)?;
    a.pushfq()?;
    a.and(qword_ptr(rsp), !0x100)?;
    a.popfq()?;
    let mut top = a.create_label();
    let mut done = a.create_label();
    a.mov(rax, LOG)?;
    a.mov(rcx, qword_ptr(rax))?;
    a.mov(qword_ptr(r15 + LOG_COPY), rcx)?;
    a.xor(edx, edx)?;
    a.set_label(&mut top)?;
    a.cmp(rdx, rcx)?;
    a.jae(done)?;
    a.cmp(rdx, i32::try_from(MAX_LOG).unwrap())?;
    a.jae(done)?;
    a.mov(rbx, qword_ptr(rax + rdx * 8 + 8))?;
    a.mov(qword_ptr(r15 + rdx * 8 + LOG_COPY + 8), rbx)?;
    a.inc(rdx)?;
    a.jmp(top)?;
    a.set_label(&mut done)?;
    a.mov(qword_ptr(rax), 0)
}

fn check(steps: &dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>, min_traps: u64) {
    let kvm = kvm_or_skip!();
    let body = |a: &mut CodeAssembler| stepped(a, steps);
    let run = TwoPass::new(&body).run_with(kvm, install_handler);
    let at = usize::try_from(LOG_COPY).unwrap();
    let traps = u64::from_le_bytes(run.native[at..at + 8].try_into().unwrap());
    let tracked = u64::from_le_bytes(run.tracked[at..at + 8].try_into().unwrap());
    assert!(
        traps >= min_traps,
        "the native pass single-stepped ({traps} #DBs)"
    );
    let rips = |m: &[u8], n: u64| -> Vec<String> {
        (0..usize::try_from(n.min(MAX_LOG)).unwrap())
            .map(|i| {
                let o = at + 8 + 8 * i;
                format!("{:#x}", u64::from_le_bytes(m[o..o + 8].try_into().unwrap()))
            })
            .collect()
    };
    assert_eq!(
        rips(&run.tracked, tracked),
        rips(&run.native, traps),
        "#DB frame RIPs tracked (left) vs untracked"
    );
    run.assert_exact();
}

/// A plain trapped store (KVM emulates it, pagetrack applies the MMIO write).
#[test]
fn tf_after_plain_trapped_store() {
    check(
        &|a| {
            a.mov(dword_ptr(rdi + 0x10), 0x1122_3344)?;
            a.nop()?;
            a.mov(qword_ptr(rdi + 0x20), rax)?;
            a.nop()
        },
        4,
    );
}

/// A locked read-modify-write (re-executed atomically by pagetrack).
#[test]
fn tf_after_locked_rmw() {
    check(
        &|a| {
            a.lock().add(dword_ptr(rdi + 0x10), 5)?;
            a.nop()?;
            a.mov(eax, 7)?;
            a.lock().xadd(dword_ptr(rdi + 0x40), eax)?;
            a.nop()
        },
        5,
    );
}

/// A store KVM cannot emulate, completed by pagetrack in userspace.
#[test]
fn tf_after_userspace_completed_store() {
    check(
        &|a| {
            a.pextrb(byte_ptr(rdi + 0x13), xmm0, 1)?;
            a.nop()?;
            a.vmovdqu(ymmword_ptr(rdi + 0x60), ymm1)?;
            a.nop()
        },
        4,
    );
}

/// `rep stosb` with TF: the CPU stores one element, then #DB with RIP still on the `rep`;
/// pagetrack's completion of the rest of the page must not run ahead of that.
#[test]
fn tf_rep_stosb_steps_one_element_at_a_time() {
    check(
        &|a| {
            a.lea(rdi, ptr(rdi + 0x100))?;
            a.mov(ecx, 16)?;
            a.mov(al, 0x5a)?;
            a.rep().stosb()?;
            a.nop()
        },
        16,
    );
}

/// `rep movsb` into the tracked frame with TF, as `rep stosb`.
#[test]
fn tf_rep_movsb_steps_one_element_at_a_time() {
    check(
        &|a| {
            a.lea(rsi, ptr(rdi + 0x200))?;
            a.lea(rdi, ptr(rdi + 0x300))?;
            a.mov(ecx, 12)?;
            a.rep().movsb()?;
            a.nop()
        },
        12,
    );
}
