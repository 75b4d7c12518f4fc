//! busybox workloads with relaxed frames (`--relaxed always` and `auto`): output identical to
//! native, and the replay oracle (every tracked frame's contents when tracking starts plus
//! the events, exact and coalesced, equal its contents when tracking stops, old bytes
//! checked) holds. Inputs are full size: relaxed frames run at native speed.

use std::path::Path;

use pagetrack_kvm::{RelaxedConfig, RelaxedMode};
use pagetrack_testkit::kvm_or_skip;
use pagetrack_vmm::process::{Input, Output, ProcessConfig, ProcessEnd, Region};

use super::{
    BUSYBOX, ENV, GuestRun, RUN_TIMEOUT, TempDir, note, require_busybox, run_config, run_native,
};

/// A deterministic text of `n` bytes: words and numbers, one line per 60 bytes or so.
fn text(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(n + 64);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(format!("{} pagetrack {}\n", x % 100_000, x >> 40).as_bytes());
    }
    out.truncate(n);
    out
}

fn run_relaxed(args: &[&str], dir: &Path, regions: Vec<Region>, mode: RelaxedMode) -> GuestRun {
    run_relaxed_with(args, dir, regions, RelaxedConfig::new(mode))
}

fn run_relaxed_with(
    args: &[&str],
    dir: &Path,
    regions: Vec<Region>,
    relaxed: RelaxedConfig,
) -> GuestRun {
    let cfg = ProcessConfig::new(BUSYBOX)
        .args(args.iter().copied())
        .env(ENV)
        .dir(dir)
        .stdin(Input::Null)
        .stdout(Output::Capture)
        .stderr(Output::Capture)
        .track(regions)
        .timeout(Some(RUN_TIMEOUT))
        .relaxed(relaxed);
    run_config(kvm_ioctls::Kvm::new().unwrap(), cfg)
}

