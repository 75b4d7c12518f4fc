//! Relaxed mode, issue 12 item 4: a trapped `rep stos`/`rep movs` with many elements left
//! promotes the tracked frames its destination reaches before pagetrack would complete it
//! one exact event per element, and the CPU runs it on the relaxed frames. Each body runs
//! through the two-pass harness (the same code on untracked, then tracked memory): memory,
//! registers and flags must equal the untracked run's, and the events, exact and coalesced,
//! must replay to the final memory with their old bytes checked. The frames are tracked
//! strict in auto mode (as a cold demotion leaves them).

use iced_x86::IcedError;
use iced_x86::code_asm::*;
use pagetrack::{Delivery, Gfn};
use pagetrack_kvm::{RelaxedConfig, RelaxedMode, VmConfig};
use pagetrack_testkit::twopass::{Event, TRACKED};
use pagetrack_testkit::{TwoPass, TwoPassRun};

type Asm = CodeAssembler;

fn auto() -> RelaxedConfig {
    RelaxedConfig::new(RelaxedMode::Auto)
}

/// Runs `body` over `frames` data frames with `relaxed` and a notifier that accepts
/// coalesced events; `setup` runs once the frames are tracked. Asserts the two-pass oracle.
fn run(
    body: &dyn Fn(&mut Asm) -> Result<(), IcedError>,
    frames: usize,
    relaxed: RelaxedConfig,
    setup: impl FnOnce(&pagetrack_kvm::Vm),
) -> Option<TwoPassRun> {
    let kvm = pagetrack_testkit::gate::open_kvm_or_skip(module_path!())?;
    let run = TwoPass::new(body)
        .frames(frames)
        .config(VmConfig::default().with_relaxed(relaxed))
        .delivery(Delivery::Coalesced)
        .run_with(kvm, setup);
    run.assert_exact();
    Some(run)
}

fn exact(run: &TwoPassRun) -> Vec<&Event> {
    run.events
        .iter()
        .filter(|e| e.coalesced.is_none())
        .collect()
}

fn coalesced(run: &TwoPassRun) -> usize {
    run.events.iter().filter(|e| e.coalesced.is_some()).count()
}

fn frame_of(e: &Event) -> u64 {
    (e.gpa - TRACKED) >> 12
}

/// The run promoted the `rep` (one promotion before a completion at least), and only its
/// first element, the trapped one, was an exact event: everything else is coalesced.
fn assert_promoted(run: &TwoPassRun, what: &str) {
    let r = run.stats.relaxed;
    assert!(r.rep_promotions >= 1, "{what}: not promoted: {r:?}");
    let exact = exact(run);
    assert_eq!(exact.len(), 1, "{what}: exact events {exact:?}");
    assert!(coalesced(run) >= 1, "{what}: no coalesced event");
    assert!(
        run.events.len() < 80,
        "{what}: {} events (an event per element would be thousands)",
        run.events.len()
    );
}

#[test]
fn a_long_rep_stosb_into_strict_frames_is_promoted_and_coalesced() {
    let body = |a: &mut Asm| {
        a.mov(eax, 0x5au32)?;
        a.mov(ecx, 0x1_0000u32)?; // 64 KiB
        a.rep().stosb()
    };
    let Some(run) = run(&body, 17, auto(), |_| {}) else {
        return;
    };
    assert_promoted(&run, "rep stosb 64 KiB");
    // The 16 frames of the 64 KiB group, not the seventeenth (untouched).
    assert!(run.stats.relaxed.promotions >= 16);
    assert!(run.events.iter().all(|e| frame_of(e) < 16));
}

#[test]
fn a_rep_stosq_of_one_page_straddling_two_frames_is_promoted() {
    let body = |a: &mut Asm| {
        a.add(rdi, 0x800)?;
        a.mov(rax, 0x1122_3344_5566_7788u64)?;
        a.mov(ecx, 512u32)?; // 4 KiB
        a.rep().stosq()
    };
    if let Some(run) = run(&body, 2, auto(), |_| {}) {
        assert_promoted(&run, "rep stosq 4 KiB");
    }
}

#[test]
fn a_rep_movsb_between_tracked_frames_and_with_a_source_override_is_promoted() {
    for with_fs in [false, true] {
        let body = move |a: &mut Asm| {
            a.mov(rsi, rdi)?; // source: frames 0-3 (the pattern)
            a.add(rdi, 0x4000)?; // destination: frames 4-7
            a.mov(ecx, 0x4000u32)?;
            if with_fs {
                a.db(&[0x64, 0xf3, 0xa4]) // fs rep movsb: FS names the source (base 0)
            } else {
                a.rep().movsb()
            }
        };
        if let Some(run) = run(&body, 8, auto(), |_| {}) {
            assert_promoted(&run, &format!("rep movsb, fs override {with_fs}"));
            assert!(run.events.iter().all(|e| frame_of(e) >= 4));
        }
    }
}

