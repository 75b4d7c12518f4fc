//! Snapshot reset (`Vm::checkpoint` / `Vm::restore`) on a real guest: after each run all RAM
//! is the checkpoint's again, byte for byte, whatever the guest and the devices wrote to
//! untracked, strict and relaxed frames; the events (restores included) replay exactly; a
//! restored page table is the one the guest translates through.

use std::collections::BTreeSet;

use iced_x86::code_asm::*;
use pagetrack::{AsId, Delivery, Gfn, NotifierClass, RegisterOptions, SlotId, Source};
use pagetrack_kvm::{Error, Invalidate, RelaxedConfig, RelaxedMode, Vm, VmConfig};
use pagetrack_testkit::{assemble, exit_with, kvm_or_skip};
use pagetrack_vmm::x86::LONG_MODE_RFLAGS;
use vm_memory::{Bytes, GuestAddress};

use crate::common::*;

const RAM: u64 = 16 << 20;
/// Pages the guest writes from [`T`]: T strict, T + 1 and T + 2 relaxed, the rest untracked.
const PAGES: u64 = 16;

/// Guest: for k in 0..rcx: `[rdi] = rsi`, `[rdi + 0x808] = !rsi`, rsi += 1, rdi += rdx.
pub(crate) fn page_writer() -> Vec<u8> {
    assemble(ENTRY, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.mov(qword_ptr(rdi), rsi)?; // first word of this page
        a.mov(rax, rsi)?;
        a.not(rax)?;
        a.mov(qword_ptr(rdi + 0x808), rax)?; // a word in its middle
        a.inc(rsi)?; // next value
        a.add(rdi, rdx)?; // next page
        a.dec(rcx)?;
        a.jnz(top)?;
        exit_with(a, 3)
    })
}

/// Sets the vCPU to enter the guest program afresh with these arguments.
pub(crate) fn enter(g: &Guest, at: u64, count: u64, stride: u64, value: u64) {
    let fd = g.vcpus[0].fd();
    let mut regs = fd.get_regs().unwrap();
    regs.rip = ENTRY;
    regs.rsp = g.layout.user_stack_top(0).unwrap();
    regs.rflags = LONG_MODE_RFLAGS;
    (regs.rdi, regs.rcx, regs.rdx, regs.rsi) = (at, count, stride, value);
    fd.set_regs(&regs).unwrap();
}

pub(crate) fn pages_of(bitmap: &[u64]) -> BTreeSet<u64> {
    (0..bitmap.len() as u64 * 64)
        .filter(|p| bitmap[usize::try_from(p / 64).unwrap()] & (1 << (p % 64)) != 0)
        .collect()
}

fn config() -> VmConfig {
    VmConfig::default()
        .with_ram(RAM)
        .with_dirty_log()
        .with_relaxed(RelaxedConfig::new(RelaxedMode::Always))
}

