//! The dirty ring (issue 12 item 2, `VmConfig::with_dirty_ring`): every harvest (the VMM's
//! `take_dirty_log`, relaxed syncs, re-cuts, checkpoints) reads every vCPU's ring, resets
//! the rings, and only then reads memory. Oracles: each take is exactly the pages written
//! since the previous one; the replay oracle for coalesced events; RAM equals the checkpoint
//! after a restore; a frame only one vCPU writes carries that vCPU as its first writer.
//! A harvest that did not reset (or reset before harvesting every ring) would leave pages
//! writable and unlogged: later rounds' stores to them would be missing from the takes (and
//! a full ring would never let its vCPU enter again: the run would time out).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use pagetrack::{AsId, Gfn, SlotId};
use pagetrack_kvm::{
    DirtyHarvester, DirtyProtect, DirtyRing, Error, HostCaps, RelaxedConfig, RelaxedMode, Vm,
    VmConfig,
};
use pagetrack_testkit::{assemble, exit_with, kvm_or_skip};
use pagetrack_vmm::x86::LONG_MODE_RFLAGS;
use vm_memory::{Bytes, GuestAddress};

use crate::checkpoint::{enter, page_writer, pages_of};
use crate::common::*;
use crate::relaxed::{coalesced_recorder, counters, run_syncing, set_regs, spin_store};

const RAM: u64 = 16 << 20;
/// The data area: 1,024 pages from 4 MiB; its first 64 are tracked (relaxed).
const DATA: u64 = 0x40_0000;
const DATA_PAGES: u64 = 1024;
const TRACKED_PAGES: u64 = 64;

pub(crate) fn ring_offered(kvm: &kvm_ioctls::Kvm) -> bool {
    let caps = HostCaps::probe(kvm);
    caps.dirty_ring_bytes > 0 || caps.dirty_ring_acq_rel_bytes > 0
}

macro_rules! ring_or_skip {
    ($kvm:expr) => {
        if !ring_offered(&$kvm) {
            eprintln!("SKIPPED: KVM offers no dirty ring");
            return;
        }
    };
}

fn ring_config(entries: u32, relaxed: RelaxedConfig) -> VmConfig {
    VmConfig::default()
        .with_ram(RAM)
        .with_dirty_log()
        .with_dirty_ring(DirtyRing::entries(entries))
        .with_relaxed(relaxed)
}

/// Guest: rcx 8-byte stores of rcx at rdi, rdi + rdx, ...; then exit.
fn strided_stores() -> Vec<u8> {
    assemble(ENTRY, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.mov(qword_ptr(rdi), rcx)?;
        a.add(rdi, rdx)?;
        a.dec(rcx)?;
        a.jnz(top)?;
        exit_with(a, 3)
    })
}

/// Data-area pages set in a region bitmap (page numbers from gpa 0).
fn data_pages(bitmap: &[u64]) -> BTreeSet<u64> {
    let area = DATA >> 12..(DATA >> 12) + DATA_PAGES;
    pages_of(bitmap)
        .into_iter()
        .filter(|p| area.contains(p))
        .collect()
}

