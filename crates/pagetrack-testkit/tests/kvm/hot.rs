//! Hot relaxed frames (manual dirty-log protect): a relaxed frame found dirty in
//! `hot_after_syncs` consecutive syncs keeps its KVM dirty bit (it stays writable and every
//! harvest reports it) and is diffed at every sync; unchanged for `hot_idle_syncs` syncs it is
//! cooled (re-protected). The coalesced events stay exact (replay oracle); the VMM's dirty log
//! and the checkpoint get a hot frame when its content changed (changed ⊆ logged ⊆ written).

use std::collections::BTreeSet;

use iced_x86::code_asm::*;
use pagetrack::{AsId, Delivery, Gfn, NotifierClass, RegisterOptions, SlotId};
use pagetrack_kvm::{DirtyProtect, HostCaps, RelaxedConfig, RelaxedMode, VmConfig};
use pagetrack_testkit::{assemble, exit_with, kvm_or_skip};
use pagetrack_vmm::x86::LONG_MODE_RFLAGS;

use crate::common::*;

const RAM: u64 = 16 << 20;
/// Tracked (relaxed) frames from [`T`].
const FRAMES: u64 = 4;
const IDLE: u32 = 6;

/// Guest: for k in 0..rcx: `[rdi] = rsi`, `[rdi + 0x808] = !rsi`, rdi += rdx; then exit.
fn writer() -> Vec<u8> {
    assemble(ENTRY, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.mov(qword_ptr(rdi), rsi)?;
        a.mov(rax, rsi)?;
        a.not(rax)?;
        a.mov(qword_ptr(rdi + 0x808), rax)?;
        a.add(rdi, rdx)?;
        a.dec(rcx)?;
        a.jnz(top)?;
        exit_with(a, 3)
    })
}

fn enter(g: &Guest, at: u64, count: u64, stride: u64, value: u64) {
    let fd = g.vcpus[0].fd();
    let mut regs = fd.get_regs().unwrap();
    regs.rip = ENTRY;
    regs.rsp = g.layout.user_stack_top(0).unwrap();
    regs.rflags = LONG_MODE_RFLAGS;
    (regs.rdi, regs.rcx, regs.rdx, regs.rsi) = (at, count, stride, value);
    fd.set_regs(&regs).unwrap();
}

/// Tracked frames (0..FRAMES) set in a region bitmap.
fn tracked_pages(bitmap: &[u64]) -> BTreeSet<u64> {
    (0..FRAMES)
        .filter(|k| {
            let p = (T >> 12) + k;
            bitmap[usize::try_from(p / 64).unwrap()] & (1 << (p % 64)) != 0
        })
        .collect()
}

fn config(how: DirtyProtect) -> VmConfig {
    let mut relaxed = RelaxedConfig::new(RelaxedMode::Always);
    relaxed.hot_after_syncs = 2;
    relaxed.hot_idle_syncs = IDLE;
    VmConfig::default()
        .with_ram(RAM)
        .with_dirty_log()
        .with_dirty_protect(how)
        .with_relaxed(relaxed)
}

fn manual_offered(kvm: &kvm_ioctls::Kvm) -> bool {
    HostCaps::probe(kvm).manual_dirty_protect & 1 != 0
}

/// One round: the guest writes `frames` (frame numbers, consecutive from the first, or one)
/// with `value`; then the VMM's log is taken. Returns (changed, logged, written) frames.
fn round(g: &mut Guest, first: u64, count: u64, value: u64) -> [BTreeSet<u64>; 3] {
    let len = usize::try_from(FRAMES * 4096).unwrap();
    let before = read(&g.vm, T, len);
    enter(g, T + first * 4096, count, 4096, value);
    assert_eq!(run_to_exit(&g.vm, &g.layout, &mut g.vcpus[0], TIMEOUT), 3);
    let after = read(&g.vm, T, len);
    let changed: BTreeSet<u64> = (0..FRAMES)
        .filter(|&k| {
            let r = usize::try_from(k * 4096).unwrap()..usize::try_from((k + 1) * 4096).unwrap();
            before[r.clone()] != after[r]
        })
        .collect();
    let logged = tracked_pages(&g.vm.take_dirty_log(SlotId(0)).unwrap());
    let written: BTreeSet<u64> = (first..first + count).collect();
    [changed, logged, written]
}

