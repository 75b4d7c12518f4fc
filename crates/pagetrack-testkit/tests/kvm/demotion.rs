//! Cold demotion (issue 12 item 4): under the auto policy a relaxed frame that no sync finds
//! dirty for `demote_after_syncs` syncs goes back to strict (after a final sync), its later
//! stores are exact events again, a demoted frame needs more heat to be promoted again
//! (hysteresis), and the replay oracle holds across every switch.

use std::time::Duration;

use iced_x86::code_asm::*;
use pagetrack::{Gfn, Source};
use pagetrack_kvm::{RelaxedConfig, RelaxedMode, VmConfig};
use pagetrack_testkit::{assemble, exit_with, kvm_or_skip};

use crate::common::*;
use crate::relaxed::{SYNC_PORT, coalesced_recorder, run_syncing, set_regs};

const RAM: u64 = 16 << 20;

/// Guest, on the frame at rdi, with a sync point (`out SYNC_PORT`) after each step:
/// 1. eight rounds of one store `[rdi + 8 r] = r` (hot: dirty at every sync), syncs 1-8;
/// 2. eight sync points without a store to the frame (cold), syncs 9-16;
/// 3. three stores `[rdi + 0x100..0x118) = 0x11, 0x22, 0x33`, sync 17;
/// 4. four stores `[rdi + 0x118..0x138) = 0x44..0x77`, sync 18; then exit 3.
fn hot_then_cold() -> Vec<u8> {
    assemble(ENTRY, |a| {
        let sync = |a: &mut CodeAssembler| a.out(u32::from(SYNC_PORT), al);
        a.mov(r8, 8u64)?;
        let mut hot = a.create_label();
        a.set_label(&mut hot)?;
        a.mov(qword_ptr(rdi + r8 * 8), r8)?; // a store into the frame
        sync(a)?;
        a.dec(r8)?;
        a.jnz(hot)?;
        a.mov(r8, 8u64)?;
        let mut cold = a.create_label();
        a.set_label(&mut cold)?;
        sync(a)?; // no store
        a.dec(r8)?;
        a.jnz(cold)?;
        for (i, v) in [0x11u32, 0x22, 0x33].into_iter().enumerate() {
            a.mov(eax, v)?;
            a.mov(qword_ptr(rdi + 0x100 + 8 * i), rax)?;
        }
        sync(a)?;
        for (i, v) in [0x44u32, 0x55, 0x66, 0x77].into_iter().enumerate() {
            a.mov(eax, v)?;
            a.mov(qword_ptr(rdi + 0x118 + 8 * i), rax)?;
        }
        sync(a)?;
        exit_with(a, 3)
    })
}

/// Auto: promoted at the first trapped store, alone (no group), the heat window and the
/// cooldown far longer than the test; coldness counted in syncs only (no time window).
fn config(demote_after_syncs: u32) -> VmConfig {
    let mut c = RelaxedConfig::new(RelaxedMode::Auto);
    c.promote_after = 1;
    c.window = Duration::from_secs(3600);
    c.group_frames = 1;
    c.demote_after_syncs = demote_after_syncs;
    c.demote_window = Duration::ZERO;
    c.demote_cooldown = Duration::from_secs(3600);
    // Syncs only at the guest's sync points (and the switches' final syncs).
    c.period = Duration::from_secs(3600);
    VmConfig::default().with_ram(RAM).with_relaxed(c)
}

/// Runs [`hot_then_cold`] on frame T; returns whether T was relaxed at each sync point
/// (index n - 1 for sync n), the events and the replay check's inputs.
fn run(kvm: kvm_ioctls::Kvm, demote_after_syncs: u32) -> (Vec<bool>, Vec<Ev>, Guest) {
    let mut g = boot_with(kvm, config(demote_after_syncs), RAM, 1, &hot_then_cold());
    let (rec, h) = coalesced_recorder(&g.vm);
    let initial = read(&g.vm, T, 0x1000);
    g.vm.tracker().add_gfn(Gfn(T >> 12)).unwrap();
    assert!(!g.vm.is_relaxed(Gfn(T >> 12)), "auto starts strict");
    set_regs(&g.vcpus[0], |r| r.rdi = T);
    let vm = g.vm.clone();
    let mut relaxed = Vec::new();
    let code = run_syncing(&g.vm, &g.layout, &mut g.vcpus[0], |_| {
        relaxed.push(vm.is_relaxed(Gfn(T >> 12)));
    });
    assert_eq!(code, 3);
    g.vm.sync().unwrap();
    let events = rec.take();
    replay(T, &initial, &events, &read(&g.vm, T, 0x1000));
    drop(h);
    (relaxed, events, g)
}

