//! Interrupted waits and `SA_RESTART` (issue 13): a thread blocked in `read` on a FIFO, or in
//! `FUTEX_WAIT` without a timeout, gets signals whose handler has `SA_RESTART` or not. As on
//! Linux, the call is restarted after an `SA_RESTART` handler and fails with `EINTR`
//! otherwise; the output must match a native run's.
//!
//! The C program is `restart/restart.c`, built with `gcc -static -pthread` at test time.

use std::process::Command;

use pagetrack_testkit::kvm_or_skip;
use pagetrack_vmm::process::{Input, Output, ProcessConfig, ProcessEnd, Region};

use super::memtest::build;
use super::{ENV, RUN_TIMEOUT, TempDir, run_config};

const RESTART_C: &str = include_str!("restart/restart.c");

fn fifo(d: &TempDir, name: &str) -> String {
    let fifo = d.join(name);
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    fifo.to_str().unwrap().to_owned()
}

#[test]
fn interrupted_read_and_futex_wait_restart_only_with_sa_restart_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("restart");
    let exe = build(&d.0, "restart", RESTART_C, &["-pthread"]);
    for (call, flag) in [("read", "0"), ("read", "1"), ("futex", "0"), ("futex", "1")] {
        let native_fifo = fifo(&d, &format!("native-{call}-{flag}"));
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
            let guest_fifo = fifo(&d, &format!("guest-{call}-{flag}-{}", regions.len()));
            let cfg = ProcessConfig::new(&exe)
                .args([call, flag, guest_fifo.as_str()])
                .env(ENV)
                .dir(&d.0)
                .allow_write(&d.0)
                .stdin(Input::Null)
                .stdout(Output::Capture)
                .stderr(Output::Capture)
                .track(regions.clone())
                .timeout(Some(RUN_TIMEOUT));
            let run = run_config(kvm_ioctls::Kvm::new().unwrap(), cfg);
            let o = &run.outcome;
            assert_eq!(
                o.end,
                ProcessEnd::Exited(0),
                "{call} {flag} {regions:?}: stderr {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert_eq!(
                String::from_utf8_lossy(&o.stdout),
                want,
                "{call} {flag} {regions:?}: output differs from native"
            );
            if let Some(r) = &run.oracle {
                r.assert_holds(&format!("{call} {flag}"));
            }
        }
    }
}