#[test]
fn restore_loop_puts_back_all_ram_for_untracked_strict_and_relaxed_frames() {
    let kvm = kvm_or_skip!();
    let mut g = boot_with(kvm, config(), RAM, 1, &page_writer());
    // Non-zero contents to restore: a pattern over the pages the guest writes.
    let pattern: Vec<u8> = (0..PAGES * 4096)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    g.vm.untracked_memory()
        .write_slice(&pattern, GuestAddress(T))
        .unwrap();
    let rec = std::sync::Arc::new(Recorder::default());
    let _h =
        g.vm.tracker()
            .register(
                rec.clone(),
                RegisterOptions::new(NotifierClass::Ordinary).with_delivery(Delivery::Coalesced),
            )
            .unwrap();
    let strict = Gfn(T >> 12);
    g.vm.pin_strict(strict).unwrap();
    g.vm.tracker()
        .add_range(AsId::NORMAL, Gfn(T >> 12), 3)
        .unwrap();
    assert!(!g.vm.is_relaxed(strict));
    assert!(g.vm.is_relaxed(Gfn((T >> 12) + 1)) && g.vm.is_relaxed(Gfn((T >> 12) + 2)));
    let tracked_initial = read(&g.vm, T, 3 * 4096);
    g.vm.take_dirty_log(SlotId(0)).unwrap();

    let taken = g.vm.checkpoint().unwrap();
    assert_eq!((taken.regions, taken.bytes), (1, RAM));
    let image = read(&g.vm, 0, usize::try_from(RAM).unwrap());

    for round in 0..6u64 {
        enter(&g, T, PAGES, 4096, 0x1000 * (round + 1));
        assert_eq!(run_to_exit(&g.vm, &g.layout, &mut g.vcpus[0], TIMEOUT), 3);
        // Device writes into a strict, a relaxed and an untracked frame.
        let mem = g.vm.memory();
        mem.write_obj(0xd0d0 + round, GuestAddress(T + 0x100))
            .unwrap();
        mem.write_obj(0xd1d1 + round, GuestAddress(T + 0x1100))
            .unwrap();
        mem.write_obj(0xd2d2 + round, GuestAddress(U + 0x40))
            .unwrap();
        let t = usize::try_from(T).unwrap();
        assert_ne!(read(&g.vm, T, 4096), image[t..t + 4096]);

        let r = g.vm.restore().unwrap();
        // Every written page: the PAGES the guest wrote and U (its stack and the CPU's
        // page-table A/D updates may add a few).
        assert!(r.restored_pages > PAGES, "{r:?}");
        assert!(r.dirty_pages >= r.restored_pages, "{r:?}");
        assert!(
            read(&g.vm, 0, usize::try_from(RAM).unwrap()) == image,
            "round {round}: RAM differs from the checkpoint after restore"
        );
        // The VMM's dirty log kept the guest's pages (and got the restored ones).
        let logged = pages_of(&g.vm.take_dirty_log(SlotId(0)).unwrap());
        let written: BTreeSet<u64> = (0..PAGES).map(|k| (T >> 12) + k).collect();
        assert!(logged.is_superset(&written), "round {round}: {logged:?}");
        assert!(logged.contains(&(U >> 12)));
        // Nothing was written since: a second restore finds nothing to put back.
        let again = g.vm.restore().unwrap();
        assert_eq!(again.restored_pages, 0, "{again:?}");
    }

    // The replay also checks that the relaxed shadows took the restored bytes: the next
    // round's coalesced events take their old bytes from the shadows.
    let ev = rec.take();
    replay(T, &tracked_initial, &ev, &read(&g.vm, T, 3 * 4096));
    let restores: Vec<&Ev> = ev
        .iter()
        .filter(|e| e.source == Source::Device && e.coalesced.is_none())
        .collect();
    // Per round: two device writes to tracked frames, and the restore's events (at least
    // the guest's two words in each of the three tracked frames and the two device words).
    assert!(
        restores.len() >= 6 * (2 + 6),
        "{} device events",
        restores.len()
    );
    assert!(
        ev.iter().any(|e| e.coalesced.is_some()),
        "relaxed frames ran"
    );
    assert_eq!(
        g.vm.stats().trapped_writes,
        6 * 2,
        "only the strict frame's stores trapped"
    );
}

#[test]
fn checkpoint_and_restore_refuse_with_typed_errors_and_change_nothing() {
    let kvm = kvm_or_skip!();
    // No dirty log: both refused.
    let vm = Vm::with_kvm(kvm, VmConfig::default().with_ram(RAM)).unwrap();
    vm.add_ram(0, RAM).unwrap();
    assert!(matches!(vm.checkpoint(), Err(Error::DirtyLogOff)));
    assert!(matches!(vm.restore(), Err(Error::DirtyLogOff)));
    drop(vm);

    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = Vm::with_kvm(kvm, VmConfig::default().with_ram(RAM).with_dirty_log()).unwrap();
    vm.add_ram(0, RAM).unwrap();
    assert!(matches!(vm.restore(), Err(Error::NoCheckpoint)));
    vm.memory().write_obj(1u64, GuestAddress(U)).unwrap();
    vm.checkpoint().unwrap();
    vm.memory().write_obj(2u64, GuestAddress(U)).unwrap();
    // RAM added since the checkpoint: stale, and nothing is written back.
    let extra = vm.add_ram(RAM, 1 << 20).unwrap();
    assert!(matches!(vm.restore(), Err(Error::CheckpointStale { .. })));
    assert_eq!(
        vm.untracked_memory()
            .read_obj::<u64>(GuestAddress(U))
            .unwrap(),
        2
    );
    vm.remove_ram(extra).unwrap();
    // The layout is the checkpoint's again: the restore goes through, and the page written
    // while it was refused is still known dirty.
    vm.restore().unwrap();
    assert_eq!(
        vm.untracked_memory()
            .read_obj::<u64>(GuestAddress(U))
            .unwrap(),
        1
    );
    // A new checkpoint replaces the old one.
    vm.memory().write_obj(3u64, GuestAddress(U)).unwrap();
    vm.checkpoint().unwrap();
    vm.memory().write_obj(4u64, GuestAddress(U)).unwrap();
    vm.restore().unwrap();
    assert_eq!(
        vm.untracked_memory()
            .read_obj::<u64>(GuestAddress(U))
            .unwrap(),
        3
    );
    assert!(vm.discard_checkpoint());
    assert!(matches!(vm.restore(), Err(Error::NoCheckpoint)));
}

