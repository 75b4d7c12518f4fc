//! Adversarial review 13 of relaxed mode: the findings review 12 left open (U2-U6 of
//! `notes/r12-unfixed.md`), each with a hostile guest or notifier. Oracles as in review 12:
//! the replay (initial memory + every event in order = final memory, each event's old bytes
//! equal to the replay so far, so a duplicated event fails) and a hang guard.

use pagetrack::Gfn;
use pagetrack_kvm::{RelaxedConfig, RelaxedMode, VmConfig};
use pagetrack_testkit::kvm_or_skip;
use vm_memory::{Bytes, GuestAddress};

use crate::common::*;
use crate::relaxed::spin_store;
use crate::review12::{RAM, coalesced_recorder, guarded, set_regs, spawn_vcpus, wait_for, word};

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
