//! Relaxed mode on a real guest: frames in writable, dirty-logged fragments with a shadow
//! copy, synced at exits to the VMM. The oracle throughout is the replay one: the initial
//! memory plus every event (exact and coalesced, each event's old bytes checked against the
//! replay so far) gives the final memory.

use std::sync::Arc;

use iced_x86::code_asm::*;
use pagetrack::{AsId, Delivery, Gfn, NotifierClass, RegisterOptions, Source};
use pagetrack_kvm::{Exit, RelaxedConfig, RelaxedMode, Vcpu, Vm, VmConfig};
use pagetrack_testkit::{assemble, exit_with, kvm_or_skip};
use pagetrack_vmm::x86::{self, EXCEPTION_PORT, GUEST_EXIT_PORT, LongModeLayout};
use vm_memory::{Bytes, GuestAddress};

use crate::common::*;

const RAM: u64 = 16 << 20;
/// The port the test guests use for a sync point (an exit to the VMM that does nothing else).
pub(crate) const SYNC_PORT: u16 = 0x80;

/// A recorder that accepts coalesced events.
pub(crate) fn coalesced_recorder(vm: &Vm) -> (Arc<Recorder>, pagetrack::NotifierHandle) {
    let rec = Arc::new(Recorder::default());
    let h = vm
        .tracker()
        .register(
            rec.clone(),
            RegisterOptions::new(NotifierClass::Ordinary).with_delivery(Delivery::Coalesced),
        )
        .unwrap();
    (rec, h)
}

fn relaxed_config(mode: RelaxedMode) -> VmConfig {
    VmConfig::default()
        .with_ram(RAM)
        .with_relaxed(RelaxedConfig::new(mode))
}

/// Runs `vcpu` to the guest's exit, calling `at_sync(n)` at its `n`-th `out` to
/// [`SYNC_PORT`]; returns the exit code. Panics on an exception, another exit or a timeout.
pub(crate) fn run_syncing(
    vm: &Vm,
    layout: &LongModeLayout,
    vcpu: &mut Vcpu,
    mut at_sync: impl FnMut(u64),
) -> u8 {
    let stopper = vcpu.stopper();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(TIMEOUT).is_err() {
            stopper.stop();
        }
    });
    let mut syncs = 0;
    let out = loop {
        match vcpu.run().unwrap() {
            Exit::IoOut {
                port: SYNC_PORT, ..
            } => {
                syncs += 1;
                at_sync(syncs);
            }
            Exit::IoOut {
                port: GUEST_EXIT_PORT,
                data,
            } => break Ok(data.first()),
            Exit::IoOut {
                port: EXCEPTION_PORT,
                ..
            } => {
                let ex = x86::decode_exception(vcpu.fd(), &*vm.untracked_memory(), layout).unwrap();
                break Err(format!("guest exception: {ex}"));
            }
            other => break Err(format!("unexpected exit {other:?}")),
        }
    };
    let _ = done_tx.send(());
    watchdog.join().unwrap();
    out.unwrap()
}

/// Guest: for round r = rcx down to 1: `rep stosb` 4 KiB of byte r over the frame at rdi,
/// `[rdi + 0x800] = r`, `[rdi + 0x1000 + 8 r] = r` (the next frame), then a sync point.
fn bursts() -> Vec<u8> {
    assemble(ENTRY, |a| {
        a.mov(r8, rcx)?; // r8 = round
        a.mov(r9, rdi)?; // r9 = the frame
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.mov(rdi, r9)?;
        a.mov(rax, r8)?; // al = round
        a.mov(ecx, 4096u32)?;
        a.rep().stosb()?;
        a.mov(qword_ptr(r9 + 0x800), r8)?;
        a.mov(qword_ptr(r9 + r8 * 8 + 0x1000), r8)?;
        a.mov(al, 0u32)?;
        a.out(u32::from(SYNC_PORT), al)?;
        a.dec(r8)?;
        a.jnz(top)?;
        exit_with(a, 3)
    })
}

pub(crate) fn set_regs(vcpu: &Vcpu, f: impl FnOnce(&mut kvm_bindings::kvm_regs)) {
    let mut regs = vcpu.fd().get_regs().unwrap();
    f(&mut regs);
    vcpu.fd().set_regs(&regs).unwrap();
}