/// A notifier that tries to checkpoint and restore from its callback.
struct Reentrant(std::sync::Mutex<Option<Vm>>, std::sync::Mutex<Vec<String>>);

impl pagetrack::TrackNotifier for Reentrant {
    fn track_write(&self, _e: &pagetrack::WriteEvent<'_>) {
        if let Some(vm) = self.0.lock().unwrap().as_ref() {
            let mut got = self.1.lock().unwrap();
            got.push(format!("{:?}", vm.checkpoint().err()));
            got.push(format!("{:?}", vm.restore().err()));
        }
    }
}

#[test]
fn checkpoint_and_restore_from_a_notifier_are_refused() {
    let kvm = kvm_or_skip!();
    let vm = Vm::with_kvm(kvm, VmConfig::default().with_ram(RAM).with_dirty_log()).unwrap();
    vm.add_ram(0, RAM).unwrap();
    vm.checkpoint().unwrap();
    let n = std::sync::Arc::new(Reentrant(
        std::sync::Mutex::new(Some(vm.clone())),
        std::sync::Mutex::default(),
    ));
    let _h = vm
        .tracker()
        .register(n.clone(), NotifierClass::Ordinary)
        .unwrap();
    vm.tracker().add_gfn(Gfn(T >> 12)).unwrap();
    vm.memory().write_obj(5u64, GuestAddress(T)).unwrap();
    let got = n.1.lock().unwrap().clone();
    n.0.lock().unwrap().take();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|e| e.contains("InCallback")), "{got:?}");
    // The checkpoint is intact and the write is restored afterwards.
    vm.restore().unwrap();
    assert_eq!(
        vm.untracked_memory()
            .read_obj::<u64>(GuestAddress(T))
            .unwrap(),
        0
    );
}

/// The 4 KiB page table that maps [0x600000, 0x800000), and the pages behind VA page 5.
const PT: u64 = 0x2_0000;
const VA: u64 = 0x60_0000;
const PAGE_B: u64 = 0x70_0000;

/// Guest: if rsi != 0, PTE 5 := page B (no TLB flush: CPL3 cannot `invlpg`); then
/// `[U] = [VA page 5]`; exit.
fn remap_program() -> Vec<u8> {
    assemble(ENTRY, |a| {
        let mut read = a.create_label();
        a.test(rsi, rsi)?;
        a.jz(read)?; // rsi == 0: only read
        a.mov(rax, PAGE_B | 0x67)?;
        a.mov(qword_ptr(PT + 5 * 8), rax)?; // PTE 5 := page B
        a.set_label(&mut read)?;
        a.mov(r8, qword_ptr(VA + 5 * 4096))?; // through whatever KVM translates now
        a.mov(rbx, U)?;
        a.mov(qword_ptr(rbx), r8)?; // the result, to untracked memory
        exit_with(a, 0)
    })
}