fn exact_store(events: &[Ev], gpa: u64) -> &Ev {
    let at: Vec<&Ev> = events.iter().filter(|e| e.gpa == gpa).collect();
    assert_eq!(at.len(), 1, "one event at {gpa:#x}: {at:?}");
    at[0]
}

#[test]
fn a_frame_that_stops_being_written_demotes_and_its_later_stores_are_exact() {
    let kvm = kvm_or_skip!();
    let (relaxed, events, g) = run(kvm, 4);
    assert_eq!(relaxed.len(), 18);
    // Hot: relaxed from the first store on, all through the first phase.
    assert!(relaxed[..8].iter().all(|&r| r), "{relaxed:?}");
    // Cold: demoted at the fourth clean sync, and strict from then on.
    let demoted_at = relaxed[8..16].iter().position(|&r| !r).expect("demoted") + 8;
    assert_eq!(demoted_at, 11, "demoted at sync {}", demoted_at + 1);
    assert!(relaxed[demoted_at..16].iter().all(|&r| !r), "{relaxed:?}");
    // Strict again: each store of phase 3 is its own exact event, from vCPU 0.
    for (i, v) in [0x11u64, 0x22, 0x33].into_iter().enumerate() {
        let e = exact_store(&events, T + 0x100 + 8 * i as u64);
        assert_eq!(e.coalesced, None, "{e:?}");
        assert_eq!(e.source, Source::Vcpu(0));
        assert_eq!(e.new, v.to_le_bytes());
    }
    // Hysteresis: three trapped stores did not promote it again (four times
    // `promote_after` are needed within the cooldown) ...
    assert!(!relaxed[16], "re-promoted after three stores");
    // ... the fourth did: that store is exact, the next ones coalesced at sync 18.
    assert!(relaxed[17], "not re-promoted after the fourth store");
    let fourth = exact_store(&events, T + 0x118);
    assert_eq!(fourth.coalesced, None);
    assert!(
        events
            .iter()
            .filter(|e| e.gpa >= T + 0x120 && e.gpa < T + 0x138)
            .all(|e| e.coalesced.is_some())
    );
    let s = g.vm.stats().relaxed;
    assert_eq!(s.cold_demotions, 1);
    assert_eq!(s.demotions, 1);
    assert_eq!(s.promotions, 2);
}

#[test]
fn with_cold_demotion_off_a_cold_frame_stays_relaxed() {
    let kvm = kvm_or_skip!();
    let (relaxed, events, g) = run(kvm, 0);
    assert!(relaxed.iter().all(|&r| r), "{relaxed:?}");
    // Phase 3's stores went to a relaxed frame: coalesced.
    assert!(
        events
            .iter()
            .filter(|e| e.gpa >= T + 0x100)
            .all(|e| e.coalesced.is_some())
    );
    let s = g.vm.stats().relaxed;
    assert_eq!((s.cold_demotions, s.demotions, s.promotions), (0, 0, 1));
}

