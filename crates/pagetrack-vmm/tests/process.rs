//! The process VM on real KVM: unmodified static programs (Debian's busybox-static, a C test
//! program built here with `gcc -static`) run at CPL3, their system calls served by the VMM,
//! their memory tracked by region. Every test starts with `kvm_or_skip!()`.
//!
//! `/bin/busybox` comes from Debian's `busybox-static` package and `gcc -static` needs
//! `libc6-dev`; `scripts/test` installs both when they are missing.

#![expect(
    clippy::unwrap_used,
    reason = "test set-up helpers fail the test loudly"
)]

#[path = "process/bad_input.rs"]
mod bad_input;
#[path = "process/containment.rs"]
mod containment;
#[path = "process/hostile13.rs"]
mod hostile13;
#[path = "process/lua.rs"]
mod lua;
#[path = "process/memtest.rs"]
mod memtest;
#[path = "process/misc.rs"]
mod misc;
#[path = "process/oracle.rs"]
mod oracle;
#[path = "process/relaxed.rs"]
mod relaxed;
#[path = "process/remap.rs"]
mod remap;
#[path = "process/restart.rs"]
mod restart;
#[path = "process/review13.rs"]
mod review13;
#[path = "process/review13b.rs"]
mod review13b;
#[path = "process/signals.rs"]
mod signals;
#[path = "process/sqlite.rs"]
mod sqlite;
#[path = "process/threads.rs"]
mod threads;
#[path = "process/time.rs"]
mod time;
#[path = "process/workloads.rs"]
mod workloads;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kvm_ioctls::Kvm;
use pagetrack::NotifierClass;
use pagetrack_vmm::process::{
    Input, Output, Process, ProcessConfig, ProcessEnd, ProcessOutcome, Region,
};

use oracle::{Oracle, OracleReport};

/// The busybox the tests run.
pub const BUSYBOX: &str = "/bin/busybox";

/// A fixed environment, the same for native and guest runs.
pub const ENV: [&str; 2] = ["PATH=/bin:/usr/bin", "LC_ALL=C"];

/// No test run may take longer than this.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// Fails the test with a clear message if busybox-static is missing.
pub fn require_busybox() {
    assert!(
        Path::new(BUSYBOX).exists(),
        "{BUSYBOX} is missing: install Debian's busybox-static (scripts/test does)"
    );
}

/// A fresh directory under the system temp dir, removed when dropped.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `pagetrack-<name>-<pid>`.
    pub fn new(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("pagetrack-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d.canonicalize().unwrap())
    }

    /// A path inside.
    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }

    /// Makes a FIFO `name` inside; its path.
    pub fn fifo(&self, name: &str) -> String {
        let fifo = self.join(name);
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
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How a guest run is tracked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Nothing tracked.
    Untracked,
    /// Stack, heap and data.
    StackHeapData,
    /// Every writable frame, page tables included.
    Writable,
}

impl Mode {
    fn regions(self) -> Vec<Region> {
        match self {
            Mode::Untracked => vec![],
            Mode::StackHeapData => vec![Region::Stack, Region::Heap, Region::Data],
            Mode::Writable => vec![Region::Writable],
        }
    }
}

/// A finished guest run with its oracle's verdict (None when untracked).
#[derive(Debug)]
pub struct GuestRun {
    /// How the program ended, its output and counters.
    pub outcome: ProcessOutcome,
    /// The replay oracle's verdict (tracked runs only).
    pub oracle: Option<OracleReport>,
    /// Wall time from loading to the end.
    pub wall: Duration,
}

/// Runs `program args` in a process VM reading under `dir`, tracked as `mode`, with the
/// replay oracle registered when tracking.
pub fn run_guest(
    kvm: Kvm,
    program: &Path,
    args: &[&str],
    dir: &Path,
    stdin: Input,
    mode: Mode,
) -> GuestRun {
    let cfg = ProcessConfig::new(program)
        .args(args.iter().copied())
        .env(ENV)
        .dir(dir)
        .stdin(stdin)
        .stdout(Output::Capture)
        .stderr(Output::Capture)
        .track(mode.regions())
        .timeout(Some(RUN_TIMEOUT));
    run_config(kvm, cfg)
}

/// Runs `cfg`, with the replay oracle registered when it tracks anything.
pub fn run_config(kvm: Kvm, cfg: ProcessConfig) -> GuestRun {
    let tracked = !cfg.track.is_empty();
    let cfg_relaxed = cfg.relaxed.mode;
    let start = std::time::Instant::now();
    let mut p = Process::with_kvm(kvm, cfg).unwrap();
    let oracle = tracked.then(|| {
        let o = Oracle::new();
        p.set_observer(Arc::clone(&o) as _);
        // A relaxed configuration needs a notifier that accepts coalesced events.
        let delivery = if cfg_relaxed == pagetrack_kvm::RelaxedMode::Off {
            pagetrack::Delivery::EachWrite
        } else {
            pagetrack::Delivery::Coalesced
        };
        let h = p
            .vm()
            .tracker()
            .register(
                Arc::clone(&o) as _,
                pagetrack::RegisterOptions::new(NotifierClass::Ordinary).with_delivery(delivery),
            )
            .unwrap();
        (o, h)
    });
    let outcome = p.run().unwrap();
    let wall = start.elapsed();
    let oracle = oracle.map(|(o, h)| {
        drop(h);
        o.report()
    });
    GuestRun {
        outcome,
        oracle,
        wall,
    }
}

/// The configuration the C test programs run with: `exe args` in `d` (which it may write),
/// the tests' environment, no input, output captured, `regions` tracked, `limit`.
pub fn c_program(
    exe: &Path,
    args: &[&str],
    d: &TempDir,
    regions: Vec<Region>,
    limit: Duration,
) -> ProcessConfig {
    ProcessConfig::new(exe)
        .args(args.iter().copied())
        .env(ENV)
        .dir(&d.0)
        .allow_write(&d.0)
        .stdin(Input::Null)
        .stdout(Output::Capture)
        .stderr(Output::Capture)
        .track(regions)
        .timeout(Some(limit))
}

/// `run` exited with status 0 and printed `want` (the native output), and its replay oracle,
/// if it tracked anything, holds; `what` names the case in failures.
pub fn assert_ran_as_natively(run: &GuestRun, want: &str, what: &str) {
    let o = &run.outcome;
    assert_eq!(
        o.end,
        ProcessEnd::Exited(0),
        "{what}: stderr {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        want,
        "{what}: output differs from native"
    );
    if let Some(oracle) = &run.oracle {
        oracle.assert_holds(what);
    }
}

/// Runs busybox natively with the same environment; returns (stdout, status, wall).
pub fn run_native(args: &[&str], stdin: Option<&Path>) -> (Vec<u8>, i32, Duration) {
    let mut c = std::process::Command::new(BUSYBOX);
    c.args(args)
        .env_clear()
        .envs(ENV.iter().map(|e| e.split_once('=').unwrap()));
    match stdin {
        Some(p) => c.stdin(std::fs::File::open(p).unwrap()),
        None => c.stdin(std::process::Stdio::null()),
    };
    let start = std::time::Instant::now();
    let out = c.output().unwrap();
    (out.stdout, out.status.code().unwrap_or(-1), start.elapsed())
}

/// Writes a line to the test's stderr even when it passes (libtest swallows `eprintln!`).
pub fn note(s: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{s}");
}
