//! Issue 10 item 6: locked operations the atomic path used to lose on two vCPUs, each run
//! with exact totals and with the same code untracked as the control: a locked op whose
//! operand straddles two frames (both tracked, or one), a compare-exchange loop on such a
//! split word, and a failing `lock cmpxchg [rax]` (RAX both base and comparand).

use iced_x86::code_asm::*;
use pagetrack::Gfn;
use pagetrack_testkit::{assemble, exit_with};

use crate::common::*;

/// Operations per vCPU in one run.
pub(crate) const N: u32 = 2_000;
/// Runs per tracked configuration.
const RUNS: usize = 2;
/// The split word: its first 4 bytes end frame T, its last 4 start frame T + 4096.
pub(crate) const SPLIT: u64 = T + 4092;

pub(crate) type Body = fn(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>;

/// Which of the two frames under the split word are tracked.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Tracked {
    Neither,
    Both,
    First,
    Second,
}

impl Tracked {
    /// The tracked bytes, as (start, length).
    fn range(self) -> Option<(u64, usize)> {
        match self {
            Tracked::Neither => None,
            Tracked::Both => Some((T, 8192)),
            Tracked::First => Some((T, 4096)),
            Tracked::Second => Some((T + 4096, 4096)),
        }
    }

    fn gfns(self) -> Vec<u64> {
        let (a, b) = (T >> 12, (T >> 12) + 1);
        match self {
            Tracked::Neither => vec![],
            Tracked::Both => vec![a, b],
            Tracked::First => vec![a],
            Tracked::Second => vec![b],
        }
    }
}

/// What one run ended with.
pub(crate) struct Run {
    /// The 8 bytes at `addr`.
    pub(crate) word: u64,
    /// The plain counter at U (bodies that keep one).
    pub(crate) counter: u64,
    /// The events delivered, in order.
    pub(crate) events: Vec<Ev>,
    /// Whether the word straddles the two frames.
    pub(crate) split: bool,
    /// Whether a vCPU stopped with an error instead of finishing (and its text).
    pub(crate) error: Option<String>,
}

/// Runs `body` `iters` times on each of two vCPUs, with `tracked` frames tracked. Registers
/// on entry: rdi = `addr`, rsi = U (an untracked scratch frame), r12 = the vCPU index.
pub(crate) fn two_vcpus(
    addr: u64,
    tracked: Tracked,
    init: u64,
    body: Body,
    iters: u32,
) -> Option<Run> {
    let kvm = pagetrack_testkit::gate::open_kvm_or_skip(module_path!())?;
    let code = assemble(ENTRY, |a| {
        a.mov(r15d, iters)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.nop()?;
        body(a)?;
        a.dec(r15d)?;
        a.jnz(top)?;
        exit_with(a, 0)
    });
    let mut g = boot(kvm, 16 << 20, 2, &code);
    use vm_memory::Bytes;
    g.vm.untracked_memory()
        .write_slice(&init.to_le_bytes(), vm_memory::GuestAddress(addr))
        .unwrap();
    let (rec, _h) = recorder(&g.vm);
    for gfn in tracked.gfns() {
        g.vm.tracker().add_gfn(Gfn(gfn)).unwrap();
    }
    let init_pages = read(&g.vm, T, 8192);
    for (i, v) in g.vcpus.iter().enumerate() {
        let mut r = v.fd().get_regs().unwrap();
        r.rdi = addr;
        r.rsi = U;
        r.r12 = i as u64;
        v.fd().set_regs(&r).unwrap();
    }
    let error = run_vcpus(&g.vm, &g.layout, g.vcpus.drain(..));
    let word = u64::from_le_bytes(read(&g.vm, addr, 8).try_into().unwrap());
    let counter = u64::from_le_bytes(read(&g.vm, U, 8).try_into().unwrap());
    let events = rec.take();
    if error.is_none()
        && let Some((from, len)) = tracked.range()
    {
        // Every event lies in the tracked frames and replays to their final contents.
        let off = usize::try_from(from - T).unwrap();
        let init = &init_pages[off..off + len];
        replay(from, init, &events, &read(&g.vm, from, len));
    }
    Some(Run {
        word,
        counter,
        events,
        split: addr & 0xfff > 0xff8,
        error,
    })
}