#[test]
fn always_relaxed_bursts_and_device_writes_replay_exactly() {
    let kvm = kvm_or_skip!();
    let mut g = boot_with(kvm, relaxed_config(RelaxedMode::Always), RAM, 1, &bursts());
    let (rec, _h) = coalesced_recorder(&g.vm);
    let initial = read(&g.vm, T, 0x2000);
    g.vm.tracker()
        .add_range(AsId::NORMAL, Gfn(T >> 12), 2)
        .unwrap();
    assert!(g.vm.is_relaxed(Gfn(T >> 12)) && g.vm.is_relaxed(Gfn((T >> 12) + 1)));
    set_regs(&g.vcpus[0], |r| {
        r.rdi = T;
        r.rcx = 20;
    });
    let vm = g.vm.clone();
    let code = run_syncing(&g.vm, &g.layout, &mut g.vcpus[0], |n| {
        // A device write at every sync point into the second frame, over bytes the guest
        // also writes (its qwords at +0x40 and +0x48 in rounds 8 and 9).
        vm.memory()
            .write_slice(
                &[0xd0 | u8::try_from(n % 16).unwrap(); 16],
                GuestAddress(T + 0x1040),
            )
            .unwrap();
    });
    assert_eq!(code, 3);
    g.vm.sync().unwrap();
    let ev = rec.take();
    replay(T, &initial, &ev, &read(&g.vm, T, 0x2000));

    let coalesced: Vec<&Ev> = ev.iter().filter(|e| e.coalesced.is_some()).collect();
    let device: Vec<&Ev> = ev.iter().filter(|e| e.source == Source::Device).collect();
    assert_eq!(device.len(), 20, "one exact event per device write");
    assert!(device.iter().all(|e| e.coalesced.is_none()));
    assert!(coalesced.iter().all(|e| e.source == Source::Guest));
    // Twenty bursts into frame 0, each a change of the whole frame: at least one coalesced
    // event per burst, far fewer than the 4,096 stores of each.
    assert!(
        coalesced.len() >= 20,
        "{} coalesced events",
        coalesced.len()
    );
    let epochs: Vec<u64> = coalesced.iter().map(|e| e.coalesced.unwrap()).collect();
    assert!(epochs.windows(2).all(|w| w[0] <= w[1]), "epochs in order");
    let s = g.vm.stats();
    assert_eq!(s.trapped_writes, 0, "no store into a relaxed frame exited");
    assert_eq!(s.relaxed.frames_relaxed, 2);
    assert_eq!(s.relaxed.coalesced_events, coalesced.len() as u64);
}

#[test]
fn a_notifier_that_needs_exact_events_keeps_every_frame_strict() {
    let kvm = kvm_or_skip!();
    let mut g = boot_with(kvm, relaxed_config(RelaxedMode::Always), RAM, 1, &bursts());
    let (_relaxed, _h1) = coalesced_recorder(&g.vm);
    let (exact, _h2) = recorder(&g.vm);
    let initial = read(&g.vm, T, 0x2000);
    g.vm.tracker()
        .add_range(AsId::NORMAL, Gfn(T >> 12), 2)
        .unwrap();
    assert!(!g.vm.is_relaxed(Gfn(T >> 12)));
    set_regs(&g.vcpus[0], |r| {
        r.rdi = T;
        r.rcx = 1;
    });
    assert_eq!(run_syncing(&g.vm, &g.layout, &mut g.vcpus[0], |_| {}), 3);
    let ev = exact.take();
    assert!(ev.iter().all(|e| e.coalesced.is_none()));
    assert_eq!(ev.len(), 4096 + 2, "one event per store");
    replay(T, &initial, &ev, &read(&g.vm, T, 0x2000));
    assert_eq!(g.vm.stats().relaxed.frames_relaxed, 0);
}

/// Guest: rcx single-byte stores of byte i at rdi + i (a burst that traps while strict).
fn byte_burst() -> Vec<u8> {
    assemble(ENTRY, |a| {
        a.xor(eax, eax)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.mov(byte_ptr(rdi + rax), al)?;
        a.inc(rax)?;
        a.cmp(rax, rcx)?;
        a.jne(top)?;
        exit_with(a, 3)
    })
}

