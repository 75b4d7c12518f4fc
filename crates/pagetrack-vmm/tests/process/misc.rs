//! Smaller behaviours: static-pie executables, standard input from bytes, a virtual-range
//! region, the timeout.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pagetrack::NotifierClass;
use pagetrack_testkit::kvm_or_skip;
use pagetrack_vmm::process::{Input, Output, Process, ProcessConfig, ProcessEnd, Region};

use super::memtest::build_c;
use super::oracle::Oracle;
use super::{BUSYBOX, Mode, TempDir, require_busybox, run_guest};

const HELLO_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    if (argc > 1 && argv[1][0] == 's') for (;;) { }
    printf("hello from %s\n", argv[0]);
    return argc > 1 ? atoi(argv[1]) : 0;
}
"#;

#[test]
fn static_pie_runs_at_its_bias() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("pie");
    let src = d.join("hello.c");
    std::fs::write(&src, HELLO_C).unwrap();
    let exe = d.join("hello-pie");
    let out = std::process::Command::new("gcc")
        .args(["-static-pie", "-O1", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gcc -static-pie: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let run = run_guest(kvm, &exe, &["7"], &d.0, Input::Null, Mode::Untracked);
    assert_eq!(run.outcome.end, ProcessEnd::Exited(7));
    assert_eq!(
        run.outcome.stdout,
        format!("hello from {}\n", exe.display()).into_bytes()
    );
}

#[test]
fn stdin_bytes_reach_the_program() {
    let kvm = kvm_or_skip!();
    require_busybox();
    let d = TempDir::new("stdin");
    let run = run_guest(
        kvm,
        Path::new(BUSYBOX),
        &["tr", "a-z", "A-Z"],
        &d.0,
        Input::Bytes(b"page track\n".to_vec()),
        Mode::Untracked,
    );
    assert_eq!(run.outcome.end, ProcessEnd::Exited(0));
    assert_eq!(run.outcome.stdout, b"PAGE TRACK\n");
}

#[test]
fn range_region_tracks_only_its_virtual_pages() {
    let kvm = kvm_or_skip!();
    let d = TempDir::new("range");
    let exe = build_c(&d.0, "hello", HELLO_C);
    // The initial stack: the 128 KiB below 0x7fff_ff00_0000.
    let (start, end) = (0x7fff_fefe_0000, 0x7fff_ff00_0000);
    let cfg = ProcessConfig::new(&exe)
        .stdin(Input::Null)
        .stdout(Output::Capture)
        .track([Region::Range { start, end }]);
    let mut p = Process::with_kvm(kvm, cfg).unwrap();
    let o = Oracle::new();
    p.set_observer(Arc::clone(&o) as _);
    let h = p
        .vm()
        .tracker()
        .register(Arc::clone(&o) as _, NotifierClass::Ordinary)
        .unwrap();
    let out = p.run().unwrap();
    drop(h);
    assert_eq!(out.end, ProcessEnd::Exited(0));
    let r = o.report();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.frames, 32, "exactly the 32 initial stack pages");
    assert_eq!(r.replayed, 32);
    assert!(r.vcpu_events > 0);
}

#[test]
fn timeout_ends_a_spinning_program() {
    let kvm = kvm_or_skip!();
    let d = TempDir::new("spin");
    let exe = build_c(&d.0, "spin", HELLO_C);
    let cfg = ProcessConfig::new(&exe)
        .args(["spin"])
        .stdin(Input::Null)
        .stdout(Output::Capture)
        .timeout(Some(Duration::from_millis(300)));
    let out = Process::with_kvm(kvm, cfg).unwrap().run().unwrap();
    assert!(matches!(out.end, ProcessEnd::Timeout(_)), "{:?}", out.end);
    assert_eq!(out.end.status(), 124);
}