/// Two programs, chosen by rdx. rdx = 0: `[rdi] = i++` until the word at rsi is non-zero (no
/// exit of its own). rdx = 1, on the frame at rdi: eight rounds of one store and a sync
/// point, twelve sync points without a store, three stores `[rdi + 0x100..0x118)` and a sync
/// point, then `[rsi] = 1` (stops the other program) and exit.
fn writer_and_cooler() -> Vec<u8> {
    assemble(ENTRY, |a| {
        let sync = |a: &mut CodeAssembler| a.out(u32::from(SYNC_PORT), al);
        let mut cooler = a.create_label();
        a.test(rdx, rdx)?;
        a.jnz(cooler)?;
        a.mov(ecx, 1u32)?;
        let mut spin = a.create_label();
        a.set_label(&mut spin)?;
        a.mov(qword_ptr(rdi), rcx)?; // the hot frame, written without pause
        a.inc(rcx)?;
        a.cmp(qword_ptr(rsi), 0)?;
        a.je(spin)?;
        exit_with(a, 3)?;
        a.set_label(&mut cooler)?;
        a.mov(r8, 8u64)?;
        let mut hot = a.create_label();
        a.set_label(&mut hot)?;
        a.mov(qword_ptr(rdi + r8 * 8), r8)?;
        sync(a)?;
        a.dec(r8)?;
        a.jnz(hot)?;
        a.mov(r8, 12u64)?;
        let mut cold = a.create_label();
        a.set_label(&mut cold)?;
        sync(a)?;
        a.dec(r8)?;
        a.jnz(cold)?;
        for (i, v) in [0x11u32, 0x22, 0x33].into_iter().enumerate() {
            a.mov(eax, v)?;
            a.mov(qword_ptr(rdi + 0x100 + 8 * i), rax)?;
        }
        sync(a)?;
        a.mov(qword_ptr(rsi), 1)?; // stop the writer
        exit_with(a, 3)
    })
}

/// A frame demotes while another vCPU keeps writing its neighbour in the same memslot
/// chunk: the demotion pauses the writer, its final sync delivers both frames' changes, and
/// the re-cut re-creates the relaxed neighbour's fragment under it. Nothing is lost (replay
/// oracle over both frames), and the demoted frame's later stores are exact.
#[test]
fn a_frame_demotes_while_another_vcpu_writes_its_relaxed_neighbour_and_nothing_is_lost() {
    let kvm = kvm_or_skip!();
    let mut c = RelaxedConfig::new(RelaxedMode::Auto);
    c.promote_after = 1;
    c.window = Duration::from_secs(3600);
    c.group_frames = 1;
    c.demote_after_syncs = 4;
    c.demote_window = Duration::ZERO;
    c.demote_cooldown = Duration::from_secs(3600);
    // Syncs only at the cooling vCPU's sync points (and the switches' final syncs).
    c.period = Duration::from_secs(3600);
    let config = VmConfig::default().with_ram(RAM).with_relaxed(c);
    let mut g = boot_with(kvm, config, RAM, 2, &writer_and_cooler());
    let (rec, _h) = coalesced_recorder(&g.vm);
    let (hot, cooling) = (T, T + 0x1000);
    let initial = read(&g.vm, T, 0x2000);
    g.vm.tracker()
        .add_range(pagetrack::AsId::NORMAL, Gfn(T >> 12), 2)
        .unwrap();
    for (i, v) in g.vcpus.iter().enumerate() {
        set_regs(v, |r| {
            r.rdx = i as u64;
            r.rdi = if i == 0 { hot } else { cooling };
            r.rsi = U;
        });
    }
    let layout = g.layout.clone();
    let mut vcpus = g.vcpus.drain(..);
    let mut writer = vcpus.next().unwrap();
    let mut cooler = vcpus.next().unwrap();
    let (vm0, layout0) = (g.vm.clone(), layout.clone());
    let w = std::thread::spawn(move || run_syncing(&vm0, &layout0, &mut writer, |_| {}));
    let vm1 = g.vm.clone();
    let mut relaxed = Vec::new();
    let code = run_syncing(&g.vm, &layout, &mut cooler, |_| {
        relaxed.push(vm1.is_relaxed(Gfn(cooling >> 12)));
    });
    assert_eq!(code, 3);
    assert_eq!(w.join().unwrap(), 3);
    g.vm.sync().unwrap();
    let fin = read(&g.vm, T, 0x2000);
    let events = rec.take();
    replay(T, &initial, &events, &fin);
    assert_eq!(relaxed.len(), 21);
    assert!(relaxed[..8].iter().all(|&r| r), "{relaxed:?}");
    assert!(!relaxed[19] && !relaxed[20], "{relaxed:?}");
    for (i, v) in [0x11u64, 0x22, 0x33].into_iter().enumerate() {
        let e = exact_store(&events, cooling + 0x100 + 8 * i as u64);
        assert_eq!((e.coalesced, e.source), (None, Source::Vcpu(1)), "{e:?}");
        assert_eq!(e.new, v.to_le_bytes());
    }
    // The writer stored at least once (before it first looks at the flag), so its frame's
    // events are in the replay above, coalesced or (if the host starved the writer for four
    // syncs, and its frame cooled too) exact.
    assert!(events.iter().any(|e| e.gpa == hot));
    assert!(g.vm.stats().relaxed.cold_demotions >= 1);
}