#[test]
fn auto_promotes_a_frame_in_the_middle_of_a_write_burst() {
    let kvm = kvm_or_skip!();
    let mut policy = RelaxedConfig::new(RelaxedMode::Auto);
    policy.promote_after = 16;
    policy.window = std::time::Duration::from_secs(10);
    let config = VmConfig::default().with_ram(RAM).with_relaxed(policy);
    let mut g = boot_with(kvm, config, RAM, 1, &byte_burst());
    let (rec, _h) = coalesced_recorder(&g.vm);
    let initial = read(&g.vm, T, 0x1000);
    g.vm.tracker().add_gfn(Gfn(T >> 12)).unwrap();
    assert!(!g.vm.is_relaxed(Gfn(T >> 12)), "auto starts strict");
    set_regs(&g.vcpus[0], |r| {
        r.rdi = T;
        r.rcx = 4096;
    });
    assert_eq!(run_to_exit(&g.vm, &g.layout, &mut g.vcpus[0], TIMEOUT), 3);
    assert!(g.vm.is_relaxed(Gfn(T >> 12)), "promoted");
    let ev = rec.take();
    replay(T, &initial, &ev, &read(&g.vm, T, 0x1000));
    let promote_after = 16;
    // The stores before the promotion are exact, one each, in order; the rest coalesced.
    let exact: Vec<&Ev> = ev.iter().take_while(|e| e.coalesced.is_none()).collect();
    assert!(exact.len() >= promote_after, "{} exact events", exact.len());
    for (i, e) in exact.iter().enumerate() {
        assert_eq!((e.gpa, e.source), (T + i as u64, Source::Vcpu(0)));
    }
    assert!(ev[exact.len()..].iter().all(|e| e.coalesced.is_some()));
    let s = g.vm.stats();
    assert_eq!(s.relaxed.promotions, 1);
    assert!(
        s.trapped_writes < 4096,
        "the burst ran natively after the promotion"
    );
}

#[test]
fn a_strict_pin_in_the_middle_of_bursts_demotes_without_losing_a_change() {
    let kvm = kvm_or_skip!();
    let mut g = boot_with(kvm, relaxed_config(RelaxedMode::Always), RAM, 1, &bursts());
    let (rec, _h) = coalesced_recorder(&g.vm);
    let initial = read(&g.vm, T, 0x2000);
    g.vm.tracker()
        .add_range(AsId::NORMAL, Gfn(T >> 12), 2)
        .unwrap();
    set_regs(&g.vcpus[0], |r| {
        r.rdi = T;
        r.rcx = 4;
    });
    let vm = g.vm.clone();
    let mut marks = Vec::new();
    let code = run_syncing(&g.vm, &g.layout, &mut g.vcpus[0], |n| {
        if n == 2 {
            // Frame 0 goes strict for the last two bursts; frame 1 stays relaxed.
            vm.pin_strict(Gfn(T >> 12)).unwrap();
            assert!(!vm.is_relaxed(Gfn(T >> 12)) && vm.is_relaxed(Gfn((T >> 12) + 1)));
            marks.push(rec.0.lock().unwrap().len());
        }
    });
    assert_eq!(code, 3);
    let ev = rec.take();
    replay(T, &initial, &ev, &read(&g.vm, T, 0x2000));
    let after: Vec<&Ev> = ev[marks[0]..]
        .iter()
        .filter(|e| e.gpa < T + 0x1000)
        .collect();
    assert_eq!(
        after.len(),
        2 * (4096 + 1),
        "strict again: one event per store"
    );
    assert!(after.iter().all(|e| e.coalesced.is_none()));
    assert_eq!(g.vm.stats().relaxed.demotions, 1);
    g.vm.unpin_strict(Gfn(T >> 12)).unwrap();
}

/// Guest: rcx times: `lock xadd [rdi], 1` (a shared counter), `[rsi + 8 (i % 512)] = i`
/// (this vCPU's frame), a sync point every 64 iterations.
pub(crate) fn counters() -> Vec<u8> {
    assemble(ENTRY, |a| {
        a.xor(r8, r8)?; // i
        let mut top = a.create_label();
        let mut no_sync = a.create_label();
        a.set_label(&mut top)?;
        a.mov(eax, 1u32)?;
        a.lock().xadd(qword_ptr(rdi), rax)?;
        a.mov(rax, r8)?;
        a.and(eax, 511u32)?;
        a.mov(qword_ptr(rsi + rax * 8), r8)?;
        a.inc(r8)?;
        a.test(r8, 63)?;
        a.jnz(no_sync)?;
        a.mov(al, 0u32)?;
        a.out(u32::from(SYNC_PORT), al)?;
        a.set_label(&mut no_sync)?;
        a.cmp(r8, rcx)?;
        a.jne(top)?;
        exit_with(a, 3)
    })
}