/// Frames 0 and 1 written with new values in every round (hot after two), then frame 0
/// left alone and frame 1 written with the same value again (both cool after IDLE unchanged
/// syncs), then both written again with new values (hot again), some rounds repeating the
/// last value. Every round's log lies between the changed and the written frames, and the
/// coalesced events replay exactly to the final memory.
#[test]
fn hot_frames_written_idle_and_written_again_replay_exactly_and_log_their_changes() {
    let kvm = kvm_or_skip!();
    if !manual_offered(&kvm) {
        eprintln!("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 not offered: hot frames need it");
        return;
    }
    let mut g = boot_with(kvm, config(DirtyProtect::Manual), RAM, 1, &writer());
    let rec = std::sync::Arc::new(Recorder::default());
    let _h =
        g.vm.tracker()
            .register(
                rec.clone(),
                RegisterOptions::new(NotifierClass::Ordinary).with_delivery(Delivery::Coalesced),
            )
            .unwrap();
    let len = usize::try_from(FRAMES * 4096).unwrap();
    let initial = read(&g.vm, T, len);
    g.vm.tracker()
        .add_range(AsId::NORMAL, Gfn(T >> 12), FRAMES)
        .unwrap();
    assert!(g.vm.is_relaxed(Gfn(T >> 12)));
    g.vm.take_dirty_log(SlotId(0)).unwrap();
    let mut value = 0x100u64;
    let check = |g: &mut Guest, first: u64, count: u64, value: u64, what: &str| {
        let [changed, logged, written] = round(g, first, count, value);
        assert!(
            changed.is_subset(&logged) && logged.is_subset(&written),
            "{what}: changed {changed:?}, logged {logged:?}, written {written:?}"
        );
    };
    for r in 0..10 {
        value += 1;
        check(&mut g, 0, 2, value, &format!("hot phase, round {r}"));
    }
    let hot = g.vm.stats().relaxed;
    assert!(hot.hot_promotions >= 2 && hot.hot_now >= 2, "{hot:?}");
    for r in 0..(IDLE as u64 + 4) {
        // Frame 1 again with the value it holds (written, unchanged); frame 0 untouched.
        check(&mut g, 1, 1, value, &format!("idle phase, round {r}"));
    }
    let idle = g.vm.stats().relaxed;
    assert!(idle.hot_cooled >= 2, "{idle:?}");
    for r in 0..12 {
        if r % 3 != 2 {
            value += 1;
        }
        check(&mut g, 0, 2, value, &format!("hot again, round {r}"));
    }
    let again = g.vm.stats().relaxed;
    assert!(again.hot_promotions >= 4, "{again:?}");
    g.vm.sync().unwrap();
    let events = rec.take();
    assert!(events.iter().all(|e| e.coalesced.is_some()));
    replay(T, &initial, &events, &read(&g.vm, T, len));
}

/// A checkpoint taken while frames are hot, hot frames changed across several syncs, then
/// restored: RAM is the checkpoint's again (the restore found the hot frames' changes), and
/// the events, restores included, replay exactly.
#[test]
fn restore_puts_back_the_changes_of_hot_frames() {
    let kvm = kvm_or_skip!();
    if !manual_offered(&kvm) {
        eprintln!("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 not offered: hot frames need it");
        return;
    }
    let mut g = boot_with(kvm, config(DirtyProtect::Manual), RAM, 1, &writer());
    let rec = std::sync::Arc::new(Recorder::default());
    let _h =
        g.vm.tracker()
            .register(
                rec.clone(),
                RegisterOptions::new(NotifierClass::Ordinary).with_delivery(Delivery::Coalesced),
            )
            .unwrap();
    let len = usize::try_from(FRAMES * 4096).unwrap();
    let initial = read(&g.vm, T, len);
    g.vm.tracker()
        .add_range(AsId::NORMAL, Gfn(T >> 12), FRAMES)
        .unwrap();
    for v in 1..6 {
        round(&mut g, 0, 2, v);
    }
    assert!(g.vm.stats().relaxed.hot_now >= 2);
    g.vm.checkpoint().unwrap();
    let image = read(&g.vm, 0, usize::try_from(RAM).unwrap());
    for cycle in 0..4u64 {
        for v in 0..4 {
            round(&mut g, 0, 2, 0x9000 + cycle * 16 + v);
        }
        assert!(g.vm.stats().relaxed.hot_now >= 1, "cycle {cycle}");
        assert_ne!(read(&g.vm, T, len), image[0x10_0000..0x10_0000 + len]);
        g.vm.restore().unwrap();
        assert!(
            read(&g.vm, 0, usize::try_from(RAM).unwrap()) == image,
            "cycle {cycle}: RAM differs from the checkpoint after restore"
        );
    }
    g.vm.sync().unwrap();
    replay(T, &initial, &rec.take(), &read(&g.vm, T, len));
}