/// A restored page table is the one the guest translates through: the guest remaps a
/// page, KVM is made to translate through the new PTE, the restore puts the old PTE back
/// from userspace (which KVM's shadow MMU does not see), and the next run reads through
/// the old mapping again. `tracked`: the page table is a tracked, marked frame (pagetrack
/// applies the guest's PTE store); else untracked (KVM emulates it).
fn restored_page_table_is_translated(tracked: bool, invalidate: Invalidate) {
    let kvm = kvm_or_skip!();
    let config = VmConfig::default().with_ram(RAM).with_dirty_log();
    let mut g = boot_with(kvm, config, RAM, 1, &remap_program());
    {
        let mem = g.vm.untracked_memory();
        for i in 0..512u64 {
            mem.write_obj((VA + i * 4096) | 0x67, GuestAddress(PT + i * 8))
                .unwrap();
        }
        let pd0 = g.layout.pml4() + 0x2000;
        mem.write_obj(PT | 0x7 | 0x20, GuestAddress(pd0 + 3 * 8))
            .unwrap();
        mem.write_obj(0xaaaa_u64, GuestAddress(VA + 5 * 4096))
            .unwrap();
        mem.write_obj(0xbbbb_u64, GuestAddress(PAGE_B)).unwrap();
    }
    let (rec, _h) = recorder(&g.vm);
    if tracked {
        g.vm.tracker().add_gfn(Gfn(PT >> 12)).unwrap();
        g.vm.mark_page_tables(&[Gfn(PT >> 12)], true);
    }
    g.vm.checkpoint().unwrap();
    let before = read(&g.vm, PT + 5 * 8, 8);
    let run = |g: &mut Guest, remap: u64| -> u64 {
        enter(g, 0, 0, 0, remap);
        assert_eq!(run_to_exit(&g.vm, &g.layout, &mut g.vcpus[0], TIMEOUT), 0);
        g.vm.untracked_memory().read_obj(GuestAddress(U)).unwrap()
    };
    assert_eq!(run(&mut g, 0), 0xaaaa, "the checkpoint's mapping");
    for round in 0..3 {
        run(&mut g, 1);
        // The guest's `invlpg`, which it cannot issue at CPL3.
        g.vm.invalidate_translations(&[Gfn(PT >> 12)]).unwrap();
        assert_eq!(run(&mut g, 0), 0xbbbb, "round {round}: the new mapping");
        let r = g.vm.restore_with(invalidate).unwrap();
        assert_eq!(read(&g.vm, PT + 5 * 8, 8), before);
        assert_eq!(
            r.invalidated_fragments > 0,
            g.vm.caps().shadow_paging && invalidate == Invalidate::Restored
        );
        assert_eq!(
            run(&mut g, 0),
            0xaaaa,
            "round {round}: the restored mapping"
        );
    }
    if tracked {
        // The guest's PTE store and the restore's, each with its old bytes.
        let ev = rec.take();
        let pte_events: Vec<&Ev> = ev.iter().filter(|e| e.gpa == PT + 5 * 8).collect();
        assert_eq!(pte_events.len(), 6, "{ev:?}");
        let b = (PAGE_B | 0x67).to_le_bytes();
        for pair in pte_events.chunks(2) {
            assert!(matches!(pair[0].source, Source::Vcpu(0)));
            assert_eq!(pair[0].new, b);
            assert_eq!(pair[1].source, Source::Device);
            assert_eq!(
                (pair[1].new.clone(), pair[1].old.clone()),
                (before.clone(), Some(b.to_vec()))
            );
        }
    }
}

#[test]
fn a_restored_untracked_page_table_is_translated_again() {
    restored_page_table_is_translated(false, Invalidate::Restored);
}

#[test]
fn a_restored_tracked_page_table_is_translated_again() {
    restored_page_table_is_translated(true, Invalidate::Restored);
}

#[test]
fn a_restored_marked_page_table_is_translated_again_without_re_creating_fragments() {
    restored_page_table_is_translated(true, Invalidate::MarkedTables);
}

/// A notifier that, on the restore's event for its tracked frame, writes an untracked page
/// through the tracked memory: a device write during the restore.
struct WritesDuringRestore(std::sync::Mutex<Option<Vm>>);

impl pagetrack::TrackNotifier for WritesDuringRestore {
    fn track_write(&self, e: &pagetrack::WriteEvent<'_>) {
        if e.source == Source::Device
            && let Some(vm) = self.0.lock().unwrap().as_ref()
        {
            vm.memory()
                .write_obj(0x5555_u64, GuestAddress(U + 0x3000))
                .unwrap();
        }
    }
}

#[test]
fn a_device_write_made_during_a_restore_is_put_back_by_the_next() {
    let kvm = kvm_or_skip!();
    let vm = Vm::with_kvm(kvm, VmConfig::default().with_ram(RAM).with_dirty_log()).unwrap();
    vm.add_ram(0, RAM).unwrap();
    let n = std::sync::Arc::new(WritesDuringRestore(std::sync::Mutex::default()));
    let _h = vm
        .tracker()
        .register(n.clone(), NotifierClass::Ordinary)
        .unwrap();
    vm.tracker().add_gfn(Gfn(T >> 12)).unwrap();
    vm.checkpoint().unwrap();
    vm.untracked_memory()
        .write_obj(7u64, GuestAddress(T))
        .unwrap(); // bypasses the log, but ...
    vm.memory().write_obj(9u64, GuestAddress(T + 8)).unwrap(); // ... this logs its page
    *n.0.lock().unwrap() = Some(vm.clone());
    let r = vm.restore().unwrap();
    assert_eq!((r.dirty_pages, r.restored_pages), (1, 1), "{r:?}");
    n.0.lock().unwrap().take();
    let mem = vm.untracked_memory();
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(T)).unwrap(),
        0,
        "the page's other bytes too"
    );
    assert_eq!(mem.read_obj::<u64>(GuestAddress(T + 8)).unwrap(), 0);
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(U + 0x3000)).unwrap(),
        0x5555,
        "written during the restore, after its page was looked at"
    );
    let again = vm.restore().unwrap();
    assert_eq!(again.restored_pages, 1, "{again:?}");
    assert_eq!(mem.read_obj::<u64>(GuestAddress(U + 0x3000)).unwrap(), 0);
}