#[test]
fn two_vcpus_on_relaxed_frames_replay_exactly_and_atomics_are_exact() {
    let kvm = kvm_or_skip!();
    let mut g = boot_with(
        kvm,
        relaxed_config(RelaxedMode::Always),
        RAM,
        2,
        &counters(),
    );
    let (rec, _h) = coalesced_recorder(&g.vm);
    let initial = read(&g.vm, T, 0x3000);
    g.vm.tracker()
        .add_range(AsId::NORMAL, Gfn(T >> 12), 3)
        .unwrap();
    const N: u64 = 20_000;
    for (i, v) in g.vcpus.iter().enumerate() {
        set_regs(v, |r| {
            r.rdi = T;
            r.rsi = T + 0x1000 * (1 + i as u64);
            r.rcx = N;
        });
    }
    let layout = g.layout.clone();
    let threads: Vec<_> = g
        .vcpus
        .drain(..)
        .map(|mut v| {
            let (vm, layout) = (g.vm.clone(), layout.clone());
            std::thread::spawn(move || run_syncing(&vm, &layout, &mut v, |_| {}))
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 3);
    }
    g.vm.sync().unwrap();
    let fin = read(&g.vm, T, 0x3000);
    assert_eq!(
        u64::from_le_bytes(fin[..8].try_into().unwrap()),
        2 * N,
        "no lost update: atomics run natively on a relaxed frame"
    );
    let ev = rec.take();
    assert!(ev.iter().all(|e| e.coalesced.is_some()));
    replay(T, &initial, &ev, &fin);
}

/// Guest: `[rdi] = i++` until the word at rsi is non-zero (no exit of its own).
pub(crate) fn spin_store() -> Vec<u8> {
    assemble(ENTRY, |a| {
        a.mov(ecx, 1u32)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.mov(qword_ptr(rdi), rcx)?;
        a.inc(rcx)?;
        a.cmp(qword_ptr(rsi), 0)?;
        a.je(top)?;
        exit_with(a, 3)
    })
}

#[test]
fn device_writes_racing_guest_stores_on_the_same_word_replay_exactly() {
    let kvm = kvm_or_skip!();
    let mut g = boot_with(
        kvm,
        relaxed_config(RelaxedMode::Always),
        RAM,
        1,
        &spin_store(),
    );
    let (rec, _h) = coalesced_recorder(&g.vm);
    let initial = read(&g.vm, T, 0x1000);
    g.vm.tracker().add_gfn(Gfn(T >> 12)).unwrap();
    set_regs(&g.vcpus[0], |r| {
        r.rdi = T;
        r.rsi = U;
    });
    let vm = g.vm.clone();
    let device = std::thread::spawn(move || {
        for k in 0..200u64 {
            // Over the word the guest keeps storing to: the guest's changes so far must be
            // delivered before this exact event, or its old bytes break the replay.
            vm.memory()
                .write_obj(0xdead_0000_u64 + k, GuestAddress(T))
                .unwrap();
            std::thread::yield_now();
        }
        vm.untracked_memory()
            .write_obj(1u64, vm_memory::GuestAddress(U))
            .unwrap();
    });
    assert_eq!(run_to_exit(&g.vm, &g.layout, &mut g.vcpus[0], TIMEOUT), 3);
    device.join().unwrap();
    let ev = rec.take();
    assert_eq!(
        ev.iter().filter(|e| e.source == Source::Device).count(),
        200
    );
    replay(T, &initial, &ev, &read(&g.vm, T, 0x1000));
}

