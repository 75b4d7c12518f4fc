//! Hostile guests (issue 10): code written so that the bytes before RIP spell a locked
//! read-modify-write that did not run. Each body runs twice through the two-pass harness
//! (untracked, then tracked) and must behave identically, with exact events.

use iced_x86::IcedError;
use iced_x86::code_asm::*;
use pagetrack_testkit::{TwoPass, TwoPassRun};

type Asm = CodeAssembler;

/// Runs `body` through the harness and asserts exactness; None when /dev/kvm is absent.
fn exact(body: &dyn Fn(&mut Asm) -> Result<(), IcedError>) -> Option<TwoPassRun> {
    let kvm = pagetrack_testkit::gate::open_kvm_or_skip(module_path!())?;
    let run = TwoPass::new(body).run(kvm);
    run.assert_exact();
    Some(run)
}

#[test]
fn harness_plain_stores_are_exact() {
    let Some(run) = exact(&|a| {
        a.mov(qword_ptr(rdi + 8), rax)?; // 8 bytes
        a.mov(dword_ptr(rdi + 0x20), 0x1234_5678)?; // imm32
        a.mov(byte_ptr(rdi + 0xfff), cl)?; // last byte
        a.add(qword_ptr(rdi + 0x40), rdx) // unlocked read-modify-write, sets flags
    }) else {
        return;
    };
    assert_eq!(run.events.len(), 4, "{:?}", run.events);
}

/// `mov dword [rbx], imm32` = c7 03 <imm32>, the immediate's bytes given.
fn mov_imm_spelling(a: &mut Asm, imm: [u8; 4]) -> Result<(), IcedError> {
    a.lea(rbx, ptr(rdi + 0x40))?;
    a.db(&[0xc7, 0x03])?;
    a.db(&imm)
}

#[test]
fn mov_imm_spelling_lock_cmpxchg_keeps_its_store() {
    // The immediate f0 0f b1 0b is `lock cmpxchg [rbx], ecx`; ZF=0 makes it look failed.
    let Some(run) = exact(&|a| mov_imm_spelling(a, [0xf0, 0x0f, 0xb1, 0x0b])) else {
        return;
    };
    assert_eq!(
        run.events.len(),
        1,
        "the store is reported: {:?}",
        run.events
    );
    assert_eq!(run.events[0].new, [0xf0, 0x0f, 0xb1, 0x0b]);
}

#[test]
fn mov_imm_spelling_lock_add_stores_its_immediate() {
    // 90 f0 01 0b: the tail f0 01 0b is `lock add [rbx], ecx`.
    let Some(run) = exact(&|a| mov_imm_spelling(a, [0x90, 0xf0, 0x01, 0x0b])) else {
        return;
    };
    assert_eq!(run.events.len(), 1);
}

#[test]
fn mov_imm_spelling_xchg_leaves_eax_alone() {
    // 11 22 87 03: the tail 87 03 is `xchg [rbx], eax`.
    let Some(run) = exact(&|a| mov_imm_spelling(a, [0x11, 0x22, 0x87, 0x03])) else {
        return;
    };
    assert_eq!(run.events.len(), 1);
}

#[test]
fn call_whose_target_follows_lock_add_bytes_keeps_its_return_address() {
    // The stack is in the data frame; the call's push traps with RIP = the target, and the
    // bytes before the target spell `lock add [rsp], rax` (f0 48 01 04 24).
    let Some(run) = exact(&|a| {
        let mut target = a.create_label();
        let mut after = a.create_label();
        a.mov(rbp, rsp)?;
        a.lea(rsp, ptr(rdi + 0x800))?;
        a.call(target)?;
        a.jmp(after)?;
        a.db(&[0xf0, 0x48, 0x01, 0x04, 0x24])?;
        a.set_label(&mut target)?;
        a.ret()?; // back through the (tracked) return address
        a.set_label(&mut after)?;
        a.mov(rsp, rbp)?;
        a.nop()
    }) else {
        return;
    };
    assert_eq!(run.events.len(), 1, "{:?}", run.events);
}

#[test]
fn rep_stosb_after_lock_add_bytes_stores_every_element() {
    // Before the `rep stosb`: f0 00 47 ff = `lock add [rdi - 1], al`, the element just stored.
    let Some(run) = exact(&|a| {
        let mut over = a.create_label();
        a.add(rdi, 0x100)?;
        a.mov(ecx, 64)?;
        a.mov(al, 0x5a)?;
        a.jmp(over)?;
        a.db(&[0xf0, 0x00, 0x47, 0xff])?;
        a.set_label(&mut over)?;
        a.rep().stosb()
    }) else {
        return;
    };
    assert_eq!(
        run.events.iter().map(|e| e.new.len()).sum::<usize>(),
        64,
        "{:?}",
        run.events
    );
}

#[test]
fn genuine_locked_ops_on_one_vcpu_stay_exact() {
    // A failing compare-exchange (no event), a xadd, an xchg and a lock inc, run for real.
    let Some(run) = exact(&|a| {
        a.xor(eax, eax)?;
        a.lock().cmpxchg(dword_ptr(rdi), ecx)?; // memory is not 0: fails, eax = memory
        a.mov(r8, rax)?;
        a.lock().xadd(qword_ptr(rdi + 8), rdx)?;
        a.xchg(qword_ptr(rdi + 16), rsi)?;
        a.lock().inc(word_ptr(rdi + 24))
    }) else {
        return;
    };
    assert_eq!(run.events.len(), 3, "{:?}", run.events);
    assert_eq!(
        run.stats.atomic_rmws, 4,
        "all four went through the atomic path"
    );
}

#[test]
fn decoding_whose_address_wraps_around_does_not_hang_the_vcpu() {
    // 90 f0 89 48 f8 ... the tail 89 48 f8 is `mov [rax - 8], ecx`: with rax = 0 its range
    // ends at the top of the address space (it once made the page loop never end).
    let Some(kvm) = pagetrack_testkit::gate::open_kvm_or_skip(module_path!()) else {
        return;
    };
    let run = pagetrack_testkit::with_watchdog(std::time::Duration::from_secs(60), move || {
        let body = |a: &mut Asm| {
            a.xor(eax, eax)?;
            mov_imm_spelling(a, [0xf0, 0x89, 0x48, 0xf8])
        };
        TwoPass::new(&body).run(kvm)
    });
    run.assert_exact();
    assert_eq!(run.events.len(), 1);
}