#[test]
fn a_rep_stosb_going_down_is_promoted() {
    let body = |a: &mut Asm| {
        // From the last byte of frame 8 down to the second of frame 0 (RDI ends in the
        // region, where the harness compares it as an offset).
        a.add(rdi, 0x8fff)?;
        a.mov(eax, 0xa5u32)?;
        a.mov(ecx, 0x8fffu32)?;
        a.std()?;
        a.rep().stosb() // the harness compares RFLAGS with DF still set
    };
    if let Some(run) = run(&body, 9, auto(), |_| {}) {
        assert_promoted(&run, "std; rep stosb 36 KiB");
        let first = exact(&run)[0];
        assert_eq!(
            first.gpa,
            TRACKED + 0x8fff,
            "the first element is the top one"
        );
    }
}

#[test]
fn a_rep_stosb_with_32_bit_addressing_is_promoted_and_leaves_rcx_as_the_cpu_does() {
    let body = |a: &mut Asm| {
        // a32: the count is ECX; RCX's upper half holds garbage the CPU clears.
        a.mov(rcx, 0x5555_0000_0000_3000u64)?;
        a.mov(eax, 0x3cu32)?;
        a.db(&[0x67, 0xf3, 0xaa]) // rep stosb [edi]
    };
    if let Some(run) = run(&body, 4, auto(), |_| {}) {
        assert_promoted(&run, "a32 rep stosb 12 KiB");
    }
}

/// A destination straddling a frame pinned strict: the pinned frame's elements stay exact,
/// one event per element in order, the frames on either side are coalesced.
#[test]
fn a_rep_over_a_strict_pinned_frame_keeps_that_frame_exact_per_element() {
    let body = |a: &mut Asm| {
        a.mov(eax, 0x77u32)?;
        a.mov(ecx, 0x4000u32)?; // frames 0-3
        a.rep().stosb()
    };
    let pinned = (TRACKED >> 12) + 2;
    let Some(run) = run(&body, 4, auto(), |vm| vm.pin_strict(Gfn(pinned)).unwrap()) else {
        return;
    };
    let in_pinned: Vec<&Event> = run.events.iter().filter(|e| frame_of(e) == 2).collect();
    assert_eq!(
        in_pinned.len(),
        4096,
        "one event per element of the pinned frame"
    );
    for (i, e) in in_pinned.iter().enumerate() {
        assert!(e.coalesced.is_none(), "pinned frame event {i} coalesced");
        assert_eq!(
            (e.gpa, e.new.as_slice()),
            (TRACKED + 0x2000 + i as u64, &[0x77u8][..])
        );
    }
    let elsewhere = run.events.iter().filter(|e| frame_of(e) != 2);
    let exact_elsewhere = elsewhere.clone().filter(|e| e.coalesced.is_none()).count();
    assert_eq!(exact_elsewhere, 1, "only the first trapped element");
    assert!(elsewhere.count() < 40, "frames 0, 1 and 3 coalesced");
    assert!(run.stats.relaxed.rep_promotions >= 1);
}

/// A budget of two relaxed frames: the next element's frame and one more are promoted, the
/// other two frames the `rep` writes fall back to the exact completion (per element).
#[test]
fn a_rep_beyond_the_relaxed_budget_falls_back_to_exact_events() {
    let body = |a: &mut Asm| {
        a.mov(eax, 0x42u32)?;
        a.mov(ecx, 0x4000u32)?;
        a.rep().stosb()
    };
    let mut config = auto();
    config.max_frames = 2;
    let Some(run) = run(&body, 4, config, |_| {}) else {
        return;
    };
    for f in [2, 3] {
        let n = run
            .events
            .iter()
            .filter(|e| frame_of(e) == f && e.coalesced.is_none() && e.new == [0x42])
            .count();
        assert_eq!(n, 4096, "frame {f}: exact, one event per element");
    }
    assert!(
        run.events
            .iter()
            .filter(|e| frame_of(e) < 2)
            .all(|e| e.coalesced.is_some() || e.gpa == TRACKED)
    );
    assert_eq!(run.stats.relaxed.relaxed_now, 2);
}

/// The control cases: with `--relaxed off`, and for a short `rep` (below
/// `rep_promote_elements`), every element is an exact event, as before.
#[test]
fn relaxed_off_or_a_short_rep_keeps_one_exact_event_per_element() {
    for (mode, count) in [(RelaxedMode::Off, 0x4000u32), (RelaxedMode::Auto, 200)] {
        let body = move |a: &mut Asm| {
            a.mov(eax, 0x99u32)?;
            a.mov(ecx, count)?;
            a.rep().stosb()
        };
        let Some(run) = run(&body, 4, RelaxedConfig::new(mode), |_| {}) else {
            return;
        };
        let what = format!("{mode:?}, {count} elements");
        assert_eq!(run.stats.relaxed.rep_promotions, 0, "{what}");
        assert_eq!(run.events.len(), count as usize, "{what}");
        assert!(run.events.iter().all(|e| e.coalesced.is_none()), "{what}");
    }
}

