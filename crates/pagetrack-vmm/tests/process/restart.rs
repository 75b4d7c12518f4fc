//! Waits and signals (issue 13), each compared with a native run:
//!
//! - `SA_RESTART`: a thread blocked in `read` on a FIFO, or in `FUTEX_WAIT` without a
//!   timeout, gets signals whose handler has `SA_RESTART` or not. As on Linux, the call is
//!   restarted after an `SA_RESTART` handler and fails with `EINTR` otherwise
//!   (`restart/restart.c`).
//! - `ppoll`/`pselect6` signal masks: a blocked, pending signal the call's mask lets in ends
//!   the wait with `EINTR` and runs its handler; a mask that keeps it blocked waits; a ready
//!   descriptor is returned first and the signal stays pending under the old mask; single-
//!   and multi-threaded (`pmask/pmask.c`).
//! - `sendfile` to a full FIFO waits without the kernel's lock, so the thread that drains
//!   the FIFO runs meanwhile; every byte arrives once and the input offsets move by what
//!   was sent (`sendfile/sendfile.c`).
//!
//! - One thread blocked in `read` or `poll` on a FIFO when its own timer fires: the wait
//!   ends, `read` restarts after an `SA_RESTART` handler and fails with `EINTR` otherwise,
//!   `poll` fails with `EINTR` (`alarm/alarm.c`).
//!
//! The C programs are built with `gcc -static -pthread` at test time.

use std::process::Command;
use std::time::Duration;

use pagetrack_testkit::kvm_or_skip;
use pagetrack_vmm::process::Region;

use super::memtest::build;
use super::{RUN_TIMEOUT, TempDir, assert_ran_as_natively, c_program, run_config};

const RESTART_C: &str = include_str!("restart/restart.c");
const PMASK_C: &str = include_str!("pmask/pmask.c");
const SENDFILE_C: &str = include_str!("sendfile/sendfile.c");
const ALARM_C: &str = include_str!("alarm/alarm.c");

#[test]
fn interrupted_read_and_futex_wait_restart_only_with_sa_restart_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("restart");
    let exe = build(&d.0, "restart", RESTART_C, &["-pthread"]);
    for (call, flag) in [("read", "0"), ("read", "1"), ("futex", "0"), ("futex", "1")] {
        let native_fifo = d.fifo(&format!("native-{call}-{flag}"));
        let native = Command::new(&exe)
            .args([call, flag, &native_fifo])
            .output()
            .unwrap();
        assert!(native.status.success(), "native {call} {flag} failed");
        let want = String::from_utf8_lossy(&native.stdout).into_owned();
        let restarted = if flag == "1" { "ok" } else { "EINTR" };
        assert!(
            want.contains("interrupted yes") && want.contains(restarted),
            "native: {want}"
        );
        for regions in [vec![], vec![Region::Stack, Region::Heap, Region::Data]] {
            let guest_fifo = d.fifo(&format!("guest-{call}-{flag}-{}", regions.len()));
            let args = [call, flag, guest_fifo.as_str()];
            let cfg = c_program(&exe, &args, &d, regions.clone(), RUN_TIMEOUT);
            let run = run_config(kvm_ioctls::Kvm::new().unwrap(), cfg);
            assert_ran_as_natively(&run, &want, &format!("{call} {flag} {regions:?}"));
        }
    }
}

#[test]
fn ppoll_and_pselect6_apply_their_signal_mask_during_the_wait_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("pmask");
    let exe = build(&d.0, "pmask", PMASK_C, &["-pthread"]);
    for extra in [None, Some("threaded")] {
        let native_fifo = d.fifo(&format!("native-{}", extra.is_some()));
        let mut args = vec![native_fifo.as_str()];
        args.extend(extra);
        let native = Command::new(&exe).args(&args).output().unwrap();
        assert!(native.status.success(), "native {extra:?} failed");
        let want = String::from_utf8_lossy(&native.stdout).into_owned();
        assert!(
            want.contains("letting SIGUSR1 in: EINTR, handler ran 1"),
            "native: {want}"
        );
        for regions in [vec![], vec![Region::Stack, Region::Heap, Region::Data]] {
            let guest_fifo = d.fifo(&format!("guest-{}-{}", extra.is_some(), regions.len()));
            let mut args = vec![guest_fifo.as_str()];
            args.extend(extra);
            let cfg = c_program(&exe, &args, &d, regions.clone(), RUN_TIMEOUT);
            let run = run_config(kvm_ioctls::Kvm::new().unwrap(), cfg);
            assert_ran_as_natively(&run, &want, &format!("pmask {extra:?} {regions:?}"));
        }
    }
}

#[test]
fn sendfile_to_a_full_fifo_lets_the_draining_thread_run_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("sendfile-full");
    let exe = build(&d.0, "sendfile", SENDFILE_C, &["-pthread"]);
    let native_fifo = d.fifo("native");
    let data = d.join("native-data");
    let native = Command::new(&exe)
        .args([native_fifo.as_str(), data.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(native.status.success(), "native run failed");
    let want = String::from_utf8_lossy(&native.stdout).into_owned();
    assert!(
        want.contains("FIFO full (yes)") && want.ends_with(" 0 wrong\n"),
        "native: {want}"
    );
    for regions in [vec![], vec![Region::Stack, Region::Heap, Region::Data]] {
        let guest_fifo = d.fifo(&format!("guest-{}", regions.len()));
        let data = d.join(&format!("guest-data-{}", regions.len()));
        // A wait under the kernel's lock is a deadlock: it ends here as a timeout.
        let cfg = c_program(
            &exe,
            &[guest_fifo.as_str(), data.to_str().unwrap()],
            &d,
            regions.clone(),
            Duration::from_secs(30),
        );
        let run = run_config(kvm_ioctls::Kvm::new().unwrap(), cfg);
        assert_ran_as_natively(&run, &want, &format!("sendfile {regions:?}"));
    }
}

#[test]
fn a_timer_ends_a_single_threaded_wait_and_restarts_read_only_with_sa_restart_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("alarm-wait");
    let exe = build(&d.0, "alarm", ALARM_C, &[]);
    let native_fifo = d.fifo("native");
    let native = Command::new(&exe).arg(&native_fifo).output().unwrap();
    assert!(native.status.success(), "native run failed");
    let want = String::from_utf8_lossy(&native.stdout).into_owned();
    assert!(
        want.contains("SA_RESTART: 1 , handled 1")
            && want.contains("no SA_RESTART: -1 Interrupted system call, handled 2")
            && want.contains("poll: -1 Interrupted system call"),
        "native: {want}"
    );
    for regions in [vec![], vec![Region::Stack, Region::Heap, Region::Data]] {
        let guest_fifo = d.fifo(&format!("guest-{}", regions.len()));
        // A wait the timer does not end is a hang: it ends here as a timeout.
        let cfg = c_program(
            &exe,
            &[guest_fifo.as_str()],
            &d,
            regions.clone(),
            Duration::from_secs(30),
        );
        let run = run_config(kvm_ioctls::Kvm::new().unwrap(), cfg);
        assert_ran_as_natively(&run, &want, &format!("alarm {regions:?}"));
    }
}
