//! Adversarial review 13 of relaxed mode: the findings review 12 left open (U2-U6 of
//! `notes/r12-unfixed.md`), each with a hostile guest or notifier. Oracles as in review 12:
//! the replay (initial memory + every event in order = final memory, each event's old bytes
//! equal to the replay so far, so a duplicated event fails) and a hang guard.

use std::sync::Arc;

use iced_x86::code_asm::*;
use pagetrack::Gfn;
use pagetrack_kvm::{RelaxedConfig, RelaxedMode, VmConfig};
use pagetrack_testkit::{assemble, exit_with, kvm_or_skip};
use vm_memory::{Bytes, GuestAddress};

use crate::common::*;
use crate::relaxed::spin_store;
use crate::review12::{
    RAM, coalesced_recorder, guarded, set_regs, spawn_vcpus, straddles, wait_for, word,
};

/// U2: a notifier that needs exact events registers while a guest spins on a relaxed frame
/// (and never exits): its very first event is exact, and so is every later one
/// (`Enforcement::before_register` demotes the frame first; the final sync's coalesced
/// change goes to the notifier registered before only). From the registration on, its events
/// replay: the frame's bytes at the registration point are the first event's old bytes.
#[test]
fn an_exact_notifier_registered_while_frames_are_relaxed_gets_exact_events_only() {
    let kvm = kvm_or_skip!();
    let mut g = boot_with(
        kvm,
        VmConfig::default()
            .with_ram(RAM)
            .with_relaxed(RelaxedConfig::new(RelaxedMode::Always)),
        RAM,
        1,
        &spin_store(),
    );
    guarded(
        "an exact registration against a spinning guest",
        move || {
            let (old, _h1) = coalesced_recorder(&g.vm);
            let r = Gfn(T >> 12);
            g.vm.tracker().add_gfn(r).unwrap();
            assert!(g.vm.is_relaxed(r));
            set_regs(&g.vcpus[0], |regs| {
                regs.rdi = T;
                regs.rsi = U;
            });
            let initial = read(&g.vm, T, 0x1000);
            let threads = spawn_vcpus(&mut g);
            wait_for("the guest runs", || word(&g.vm, T) > 1000);
            let before = word(&g.vm, T);
            let (exact, _h2) = recorder(&g.vm);
            assert!(
                !g.vm.is_relaxed(r),
                "relaxed after the registration returned"
            );
            wait_for("exact events", || exact.0.lock().unwrap().len() >= 50);
            g.vm.untracked_memory()
                .write_obj(1u64, GuestAddress(U))
                .unwrap();
            for t in threads {
                assert_eq!(t.join().unwrap(), 3);
            }
            let fin = read(&g.vm, T, 0x1000);
            let ev = exact.take();
            assert!(
                ev.iter().all(|e| e.coalesced.is_none()),
                "a coalesced event reached the exact notifier: {:?}",
                ev.iter().find(|e| e.coalesced.is_some())
            );
            let first = ev[0].old.clone().unwrap();
            assert!(u64::from_le_bytes(first[..8].try_into().unwrap()) >= before);
            let mut at_registration = fin.clone();
            at_registration[..first.len()].copy_from_slice(&first);
            replay(T, &at_registration, &ev, &fin);
            // The notifier registered first saw it all, coalesced then exact.
            replay(T, &initial, &old.take(), &fin);
        },
    );
}