#[test]
fn auto_by_default_relaxes_the_aligned_group_of_the_first_trapped_frame() {
    let kvm = kvm_or_skip!();
    let mut g = boot_with(kvm, relaxed_config(RelaxedMode::Auto), RAM, 1, &bursts());
    let (rec, _h) = coalesced_recorder(&g.vm);
    let initial = read(&g.vm, T, 32 * 0x1000);
    g.vm.tracker()
        .add_range(AsId::NORMAL, Gfn(T >> 12), 32)
        .unwrap();
    set_regs(&g.vcpus[0], |r| {
        r.rdi = T;
        r.rcx = 3;
    });
    assert_eq!(run_syncing(&g.vm, &g.layout, &mut g.vcpus[0], |_| {}), 3);
    let group = RelaxedConfig::default().group_frames;
    for f in 0..32 {
        assert_eq!(
            g.vm.is_relaxed(Gfn((T >> 12) + f)),
            f < group,
            "frame {f}: relaxed with its group only"
        );
    }
    let ev = rec.take();
    assert_eq!(
        ev[0].coalesced, None,
        "the trapped store that promoted is exact"
    );
    replay(T, &initial, &ev, &read(&g.vm, T, 32 * 0x1000));
    assert_eq!(g.vm.stats().relaxed.frames_relaxed, group);
}

#[test]
fn the_vmms_dirty_log_stays_exact_while_relaxed_syncs_share_the_harvest() {
    let kvm = kvm_or_skip!();
    let config = relaxed_config(RelaxedMode::Always).with_dirty_log();
    let mut g = boot_with(kvm, config, RAM, 1, &bursts());
    let (rec, _h) = coalesced_recorder(&g.vm);
    let initial = read(&g.vm, T, 0x8000);
    g.vm.tracker()
        .add_range(AsId::NORMAL, Gfn(T >> 12), 8)
        .unwrap();
    let slot = pagetrack::SlotId(0);
    let _ = g.vm.take_dirty_log(slot).unwrap();
    set_regs(&g.vcpus[0], |r| {
        r.rdi = T;
        r.rcx = 6;
    });
    let vm = g.vm.clone();
    let mut logged = std::collections::BTreeSet::new();
    let mut page_set = |bitmap: Vec<u64>| {
        for (i, w) in bitmap.iter().enumerate() {
            for b in 0..64 {
                let page = i as u64 * 64 + b;
                if w & (1 << b) != 0 && (T >> 12..(T >> 12) + 8).contains(&page) {
                    logged.insert(page - (T >> 12));
                }
            }
        }
    };
    let code = run_syncing(&g.vm, &g.layout, &mut g.vcpus[0], |n| {
        // Every exit synced the relaxed frames (a harvest); the VMM's log still has them.
        if n % 2 == 0 {
            page_set(vm.take_dirty_log(slot).unwrap());
        }
    });
    assert_eq!(code, 3);
    page_set(g.vm.take_dirty_log(slot).unwrap());
    // The guest writes frames 0 and 1 of the eight, nothing else.
    assert_eq!(logged, [0u64, 1].into_iter().collect());
    let ev = rec.take();
    assert!(ev.iter().all(|e| e.coalesced.is_some()));
    replay(T, &initial, &ev, &read(&g.vm, T, 0x8000));
}

/// Guest, for phase k = 1, 2, 3: two qwords `k * 0x0101010101010101` at +0x100 of frame
/// rdi + 0x1000 (k - 1), then `[rsi + 8] = k` (ready), then waits until `[rsi] == k` (go).
/// No exit of its own between the stores and the go, so nothing syncs them.
fn phases() -> Vec<u8> {
    assemble(ENTRY, |a| {
        a.mov(r8, 1u64)?;
        let mut top = a.create_label();
        let mut wait = a.create_label();
        a.set_label(&mut top)?;
        a.mov(rbx, r8)?;
        a.shl(rbx, 12)?;
        a.add(rbx, rdi)?;
        a.sub(rbx, 0x1000)?;
        a.mov(rax, 0x0101_0101_0101_0101u64)?;
        a.imul_2(rax, r8)?;
        a.mov(qword_ptr(rbx + 0x100), rax)?;
        a.mov(qword_ptr(rbx + 0x108), rax)?;
        a.mov(qword_ptr(rsi + 8), r8)?;
        a.set_label(&mut wait)?;
        a.cmp(qword_ptr(rsi), r8)?;
        a.jne(wait)?;
        a.inc(r8)?;
        a.cmp(r8, 4)?;
        a.jne(top)?;
        exit_with(a, 3)
    })
}