/// With plain `KVM_GET_DIRTY_LOG` every harvest re-protects what it reports: no frame is
/// made hot, and the log is exactly the written set.
#[test]
fn no_frame_is_hot_with_plain_get() {
    let kvm = kvm_or_skip!();
    let mut g = boot_with(kvm, config(DirtyProtect::Plain), RAM, 1, &writer());
    let _h =
        g.vm.tracker()
            .register(
                std::sync::Arc::new(Recorder::default()),
                RegisterOptions::new(NotifierClass::Ordinary).with_delivery(Delivery::Coalesced),
            )
            .unwrap();
    g.vm.tracker()
        .add_range(AsId::NORMAL, Gfn(T >> 12), FRAMES)
        .unwrap();
    assert!(g.vm.is_relaxed(Gfn(T >> 12)));
    g.vm.take_dirty_log(SlotId(0)).unwrap();
    for v in 1..8 {
        let [_, logged, written] = round(&mut g, 0, 2, 7);
        assert_eq!(logged, written, "round {v}");
    }
    assert_eq!(g.vm.stats().relaxed.hot_promotions, 0);
}

/// The guest writes frames `first..first + count` of [`T`] with `value`, then exits.
fn write_frames(g: &mut Guest, first: u64, count: u64, value: u64) {
    enter(g, T + first * 4096, count, 4096, value);
    assert_eq!(run_to_exit(&g.vm, &g.layout, &mut g.vcpus[0], TIMEOUT), 3);
}

/// The two words [`writer`] stores into a frame, as (offset, bytes).
fn words_of(value: u64) -> [(u64, Vec<u8>); 2] {
    [
        (0, value.to_le_bytes().to_vec()),
        (0x808, (!value).to_le_bytes().to_vec()),
    ]
}

