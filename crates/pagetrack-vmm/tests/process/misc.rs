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

#[test]
fn timeout_ends_a_sleeping_program() {
    let kvm = kvm_or_skip!();
    require_busybox();
    // The sleep is cut at the deadline and the run ends there: a timeout, not status 0.
    let cfg = ProcessConfig::new(BUSYBOX)
        .args(["sleep", "5"])
        .argv0("busybox")
        .stdin(Input::Null)
        .stdout(Output::Capture)
        .timeout(Some(Duration::from_millis(300)));
    let out = Process::with_kvm(kvm, cfg).unwrap().run().unwrap();
    assert!(matches!(out.end, ProcessEnd::Timeout(_)), "{:?}", out.end);
    assert_eq!(out.end.status(), 124);
}

/// poll, ppoll, select and pselect6 on what the VMM serves: a regular file, standard
/// input from bytes, standard output, a bad descriptor; printed so native and guest compare.
const POLL_C: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/select.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    /* The "bad" descriptors must be closed natively too: a test runner can leave
       descriptors such as cargo's jobserver open in the native process. */
    close(99);
    int f = open(argv[1], O_RDONLY);
    struct pollfd p[4] = {{f, POLLIN | POLLOUT, 0}, {0, POLLIN, 0}, {1, POLLOUT, 0}, {99, POLLIN, 0}};
    int n = poll(p, 4, -1);
    printf("poll %d:", n);
    for (int i = 0; i < 4; i++) printf(" %#x", p[i].revents & (POLLIN | POLLOUT | POLLNVAL));
    printf("\n");
    struct timespec ts = {0, 1000000};
    struct pollfd q = {-1, POLLIN, 0};
    printf("ppoll none %d\n", ppoll(&q, 1, &ts, NULL));
    fd_set r, w;
    FD_ZERO(&r); FD_ZERO(&w);
    FD_SET(f, &r); FD_SET(0, &r); FD_SET(1, &w);
    struct timeval tv = {1, 0};
    n = select(f + 1, &r, &w, NULL, &tv);
    printf("select %d: r %d %d w %d\n", n, FD_ISSET(f, &r), FD_ISSET(0, &r), FD_ISSET(1, &w));
    /* The bad descriptor for select is the lowest free one: Linux clamps select's nfds to
       the size of the process's descriptor table (64 unless a descriptor at or above 64
       was ever open), so a closed descriptor above that is ignored, not EBADF; and the
       table's size natively depends on what the test runner had open at fork. */
    int bad = dup(0);
    close(bad);
    FD_ZERO(&r); FD_SET(bad, &r);
    n = select(bad + 1, &r, NULL, NULL, &tv);
    printf("select bad %d %s\n", n, n < 0 ? strerror(errno) : "");
    FD_ZERO(&r); FD_SET(f, &r);
    n = pselect(f + 1, &r, NULL, NULL, &ts, NULL);
    printf("pselect %d %d\n", n, FD_ISSET(f, &r));
    char buf[64];
    long k = read(0, buf, sizeof buf);
    printf("stdin %ld\n", k);
    return 0;
}
"#;

#[test]
fn poll_and_select_match_native() {
    let kvm = kvm_or_skip!();
    let d = TempDir::new("poll");
    let exe = build_c(&d.0, "poll", POLL_C);
    let file = d.join("data.txt");
    std::fs::write(&file, "x\n").unwrap();
    let native = std::process::Command::new(&exe)
        .arg(&file)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(native.status.success());
    let run = run_guest(
        kvm,
        &exe,
        &[file.to_str().unwrap()],
        &d.0,
        Input::Null,
        Mode::Untracked,
    );
    assert_eq!(run.outcome.end, ProcessEnd::Exited(0));
    assert_eq!(
        String::from_utf8_lossy(&run.outcome.stdout),
        String::from_utf8_lossy(&native.stdout)
    );
    assert!(
        run.outcome.stats.syscalls.unknown.is_empty(),
        "{:?}",
        run.outcome.stats.syscalls.unknown
    );
}

