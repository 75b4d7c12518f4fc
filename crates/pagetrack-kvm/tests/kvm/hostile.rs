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
}