/// Runs `vcpus` to the guest's exit, one thread each, and returns the error that stopped the
/// run, if any. A vCPU that stops with an error stops the others (their loops may wait for it
/// forever); their "stopped" does not hide that error.
pub(crate) fn run_vcpus(
    vm: &pagetrack_kvm::Vm,
    layout: &pagetrack_vmm::x86::LongModeLayout,
    vcpus: impl Iterator<Item = pagetrack_kvm::Vcpu>,
) -> Option<String> {
    let vcpus: Vec<_> = vcpus.collect();
    let stoppers: std::sync::Arc<Vec<_>> =
        std::sync::Arc::new(vcpus.iter().map(|v| v.stopper()).collect());
    let threads: Vec<_> = vcpus
        .into_iter()
        .map(|mut v| {
            let (vm, layout, stoppers) = (vm.clone(), layout.clone(), stoppers.clone());
            std::thread::spawn(move || {
                let r = run_or_error(&vm, &layout, &mut v);
                if r.is_err() {
                    for s in stoppers.iter() {
                        s.stop();
                    }
                }
                r
            })
        })
        .collect();
    let mut error: Option<String> = None;
    for t in threads {
        if let Err(e) = t.join().unwrap()
            && (e != "stopped" || error.is_none())
        {
            error = Some(e);
        }
    }
    error
}

/// Runs a vCPU to the guest's exit; an error `Vcpu::run` returns comes back as text.
pub(crate) fn run_or_error(
    vm: &pagetrack_kvm::Vm,
    layout: &pagetrack_vmm::x86::LongModeLayout,
    v: &mut pagetrack_kvm::Vcpu,
) -> Result<(), String> {
    use pagetrack_kvm::Exit;
    use pagetrack_vmm::x86::{EXCEPTION_PORT, GUEST_EXIT_PORT};
    let stopper = v.stopper();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx
            .recv_timeout(std::time::Duration::from_secs(600))
            .is_err()
        {
            stopper.stop();
        }
    });
    let out = match v.run() {
        Ok(Exit::IoOut {
            port: GUEST_EXIT_PORT,
            data,
        }) => {
            assert_eq!(data.first(), 0, "guest exit code");
            Ok(())
        }
        Ok(Exit::IoOut {
            port: EXCEPTION_PORT,
            ..
        }) => {
            let ex = pagetrack_vmm::x86::decode_exception(v.fd(), &*vm.untracked_memory(), layout)
                .unwrap();
            panic!("guest exception: {ex}");
        }
        // Stopped by a peer vCPU's error (`two_vcpus`).
        Ok(Exit::Stopped) => Err("stopped".to_owned()),
        Ok(other) => panic!("unexpected exit {other:?}"),
        Err(e) => Err(e.to_string()),
    };
    let _ = done_tx.send(());
    watchdog.join().unwrap();
    out
}

/// Iterations of the untracked control: a native split lock costs this host milliseconds
/// (its split-lock mitigation serializes them across cores).
pub(crate) const CONTROL: u32 = 50;

/// Runs `body` untracked (the control, fewer rounds: split locks are slow natively) and in
/// each tracked configuration, and checks `check` on every run that finished.
pub(crate) fn each_config(addr: u64, init: u64, body: Body, check: impl Fn(&Run, u32, Tracked)) {
    let Some(control) = two_vcpus(addr, Tracked::Neither, init, body, CONTROL) else {
        return;
    };
    assert!(
        control.error.is_none(),
        "control failed: {:?}",
        control.error
    );
    assert!(control.events.is_empty());
    check(&control, CONTROL, Tracked::Neither);
    if addr & 0xfff == 0xffc {
        // One frame tracked: KVM stores the untracked part itself, outside any lock, so the
        // operation cannot be made atomic and the vCPU stops with a typed error naming the
        // instruction, rather than lose updates silently.
        for tracked in [Tracked::First, Tracked::Second] {
            let Some(run) = two_vcpus(addr, tracked, init, body, N) else {
                return;
            };
            let error = run.error.unwrap_or_default();
            assert!(
                error.contains("cannot continue at rip 0x10") && error.contains("untracked frame"),
                "{tracked:?}: {error:?}"
            );
        }
    }
    for _ in 0..RUNS {
        let Some(run) = two_vcpus(addr, Tracked::Both, init, body, N) else {
            return;
        };
        assert!(run.error.is_none(), "the vCPU stopped: {:?}", run.error);
        check(&run, N, Tracked::Both);
    }
}

