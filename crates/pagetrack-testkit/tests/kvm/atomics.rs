//! Locked read-modify-writes on a tracked word stay atomic across two vCPUs (KVM alone loses
//! 23–38 % of them, findings Q2), with one event per memory change and none for a failed
//! compare-exchange.

use iced_x86::code_asm::*;
use pagetrack::Gfn;
use pagetrack_testkit::{assemble, exit_with, kvm_or_skip};

use crate::common::*;

const N: u32 = 20_000;
const RUNS: usize = 10;

type Body = fn(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>;

/// Runs `body` N times on each of two vCPUs. Registers on entry: rdi = the tracked word,
/// rbx = this vCPU's own bit mask (1 << index), r12 = index, r14 = error count (stored to
/// U + 8 * index at the end). Returns (final word, errors of vCPU 0 and 1, events).
fn two_vcpus(kvm: kvm_ioctls::Kvm, init: u64, body: Body) -> (u64, [u64; 2], Vec<Ev>) {
    two_vcpus_n(kvm, init, body, N)
}

/// As [`two_vcpus`] with `iters` iterations of `body` (bodies with k locked operations run
/// N / k iterations, so every test does N operations per vCPU).
fn two_vcpus_n(
    kvm: kvm_ioctls::Kvm,
    init: u64,
    body: Body,
    iters: u32,
) -> (u64, [u64; 2], Vec<Ev>) {
    two_vcpus_prologue(kvm, init, |a| a.nop(), body, iters)
}

/// As [`two_vcpus_n`], running `prologue` once on each vCPU before the loop.
fn two_vcpus_prologue(
    kvm: kvm_ioctls::Kvm,
    init: u64,
    prologue: Body,
    body: Body,
    iters: u32,
) -> (u64, [u64; 2], Vec<Ev>) {
    let code = assemble(ENTRY, |a| {
        prologue(a)?;
        a.xor(r14, r14)?; // errors = 0
        a.mov(r15d, iters)?; // iterations
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.nop()?; // the body may put its own label on its first instruction
        body(a)?;
        a.dec(r15d)?;
        a.jnz(top)?;
        a.mov(r13, U)?;
        a.mov(qword_ptr(r13 + r12 * 8), r14)?; // report errors (untracked)
        exit_with(a, 0)
    });
    let mut g = boot(kvm, 16 << 20, 2, &code);
    use vm_memory::Bytes;
    g.vm.untracked_memory()
        .write_slice(&init.to_le_bytes(), vm_memory::GuestAddress(T))
        .unwrap();
    let (rec, _h) = recorder(&g.vm);
    g.vm.tracker().add_gfn(Gfn(T >> 12)).unwrap();
    let init_page = read(&g.vm, T, 4096);
    for (i, v) in g.vcpus.iter().enumerate() {
        let mut r = v.fd().get_regs().unwrap();
        r.rdi = T;
        r.rbx = 1 << i;
        r.r12 = i as u64;
        v.fd().set_regs(&r).unwrap();
    }
    let (vm, layout) = (g.vm.clone(), g.layout.clone());
    let threads: Vec<_> = g
        .vcpus
        .drain(..)
        .map(|mut v| {
            let (vm, layout) = (vm.clone(), layout.clone());
            std::thread::spawn(move || {
                run_to_exit(&vm, &layout, &mut v, std::time::Duration::from_secs(120))
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let word = u64::from_le_bytes(read(&g.vm, T, 8).try_into().unwrap());
    let errs = [0, 1].map(|i| u64::from_le_bytes(read(&g.vm, U + 8 * i, 8).try_into().unwrap()));
    let ev = rec.take();
    if std::env::var_os("PT_DEBUG").is_some() {
        let mut lens = std::collections::BTreeMap::new();
        for e in &ev {
            *lens
                .entry((e.new.len(), format!("{}", e.source)))
                .or_insert(0) += 1;
        }
        eprintln!("stats {:?} lens {lens:?}", g.vm.stats());
    }
    replay(T, &init_page, &ev, &read(&g.vm, T, 4096));
    (word, errs, ev)
}

fn repeat(init: u64, body: Body, check: impl Fn(u64, [u64; 2], &[Ev])) {
    repeat_n(init, body, 1, check);
}

/// Runs a body with `ops` locked operations per iteration RUNS times.
fn repeat_n(init: u64, body: Body, ops: u32, check: impl Fn(u64, [u64; 2], &[Ev])) {
    for _ in 0..RUNS {
        let kvm = kvm_or_skip!();
        let (word, errs, ev) = two_vcpus_n(kvm, init, body, N / ops);
        check(word, errs, &ev);
    }
}

fn sum_check(expect: u64) -> impl Fn(u64, [u64; 2], &[Ev]) {
    move |word, _, ev| {
        assert_eq!(word, expect, "lost updates");
        assert_eq!(ev.len(), 2 * N as usize, "one event per update");
    }
}

#[test]
fn lock_xadd_two_vcpus_exact() {
    repeat(
        0,
        |a| {
            a.mov(eax, 1)?;
            a.lock().xadd(qword_ptr(rdi), rax) // fetch-and-add 1
        },
        sum_check(2 * u64::from(N)),
    );
}

#[test]
fn lock_inc_dec_add_sub_two_vcpus_exact() {
    repeat(
        0,
        |a| a.lock().inc(qword_ptr(rdi)),
        sum_check(2 * u64::from(N)),
    );
    repeat(
        2 * u64::from(N),
        |a| a.lock().dec(dword_ptr(rdi)),
        sum_check(0),
    );
    repeat(
        0,
        |a| a.lock().add(word_ptr(rdi), 3),
        sum_check((6 * u64::from(N)) & 0xffff),
    );
    repeat(
        2 * u64::from(N),
        |a| a.lock().sub(qword_ptr(rdi), 1),
        sum_check(0),
    );
}

/// A `lock cmpxchg` retry loop of `bits` width: read, add 1, compare-exchange, retry on failure.
macro_rules! cmpxchg_loop {
    ($ptr:ident, $acc:ident, $new:ident) => {
        |a: &mut CodeAssembler| {
            let mut retry = a.create_label();
            a.set_label(&mut retry)?;
            a.mov($acc, $ptr(rdi))?; // expected = current
            a.lea(rcx, qword_ptr(rax + 1))?; // new = expected + 1
            a.lock().cmpxchg($ptr(rdi), $new)?; // publish if unchanged
            a.jnz(retry) // somebody else won: retry
        }
    };
}

#[test]
fn lock_cmpxchg_retry_loops_all_widths_exact() {
    let failures_give_no_event = |expect: u64| {
        move |word: u64, _: [u64; 2], ev: &[Ev]| {
            assert_eq!(word, expect, "lost updates");
            assert_eq!(
                ev.len(),
                2 * N as usize,
                "events only for successful exchanges"
            );
            for e in ev {
                assert_ne!(
                    e.old.as_deref(),
                    Some(&e.new[..]),
                    "a failed compare was reported"
                );
            }
        }
    };
    repeat(
        0,
        cmpxchg_loop!(qword_ptr, rax, rcx),
        failures_give_no_event(2 * u64::from(N)),
    );
    repeat(
        0,
        cmpxchg_loop!(dword_ptr, eax, ecx),
        failures_give_no_event(2 * u64::from(N)),
    );
    repeat(
        0,
        cmpxchg_loop!(word_ptr, ax, cx),
        failures_give_no_event(2 * u64::from(N)),
    );
    repeat(
        0,
        cmpxchg_loop!(byte_ptr, al, cl),
        failures_give_no_event((2 * u64::from(N)) & 0xff),
    );
}

#[test]
fn cmpxchg8b_and_16b_retry_loops_exact() {
    let body8: Body = |a| {
        let mut retry = a.create_label();
        a.set_label(&mut retry)?;
        a.mov(eax, dword_ptr(rdi))?; // edx:eax = current
        a.mov(edx, dword_ptr(rdi + 4))?;
        a.lea(ebx, ptr(rax + 1))?; // ecx:ebx = current + 1 (low half only grows)
        a.mov(ecx, edx)?;
        a.lock().cmpxchg8b(qword_ptr(rdi))?;
        a.jnz(retry)
    };
    repeat(0, body8, sum_check(2 * u64::from(N)));
    let body16: Body = |a| {
        let mut retry = a.create_label();
        a.set_label(&mut retry)?;
        a.mov(rax, qword_ptr(rdi))?; // rdx:rax = current
        a.mov(rdx, qword_ptr(rdi + 8))?;
        a.lea(rbx, qword_ptr(rax + 1))?; // rcx:rbx = current + 1
        a.mov(rcx, rdx)?;
        a.lock().cmpxchg16b(xmmword_ptr(rdi))?;
        a.jnz(retry)
    };
    repeat(0, body16, sum_check(2 * u64::from(N)));
}

/// Each vCPU flips only its own bit and checks it after every operation: a lost update shows
/// up as an error.
#[test]
fn lock_bitwise_ops_on_own_bits_never_lost() {
    let no_errors = |_: u64, errs: [u64; 2], _: &[Ev]| assert_eq!(errs, [0, 0], "lost updates");
    let or_and: Body = |a| {
        a.lock().or(qword_ptr(rdi), rbx)?; // set own bit
        a.test(qword_ptr(rdi), rbx)?;
        let mut ok = a.create_label();
        a.jnz(ok)?;
        a.inc(r14)?; // own bit lost
        a.set_label(&mut ok)?;
        a.mov(rax, rbx)?;
        a.not(rax)?;
        a.lock().and(qword_ptr(rdi), rax)?; // clear own bit
        a.test(qword_ptr(rdi), rbx)?;
        let mut ok2 = a.create_label();
        a.jz(ok2)?;
        a.inc(r14)?;
        a.set_label(&mut ok2)?;
        a.nop()
    };
    repeat_n(0, or_and, 2, no_errors);
    let xor: Body = |a| {
        a.lock().xor(qword_ptr(rdi), rbx)?; // flip own bit (now set)
        a.test(qword_ptr(rdi), rbx)?;
        let mut ok = a.create_label();
        a.jnz(ok)?;
        a.inc(r14)?;
        a.set_label(&mut ok)?;
        a.lock().xor(qword_ptr(rdi), rbx)?; // flip back
        a.nop()
    };
    repeat_n(0, xor, 2, no_errors);
    let bt: Body = |a| {
        a.lock().bts(qword_ptr(rdi), r12)?; // set own bit; CF = old (must be 0)
        a.adc(r14, 0)?;
        a.lock().btc(qword_ptr(rdi), r12)?; // complement: CF = old (must be 1)
        a.cmc()?;
        a.adc(r14, 0)?;
        a.lock().bts(qword_ptr(rdi), r12)?; // set again (old 0)
        a.adc(r14, 0)?;
        a.lock().btr(qword_ptr(rdi), r12)?; // reset: CF = old (must be 1)
        a.cmc()?;
        a.adc(r14, 0)
    };
    repeat_n(0, bt, 4, no_errors);
}

#[test]
fn lock_not_neg_pairs_cancel_exactly() {
    let back_to_init = |init: u64| move |word: u64, _: [u64; 2], _: &[Ev]| assert_eq!(word, init);
    repeat(
        0x1234_5678,
        |a| a.lock().not(qword_ptr(rdi)),
        back_to_init(0x1234_5678),
    );
    repeat(77, |a| a.lock().neg(qword_ptr(rdi)), back_to_init(77));
}

#[test]
fn xchg_spinlock_protects_a_plain_counter_on_a_tracked_frame() {
    // lock word at T, counter at T + 64; acquire with xchg, release with a plain store.
    let body: Body = |a| {
        let mut spin = a.create_label();
        a.set_label(&mut spin)?;
        a.mov(eax, 1)?;
        a.xchg(dword_ptr(rdi), eax)?; // try to take the lock
        a.test(eax, eax)?;
        a.jnz(spin)?; // held by the other vCPU
        a.mov(rax, qword_ptr(rdi + 64))?; // non-atomic increment inside the lock
        a.inc(rax)?;
        a.mov(qword_ptr(rdi + 64), rax)?;
        a.mov(dword_ptr(rdi), 0)?; // release (plain store)
        a.nop()
    };
    for _ in 0..RUNS {
        let kvm = kvm_or_skip!();
        let (word, _, ev) = two_vcpus(kvm, 0, body);
        assert_eq!(word & 0xffff_ffff, 0, "lock released");
        let counter = ev
            .iter()
            .rev()
            .find(|e| e.gpa == T + 64)
            .expect("counter events");
        assert_eq!(
            counter.new,
            (2 * u64::from(N)).to_le_bytes(),
            "no increment lost"
        );
    }
}

/// After `wrfsbase`, a locked increment through FS stays atomic: the FS base comes from the
/// exit, not from a value cached at an earlier trapped store.
#[test]
fn lock_inc_through_fs_after_wrfsbase_two_vcpus_exact() {
    for _ in 0..RUNS {
        let kvm = kvm_or_skip!();
        let (word, _, ev) = two_vcpus_prologue(
            kvm,
            0,
            |a| {
                a.lock().inc(qword_ptr(rdi + 64))?; // a trapped store while FS base is 0
                a.lea(rax, ptr(rdi - 0x100))?;
                a.wrfsbase(rax) // FS base = T - 0x100
            },
            |a| a.lock().inc(qword_ptr(0x100).fs()),
            N,
        );
        assert_eq!(word, 2 * u64::from(N), "lost updates");
        assert_eq!(ev.len(), 2 * N as usize + 2, "one event per update");
    }
}