/// U5: one `lock xadd` straddling a strict frame (T) and a relaxed one (T + 0x1000), in a
/// fresh VM each time. KVM sometimes stores the relaxed part itself (one MMIO fragment),
/// sometimes hands both parts over (two); the run stopped with `SplitLockHalfTracked` in
/// the first case and completed in the second. Now it stops in both (atomicity cannot be
/// proven: the guest writes a relaxed frame natively), with KVM's result in memory (both
/// parts, as the CPU would have left them on one vCPU), and the replay holds. Which case each
/// run met shows in the relaxed part's event (coalesced: KVM stored it; exact: applied).
#[test]
fn a_locked_add_straddling_a_strict_and_a_relaxed_frame_is_refused_whatever_kvm_stored() {
    let mut seen = (0, 0);
    for _ in 0..8 {
        let kvm = kvm_or_skip!();
        let mut g = boot_with(
            kvm,
            VmConfig::default()
                .with_ram(RAM)
                .with_relaxed(RelaxedConfig::new(RelaxedMode::Always)),
            RAM,
            1,
            &straddles(),
        );
        let (rec, _h) = coalesced_recorder(&g.vm);
        let src: Vec<u8> = (0..64u8).map(|i| 0x80 | i).collect();
        g.vm.untracked_memory()
            .write_slice(&src, GuestAddress(U))
            .unwrap();
        let (a, b, c) = (Gfn(T >> 12), Gfn((T >> 12) + 1), Gfn((T >> 12) + 2));
        g.vm.pin_strict(a).unwrap();
        g.vm.pin_strict(c).unwrap();
        let initial = read(&g.vm, T, 0x3000);
        g.vm.tracker()
            .add_range(pagetrack::AsId::NORMAL, a, 3)
            .unwrap();
        assert!(g.vm.is_relaxed(b));
        set_regs(&g.vcpus[0], |r| r.rdx = 1);
        match g.vcpus[0].run() {
            Err(pagetrack_kvm::Error::Unemulatable {
                reason: pagetrack_kvm::StopReason::SplitLockHalfTracked,
                ..
            }) => {}
            other => panic!("expected SplitLockHalfTracked, got {other:?}"),
        }
        g.vm.sync().unwrap();
        let ev = rec.take();
        let fin = read(&g.vm, T, 0x3000);
        replay(T, &initial, &ev, &fin);
        let mut want = src.clone();
        let at = 0xffc - 0xfe0;
        let v = u64::from_le_bytes(want[at..at + 8].try_into().unwrap());
        want[at..at + 8].copy_from_slice(&v.wrapping_add(0x0101_0101_0101_0101).to_le_bytes());
        assert_eq!(&fin[0xfe0..0x1020], &want[..]);
        let last = ev
            .iter()
            .rev()
            .find(|e| e.gpa <= T + 0x1000 && T + 0x1000 < e.gpa + e.new.len() as u64)
            .unwrap_or_else(|| panic!("no event of the relaxed part: {ev:?}"));
        if last.coalesced.is_some() {
            seen.0 += 1;
        } else {
            seen.1 += 1;
        }
    }
    eprintln!(
        "relaxed part stored by KVM {} times, handed over {} times",
        seen.0, seen.1
    );
}

/// Guest: rcx times: `[rsi + 8 (i % 512)] = i` (this vCPU's frame), `lock xadd [rdi], 1` (a
/// shared counter), no exit of its own until the end.
fn pinned_counters() -> Vec<u8> {
    assemble(ENTRY, |a| {
        a.xor(r8, r8)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.mov(rax, r8)?;
        a.and(eax, 511u32)?;
        a.mov(qword_ptr(rsi + rax * 8), r8)?;
        a.mov(eax, 1u32)?;
        a.lock().xadd(qword_ptr(rdi), rax)?;
        a.inc(r8)?;
        a.cmp(r8, rcx)?;
        a.jne(top)?;
        exit_with(a, 3)
    })
}