/// The word ends at `init + 2 * per_op * iters` (64-bit wrapping) and, tracked, every update
/// is one event per tracked frame it touched (the replay was checked by the harness).
pub(crate) fn exact_sum(init: u64, per_op: u64) -> impl Fn(&Run, u32, Tracked) {
    move |run, iters, tracked| {
        let want = init.wrapping_add(2 * per_op * u64::from(iters));
        assert_eq!(
            run.word,
            want,
            "{tracked:?}: lost updates: {} of {}",
            run.word.wrapping_sub(init) / per_op,
            2 * iters
        );
    }
}

#[test]
fn split_lock_xadd_two_vcpus_exact() {
    each_config(
        SPLIT,
        0xffff_fff0,
        |a| {
            a.mov(eax, 1)?;
            a.lock().xadd(qword_ptr(rdi), rax)
        },
        exact_sum(0xffff_fff0, 1),
    );
}

#[test]
fn split_lock_add_and_inc_two_vcpus_exact() {
    // The low half carries into the high half (the other frame) every 2^32 / 3 adds: start
    // near the carry so that it happens during the run.
    each_config(
        SPLIT,
        0xffff_f000,
        |a| a.lock().add(qword_ptr(rdi), 3),
        exact_sum(0xffff_f000, 3),
    );
    each_config(
        SPLIT,
        0xffff_f000,
        |a| a.lock().inc(qword_ptr(rdi)),
        exact_sum(0xffff_f000, 1),
    );
    // A 4-byte word split 2 + 2.
    each_config(
        T + 4094,
        0,
        |a| a.lock().add(dword_ptr(rdi), 1),
        |run, iters, tracked| {
            assert_eq!(
                run.word & 0xffff_ffff,
                2 * u64::from(iters),
                "{tracked:?}: lost updates"
            );
        },
    );
}

#[test]
fn split_xchg_spinlock_protects_a_plain_counter() {
    // The lock word straddles the two frames; the counter at U is incremented non-atomically
    // inside the lock: a lost exchange lets both vCPUs in and loses increments.
    each_config(
        SPLIT,
        0,
        |a| {
            let mut spin = a.create_label();
            a.set_label(&mut spin)?;
            a.mov(eax, 1)?;
            a.xchg(qword_ptr(rdi), rax)?;
            a.test(rax, rax)?;
            a.jnz(spin)?;
            a.mov(rax, qword_ptr(rsi))?;
            a.inc(rax)?;
            a.mov(qword_ptr(rsi), rax)?;
            a.xor(eax, eax)?;
            a.xchg(qword_ptr(rdi), rax) // release
        },
        |run, iters, tracked| {
            assert_eq!(run.word, 0, "{tracked:?}: lock released");
            assert_eq!(
                run.counter,
                2 * u64::from(iters),
                "{tracked:?}: two vCPUs inside the lock"
            );
        },
    );
}

#[test]
fn split_lock_cmpxchg_retry_loop_exact() {
    each_config(
        SPLIT,
        0xffff_fff0,
        |a| {
            let mut retry = a.create_label();
            a.set_label(&mut retry)?;
            a.mov(rax, qword_ptr(rdi))?;
            a.lea(rcx, qword_ptr(rax + 1))?;
            a.lock().cmpxchg(qword_ptr(rdi), rcx)?;
            a.jnz(retry)
        },
        exact_sum(0xffff_fff0, 1),
    );
}

/// A failing `lock cmpxchg [rax], rcx` whose comparand is its own address (never the
/// counter's value): KVM writes the old value back and leaves it in RAX, so the address can
/// no longer be rebuilt. Applied as a plain store, that stale write-back loses the other
/// vCPU's increments.
#[test]
fn failing_cmpxchg_with_rax_base_and_comparand_loses_nothing() {
    for addr in [T + 64, SPLIT] {
        each_config(
            addr,
            0,
            |a| {
                a.mov(rax, rdi)?; // comparand = the address (the counter never gets there)
                a.mov(ecx, 7)?;
                a.lock().cmpxchg(qword_ptr(rax), rcx)?; // fails: RAX = the counter
                a.lock().inc(qword_ptr(rdi))
            },
            |run, iters, tracked| {
                assert_eq!(run.word, 2 * u64::from(iters), "{tracked:?}: lost updates");
                // One event per increment and frame piece, none for a failed compare.
                let pieces = tracked.range().map_or(0, |_| if run.split { 2 } else { 1 });
                assert_eq!(
                    run.events.len(),
                    pieces * 2 * iters as usize,
                    "{tracked:?}: a failed compare was reported"
                );
            },
        );
    }
}