/// Rounds of strided guest stores over the data area (tracked relaxed frames and untracked
/// ones), the VMM's log taken after each: every take must be exactly that round's pages, and
/// the coalesced events replay. `max_count` bounds the pages per round (a large one fills a
/// small ring several times per round). Without `relaxed` nothing is tracked and no exit
/// syncs: each round's take is the only harvest, so a take that resets before harvesting
/// (the entries it harvests then stay writable until the next take) misses the next round's
/// stores to the same pages.
fn rounds_take_exactly_the_written_set(
    kvm: kvm_ioctls::Kvm,
    entries: u32,
    rounds: u64,
    max_count: u64,
    relaxed: bool,
) -> Vm {
    let caps = HostCaps::probe(&kvm);
    let mode = if relaxed {
        RelaxedMode::Always
    } else {
        RelaxedMode::Off
    };
    let config = ring_config(entries, RelaxedConfig::new(mode));
    let mut g = boot_with(kvm, config, RAM, 1, &strided_stores());
    assert_eq!(
        g.vm.dirty_harvester(),
        DirtyHarvester::Ring {
            entries,
            acq_rel: caps.dirty_ring_acq_rel_bytes > 0
        }
    );
    let (rec, _h) = coalesced_recorder(&g.vm);
    let len = usize::try_from(TRACKED_PAGES * 4096).unwrap();
    let initial = read(&g.vm, DATA, len);
    if relaxed {
        g.vm.tracker()
            .add_range(AsId::NORMAL, Gfn(DATA >> 12), TRACKED_PAGES)
            .unwrap();
        assert!(g.vm.is_relaxed(Gfn(DATA >> 12)));
    }
    let slot = SlotId(0);
    let _ = g.vm.take_dirty_log(slot).unwrap();
    for round in 0..rounds {
        let stride = 1 + round % 5;
        let first = (round * 29) % 128;
        let count = (DATA_PAGES - first).div_ceil(stride).min(max_count);
        let fd = g.vcpus[0].fd();
        let mut regs = fd.get_regs().unwrap();
        regs.rip = ENTRY;
        regs.rsp = g.layout.user_stack_top(0).unwrap();
        regs.rflags = LONG_MODE_RFLAGS;
        regs.rdi = DATA + first * 4096;
        regs.rcx = count;
        regs.rdx = stride * 4096;
        fd.set_regs(&regs).unwrap();
        assert_eq!(run_to_exit(&g.vm, &g.layout, &mut g.vcpus[0], TIMEOUT), 3);
        let written: BTreeSet<u64> = (0..count)
            .map(|k| (DATA >> 12) + first + k * stride)
            .collect();
        assert_eq!(
            data_pages(&g.vm.take_dirty_log(slot).unwrap()),
            written,
            "round {round}"
        );
    }
    g.vm.sync().unwrap();
    let events = rec.take();
    assert_eq!(relaxed, events.iter().any(|e| e.coalesced.is_some()));
    // One vCPU: every coalesced event names it as its frame's first writer.
    assert!(
        events
            .iter()
            .filter(|e| e.coalesced.is_some())
            .all(|e| e.first_writer == Some(0)),
        "{:?}",
        events.iter().find(|e| e.first_writer != Some(0))
    );
    if relaxed {
        replay(DATA, &initial, &events, &read(&g.vm, DATA, len));
    }
    let stats = g.vm.ring_stats().unwrap();
    assert!(stats.entries > 0 && stats.resets > 0, "{stats:?}");
    g.vm
}

#[test]
fn with_the_ring_every_take_is_exactly_the_pages_written_since_the_last() {
    let kvm = kvm_or_skip!();
    ring_or_skip!(kvm);
    rounds_take_exactly_the_written_set(kvm, 4096, 24, 64, true);
}

#[test]
fn with_the_ring_and_no_relaxed_frames_every_take_is_exactly_the_written_set() {
    let kvm = kvm_or_skip!();
    ring_or_skip!(kvm);
    rounds_take_exactly_the_written_set(kvm, 4096, 24, 64, false);
}

#[test]
fn a_small_ring_fills_and_its_ring_full_exits_lose_nothing() {
    let kvm = kvm_or_skip!();
    ring_or_skip!(kvm);
    // 256 entries (KVM's smallest here), 64 reserved: a round of up to 1,024 pages fills
    // the ring several times.
    let vm = rounds_take_exactly_the_written_set(kvm, DirtyRing::MIN_ENTRIES, 8, 1024, true);
    let stats = vm.ring_stats().unwrap();
    assert!(stats.full_exits > 0, "the ring never filled: {stats:?}");
}

