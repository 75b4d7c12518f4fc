//! Review of issue 13 through the `pagetrack exec` binary: `--timeout` against a program
//! blocked writing to a full standard output, and standard input read only as asked.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BUSYBOX: &str = "/bin/busybox";

fn usable() -> bool {
    std::path::Path::new("/dev/kvm").exists() && std::path::Path::new(BUSYBOX).exists()
}

#[test]
fn timeout_ends_a_program_blocked_on_a_full_stdout() {
    if !usable() {
        return;
    }
    // `yes` into a pipe nobody reads: timeout(1) ends it after 1 s with 124. pagetrack's
    // write to its own stdout blocks in the VMM, where the deadline is never looked at.
    let mut child = Command::new(env!("CARGO_BIN_EXE_pagetrack"))
        .args([
            "exec",
            "--timeout",
            "1",
            "--dir",
            "/tmp",
            "--",
            BUSYBOX,
            "yes",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > Duration::from_secs(6) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if status.is_none() {
        child.kill().unwrap();
        let _ = child.wait();
    }
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(124),
        "still running 6 s after --timeout 1 (blocked writing stdout)"
    );
}

#[test]
fn stdin_is_read_only_as_far_as_asked() {
    if !usable() {
        return;
    }
    // `read` takes one line; what follows is left for the next reader of the same pipe.
    let mut child = Command::new("sh")
        .args([
            "-c",
            &format!(
                "{} exec --dir /tmp -- {BUSYBOX} sh -c 'read x; echo x=$x'; cat",
                env!("CARGO_BIN_EXE_pagetrack")
            ),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"first\nsecond\nthird\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "x=first\nsecond\nthird\n"
    );
}

#[test]
fn mmap_far_beyond_a_small_file_does_not_abort_the_vmm() {
    if !usable() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("pagetrack-h13-cli-mmap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("hostile.c");
    std::fs::write(
        &src,
        include_str!("../../pagetrack-vmm/tests/process/hostile13/hostile.c"),
    )
    .unwrap();
    let exe = dir.join("hostile");
    let gcc = Command::new("gcc")
        .args(["-static", "-O1", "-w", "-o"])
        .arg(&exe)
        .arg(&src)
        .status()
        .unwrap();
    assert!(gcc.success());
    let small = dir.join("small");
    std::fs::write(&small, "hi\n").unwrap();
    // A 64 MiB guest maps 64 GiB of a 3-byte file: Linux says yes (lazily) or ENOMEM. The
    // VMM allocates a zeroed Vec of the whole length first: "memory allocation of
    // 68719476736 bytes failed", SIGABRT (status 134), no exit line.
    let out = Command::new(env!("CARGO_BIN_EXE_pagetrack"))
        .args(["exec", "--mem", "64M", "--dir"])
        .arg(&dir)
        .arg("--")
        .arg(&exe)
        .args(["mmap", small.to_str().unwrap(), "65536"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout {} stderr {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .next()
            .unwrap_or("")
    );
}