/// U6: two vCPUs store and count while the VMM pins, unpins and relaxes their frames over and
/// over (demotions and promotions in the middle of both write bursts): the replay holds and
/// no increment of the shared counter is lost, whichever mode its frame is in.
#[test]
fn pins_and_relaxes_racing_two_vcpus_replay_exactly_and_lose_no_increment() {
    let kvm = kvm_or_skip!();
    let mut g = boot_with(
        kvm,
        VmConfig::default()
            .with_ram(RAM)
            .with_relaxed(RelaxedConfig::new(RelaxedMode::Always)),
        RAM,
        2,
        &pinned_counters(),
    );
    guarded("pins against two vCPUs", move || {
        let (rec, _h) = coalesced_recorder(&g.vm);
        let initial = read(&g.vm, T, 0x3000);
        let frames: Vec<Gfn> = (0..3).map(|k| Gfn((T >> 12) + k)).collect();
        g.vm.tracker()
            .add_range(pagetrack::AsId::NORMAL, frames[0], 3)
            .unwrap();
        const N: u64 = 30_000;
        for (i, v) in g.vcpus.iter().enumerate() {
            set_regs(v, |r| {
                r.rdi = T + 0x2000;
                r.rsi = T + 0x1000 * i as u64;
                r.rcx = N;
            });
        }
        let threads = spawn_vcpus(&mut g);
        let mut k = 0usize;
        while !threads.iter().all(std::thread::JoinHandle::is_finished) {
            let f = frames[k % 3];
            g.vm.pin_strict(f).unwrap();
            assert!(!g.vm.is_relaxed(f));
            g.vm.unpin_strict(f).unwrap();
            g.vm.relax(&frames).unwrap();
            k += 1;
        }
        for t in threads {
            assert_eq!(t.join().unwrap(), 3);
        }
        g.vm.sync().unwrap();
        let fin = read(&g.vm, T, 0x3000);
        assert_eq!(
            u64::from_le_bytes(fin[0x2000..0x2008].try_into().unwrap()),
            2 * N,
            "no lost increment ({k} pin rounds)"
        );
        replay(T, &initial, &rec.take(), &fin);
        assert!(g.vm.stats().relaxed.demotions > 0);
    });
}

/// Exact notifiers register and unregister over and over while two vCPUs spin on their own
/// relaxed frames and the VMM relaxes the frames again after every round (promotions racing
/// the registrations): each exact notifier gets exact events only, and the coalesced one,
/// registered throughout, replays.
#[test]
fn exact_registrations_racing_promotions_give_each_exact_notifier_exact_events_only() {
    let kvm = kvm_or_skip!();
    let mut g = boot_with(
        kvm,
        VmConfig::default()
            .with_ram(RAM)
            .with_relaxed(RelaxedConfig::new(RelaxedMode::Always)),
        RAM,
        2,
        &spin_store(),
    );
    guarded("registrations against promotions", move || {
        let (all, _h) = coalesced_recorder(&g.vm);
        let frames = [Gfn(T >> 12), Gfn((T >> 12) + 1)];
        let initial = read(&g.vm, T, 0x2000);
        g.vm.tracker()
            .add_range(pagetrack::AsId::NORMAL, frames[0], 2)
            .unwrap();
        for (i, v) in g.vcpus.iter().enumerate() {
            set_regs(v, |r| {
                r.rdi = T + 0x1000 * i as u64 + 8 * i as u64;
                r.rsi = U;
            });
        }
        let threads = spawn_vcpus(&mut g);
        wait_for("the guest runs", || word(&g.vm, T) != 0);
        let relaxer = {
            let vm = g.vm.clone();
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let s2 = stop.clone();
            let t = std::thread::spawn(move || {
                while !s2.load(std::sync::atomic::Ordering::Acquire) {
                    vm.relax(&frames).unwrap();
                    std::thread::yield_now();
                }
            });
            (stop, t)
        };
        for round in 0..40 {
            let (exact, h) = recorder(&g.vm);
            assert!(
                frames.iter().all(|&f| !g.vm.is_relaxed(f)),
                "round {round}: relaxed under an exact notifier"
            );
            wait_for("exact events", || !exact.0.lock().unwrap().is_empty());
            drop(h);
            // The relaxer promotes again once no exact notifier is registered: the next
            // registration races a relaxed set.
            wait_for("a promotion", || frames.iter().any(|&f| g.vm.is_relaxed(f)));
            let ev = exact.take();
            assert!(
                ev.iter().all(|e| e.coalesced.is_none()),
                "round {round}: {:?}",
                ev.iter().find(|e| e.coalesced.is_some())
            );
        }
        relaxer.0.store(true, std::sync::atomic::Ordering::Release);
        relaxer.1.join().unwrap();
        g.vm.untracked_memory()
            .write_obj(1u64, GuestAddress(U))
            .unwrap();
        for t in threads {
            assert_eq!(t.join().unwrap(), 3);
        }
        g.vm.sync().unwrap();
        replay(T, &initial, &all.take(), &read(&g.vm, T, 0x2000));
    });
}