#[test]
fn two_vcpus_on_the_ring_replay_exactly_with_each_frames_first_writer() {
    let kvm = kvm_or_skip!();
    ring_or_skip!(kvm);
    let config = ring_config(1024, RelaxedConfig::new(RelaxedMode::Always));
    let mut g = boot_with(kvm, config, RAM, 2, &counters());
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
    assert_eq!(u64::from_le_bytes(fin[..8].try_into().unwrap()), 2 * N);
    let ev = rec.take();
    assert!(ev.iter().all(|e| e.coalesced.is_some()));
    replay(T, &initial, &ev, &fin);
    // Frame T + 0x1000 only vCPU 0 writes, T + 0x2000 only vCPU 1.
    for (vcpu, frame) in [(0u32, T + 0x1000), (1, T + 0x2000)] {
        let mine: Vec<&Ev> = ev.iter().filter(|e| e.gpa & !0xfff == frame).collect();
        assert!(!mine.is_empty(), "no event for vCPU {vcpu}'s frame");
        assert!(
            mine.iter().all(|e| e.first_writer == Some(vcpu)),
            "vCPU {vcpu}'s frame: {:?}",
            mine.iter().find(|e| e.first_writer != Some(vcpu))
        );
    }
    // The shared counter's frame: whichever vCPU dirtied it first, or unknown when both
    // rings logged it between two syncs.
    assert!(
        ev.iter()
            .filter(|e| e.gpa & !0xfff == T)
            .all(|e| matches!(e.first_writer, None | Some(0 | 1)))
    );
}

#[test]
fn a_sync_on_one_vcpu_finds_what_another_vcpu_wrote_and_names_it() {
    let kvm = kvm_or_skip!();
    ring_or_skip!(kvm);
    // No periodic sync: vCPU 1 never exits, so only vCPU 0's exit can sync.
    let mut relaxed = RelaxedConfig::new(RelaxedMode::Always);
    relaxed.period = Duration::from_secs(3600);
    let mut g = boot_with(kvm, ring_config(1024, relaxed), RAM, 2, &spin_store());
    let (rec, _h) = coalesced_recorder(&g.vm);
    g.vm.tracker()
        .add_range(AsId::NORMAL, Gfn(T >> 12), 3)
        .unwrap();
    // vCPU 1 stores into T + 0x1000 until the word at U is set; vCPU 0 stores once into
    // T + 0x2000 and exits (its flag, the code at ENTRY, is non-zero).
    set_regs(&g.vcpus[1], |r| {
        r.rdi = T + 0x1000;
        r.rsi = U;
    });
    set_regs(&g.vcpus[0], |r| {
        r.rdi = T + 0x2000;
        r.rsi = ENTRY;
    });
    let mut v1 = g.vcpus.pop().unwrap();
    let (vm, layout) = (g.vm.clone(), g.layout.clone());
    let spinner = std::thread::spawn(move || run_to_exit(&vm, &layout, &mut v1, TIMEOUT));
    let deadline = Instant::now() + TIMEOUT;
    while read(&g.vm, T + 0x1000, 8) == [0; 8] {
        assert!(Instant::now() < deadline, "vCPU 1 never stored");
        std::thread::yield_now();
    }
    // vCPU 0's exit to the VMM syncs: vCPU 1's ring must be harvested too.
    assert_eq!(run_to_exit(&g.vm, &g.layout, &mut g.vcpus[0], TIMEOUT), 3);
    let ev = rec.take();
    g.vm.untracked_memory()
        .write_obj(1u64, GuestAddress(U))
        .unwrap();
    assert_eq!(spinner.join().unwrap(), 3);
    let of = |frame: u64| -> Vec<&Ev> { ev.iter().filter(|e| e.gpa & !0xfff == frame).collect() };
    let theirs = of(T + 0x1000);
    assert!(
        !theirs.is_empty(),
        "vCPU 0's sync missed vCPU 1's store: {ev:?}"
    );
    assert!(
        theirs.iter().all(|e| e.first_writer == Some(1)),
        "{theirs:?}"
    );
    let own = of(T + 0x2000);
    assert!(!own.is_empty() && own.iter().all(|e| e.first_writer == Some(0)));
}

