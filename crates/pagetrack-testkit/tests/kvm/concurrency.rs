//! The kernel's guarantee, kept with vCPUs running: when an add returns, no store to the frame
//! lands without an event; when the last remove returns, events for the frame stop.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use pagetrack::Gfn;
use pagetrack_kvm::{Exit, Vm};
use pagetrack_testkit::{assemble, kvm_or_skip};

use crate::common::*;

/// Guest: forever `[rdi] = k; [rsi] = k; k++` (rdi tracked frame, rsi untracked progress word).
fn store_loop() -> Vec<u8> {
    assemble(ENTRY, |a| {
        a.mov(ecx, 1)?; // k = 1
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.mov(qword_ptr(rdi), rcx)?; // [rdi] = k (the tracked frame)
        a.mov(qword_ptr(rsi), rcx)?; // [rsi] = k (progress, untracked)
        a.inc(rcx)?; // k++
        a.jmp(top)
    })
}

fn set_args(vcpu: &pagetrack_kvm::Vcpu, dest: u64, prog: u64) {
    let mut regs = vcpu.fd().get_regs().unwrap();
    regs.rdi = dest;
    regs.rsi = prog;
    vcpu.fd().set_regs(&regs).unwrap();
}

fn progress(vm: &Vm, at: u64) -> u64 {
    u64::from_le_bytes(read(vm, at, 8).try_into().unwrap())
}

/// Polls until `f` holds; a liveness bound, not a timing assertion.
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::yield_now();
    }
}

#[test]
fn add_and_remove_while_two_vcpus_store_keep_the_guarantee() {
    let kvm = kvm_or_skip!();
    let mut g = boot(kvm, 64 << 20, 2, &store_loop());
    let (rec, _h) = recorder(&g.vm);
    let (t0, p0) = (T, U);
    let (t1, p1) = (T + 0x40_0000, U + 0x8);
    set_args(&g.vcpus[0], t0, p0);
    set_args(&g.vcpus[1], t1, p1);
    let stoppers: Vec<_> = g.vcpus.iter().map(|v| v.stopper()).collect();
    let done = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = g
        .vcpus
        .drain(..)
        .map(|mut v| {
            let done = done.clone();
            std::thread::spawn(move || {
                let exit = v.run().unwrap();
                assert!(done.load(Ordering::SeqCst), "vCPU left early: {exit:?}");
                assert_eq!(exit, Exit::Stopped);
            })
        })
        .collect();

    for round in 0..20 {
        let frame = if round % 2 == 0 { t0 } else { t1 };
        let prog = if round % 2 == 0 { p0 } else { p1 };
        rec.take();
        g.vm.tracker().add_gfn(Gfn(frame >> 12)).unwrap();
        let after_add = progress(&g.vm, prog);
        wait_until("events after add", || rec.0.lock().unwrap().len() >= 50);
        g.vm.tracker().remove_gfn(Gfn(frame >> 12)).unwrap();
        let after_remove = progress(&g.vm, prog);
        let ev = rec.take();

        // Every store after the add returned has an event: the values are consecutive and
        // start no later than the first store issued after we read the progress word.
        let vals: Vec<u64> = ev
            .iter()
            .inspect(|e| assert_eq!(e.gpa, frame))
            .map(|e| u64::from_le_bytes(e.new.clone().try_into().unwrap()))
            .collect();
        assert!(
            vals[0] <= after_add + 2,
            "round {round}: first event {} after {after_add}",
            vals[0]
        );
        for w in vals.windows(2) {
            assert_eq!(w[1], w[0] + 1, "round {round}: a store was not reported");
        }
        // After the remove returned: the guest keeps running natively, with no event.
        wait_until("progress after remove", || {
            progress(&g.vm, prog) > after_remove + 100_000
        });
        assert!(
            rec.take().is_empty(),
            "round {round}: event after remove returned"
        );
    }

    done.store(true, Ordering::SeqCst);
    for s in &stoppers {
        s.stop();
    }
    for t in threads {
        t.join().unwrap();
    }
    assert!(g.vm.stats().pauses >= 40);
}