/// Guest for two vCPUs: `rounds` times, `rep stosb` of 32 KiB of byte (round + 16 rdx) at
/// rdi, then three sync points (with demotion after two clean syncs, the frames go strict
/// between rounds and the next round's `rep` traps and promotes again); exit 3.
fn racing_fills(rounds: u32) -> Vec<u8> {
    pagetrack_testkit::assemble(crate::common::ENTRY, |a| {
        a.mov(r9, rdi)?;
        a.mov(r8d, rounds)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.mov(rdi, r9)?;
        a.mov(rax, rdx)?;
        a.shl(eax, 4)?;
        a.add(eax, r8d)?;
        a.mov(ecx, 0x8000u32)?;
        a.rep().stosb()?;
        for _ in 0..3 {
            a.out(u32::from(crate::relaxed::SYNC_PORT), al)?;
        }
        a.dec(r8d)?;
        a.jnz(top)?;
        pagetrack_testkit::exit_with(a, 3)
    })
}

/// Two vCPUs fill the two halves of one 64 KiB group at once, round after round, while the
/// frames demote between rounds: their promotions race (one pauses the other, which parks on
/// the stripes or finds the frames relaxed), nothing deadlocks, the replay oracle holds over
/// the group and the final memory is each vCPU's last round.
#[test]
fn two_vcpus_promoting_for_their_reps_in_one_group_do_not_deadlock_and_replay() {
    use crate::common::{T, boot_with, read, replay};
    use crate::relaxed::{coalesced_recorder, run_syncing, set_regs};
    let kvm = pagetrack_testkit::kvm_or_skip!();
    let rounds = 6;
    let mut c = auto();
    c.demote_after_syncs = 2;
    c.demote_window = std::time::Duration::ZERO;
    let ram = 16 << 20;
    let config = VmConfig::default().with_ram(ram).with_relaxed(c);
    let mut g = boot_with(kvm, config, ram, 2, &racing_fills(rounds));
    let (rec, _h) = coalesced_recorder(&g.vm);
    let initial = read(&g.vm, T, 0x1_0000);
    g.vm.tracker()
        .add_range(pagetrack::AsId::NORMAL, Gfn(T >> 12), 16)
        .unwrap();
    for (i, v) in g.vcpus.iter().enumerate() {
        set_regs(v, |r| {
            r.rdx = i as u64;
            r.rdi = T + 0x8000 * i as u64;
        });
    }
    let layout = g.layout.clone();
    let mut vcpus = g.vcpus.drain(..);
    let (mut v0, mut v1) = (vcpus.next().unwrap(), vcpus.next().unwrap());
    let (vm0, layout0) = (g.vm.clone(), layout.clone());
    let other = std::thread::spawn(move || run_syncing(&vm0, &layout0, &mut v0, |_| {}));
    assert_eq!(run_syncing(&g.vm, &layout, &mut v1, |_| {}), 3);
    assert_eq!(other.join().unwrap(), 3);
    g.vm.sync().unwrap();
    let fin = read(&g.vm, T, 0x1_0000);
    assert!(fin[..0x8000].iter().all(|&b| b == 1), "vCPU 0's last round");
    assert!(
        fin[0x8000..].iter().all(|&b| b == 0x11),
        "vCPU 1's last round"
    );
    replay(T, &initial, &rec.take(), &fin);
    assert!(g.vm.stats().relaxed.rep_promotions >= 2);
}

/// A destination that runs on into untracked frames: the tracked ones are promoted, the CPU
/// stores the rest natively, and no event names an untracked frame. (The harness's replay
/// covers every data frame, so the two tracked ones are replayed here.)
#[test]
fn a_rep_running_into_untracked_frames_is_promoted_where_tracked() {
    let body = |a: &mut Asm| {
        a.mov(eax, 0x6eu32)?;
        a.mov(ecx, 0x4000u32)?;
        a.rep().stosb()
    };
    let Some(kvm) = pagetrack_testkit::gate::open_kvm_or_skip(module_path!()) else {
        return;
    };
    let run = TwoPass::new(&body)
        .frames(4)
        .config(VmConfig::default().with_relaxed(auto()))
        .delivery(Delivery::Coalesced)
        .run_with(kvm, |vm| {
            for f in [2, 3] {
                vm.tracker().remove_gfn(Gfn((TRACKED >> 12) + f)).unwrap();
            }
        });
    assert!(
        matches!(run.ending, pagetrack_testkit::Ending::Finished),
        "{:?}",
        run.ending
    );
    run.assert_same_memory();
    run.assert_same_registers();
    assert_promoted(&run, "rep stosb into untracked frames");
    let mut mem = run.initial[..0x2000].to_vec();
    for e in &run.events {
        assert!(frame_of(e) < 2, "an event in an untracked frame: {e:?}");
        let off = usize::try_from(e.gpa - TRACKED).unwrap();
        let range = off..off + e.new.len();
        assert_eq!(Some(&mem[range.clone()]), e.old.as_deref(), "{e:?}");
        mem[range].copy_from_slice(&e.new);
    }
    assert!(mem == run.tracked[..0x2000], "replay of the tracked frames");
    assert_eq!(run.stats.relaxed.relaxed_now, 2);
}