#[test]
fn checkpoint_and_restore_with_the_ring_put_back_all_ram() {
    const PAGES: u64 = 16;
    let kvm = kvm_or_skip!();
    ring_or_skip!(kvm);
    let config = ring_config(256, RelaxedConfig::new(RelaxedMode::Always));
    let mut g = boot_with(kvm, config, RAM, 1, &page_writer());
    let pattern: Vec<u8> = (0..PAGES * 4096)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    g.vm.untracked_memory()
        .write_slice(&pattern, GuestAddress(T))
        .unwrap();
    let (rec, _h) = coalesced_recorder(&g.vm);
    g.vm.tracker()
        .add_range(AsId::NORMAL, Gfn(T >> 12), 3)
        .unwrap();
    assert!(g.vm.is_relaxed(Gfn(T >> 12)));
    let tracked_initial = read(&g.vm, T, 3 * 4096);
    g.vm.take_dirty_log(SlotId(0)).unwrap();
    g.vm.checkpoint().unwrap();
    let image = read(&g.vm, 0, usize::try_from(RAM).unwrap());
    for round in 0..6u64 {
        // More pages than the ring holds on some rounds: ring-full exits in between.
        let pages = if round % 2 == 0 { PAGES } else { 600 };
        enter(&g, T, pages, 4096, 0x1000 * (round + 1));
        assert_eq!(run_to_exit(&g.vm, &g.layout, &mut g.vcpus[0], TIMEOUT), 3);
        g.vm.memory()
            .write_obj(0xd2d2 + round, GuestAddress(U + 0x40))
            .unwrap();
        let r = g.vm.restore().unwrap();
        assert!(r.restored_pages >= pages, "{r:?}");
        assert!(
            read(&g.vm, 0, usize::try_from(RAM).unwrap()) == image,
            "round {round}: RAM differs from the checkpoint after restore"
        );
        let logged = pages_of(&g.vm.take_dirty_log(SlotId(0)).unwrap());
        let written: BTreeSet<u64> = (0..pages).map(|k| (T >> 12) + k).collect();
        assert!(logged.is_superset(&written), "round {round}");
        assert_eq!(g.vm.restore().unwrap().restored_pages, 0);
    }
    assert!(g.vm.ring_stats().unwrap().full_exits > 0);
    let ev = rec.take();
    replay(T, &tracked_initial, &ev, &read(&g.vm, T, 3 * 4096));
}

#[test]
fn a_vmms_vm_takes_the_ring_before_its_vcpus_and_keeps_its_own_slots_pages() {
    let kvm = kvm_or_skip!();
    ring_or_skip!(kvm);
    let caps = HostCaps::probe(&kvm);
    let fd = Arc::new(kvm.create_vm().unwrap());
    let vm = Vm::from_vm_fd(
        &kvm,
        Arc::clone(&fd),
        caps.clone(),
        VmConfig::default()
            .with_kvm_slots(100..200)
            .with_dirty_log()
            .with_dirty_ring(DirtyRing::entries(512)),
    )
    .unwrap();
    assert!(matches!(
        vm.dirty_harvester(),
        DirtyHarvester::Ring { entries: 512, .. }
    ));
    // No VMM slot written yet: nothing of the VMM's.
    assert_eq!(vm.take_vmm_ring_dirty().unwrap(), Vec::new());

    // A VMM that created a vCPU first: KVM refuses the ring, and the VM is unchanged (its
    // bitmap harvest still works for a pagetrack VM on it without the ring).
    let fd = Arc::new(kvm.create_vm().unwrap());
    let _vcpu = fd.create_vcpu(0).unwrap();
    let late = Vm::from_vm_fd(
        &kvm,
        Arc::clone(&fd),
        caps.clone(),
        VmConfig::default()
            .with_kvm_slots(100..200)
            .with_dirty_ring(DirtyRing::entries(512)),
    );
    assert!(
        matches!(late, Err(Error::DirtyRingRefused { entries: 512, .. })),
        "{late:?}"
    );
    let plain = Vm::from_vm_fd(
        &kvm,
        fd,
        caps,
        VmConfig::default()
            .with_kvm_slots(100..200)
            .with_dirty_log(),
    )
    .unwrap();
    assert_eq!(plain.dirty_harvester(), DirtyHarvester::Plain);
}

