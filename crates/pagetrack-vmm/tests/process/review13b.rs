//! Second review of issue 13's address-space lock, as a hostile program's author would attack
//! it: stores whose completion takes more than one KVM exit, blocked threads and signals during
//! address-space changes, many threads hammering while another unmaps, and whether constant
//! trapped stores starve `munmap`. Each run is compared with a native run of the same program
//! and has a timeout, so a hang or deadlock is a failure, not a stuck test.
//!
//! The C programs are under `review13b/`, built with `gcc -static -pthread` at test time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pagetrack_testkit::kvm_or_skip;
use pagetrack_vmm::process::{ProcessEnd, Region};

use super::memtest::build;
use super::{GuestRun, TempDir, assert_ran_as_natively, c_program, run_config};

const SPLIT_C: &str = include_str!("review13b/split.c");
const STORM_C: &str = include_str!("review13b/storm.c");
const SPLITLOCK_C: &str = include_str!("review13b/splitlock.c");

/// No run here may take longer than this; a deadlock ends as a timeout well before.
const LIMIT: Duration = Duration::from_secs(60);

/// Runs `exe args` in a process VM tracking `regions`, with `LIMIT`.
fn guest(exe: &Path, args: &[&str], d: &TempDir, regions: Vec<Region>) -> GuestRun {
    run_config(
        kvm_ioctls::Kvm::new().unwrap(),
        c_program(exe, args, d, regions, LIMIT),
    )
}

/// Native stdout of `exe args` (which must succeed).
fn native(exe: &Path, args: &[&str]) -> String {
    let out = Command::new(exe).args(args).output().unwrap();
    assert!(out.status.success(), "native {args:?} failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The guest run ended as natively (status 0, same stdout) and the replay oracle holds.
fn assert_as_natively(exe: &Path, args: &[&str], d: &TempDir, regions: Vec<Region>) {
    let want = native(exe, args);
    let run = guest(exe, args, d, regions.clone());
    assert_ran_as_natively(&run, &want, &format!("{args:?} {regions:?}"));
}

fn split_exe(d: &TempDir) -> PathBuf {
    build(&d.0, "split", SPLIT_C, &["-pthread"])
}

/// An 8-byte store straddling two tracked pages exits twice (one MMIO fragment per page);
/// KVM translates both pages before the first exit and sends the second fragment's GPA on
/// the next `KVM_RUN`, without walking again. A `mmap(MAP_FIXED)` of the second page between
/// the two exits frees its frame, a fresh mapping gets it, and the second fragment lands in
/// the fresh page. Natively a fresh anonymous page is all zero.
#[test]
fn review13b_page_straddling_store_racing_map_fixed_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13b-straddle");
    let exe = split_exe(&d);
    assert_as_natively(&exe, &["straddle", "1000"], &d, vec![Region::Mmap]);
}

/// A 16-byte SSE store (`movdqu`) into a tracked page exits twice, 8 bytes each, to GPAs KVM
/// computed before the first exit: the same race as the straddling store, within one page.
#[test]
fn review13b_sse_store_racing_map_fixed_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13b-sse");
    let exe = split_exe(&d);
    assert_as_natively(&exe, &["sse", "1000"], &d, vec![Region::Mmap]);
}

fn storm_exe(d: &TempDir) -> PathBuf {
    build(&d.0, "storm", STORM_C, &["-pthread"])
}

/// While the main thread churns the address space (`mmap`, `munmap`, `mremap` shrink,
/// `mmap(MAP_FIXED)`, `mprotect`, `brk` grow and shrink, `madvise(MADV_DONTNEED)`: every one
/// an update), other threads wait on a futex in a tracked page, `nanosleep` with `SIGUSR1`
/// delivered onto a tracked `sigaltstack`, hammer a tracked page, and finally `pread` into a
/// buffer straddling two tracked pages: no deadlock, and everything as natively.
#[test]
fn review13b_blocked_threads_signals_and_reads_under_address_space_churn_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13b-blocked");
    let exe = storm_exe(&d);
    let data = d.join("r13b.dat");
    let data = data.to_str().unwrap();
    for regions in [vec![Region::Mmap], vec![Region::Writable]] {
        assert_as_natively(&exe, &["blocked", "500", "once", data], &d, regions);
    }
}

/// The same churn with the reader calling `pread` in a loop: a thread that makes system
/// calls while another thread's address-space calls pause every vCPU.
#[test]
fn review13b_syscall_loop_under_address_space_churn_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13b-loop");
    let exe = storm_exe(&d);
    let data = d.join("r13b.dat");
    let data = data.to_str().unwrap();
    assert_as_natively(
        &exe,
        &["blocked", "500", "loop", data],
        &d,
        vec![Region::Mmap],
    );
}

/// A thread calls `exit_group(7)` while the main thread is in its churn loop and two threads
/// hammer a tracked page: the process ends with status 7, as natively, and does not hang.
#[test]
fn review13b_exit_group_during_address_space_churn_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13b-exitgroup");
    let exe = storm_exe(&d);
    let out = Command::new(&exe).arg("exitgroup").output().unwrap();
    assert_eq!(out.status.code(), Some(7), "native: {out:?}");
    for regions in [vec![Region::Mmap], vec![Region::Writable]] {
        let run = guest(&exe, &["exitgroup"], &d, regions.clone());
        let o = &run.outcome;
        assert_eq!(
            o.end,
            ProcessEnd::Exited(7),
            "{regions:?}: stderr {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&out.stdout),
            "{regions:?}"
        );
        if let Some(oracle) = run.oracle.as_ref() {
            oracle.assert_holds(&format!("exit_group {regions:?}"));
        }
    }
}

/// 63 threads (64 with the main one, the most pagetrack runs) each map a tracked page, fill
/// and check it, `lock xadd`, `lock cmpxchg` and `xchg` shared tracked counters, and unmap
/// it, 10 times: every word as written, every atomic counted once, no deadlock.
#[test]
fn review13b_63_threads_atomics_and_munmap_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13b-many");
    let exe = storm_exe(&d);
    for regions in [vec![Region::Mmap], vec![Region::Writable]] {
        assert_as_natively(&exe, &["many"], &d, regions);
    }
}

/// Two threads `lock xadd` one counter that straddles two tracked pages (a split lock), 60
/// times each: natively the counter ends at 120. Two guest runs, every one exact. The counts
/// are small because a split lock costs this host tens of milliseconds even untracked (its
/// split-lock mitigation), so 4,000 per thread could not finish within the run limit; the
/// two-vCPU flat-guest tests (`pagetrack-testkit/tests/kvm/splitlock.rs`) do thousands.
#[test]
fn review13b_split_lock_xadd_across_two_tracked_pages_is_atomic() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13b-splitlock");
    let exe = build(&d.0, "splitlock", SPLITLOCK_C, &["-pthread"]);
    assert_eq!(native(&exe, &["60"]), "split lock: 120 of 120\n");
    for round in 0..2 {
        let run = guest(&exe, &["60"], &d, vec![Region::Mmap]);
        let o = &run.outcome;
        assert_eq!(
            o.end,
            ProcessEnd::Exited(0),
            "stderr {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            "split lock: 120 of 120\n",
            "run {round}: increments lost"
        );
    }
}