#[test]
fn untracking_a_relaxed_frame_delivers_its_changes_since_the_last_sync() {
    let kvm = kvm_or_skip!();
    // No periodic sync while the guest spins: only the untrack can deliver its stores.
    let mut policy = RelaxedConfig::new(RelaxedMode::Always);
    policy.period = std::time::Duration::from_secs(3600);
    let config = VmConfig::default().with_ram(RAM).with_relaxed(policy);
    let mut g = boot_with(kvm, config, RAM, 1, &phases());
    let (rec, _h) = coalesced_recorder(&g.vm);
    let initial = read(&g.vm, T, 0x3000);
    g.vm.tracker()
        .add_range(AsId::NORMAL, Gfn(T >> 12), 3)
        .unwrap();
    for f in 0..3 {
        assert!(g.vm.is_relaxed(Gfn((T >> 12) + f)));
    }
    set_regs(&g.vcpus[0], |r| {
        r.rdi = T;
        r.rsi = U;
    });
    let (vm, layout) = (g.vm.clone(), g.layout.clone());
    let mut vcpu = g.vcpus.remove(0);
    let guest = std::thread::spawn(move || run_to_exit(&vm, &layout, &mut vcpu, TIMEOUT));
    let word = |gpa: u64| {
        g.vm.untracked_memory()
            .read_obj::<u64>(GuestAddress(gpa))
            .unwrap()
    };
    let mut all = Vec::new();
    for k in 1..=3u64 {
        // The guest's stores of phase k are in memory (a hang guard, not a timing bound).
        let deadline = std::time::Instant::now() + TIMEOUT;
        while word(U + 8) != k {
            assert!(
                std::time::Instant::now() < deadline,
                "phase {k} not reached"
            );
            std::thread::yield_now();
        }
        let frame = T + 0x1000 * (k - 1);
        assert!(
            rec.0
                .lock()
                .unwrap()
                .iter()
                .all(|e| e.gpa >> 12 != frame >> 12),
            "phase {k}: nothing synced the stores yet"
        );
        // Each form of untrack, without a sync first.
        let gfn = Gfn(frame >> 12);
        match k {
            1 => g.vm.tracker().remove_gfn(gfn).unwrap(),
            2 => g.vm.tracker().remove_gfns(AsId::NORMAL, &[gfn]).unwrap(),
            _ => g.vm.tracker().remove_range(AsId::NORMAL, gfn, 1).unwrap(),
        }
        assert!(!g.vm.is_relaxed(gfn));
        all.extend(rec.take());
        let mine: Vec<&Ev> = all.iter().filter(|e| e.gpa >> 12 == frame >> 12).collect();
        let want = (k * 0x0101_0101_0101_0101).to_le_bytes().repeat(2);
        assert!(
            mine.iter()
                .any(|e| e.coalesced.is_some() && e.gpa == frame + 0x100 && e.new == want),
            "phase {k}: the store before the untrack was delivered: {mine:?}"
        );
        replay(T, &initial, &all, &read(&g.vm, T, 0x3000));
        g.vm.untracked_memory()
            .write_obj(k, GuestAddress(U))
            .unwrap();
    }
    assert_eq!(guest.join().unwrap(), 3);
    assert!(rec.take().is_empty(), "nothing tracked is left");
    assert_eq!(g.vm.stats().trapped_writes, 0);
}