#[test]
fn ring_sizes_kvm_would_refuse_and_missing_rings_are_typed_errors() {
    let kvm = kvm_or_skip!();
    let caps = HostCaps::probe(&kvm);
    let max = caps.dirty_ring_acq_rel_bytes.max(caps.dirty_ring_bytes) / 16;
    if max > 0 {
        for bad in [0, 100, 128, 257, max.saturating_mul(2)] {
            let r = Vm::new(VmConfig::default().with_dirty_ring(DirtyRing::entries(bad)));
            match r {
                Err(Error::DirtyRingSize {
                    entries,
                    min,
                    max: m,
                }) => {
                    assert_eq!((entries, min, m), (bad, DirtyRing::MIN_ENTRIES, max));
                }
                other => panic!("{bad} entries: {other:?}"),
            }
        }
        let manual = Vm::new(
            VmConfig::default()
                .with_dirty_ring(DirtyRing::entries(256))
                .with_dirty_protect(DirtyProtect::Manual),
        );
        assert!(
            matches!(manual, Err(Error::InvalidConfig { .. })),
            "{manual:?}"
        );
        let max_ok = Vm::new(VmConfig::default().with_dirty_ring(DirtyRing::entries(max)));
        assert!(max_ok.is_ok(), "{max_ok:?}");
    }
    // A host without the ring (the capabilities a VMM hands over say so).
    let mut without = caps;
    without.dirty_ring_bytes = 0;
    without.dirty_ring_acq_rel_bytes = 0;
    let fd = Arc::new(kvm.create_vm().unwrap());
    let r = Vm::from_vm_fd(
        &kvm,
        fd,
        without,
        VmConfig::default()
            .with_kvm_slots(100..200)
            .with_dirty_ring(DirtyRing::entries(256)),
    );
    assert!(
        matches!(r, Err(Error::DirtyRingUnsupported { entries: 256 })),
        "{r:?}"
    );
}