/// Untracking a relaxed frame leaves it writable in its logged fragment (no re-cut: no
/// memslot is changed), its changes up to the untrack are delivered and later ones are not
/// (it is untracked, and never traps); tracking it again works strict (a pin: exact events
/// whose old bytes are what the guest wrote while it was untracked) and relaxed.
#[test]
fn an_untracked_relaxed_frame_keeps_its_fragment_and_can_be_tracked_again() {
    let kvm = kvm_or_skip!();
    let mut relaxed = RelaxedConfig::new(RelaxedMode::Always);
    relaxed.period = std::time::Duration::from_secs(3600);
    let config = VmConfig::default().with_ram(RAM).with_relaxed(relaxed);
    let mut g = boot_with(kvm, config, RAM, 1, &writer());
    let rec = std::sync::Arc::new(Recorder::default());
    let _h =
        g.vm.tracker()
            .register(
                rec.clone(),
                RegisterOptions::new(NotifierClass::Ordinary).with_delivery(Delivery::Coalesced),
            )
            .unwrap();
    let initial = read(&g.vm, T, 3 * 4096);
    g.vm.tracker()
        .add_range(AsId::NORMAL, Gfn(T >> 12), 3)
        .unwrap();
    let mid = Gfn((T >> 12) + 1);
    assert!(g.vm.is_relaxed(mid));
    write_frames(&mut g, 0, 3, 1);
    let before = g.vm.stats().fragments;
    g.vm.tracker().remove_gfn(mid).unwrap();
    assert!(!g.vm.is_relaxed(mid));
    let after = g.vm.stats().fragments;
    assert_eq!(
        (after.slot_changes, after.fragments),
        (before.slot_changes, before.fragments),
        "the untrack re-cut the chunk"
    );
    // Written while untracked: nothing reported for it, and no trap.
    write_frames(&mut g, 0, 3, 2);
    assert_eq!(g.vm.stats().trapped_writes, 0);
    let untracked_phase = rec.take();
    let mid_gpa = T + 0x1000;
    let (mine, others): (Vec<Ev>, Vec<Ev>) = untracked_phase
        .into_iter()
        .partition(|e| e.gpa >> 12 == mid_gpa >> 12);
    let last_mid: Vec<(u64, Vec<u8>)> = mine
        .iter()
        .filter(|e| e.new == 1u64.to_le_bytes() || e.new == (!1u64).to_le_bytes())
        .map(|e| (e.gpa - mid_gpa, e.new.clone()))
        .collect();
    assert_eq!(
        last_mid,
        words_of(1).to_vec(),
        "the frame's changes up to the untrack were delivered, and only those: {mine:?}"
    );
    assert_eq!(mine.len(), 2, "nothing after the untrack: {mine:?}");
    let mut events = others;
    // Tracked again, strict (pinned): exact events from the guest's writes.
    g.vm.pin_strict(mid).unwrap();
    g.vm.tracker().add_gfn(mid).unwrap();
    assert!(!g.vm.is_relaxed(mid));
    write_frames(&mut g, 1, 1, 3);
    let strict = rec.take();
    let exact: Vec<(u64, Vec<u8>, Option<Vec<u8>>)> = strict
        .iter()
        .filter(|e| e.coalesced.is_none())
        .map(|e| (e.gpa - mid_gpa, e.new.clone(), e.old.clone()))
        .collect();
    assert_eq!(
        exact,
        words_of(3)
            .into_iter()
            .zip(words_of(2))
            .map(|((at, new), (_, old))| (at, new, Some(old)))
            .collect::<Vec<_>>(),
        "{strict:?}"
    );
    // Untracked and tracked again, relaxed: coalesced events again.
    g.vm.tracker().remove_gfn(mid).unwrap();
    g.vm.unpin_strict(mid).unwrap();
    g.vm.tracker().add_gfn(mid).unwrap();
    assert!(g.vm.is_relaxed(mid));
    write_frames(&mut g, 1, 1, 4);
    let relaxed_again = rec.take();
    let coalesced: Vec<(u64, Vec<u8>, Option<Vec<u8>>)> = relaxed_again
        .iter()
        .filter(|e| e.coalesced.is_some() && e.gpa >> 12 == mid_gpa >> 12)
        .map(|e| (e.gpa - mid_gpa, e.new.clone(), e.old.clone()))
        .collect();
    assert_eq!(
        coalesced,
        words_of(4)
            .into_iter()
            .zip(words_of(3))
            .map(|((at, new), (_, old))| (at, new, Some(old)))
            .collect::<Vec<_>>(),
        "{relaxed_again:?}"
    );
    // Frames 0 and 2 stayed tracked throughout: their events replay exactly.
    events.extend(strict.into_iter().chain(relaxed_again));
    let mut fin = read(&g.vm, T, 3 * 4096);
    let mut init = initial.clone();
    // Frame 1's bytes are outside the oracle (it was untracked for a while).
    fin[0x1000..0x2000].fill(0);
    init[0x1000..0x2000].fill(0);
    let outer: Vec<Ev> = events
        .into_iter()
        .filter(|e| e.gpa >> 12 != mid_gpa >> 12)
        .collect();
    replay(T, &init, &outer, &fin);
}