/// Guest, on the four frames at rdi, with sync points: `rep stosb` of 16 KiB of byte 1,
/// sync; eight sync points without a store (cold); `rep stosb` of 16 KiB of byte 2, sync;
/// exit 3.
fn fill_cool_fill() -> Vec<u8> {
    assemble(ENTRY, |a| {
        let sync = |a: &mut CodeAssembler| a.out(u32::from(SYNC_PORT), al);
        a.mov(r9, rdi)?;
        for byte in [1u32, 2] {
            a.mov(rdi, r9)?;
            a.mov(eax, byte)?;
            a.mov(ecx, 0x4000u32)?;
            a.rep().stosb()?;
            sync(a)?;
            if byte == 1 {
                a.mov(r8, 8u64)?;
                let mut cold = a.create_label();
                a.set_label(&mut cold)?;
                sync(a)?;
                a.dec(r8)?;
                a.jnz(cold)?;
            }
        }
        exit_with(a, 3)
    })
}

/// The demotion cliff (bzip2's work arrays): frames demoted while cold between two bulk
/// fills are promoted again by the second fill's `rep stosb` before it is completed, despite
/// the hysteresis (a cooldown longer than the test), so each fill is one exact event (its
/// trapped first element) and coalesced changes, not 16,384 exact events.
#[test]
fn frames_demoted_cold_are_promoted_again_by_a_bulk_rep_store_before_it_completes() {
    let kvm = kvm_or_skip!();
    let mut g = boot_with(kvm, config(4), RAM, 1, &fill_cool_fill());
    let (rec, _h) = coalesced_recorder(&g.vm);
    let initial = read(&g.vm, T, 0x4000);
    g.vm.tracker()
        .add_range(pagetrack::AsId::NORMAL, Gfn(T >> 12), 4)
        .unwrap();
    set_regs(&g.vcpus[0], |r| r.rdi = T);
    let vm = g.vm.clone();
    let mut relaxed = Vec::new();
    let code = run_syncing(&g.vm, &g.layout, &mut g.vcpus[0], |_| {
        relaxed.push((0..4).all(|f| vm.is_relaxed(Gfn((T >> 12) + f))));
    });
    assert_eq!(code, 3);
    g.vm.sync().unwrap();
    let fin = read(&g.vm, T, 0x4000);
    assert_eq!(fin, vec![2u8; 0x4000]);
    let events = rec.take();
    replay(T, &initial, &events, &fin);
    assert_eq!(relaxed.len(), 10);
    assert!(
        relaxed[0],
        "the first fill promoted its frames: {relaxed:?}"
    );
    assert!(!relaxed[8], "cold, demoted: {relaxed:?}");
    assert!(
        relaxed[9],
        "the second fill promoted them again: {relaxed:?}"
    );
    let exact: Vec<&Ev> = events.iter().filter(|e| e.coalesced.is_none()).collect();
    assert_eq!(
        exact.len(),
        2,
        "each fill's trapped first element: {exact:?}"
    );
    assert!(
        exact
            .iter()
            .all(|e| e.gpa == T && e.source == Source::Vcpu(0))
    );
    let s = g.vm.stats();
    assert_eq!(s.relaxed.rep_promotions, 2);
    assert_eq!(s.relaxed.cold_demotions, 4);
    assert_eq!(s.string_elements, 0, "nothing completed in userspace");
}