/// The `Vm::checkpoint` doc example (`no_run` there), with its effect checked.
#[test]
fn the_checkpoint_doc_example_runs() {
    let _kvm = kvm_or_skip!();
    let vm = Vm::new(VmConfig::default().with_ram(16 << 20).with_dirty_log()).unwrap();
    vm.add_ram(0, 16 << 20).unwrap();
    vm.checkpoint().unwrap();
    for input in [&b"first"[..], b"second"] {
        vm.memory()
            .write_slice(input, GuestAddress(0x8000))
            .unwrap();
        let r = vm.restore().unwrap();
        assert_eq!((r.restored_pages, r.dirty_pages), (1, 1));
        assert_eq!(read(&vm, 0x8000, 8), vec![0; 8]);
    }
}

/// Guest: forever { rax += 1; [rdi] = rax (untracked); [rsi] = rax (tracked: traps) }.
fn counter_loop() -> Vec<u8> {
    assemble(ENTRY, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.inc(rax)?; // the counter
        a.mov(qword_ptr(rdi), rax)?; // untracked word first
        a.mov(qword_ptr(rsi), rax)?; // then the tracked one
        a.jmp(top)
    })
}

#[test]
fn checkpoint_and_restores_while_a_vcpu_runs_pause_it_at_a_consistent_point() {
    let kvm = kvm_or_skip!();
    let config = VmConfig::default().with_ram(RAM).with_dirty_log();
    let mut g = boot_with(kvm, config, RAM, 1, &counter_loop());
    let (rec, _h) = recorder(&g.vm);
    g.vm.tracker().add_gfn(Gfn(T >> 12)).unwrap();
    let initial_t = read(&g.vm, T, 4096);
    let word = |vm: &Vm, gpa| -> u64 { vm.untracked_memory().read_obj(GuestAddress(gpa)).unwrap() };
    enter(&g, U + 0x5000, 0, 0, 0);
    {
        let fd = g.vcpus[0].fd();
        let mut regs = fd.get_regs().unwrap();
        regs.rsi = T;
        fd.set_regs(&regs).unwrap();
    }
    let stopper = g.vcpus[0].stopper();
    let mut vcpu = g.vcpus.pop().unwrap();
    let runner = std::thread::spawn(move || vcpu.run().unwrap());
    let events = |n: usize| {
        let start = std::time::Instant::now();
        while rec.0.lock().unwrap().len() < n {
            assert!(start.elapsed() < TIMEOUT, "the guest stopped storing");
            std::thread::yield_now();
        }
    };
    events(100);
    g.vm.checkpoint().unwrap();
    for _ in 1..=5 {
        // The guest goes on from its registers: its counter is past the image's.
        let seen = rec.0.lock().unwrap().len();
        events(seen + 200);
        let r = g.vm.restore().unwrap();
        assert!(r.restored_pages >= 2, "{r:?}");
    }
    // More stores, then the vCPU stops: the last restore puts back what it wrote last.
    let seen = rec.0.lock().unwrap().len();
    events(seen + 200);
    stopper.stop();
    assert_eq!(runner.join().unwrap(), pagetrack_kvm::Exit::Stopped);
    let r = g.vm.restore().unwrap();
    assert_eq!(r.restored_pages, 2, "{r:?}");
    let ev = rec.take();
    // Each restore put the image's counter back into T, with one event: all the same value,
    // a value the guest had stored (the checkpoint paused it between two stores).
    let restores: Vec<&Ev> = ev.iter().filter(|e| e.source == Source::Device).collect();
    assert_eq!(restores.len(), 6, "one restore event per restore");
    let c = u64::from_le_bytes(restores[0].new.clone().try_into().unwrap());
    assert!(
        restores
            .iter()
            .all(|e| e.gpa == T && e.new == c.to_le_bytes())
    );
    assert!(
        ev.iter()
            .any(|e| e.source == Source::Vcpu(0) && e.new == c.to_le_bytes())
    );
    assert_eq!(word(&g.vm, T), c, "the tracked word is the image's");
    let u = word(&g.vm, U + 0x5000);
    assert!(
        u == c || u == c + 1,
        "untracked word {u} against the image's {c}"
    );
    replay(T, &initial_t, &ev, &read(&g.vm, T, 4096));
}