/// A sync with no guest instruction run since the last one began returns at once (no
/// harvest): a second `Vm::sync`, and the sync before a device write into a relaxed frame
/// right after an exit. Once the guest has run again the next sync harvests and finds its
/// stores, and the events (device writes included) replay exactly.
#[test]
fn a_sync_with_nothing_run_since_the_last_is_skipped_and_the_next_run_is_found() {
    let kvm = kvm_or_skip!();
    let mut relaxed = RelaxedConfig::new(RelaxedMode::Always);
    relaxed.period = std::time::Duration::from_secs(3600);
    let config = VmConfig::default().with_ram(RAM).with_relaxed(relaxed);
    let mut g = boot_with(kvm, config, RAM, 1, &writer());
    let rec = std::sync::Arc::new(Recorder::default());
    let _h =
        g.vm.tracker()
            .register(
                rec.clone(),
                RegisterOptions::new(NotifierClass::Ordinary).with_delivery(Delivery::Coalesced),
            )
            .unwrap();
    let initial = read(&g.vm, T, 2 * 4096);
    g.vm.tracker()
        .add_range(AsId::NORMAL, Gfn(T >> 12), 2)
        .unwrap();
    write_frames(&mut g, 0, 2, 1);
    let s0 = g.vm.stats().relaxed;
    let report = g.vm.sync().unwrap();
    assert_eq!(report.dirty_frames, 0);
    let s1 = g.vm.stats().relaxed;
    assert_eq!(s1.skipped_syncs, s0.skipped_syncs + 1, "{s1:?}");
    // A device write into a relaxed frame: its sync first is skipped too; the write is exact.
    use vm_memory::Bytes;
    g.vm.memory()
        .write_obj(0xdead_beef_u64, vm_memory::GuestAddress(T + 0x40))
        .unwrap();
    let s2 = g.vm.stats().relaxed;
    assert_eq!(s2.skipped_syncs, s1.skipped_syncs + 1, "{s2:?}");
    // The guest runs again: the exit's sync harvests and delivers its stores.
    write_frames(&mut g, 0, 2, 2);
    let s3 = g.vm.stats().relaxed;
    assert_eq!(s3.skipped_syncs, s2.skipped_syncs, "{s3:?}");
    let events = rec.take();
    for frame in [T, T + 0x1000] {
        assert!(
            events
                .iter()
                .any(|e| e.gpa == frame && e.coalesced.is_some() && e.new == 2u64.to_le_bytes()),
            "the second run's store to {frame:#x} was delivered: {events:?}"
        );
    }
    replay(T, &initial, &events, &read(&g.vm, T, 2 * 4096));
}

/// Auto: a frame relaxed, untracked (it lingers in its logged fragment) and tracked again is
/// relaxed again at once, without a re-cut either way (a `free` then `malloc` of the same
/// memory); its next change is a coalesced event whose old bytes are what the guest wrote
/// while it was untracked.
#[test]
fn auto_tracks_a_lingering_frame_relaxed_again_without_a_re_cut() {
    let kvm = kvm_or_skip!();
    let mut relaxed = RelaxedConfig::new(RelaxedMode::Auto);
    relaxed.period = std::time::Duration::from_secs(3600);
    relaxed.demote_after_syncs = 0;
    let config = VmConfig::default().with_ram(RAM).with_relaxed(relaxed);
    let mut g = boot_with(kvm, config, RAM, 1, &writer());
    let rec = std::sync::Arc::new(Recorder::default());
    let _h =
        g.vm.tracker()
            .register(
                rec.clone(),
                RegisterOptions::new(NotifierClass::Ordinary).with_delivery(Delivery::Coalesced),
            )
            .unwrap();
    let f = Gfn(T >> 12);
    g.vm.tracker().add_gfn(f).unwrap();
    assert!(!g.vm.is_relaxed(f), "auto starts strict");
    // The first trapped store promotes it.
    write_frames(&mut g, 0, 1, 1);
    assert!(g.vm.is_relaxed(f));
    let before = g.vm.stats().fragments;
    g.vm.tracker().remove_gfn(f).unwrap();
    write_frames(&mut g, 0, 1, 2);
    g.vm.tracker().add_gfn(f).unwrap();
    assert!(g.vm.is_relaxed(f), "tracked again relaxed at once");
    let after = g.vm.stats().fragments;
    assert_eq!(
        after.slot_changes, before.slot_changes,
        "untrack and re-track re-cut the chunk"
    );
    rec.take();
    let traps = g.vm.stats().trapped_writes;
    write_frames(&mut g, 0, 1, 3);
    assert_eq!(g.vm.stats().trapped_writes, traps, "no trap: relaxed");
    let ev: Vec<(u64, Vec<u8>, Option<Vec<u8>>)> = rec
        .take()
        .into_iter()
        .filter(|e| e.gpa >> 12 == T >> 12)
        .map(|e| (e.gpa - T, e.new, e.old))
        .collect();
    assert_eq!(
        ev,
        words_of(3)
            .into_iter()
            .zip(words_of(2))
            .map(|((at, new), (_, old))| (at, new, Some(old)))
            .collect::<Vec<_>>()
    );
}
