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