#[test]
fn dropping_the_vm_delivers_relaxed_changes_since_the_last_sync() {
    let kvm = kvm_or_skip!();
    let mut policy = RelaxedConfig::new(RelaxedMode::Always);
    policy.period = std::time::Duration::from_secs(3600);
    let config = VmConfig::default().with_ram(RAM).with_relaxed(policy);
    let mut g = boot_with(kvm, config, RAM, 1, &phases());
    let (rec, _h) = coalesced_recorder(&g.vm);
    let initial = read(&g.vm, T, 0x1000);
    g.vm.tracker().add_gfn(Gfn(T >> 12)).unwrap();
    set_regs(&g.vcpus[0], |r| {
        r.rdi = T;
        r.rsi = U;
    });
    let mut vcpu = g.vcpus.remove(0);
    let stopper = vcpu.stopper();
    let guest = std::thread::spawn(move || {
        let exit = vcpu.run().map(|e| format!("{e:?}"));
        drop(vcpu);
        exit
    });
    let deadline = std::time::Instant::now() + TIMEOUT;
    while g
        .vm
        .untracked_memory()
        .read_obj::<u64>(GuestAddress(U + 8))
        .unwrap()
        != 1
    {
        assert!(std::time::Instant::now() < deadline, "phase 1 not reached");
        std::thread::yield_now();
    }
    let fin = read(&g.vm, T, 0x1000);
    // Stopped, not an exit to the VMM: nothing synced.
    stopper.stop();
    assert_eq!(guest.join().unwrap().unwrap(), "Stopped");
    assert!(rec.0.lock().unwrap().is_empty(), "nothing synced yet");
    // The last handles on the VM (the stopper holds one too).
    drop(stopper);
    drop(g);
    let ev = rec.take();
    assert!(
        ev.iter()
            .any(|e| e.gpa == T + 0x100 && e.coalesced.is_some()),
        "the teardown delivered the guest's stores: {ev:?}"
    );
    replay(T, &initial, &ev, &fin);
}

/// Records every event and, at each coalesced one, adds and removes a track on a spare
/// frame from inside the callback (each a pause of every vCPU).
#[derive(Debug)]
struct Retracker {
    rec: Arc<Recorder>,
    tracker: std::sync::OnceLock<pagetrack::Tracking>,
    spare: Gfn,
    retracks: std::sync::atomic::AtomicU64,
}