/// Runs `args` natively, then relaxed `always` and `auto`, tracking every writable frame and
/// then stack+heap+data+mmap: outputs must equal native, the oracle must hold, and frames
/// must have run relaxed with coalesced events.
fn check(name: &str, dir: &Path, args: &[&str]) {
    let (native, status, native_wall) = run_native(args, None);
    assert_eq!(status, 0, "{name}: native busybox failed");
    let sets = [
        ("writable", vec![Region::Writable]),
        (
            "stack+heap+data+mmap",
            vec![Region::Stack, Region::Heap, Region::Data, Region::Mmap],
        ),
    ];
    for mode in [RelaxedMode::Always, RelaxedMode::Auto] {
        for (set, regions) in &sets {
            let what = format!("{name} {mode:?} {set}");
            let run = run_relaxed(args, dir, regions.clone(), mode);
            let o = &run.outcome;
            assert_eq!(
                o.end,
                ProcessEnd::Exited(0),
                "{what}: stderr {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(o.stdout == native, "{what}: output differs from native");
            let oracle = run.oracle.as_ref().unwrap();
            oracle.assert_holds(&what);
            let r = o.stats.vm.relaxed;
            assert!(r.frames_relaxed > 0, "{what}: no frame ran relaxed");
            assert!(r.coalesced_events > 0, "{what}: no coalesced event");
            note(&format!(
                "{what:>40}: native {:>6.1} ms, relaxed run {:>7.1} ms, {} frames relaxed, {} coalesced events, {} trapped stores, {} syncs",
                native_wall.as_secs_f64() * 1e3,
                run.wall.as_secs_f64() * 1e3,
                r.frames_relaxed,
                r.coalesced_events,
                o.stats.vm.trapped_writes,
                r.syncs
            ));
        }
    }
}

#[test]
fn busybox_hashes_sort_and_od_with_relaxed_frames_match_native_and_replay() {
    let _kvm = kvm_or_skip!();
    require_busybox();
    let d = TempDir::new("relaxed");
    let input = d.join("in.txt");
    std::fs::write(&input, text(300 << 10, 7)).unwrap();
    let f = input.to_str().unwrap();
    check("sha512sum", &d.0, &["sha512sum", f]);
    check("sort -n", &d.0, &["sort", "-n", f]);
    check("od", &d.0, &["od", "-A", "x", "-t", "x1", "-N", "65536", f]);
}

#[test]
fn busybox_bzip2_round_trip_with_relaxed_frames_matches_native_and_replays() {
    let _kvm = kvm_or_skip!();
    require_busybox();
    let d = TempDir::new("relaxed-bz");
    let input = d.join("in.txt");
    std::fs::write(&input, text(200 << 10, 11)).unwrap();
    let f = input.to_str().unwrap();
    check("bzip2 -c", &d.0, &["bzip2", "-c", f]);
    // bunzip2 of what native bzip2 made.
    let (bz, status, _) = run_native(&["bzip2", "-c", f], None);
    assert_eq!(status, 0);
    let packed = d.join("in.txt.bz2");
    std::fs::write(&packed, bz).unwrap();
    check(
        "bunzip2 -c",
        &d.0,
        &["bunzip2", "-c", packed.to_str().unwrap()],
    );
}

/// Cold demotion in the middle of real workloads (issue 12 item 4): with frames demoted after
/// four clean syncs (no time window), sort's and od's frames go strict and relaxed again
/// many times while the program runs; the output still equals native and the oracle (exact
/// events between coalesced ones, every switch fenced by a final sync) holds.
#[test]
fn busybox_with_frames_demoted_and_promoted_again_matches_native_and_replays() {
    let _kvm = kvm_or_skip!();
    require_busybox();
    let d = TempDir::new("relaxed-demote");
    let input = d.join("in.txt");
    std::fs::write(&input, text(100 << 10, 5)).unwrap();
    let f = input.to_str().unwrap();
    let mut config = RelaxedConfig::new(RelaxedMode::Auto);
    config.demote_after_syncs = 4;
    config.demote_window = std::time::Duration::ZERO;
    for args in [
        &["sort", "-n", f][..],
        &["od", "-A", "x", "-t", "x1", "-N", "65536", f][..],
    ] {
        let (native, status, _) = run_native(args, None);
        assert_eq!(status, 0, "{args:?}: native busybox failed");
        let run = run_relaxed_with(args, &d.0, vec![Region::Writable], config);
        let what = format!("{args:?} auto, demote after 4 syncs");
        let o = &run.outcome;
        assert_eq!(o.end, ProcessEnd::Exited(0), "{what}");
        assert!(o.stdout == native, "{what}: output differs from native");
        run.oracle.as_ref().unwrap().assert_holds(&what);
        let r = o.stats.vm.relaxed;
        assert!(r.cold_demotions > 0, "{what}: no cold demotion");
        assert!(r.coalesced_events > 0, "{what}: no coalesced event");
        note(&format!(
            "{what}: {} promotions, {} cold demotions, {} trapped stores, wall {:.1} ms",
            r.promotions,
            r.cold_demotions,
            o.stats.vm.trapped_writes,
            run.wall.as_secs_f64() * 1e3
        ));
    }
}

/// The demotion cliff (issue 12 item 4): bzip2 with frames demoted after 8 clean syncs and
/// 20 ms (the sweep row that took 20-66 s, 360k-400k exact events: its work arrays, demoted
/// between passes, were bulk-written again by `rep stos` completed one exact event per
/// element). A trapped `rep` now promotes its destination first: the output equals native,
/// the oracle holds, and the exact events (trapped stores plus elements completed in
/// userspace) stay far below the cliff's.
#[test]
fn busybox_bzip2_with_aggressive_demotion_promotes_its_rep_stores_and_matches_native() {
    let _kvm = kvm_or_skip!();
    require_busybox();
    let d = TempDir::new("relaxed-rep");
    let input = d.join("in.txt");
    std::fs::write(&input, text(200 << 10, 13)).unwrap();
    let f = input.to_str().unwrap();
    let args = ["bzip2", "-c", f];
    let (native, status, _) = run_native(&args, None);
    assert_eq!(status, 0, "native busybox failed");
    let mut config = RelaxedConfig::new(RelaxedMode::Auto);
    config.demote_after_syncs = 8;
    config.demote_window = std::time::Duration::from_millis(20);
    let run = run_relaxed_with(&args, &d.0, vec![Region::Writable], config);
    let what = "bzip2 -c auto, demote after 8 syncs / 20 ms";
    let o = &run.outcome;
    assert_eq!(o.end, ProcessEnd::Exited(0), "{what}");
    assert!(o.stdout == native, "{what}: output differs from native");
    run.oracle.as_ref().unwrap().assert_holds(what);
    let s = o.stats.vm;
    let exact = s.trapped_writes + s.string_elements;
    note(&format!(
        "{what}: {} rep promotions, {} promotions, {} cold demotions, {exact} exact stores, {} coalesced events, wall {:.1} ms",
        s.relaxed.rep_promotions,
        s.relaxed.promotions,
        s.relaxed.cold_demotions,
        s.relaxed.coalesced_events,
        run.wall.as_secs_f64() * 1e3
    ));
    assert!(
        exact < 50_000,
        "{what}: {exact} exact stores (the cliff made 360k-400k)"
    );
}