/// A VMM's VM with a memslot of its own (slot 0, dirty-logged) next to pagetrack's RAM:
/// with the ring, KVM keeps no bitmap for the VMM's slot either, so pagetrack's harvests keep
/// its pages for the VMM (`take_vmm_ring_dirty`) instead of dropping them, round after round
/// (the reset re-protects the VMM's pages too).
#[test]
fn a_vmms_own_memslot_gets_its_ring_pages_from_pagetrack() {
    use vm_memory::GuestMemoryRegion;
    let kvm = kvm_or_skip!();
    ring_or_skip!(kvm);
    const MINE: u64 = 32 << 20;
    // Declared first, dropped last: KVM maps it until the VM fd closes.
    let mine =
        vm_memory::GuestRegionMmap::<()>::from_range(GuestAddress(MINE), 1 << 20, None).unwrap();
    let fd = Arc::new(kvm.create_vm().unwrap());
    let vm = Vm::from_vm_fd(
        &kvm,
        Arc::clone(&fd),
        HostCaps::probe(&kvm),
        VmConfig::default()
            .with_ram(48 << 20)
            .with_kvm_slots(8..40)
            .with_dirty_ring(DirtyRing::entries(512)),
    )
    .unwrap();
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
        guest_phys_addr: MINE,
        memory_size: mine.len(),
        userspace_addr: mine.as_ptr() as u64,
    };
    // SAFETY: `region` describes exactly the mapping `mine` owns, which outlives the VM fd
    // (declared before it, so dropped after every handle on the VM, the vCPU's included).
    unsafe { fd.set_user_memory_region(region) }.unwrap();
    // pagetrack's RAM around the VMM's slot: [0, 32 MiB) and [33 MiB, 48 MiB), whose top
    // holds the long-mode structures (the layout identity-maps all 48 MiB).
    for (at, len) in [(0, MINE), (MINE + (1 << 20), 15 << 20)] {
        let ram = vm_memory::GuestRegionMmap::from_range(
            GuestAddress(at),
            usize::try_from(len).unwrap(),
            None,
        )
        .unwrap();
        vm.add_region(Arc::new(ram)).unwrap();
    }
    vm.untracked_memory()
        .write_slice(&strided_stores(), GuestAddress(ENTRY))
        .unwrap();
    let layout = pagetrack_vmm::x86::LongModeLayout::new(48 << 20).unwrap();
    let mut vcpu = fd.create_vcpu(0).unwrap();
    pagetrack_vmm::x86::setup_long_mode(&kvm, &vcpu, &*vm.untracked_memory(), &layout, ENTRY, 0)
        .unwrap();
    let mut handler = vm.exit_handler(0, &mut vcpu).unwrap();
    for round in 0..4u64 {
        let stride = 1 + round;
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = ENTRY;
        regs.rsp = layout.user_stack_top(0).unwrap();
        regs.rflags = LONG_MODE_RFLAGS;
        (regs.rdi, regs.rcx, regs.rdx) = (MINE, 5, stride * 4096);
        vcpu.set_regs(&regs).unwrap();
        loop {
            match handler.run(&mut vcpu).unwrap() {
                pagetrack_kvm::Ran::Tracked(exit) => {
                    let done = handler.handle(exit, &mut vcpu).unwrap();
                    assert_eq!(done, pagetrack_kvm::Handled::Done);
                }
                pagetrack_kvm::Ran::Exit(kvm_ioctls::VcpuExit::IoOut(
                    pagetrack_vmm::x86::GUEST_EXIT_PORT,
                    _,
                )) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        let want: Vec<(u32, u64)> = (0..5).map(|k| (0, k * stride)).collect();
        assert_eq!(vm.take_vmm_ring_dirty().unwrap(), want, "round {round}");
        assert_eq!(vm.take_vmm_ring_dirty().unwrap(), Vec::new());
    }
    assert!(vm.ring_stats().unwrap().foreign_entries >= 20);
}

/// Two vCPUs fill a 256-entry ring each, at once, over relaxed and untracked pages: their
/// ring-full exits (each harvesting every ring) and exit syncs race, and still the VMM's log
/// is exactly the pages written, the coalesced events replay, and each vCPU's own pages name it.
#[test]
fn two_vcpus_filling_small_rings_at_once_lose_nothing() {
    let kvm = kvm_or_skip!();
    ring_or_skip!(kvm);
    let config = ring_config(
        DirtyRing::MIN_ENTRIES,
        RelaxedConfig::new(RelaxedMode::Always),
    );
    let mut g = boot_with(kvm, config, RAM, 2, &strided_stores());
    let (rec, _h) = coalesced_recorder(&g.vm);
    let len = usize::try_from(TRACKED_PAGES * 4096).unwrap();
    let initial = read(&g.vm, DATA, len);
    g.vm.tracker()
        .add_range(AsId::NORMAL, Gfn(DATA >> 12), TRACKED_PAGES)
        .unwrap();
    let _ = g.vm.take_dirty_log(SlotId(0)).unwrap();
    let half = DATA_PAGES / 2;
    for round in 0..3u64 {
        // vCPU i writes every page of its half: the even pages of the tracked range are
        // vCPU 0's, the odd ones vCPU 1's (interleaved so both write relaxed frames).
        for (i, v) in g.vcpus.iter().enumerate() {
            let i = i as u64;
            set_regs(v, |r| {
                r.rip = ENTRY;
                r.rsp = g.layout.user_stack_top(u32::try_from(i).unwrap()).unwrap();
                r.rflags = LONG_MODE_RFLAGS;
                r.rdi = DATA + i * 4096;
                r.rcx = half;
                r.rdx = 2 * 4096;
            });
        }
        let layout = g.layout.clone();
        let threads: Vec<_> = g
            .vcpus
            .drain(..)
            .map(|mut v| {
                let (vm, layout) = (g.vm.clone(), layout.clone());
                std::thread::spawn(move || {
                    let code = run_to_exit(&vm, &layout, &mut v, TIMEOUT);
                    (v, code)
                })
            })
            .collect();
        for t in threads {
            let (v, code) = t.join().unwrap();
            assert_eq!(code, 3);
            g.vcpus.push(v);
        }
        g.vcpus.sort_by_key(|v| v.index());
        let written: BTreeSet<u64> = (0..DATA_PAGES).map(|p| (DATA >> 12) + p).collect();
        assert_eq!(
            data_pages(&g.vm.take_dirty_log(SlotId(0)).unwrap()),
            written,
            "round {round}"
        );
    }
    g.vm.sync().unwrap();
    let ev = rec.take();
    replay(DATA, &initial, &ev, &read(&g.vm, DATA, len));
    for e in &ev {
        let vcpu = u32::try_from((e.gpa - DATA) / 4096 % 2).unwrap();
        assert_eq!(e.first_writer, Some(vcpu), "{e:?}");
    }
    assert!(g.vm.ring_stats().unwrap().full_exits >= 2);
}

/// A guest that re-dirties the same pages for a long time while the VMM takes nothing: each
/// ring-full reset re-protects them, so they are logged again and again; the queued entries
/// stay bounded (duplicates dropped) and the take is still exactly the pages written.
#[test]
fn pages_redirtied_between_takes_are_queued_once_and_taken_exactly() {
    let kvm = kvm_or_skip!();
    ring_or_skip!(kvm);
    let config = ring_config(DirtyRing::MIN_ENTRIES, RelaxedConfig::new(RelaxedMode::Off));
    let mut g = boot_with(kvm, config, RAM, 1, &strided_stores());
    let _ = g.vm.take_dirty_log(SlotId(0)).unwrap();
    // More pages than the ring's soft limit (192 here): every run fills it, and each reset
    // re-protects pages the next run writes again.
    const PAGES: u64 = 300;
    let mut most_queued = 0;
    for _ in 0..60 {
        set_regs(&g.vcpus[0], |r| {
            r.rip = ENTRY;
            r.rsp = g.layout.user_stack_top(0).unwrap();
            r.rflags = LONG_MODE_RFLAGS;
            (r.rdi, r.rcx, r.rdx) = (DATA, PAGES, 4096);
        });
        assert_eq!(run_to_exit(&g.vm, &g.layout, &mut g.vcpus[0], TIMEOUT), 3);
        most_queued = most_queued.max(g.vm.ring_stats().unwrap().queued);
    }
    let stats = g.vm.ring_stats().unwrap();
    assert!(
        stats.entries >= 50 * PAGES,
        "pages were not logged again: {stats:?}"
    );
    assert!(most_queued <= 4096 + 256, "the queue grew to {most_queued}");
    let written: BTreeSet<u64> = (0..PAGES).map(|p| (DATA >> 12) + p).collect();
    assert_eq!(
        data_pages(&g.vm.take_dirty_log(SlotId(0)).unwrap()),
        written
    );
    assert_eq!(g.vm.ring_stats().unwrap().queued, 0);
}

/// Re-cuts that delete a read-only (tracked) fragment with the ring on: tracking a frame next
/// to a tracked one merges their read-only fragments, and untracking splits them again. The
/// delete asked KVM for the slot's dirty bitmap, which the ring replaces (`KVM_GET_DIRTY_LOG`
/// failed with ENXIO, so the track failed): found by the mode model test (`modes.rs`).
#[test]
fn with_the_ring_neighbouring_tracks_and_untracks_re_cut_read_only_fragments() {
    let kvm = kvm_or_skip!();
    ring_or_skip!(kvm);
    for relaxed in [RelaxedMode::Off, RelaxedMode::Auto] {
        let g = boot_with(
            kvm_ioctls::Kvm::new().unwrap(),
            ring_config(1024, RelaxedConfig::new(relaxed)),
            RAM,
            1,
            &spin_store(),
        );
        let (_rec, _h) = coalesced_recorder(&g.vm);
        let frames: Vec<Gfn> = (0..4).map(|k| Gfn((T >> 12) + k)).collect();
        for order in [[1usize, 0, 2, 3], [3, 1, 2, 0]] {
            for &f in &order {
                g.vm.tracker().add_gfn(frames[f]).unwrap();
            }
            for &f in order.iter().rev() {
                g.vm.tracker().remove_gfn(frames[f]).unwrap();
            }
        }
        assert!(
            g.vm.stats().fragments.slot_changes > 0,
            "{relaxed:?}: no re-cut"
        );
    }
}