/// Kicks of the VMM's own signal handler ([`kicked`]).
static KICKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

extern "C" fn kicked(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KICKS.fetch_add(1, Ordering::SeqCst);
}

/// A VMM that kicks its vCPUs with a signal of its own hands pagetrack that signal
/// (`KickSignal::Vmm`): pagetrack pauses two running vCPUs with it (the VMM's handler sees
/// the kicks) and installs no handler of its own, and the guarantee holds as with the default.
#[test]
fn the_vmms_own_kick_signal_pauses_running_vcpus() {
    let kvm = kvm_or_skip!();
    let signal = vmm_sys_util::signal::SIGRTMIN() + 7;
    vmm_sys_util::signal::register_signal_handler(signal, kicked).unwrap();
    let config = pagetrack_kvm::VmConfig::default()
        .with_ram(64 << 20)
        .with_kick_signal(pagetrack_kvm::KickSignal::Vmm { signal });
    let mut g = boot_with(kvm, config, 64 << 20, 2, &store_loop());
    let (rec, _h) = recorder(&g.vm);
    set_args(&g.vcpus[0], T, U);
    set_args(&g.vcpus[1], T + 0x40_0000, U + 8);
    let stoppers: Vec<_> = g.vcpus.iter().map(|v| v.stopper()).collect();
    let threads: Vec<_> = g
        .vcpus
        .drain(..)
        .map(|mut v| std::thread::spawn(move || v.run().unwrap()))
        .collect();
    wait_until("both vCPUs running", || {
        progress(&g.vm, U) > 1000 && progress(&g.vm, U + 8) > 1000
    });
    let before = KICKS.load(Ordering::SeqCst);
    g.vm.tracker().add_gfn(Gfn(T >> 12)).unwrap();
    let after_add = progress(&g.vm, U);
    wait_until("events after add", || rec.0.lock().unwrap().len() >= 50);
    g.vm.tracker().remove_gfn(Gfn(T >> 12)).unwrap();
    assert!(
        KICKS.load(Ordering::SeqCst) > before,
        "the pauses did not send the VMM's signal"
    );
    let vals: Vec<u64> = rec
        .take()
        .iter()
        .inspect(|e| assert_eq!(e.gpa, T))
        .map(|e| u64::from_le_bytes(e.new.clone().try_into().unwrap()))
        .collect();
    assert!(
        vals[0] <= after_add + 2,
        "first event {} after {after_add}",
        vals[0]
    );
    for w in vals.windows(2) {
        assert_eq!(w[1], w[0] + 1, "a store was not reported");
    }
    for s in &stoppers {
        s.stop();
    }
    for t in threads {
        assert_eq!(t.join().unwrap(), Exit::Stopped);
    }
}

/// A VMM kick signal without a handler (its default action would end the process) and a
/// kick signal past `SIGRTMAX` are refused, before a VM is made.
#[test]
fn a_kick_signal_without_handler_or_out_of_range_is_refused() {
    use pagetrack_kvm::{Error, KickSignal, VmConfig};
    let kvm = kvm_or_skip!();
    let signal = vmm_sys_util::signal::SIGRTMIN() + 9; // nobody installs a handler on it
    let err = Vm::with_kvm(
        kvm,
        VmConfig::default().with_kick_signal(KickSignal::Vmm { signal }),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::KickSignalUnhandled { signal: s } if s == signal),
        "{err:?}"
    );
    for kick in [
        KickSignal::Vmm {
            signal: libc::SIGUSR1,
        },
        KickSignal::Own { offset: -1 },
        KickSignal::Own { offset: 1000 },
    ] {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let err = Vm::with_kvm(kvm, VmConfig::default().with_kick_signal(kick)).unwrap_err();
        assert!(
            matches!(err, Error::InvalidConfig { .. }),
            "{kick:?}: {err:?}"
        );
    }
}