/// GDT selector (RPL 3) of the 32-bit CPL3 code segment the compatibility-mode test puts in
/// a GDT slot the 2-vCPU guests do not use (the TSS descriptor of vCPU 61).
pub(crate) const COMPAT_CS: u32 = 0x400 | 3;
/// Where the compatibility-mode loop and the 64-bit return point are assembled.
pub(crate) const COMPAT_AT: u64 = ENTRY + 0x800;
pub(crate) const BACK64_AT: u64 = ENTRY + 0x400;

/// Two vCPUs `lock inc dword [edi]` `iters` times each in compatibility mode at `T`, the
/// frame tracked or not (see [`compat_lock_inc_at`]).
fn compat_lock_inc(tracked: bool, iters: u32) -> Option<(u64, Option<String>)> {
    let gfns: &[u64] = if tracked { &[T >> 12] } else { &[] };
    compat_lock_inc_at(T, gfns, iters, 2)
}

/// Two vCPUs `lock inc dword [edi]` `iters` times each in compatibility mode (a 32-bit code
/// segment under long mode), entered and left by far returns, with `edi = addr` and the frames
/// `gfns` tracked. Returns the counter at `addr` and the error that stopped the run.
pub(crate) fn compat_lock_inc_at(
    addr: u64,
    gfns: &[u64],
    iters: u32,
    nvcpus: u32,
) -> Option<(u64, Option<String>)> {
    let kvm = pagetrack_testkit::gate::open_kvm_or_skip(module_path!())?;
    let enter = assemble(ENTRY, |a| {
        a.mov(ecx, iters)?;
        a.mov(eax, COMPAT_CS)?;
        a.push(rax)?;
        a.mov(eax, u32::try_from(COMPAT_AT).unwrap())?;
        a.push(rax)?;
        a.db(&[0x48, 0xcb]) // retfq: to the 32-bit segment
    });
    let back = assemble(BACK64_AT, |a| exit_with(a, 0));
    let compat = pagetrack_testkit::asm::assemble_bits(32, COMPAT_AT, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.lock().inc(dword_ptr(edi))?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.mov(eax, u32::from(pagetrack_vmm::x86::USER_CS))?;
        a.push(eax)?;
        a.mov(eax, u32::try_from(BACK64_AT).unwrap())?;
        a.push(eax)?;
        a.retf() // 32-bit far return to the 64-bit segment
    });
    let mut g = boot(kvm, 16 << 20, nvcpus, &enter);
    use vm_memory::Bytes;
    let mem = g.vm.untracked_memory();
    mem.write_slice(&back, vm_memory::GuestAddress(BACK64_AT))
        .unwrap();
    mem.write_slice(&compat, vm_memory::GuestAddress(COMPAT_AT))
        .unwrap();
    // Base 0, limit 4 GiB, G = 1, D = 1, L = 0, present, DPL 3, code execute/read.
    let descriptor: u64 = 0x00cf_fa00_0000_ffff;
    mem.write_slice(
        &descriptor.to_le_bytes(),
        vm_memory::GuestAddress(g.layout.gdt() + u64::from(COMPAT_CS & !3)),
    )
    .unwrap();
    drop(mem);
    let (_rec, _h) = recorder(&g.vm);
    for &gfn in gfns {
        g.vm.tracker().add_gfn(Gfn(gfn)).unwrap();
    }
    for v in &g.vcpus {
        let mut r = v.fd().get_regs().unwrap();
        r.rdi = addr;
        v.fd().set_regs(&r).unwrap();
    }
    let error = run_vcpus(&g.vm, &g.layout, g.vcpus.drain(..));
    let word = u64::from_le_bytes(read(&g.vm, addr, 8).try_into().unwrap());
    Some((word, error))
}

/// `lock inc` in compatibility mode: the untracked control counts exactly; tracked, every
/// increment arrives, or the vCPU stops with a typed error naming the instruction — never a
/// silent lost update.
#[test]
fn compat_mode_lock_inc_is_exact_or_refused() {
    let Some((word, error)) = compat_lock_inc(false, N) else {
        return;
    };
    assert_eq!(error, None);
    assert_eq!(word, 2 * u64::from(N), "control");
    for _ in 0..RUNS {
        let Some((word, error)) = compat_lock_inc(true, N) else {
            return;
        };
        match error {
            None => assert_eq!(word, 2 * u64::from(N), "lost updates"),
            Some(e) => assert!(e.contains("compatibility mode"), "{e}"),
        }
    }
}