#[test]
fn ash_read_loop_over_a_file_matches_native() {
    let kvm = kvm_or_skip!();
    require_busybox();
    let d = TempDir::new("ashread");
    let file = d.join("lines.txt");
    let text: String = (0..200)
        .map(|i| format!("line {i}  with  spaces\n"))
        .collect();
    std::fs::write(&file, &text).unwrap();
    let script = format!(
        "n=0; while read l; do echo \"$l\"; n=$((n+1)); done < {}; echo \"$n lines\"",
        file.display()
    );
    let args = ["ash", "-c", script.as_str()];
    let (native, status, _) = super::run_native(&args, None);
    assert_eq!(status, 0);
    assert!(String::from_utf8_lossy(&native).ends_with("200 lines\n"));
    let run = run_guest(
        kvm,
        Path::new(BUSYBOX),
        &args,
        &d.0,
        Input::Null,
        Mode::Untracked,
    );
    assert_eq!(run.outcome.end, ProcessEnd::Exited(0));
    assert_eq!(
        String::from_utf8_lossy(&run.outcome.stdout),
        String::from_utf8_lossy(&native)
    );
}

/// What `touch`, `chmod`, `ln`, `cp -a`, `sed -i`, `rm -r` and the devices do inside a write
/// directory (D), one busybox command a line (the process VM runs no fork), as they print it.
const FILE_STEPS: &[&str] = &[
    "mkdir -p D/a/b",
    "sh -c 'echo hello > D/a/b/f; echo x > /dev/null; echo dropped >/dev/null'",
    "touch D/t",
    "touch -t 202001020304.05 D/t",
    "chmod 640 D/a/b/f",
    "ln -s b/f D/a/l",
    "ln D/a/b/f D/a/hard",
    "cp -a D/a D/c",
    "sed -i s/hello/bye/ D/c/b/f",
    "od -An -tx1 -N8 /dev/zero",
    "dd if=/dev/urandom of=D/rand bs=16 count=1",
    "rm -r D/a",
    "stat -c '%n %a %s %F %h' D/c D/c/b D/c/b/f D/c/l D/c/hard D/t D/rand",
    "stat -c %Y D/t",
    "cat D/c/b/f",
    "readlink D/c/l",
    "ls D",
];

#[test]
fn file_tools_and_devices_match_native() {
    let _kvm = kvm_or_skip!();
    require_busybox();
    let d = TempDir::new("filetools");
    let native_dir = d.join("native");
    let guest_dir = d.join("guest");
    std::fs::create_dir_all(&native_dir).unwrap();
    std::fs::create_dir_all(&guest_dir).unwrap();
    let words = |step: &str, dir: &Path| -> Vec<String> {
        // Split on spaces outside single quotes.
        let mut out = Vec::new();
        let (mut cur, mut quoted) = (String::new(), false);
        for c in step.chars() {
            match c {
                '\'' => quoted = !quoted,
                ' ' if !quoted => out.push(std::mem::take(&mut cur)),
                _ => cur.push(c),
            }
        }
        out.push(cur);
        out.iter()
            .map(|w| w.replace('D', dir.to_str().unwrap()))
            .collect()
    };
    for step in FILE_STEPS {
        let native_args = words(step, &native_dir);
        let native_args: Vec<&str> = native_args.iter().map(String::as_str).collect();
        let (native, status, _) = super::run_native(&native_args, None);
        assert_eq!(status, 0, "native {step}");
        let args = words(step, &guest_dir);
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let cfg = ProcessConfig::new(BUSYBOX)
            .args(args.iter().map(String::as_str))
            .argv0("busybox")
            .env(super::ENV)
            .dir(&d.0)
            .allow_write(&guest_dir)
            .stdin(Input::Null)
            .stdout(Output::Capture)
            .stderr(Output::Capture);
        let o = Process::with_kvm(kvm, cfg).unwrap().run().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.end, ProcessEnd::Exited(0), "{step}: {err}");
        let norm =
            |b: &[u8], dir: &Path| String::from_utf8_lossy(b).replace(dir.to_str().unwrap(), "D");
        assert_eq!(
            norm(&o.stdout, &guest_dir),
            norm(&native, &native_dir),
            "{step}: {err}"
        );
        assert!(
            o.stats.syscalls.unknown.is_empty(),
            "{step}: {:?}",
            o.stats.syscalls.unknown
        );
    }
    assert_eq!(
        std::fs::read_to_string(guest_dir.join("c/b/f")).unwrap(),
        "bye\n"
    );

    // Directory entries come in the host's order: the same listing, unsorted.
    let c = guest_dir.join("c");
    let args = ["ls", "-f", "-1", c.to_str().unwrap()];
    let (native_ls, _, _) = super::run_native(&args, None);
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let run = run_guest(
        kvm,
        Path::new(BUSYBOX),
        &args,
        &d.0,
        Input::Null,
        Mode::Untracked,
    );
    assert_eq!(
        String::from_utf8_lossy(&run.outcome.stdout),
        String::from_utf8_lossy(&native_ls)
    );
}
