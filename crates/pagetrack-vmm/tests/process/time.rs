//! The vDSO: `clock_gettime`, `gettimeofday` and `time` run inside the guest, agree with the
//! host's clocks and the VMM's system calls, never go backwards, and do not exit.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use pagetrack_testkit::kvm_or_skip;
use pagetrack_vmm::process::{Input, ProcessEnd};

use super::memtest::build_c;
use super::{Mode, TempDir, note, run_guest};

/// Reads the clocks `argv[1]` times each through the C library (the vDSO), and every 1000th
/// time through the raw system call (the VMM), checking that no reading of a clock is
/// earlier than the one before it, whichever path gave it. Prints the first and last
/// real-time and monotonic readings in nanoseconds and the number of backward steps.
const CLOCKS_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
static long long ns(struct timespec t) { return t.tv_sec * 1000000000LL + t.tv_nsec; }
int main(int argc, char **argv) {
    long n = atol(argv[1]), backwards = 0;
    struct timespec t;
    struct timeval tv;
    clock_gettime(CLOCK_REALTIME, &t);
    long long rt0 = ns(t), rt = rt0;
    clock_gettime(CLOCK_MONOTONIC, &t);
    long long mono0 = ns(t), mono = mono0;
    long long us = 0;
    time_t secs = 0;
    for (long i = 0; i < n; i++) {
        int raw = i % 1000 == 999;
        if (raw) syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &t);
        else clock_gettime(CLOCK_MONOTONIC, &t);
        if (ns(t) < mono) backwards++;
        mono = ns(t);
        if (raw) syscall(SYS_clock_gettime, CLOCK_REALTIME, &t);
        else clock_gettime(CLOCK_REALTIME, &t);
        if (ns(t) < rt) backwards++;
        rt = ns(t);
        gettimeofday(&tv, NULL);
        long long u = tv.tv_sec * 1000000LL + tv.tv_usec;
        if (u < us || u > rt / 1000 + 1000000) backwards++;
        us = u;
        time_t s = time(NULL);
        if (s < secs || s < tv.tv_sec) backwards++;
        secs = s;
    }
    printf("%lld %lld %lld %lld %ld\n", rt0, rt, mono0, mono, backwards);
    return 0;
}
"#;

fn now_ns() -> i128 {
    i128::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    )
    .unwrap()
}

#[test]
fn vdso_clocks_are_monotonic_close_to_the_host_and_do_not_exit() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("clocks");
    let exe = build_c(&d.0, "clocks", CLOCKS_C);
    // Tracked, each store to the stack is a trapped write: fewer rounds.
    for (mode, calls) in [(Mode::Untracked, 100_000u64), (Mode::StackHeapData, 2_000)] {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let (before, started) = (now_ns(), Instant::now());
        let n = calls.to_string();
        let run = run_guest(kvm, &exe, &[&n], &d.0, Input::Null, mode);
        let (after, elapsed) = (now_ns(), started.elapsed());
        assert_eq!(run.outcome.end, ProcessEnd::Exited(0), "{mode:?}: {run:?}");
        let out = String::from_utf8(run.outcome.stdout.clone()).unwrap();
        let v: Vec<i128> = out.split_whitespace().map(|w| w.parse().unwrap()).collect();
        let [rt0, rt1, mono0, mono1, backwards] = v[..] else {
            panic!("{mode:?}: output {out:?}");
        };
        assert_eq!(backwards, 0, "{mode:?}: a clock went backwards");
        // Real time within the host's, read around the run.
        assert!(
            before <= rt0 && rt0 <= rt1 && rt1 <= after,
            "{mode:?}: real time {rt0}..{rt1} outside the host's {before}..{after}"
        );
        // Monotonic time starts at the process VM's origin (1000 s) and advances no more
        // than the host's did around the run.
        let host = i128::try_from(elapsed.as_nanos()).unwrap();
        assert!(
            (1_000_000_000_000..1_000_000_000_000 + host).contains(&mono0)
                && mono0 <= mono1
                && mono1 - mono0 <= host,
            "{mode:?}: monotonic {mono0}..{mono1}, host {host} ns"
        );
        // 4 calls a round; only the raw system calls (2 per 1000 rounds) and the C
        // library's start-up (16 calls) exit.
        let s = &run.outcome.stats;
        note(&format!(
            "   clocks {mode:?}: {} calls, {} exits, {} system calls, run {:.1} ms",
            4 * calls,
            s.exits,
            s.syscalls.total(),
            s.run_time.as_secs_f64() * 1e3
        ));
        assert!(
            s.exits <= 2 * calls / 1000 + 32,
            "{mode:?}: {} exits for {} calls",
            s.exits,
            4 * calls
        );
        assert_eq!(
            s.syscalls.by_number.get(&228).copied(),
            Some(2 * calls / 1000),
            "{mode:?}: clock_gettime system calls"
        );
    }
}