impl pagetrack::TrackNotifier for Retracker {
    fn track_write(&self, e: &pagetrack::WriteEvent<'_>) {
        self.rec.track_write(e);
        if e.coalesced.is_some()
            && let Some(t) = self.tracker.get()
        {
            t.add_gfn(self.spare).unwrap();
            t.remove_gfn(self.spare).unwrap();
            self.retracks
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[test]
fn a_notifier_that_pauses_during_relaxed_syncs_does_not_deadlock_a_trapping_vcpu() {
    let kvm = kvm_or_skip!();
    // A sync at every trapped store: vCPU 1, storing to a strict frame (each store an MMIO
    // exit with a continuation), keeps asking for the sync lock while vCPU 0's exits sync
    // its relaxed frame and the notifier pauses from inside the delivery.
    let mut policy = RelaxedConfig::new(RelaxedMode::Always);
    policy.period = std::time::Duration::ZERO;
    let config = VmConfig::default().with_ram(RAM).with_relaxed(policy);
    let mut g = boot_with(kvm, config, RAM, 2, &counters());
    let rec = Arc::new(Recorder::default());
    let n = Arc::new(Retracker {
        rec: rec.clone(),
        tracker: std::sync::OnceLock::new(),
        spare: Gfn((T >> 12) + 3),
        retracks: std::sync::atomic::AtomicU64::new(0),
    });
    n.tracker.set(g.vm.tracker().clone()).unwrap();
    let _h =
        g.vm.tracker()
            .register(
                n.clone(),
                RegisterOptions::new(NotifierClass::Ordinary).with_delivery(Delivery::Coalesced),
            )
            .unwrap();
    let initial = read(&g.vm, T, 0x4000);
    let strict = Gfn((T >> 12) + 1);
    g.vm.pin_strict(strict).unwrap();
    g.vm.tracker()
        .add_range(AsId::NORMAL, Gfn(T >> 12), 3)
        .unwrap();
    assert!(g.vm.is_relaxed(Gfn(T >> 12)) && !g.vm.is_relaxed(strict));
    let iterations = [20_000u64, 3_000];
    // vCPU i: its counter at T + 0x2000 + 8 i (relaxed), its stores over frame i.
    for (i, v) in g.vcpus.iter().enumerate() {
        set_regs(v, |r| {
            r.rdi = T + 0x2000 + 8 * i as u64;
            r.rsi = T + 0x1000 * i as u64;
            r.rcx = iterations[i];
        });
    }
    let layout = g.layout.clone();
    let threads: Vec<_> = g
        .vcpus
        .drain(..)
        .map(|mut v| {
            let (vm, layout) = (g.vm.clone(), layout.clone());
            std::thread::spawn(move || run_syncing(&vm, &layout, &mut v, |_| {}))
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 3);
    }
    g.vm.sync().unwrap();
    let fin = read(&g.vm, T, 0x4000);
    for (i, &it) in iterations.iter().enumerate() {
        let at = 0x2000 + 8 * i;
        assert_eq!(
            u64::from_le_bytes(fin[at..at + 8].try_into().unwrap()),
            it,
            "vCPU {i}'s counter"
        );
    }
    let ev = rec.take();
    replay(T, &initial, &ev, &fin);
    assert!(n.retracks.load(std::sync::atomic::Ordering::Relaxed) > 0);
    assert!(
        ev.iter()
            .filter(|e| e.gpa >> 12 == strict.0)
            .all(|e| e.coalesced.is_none())
    );
    g.vm.unpin_strict(strict).unwrap();
}

/// Asks for a sync when it sees an event for `frame` (from inside its callback).
struct RequestsSync {
    frame: u64,
    requester: pagetrack_kvm::SyncRequester,
    asked: std::sync::atomic::AtomicBool,
}

impl pagetrack::TrackNotifier for RequestsSync {
    fn track_write(&self, e: &pagetrack::WriteEvent<'_>) {
        if e.gpa.0 >> 12 == self.frame >> 12 {
            assert!(self.requester.request(), "the VM is alive");
            self.asked.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// Sync points, "a notifier's request" (issue 12 item 5): a notifier asks for a sync from
/// inside its callback (where `Vm::sync` would wait on locks its delivery holds), and the
/// changes of a guest that spins on a relaxed frame without exits arrive, with the periodic
/// sync an hour away. Without the request nothing would deliver them.
#[test]
fn a_notifier_asks_for_a_sync_from_its_callback_and_a_guest_without_exits_is_synced() {
    let kvm = kvm_or_skip!();
    let mut policy = RelaxedConfig::new(RelaxedMode::Always);
    policy.period = std::time::Duration::from_secs(3600);
    let mut g = boot_with(
        kvm,
        VmConfig::default().with_ram(RAM).with_relaxed(policy),
        RAM,
        1,
        &spin_store(),
    );
    let (rec, _h) = coalesced_recorder(&g.vm);
    // The trigger: a device write into a frame pinned strict (an exact event, no sync).
    let trigger = U + 0x1000;
    let asker = Arc::new(RequestsSync {
        frame: trigger,
        requester: g.vm.sync_requester(),
        asked: false.into(),
    });
    let _ha =
        g.vm.tracker()
            .register(
                asker.clone(),
                RegisterOptions::new(NotifierClass::Ordinary).with_delivery(Delivery::Coalesced),
            )
            .unwrap();
    g.vm.pin_strict(Gfn(trigger >> 12)).unwrap();
    g.vm.tracker()
        .add_gfns(AsId::NORMAL, &[Gfn(T >> 12), Gfn(trigger >> 12)])
        .unwrap();
    set_regs(&g.vcpus[0], |r| {
        r.rdi = T;
        r.rsi = U;
    });
    let (vm, layout) = (g.vm.clone(), g.layout.clone());
    let mut vcpu = g.vcpus.pop().unwrap();
    let guest = std::thread::spawn(move || run_to_exit(&vm, &layout, &mut vcpu, TIMEOUT));
    crate::review12::wait_for("the guest does not run", || {
        crate::review12::word(&g.vm, T) >= 1000
    });
    assert!(g.vm.is_relaxed(Gfn(T >> 12)), "T runs relaxed");
    assert!(
        rec.take().iter().all(|e| e.gpa >> 12 != T >> 12),
        "nothing synced T yet"
    );
    g.vm.memory()
        .write_obj(7u64, GuestAddress(trigger))
        .unwrap();
    assert!(asker.asked.load(std::sync::atomic::Ordering::SeqCst));
    let deadline = std::time::Instant::now() + TIMEOUT;
    let mut got = Vec::new();
    while !got
        .iter()
        .any(|e: &Ev| e.gpa >> 12 == T >> 12 && e.coalesced.is_some())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the requested sync never came: {got:?}"
        );
        got.extend(rec.take());
        std::thread::yield_now();
    }
    g.vm.untracked_memory()
        .write_obj(1u64, GuestAddress(U))
        .unwrap();
    assert_eq!(guest.join().unwrap(), 3);
    let requester = g.vm.sync_requester();
    drop(g);
    assert!(!requester.request(), "the VM is gone");
}
