//! Review of issue 13's containment change, as a hostile program's author would attack it:
//! escapes (symlinks of every kind, `..` at every position, guest directory descriptors kept
//! across renames, links, renames and exchanges, roots removed, metadata calls through
//! links, devices, procfs, long and bad paths, a read-only root), leaks through `stat`,
//! host memory and time the program can make the VMM spend, and calls whose results differ
//! from native. Tests named `*_as_natively` or `*_never_*`/`*_bounded` that fail are findings;
//! the others show what held.
//!
//! The C programs are in `hostile13/` and built with `gcc -static` at test time.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pagetrack_testkit::kvm_or_skip;
use pagetrack_vmm::process::{Input, Output, Process, ProcessConfig, ProcessEnd, ProcessOutcome};

use super::memtest::build_c;
use super::{BUSYBOX, ENV, RUN_TIMEOUT, TempDir, require_busybox};

const HOSTILE_C: &str = include_str!("hostile13/hostile.c");
const DOS_C: &str = include_str!("hostile13/dos.c");

fn hostile(d: &TempDir) -> PathBuf {
    build_c(&d.0, "hostile", HOSTILE_C)
}

/// Runs `exe args` reading under `dir`, writing under each of `write`.
fn guest(
    exe: &Path,
    args: &[&str],
    dir: &Path,
    write: &[&Path],
    mem: u64,
    timeout: Duration,
) -> ProcessOutcome {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let mut cfg = ProcessConfig::new(exe)
        .args(args.iter().copied())
        .env(ENV)
        .mem(mem)
        .dir(dir)
        .stdin(Input::Null)
        .stdout(Output::Capture)
        .stderr(Output::Capture)
        .timeout(Some(timeout));
    for w in write {
        cfg = cfg.allow_write(*w);
    }
    Process::with_kvm(kvm, cfg).unwrap().run().unwrap()
}

fn text(o: &ProcessOutcome) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `name=result` lines of the hostile program.
fn result<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {name} in {out}"))
}

fn sh(cmd: &str) {
    let s = std::process::Command::new("sh")
        .args(["-c", cmd])
        .status()
        .unwrap();
    assert!(s.success(), "{cmd}");
}

/// The outside: a 27-byte secret (mode 0600) and a victim, both dated 2020-01-01.
fn make_outside(d: &TempDir) -> PathBuf {
    let out = d.join("outside");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("secret"), "TOPSECRET-outside-27-bytes\n").unwrap();
    std::fs::write(out.join("victim"), "keep me\n").unwrap();
    std::fs::set_permissions(out.join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    sh(&format!(
        "touch -d 2020-01-01 {0}/secret {0}/victim",
        out.display()
    ));
    out
}

fn assert_outside_untouched(out: &Path) {
    let names: BTreeSet<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names,
        ["secret", "victim"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
        "names outside changed"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("secret")).unwrap(),
        "TOPSECRET-outside-27-bytes\n"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("victim")).unwrap(),
        "keep me\n"
    );
    let m = std::fs::metadata(out.join("secret")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o600, "the secret's mode changed");
    assert_eq!(m.mtime(), 1_577_836_800, "the secret's mtime changed");
    assert_eq!(
        std::fs::metadata(out.join("victim")).unwrap().mtime(),
        1_577_836_800
    );
}

#[test]
fn escapes_through_links_dotdot_dirfds_renames_devices_and_bad_paths_are_refused() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("h13-escape");
    let exe = hostile(&d);
    let out = make_outside(&d);
    let root = d.join("root");
    let w = root.join("w");
    let ro = root.join("ro");
    std::fs::create_dir_all(w.join("sub")).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(w.join("inside"), "inside\n").unwrap();
    std::fs::write(w.join("inside2"), "inside2\n").unwrap();
    std::fs::write(w.join("sub/secret"), "subsecret\n").unwrap();
    std::fs::write(ro.join("ro.txt"), "ro\n").unwrap();
    let o = out.display();
    sh(&format!(
        "cd {w} && ln -s {o} evil && ln -s ../../outside rel && ln -s {o}/newfile dang && \
         ln -s ../../outside/newfile2 reldang && ln -s loop2 loop1 && ln -s loop1 loop2 && \
         ln -s chain2 chain1 && ln -s ../../outside chain2",
        w = w.display()
    ));
    let run = guest(
        &exe,
        &[
            "escape",
            w.to_str().unwrap(),
            out.to_str().unwrap(),
            ro.to_str().unwrap(),
        ],
        &root,
        &[&w],
        64 << 20,
        RUN_TIMEOUT,
    );
    let t = text(&run);
    assert_eq!(run.end, ProcessEnd::Exited(0), "{t}");
    assert!(
        !t.contains("VMMFD"),
        "the program saw a VMM descriptor: {t}"
    );
    assert!(!t.contains("LEAK"), "{t}");
    for l in t.lines().filter(|l| l.starts_with("WROTE")) {
        assert!(
            l == "WROTE dev:/dev//null" || l == "WROTE dev:/dev/./null",
            "{l}"
        );
    }
    for name in [
        "abs-link",
        "rel-link",
        "abs-link-self",
        "dangling-creat",
        "reldangling-creat",
        "trunc-through",
        "append-through",
        "tmpfile-through",
        "chain",
        "dotdot-mid",
        "at-W-dotdot",
        "at-W-evil",
        "at-W-abs",
        "at-W-creat-evil",
        "at-moved-dotdot",
        "at-moved-creat-dotdot",
        "link-from-outside",
        "link-to-outside",
        "symlink-abs-open",
        "symlink-rel-open",
        "symlink-in-outside",
        "rename-out",
        "rename-in",
        "rename-through",
        "exchange-out",
        "after-exchange",
        "unlink-root",
        "rmdir-root",
        "rename-root",
        "mkdir-through",
        "unlink-through",
        "chmod-through",
        "chmod-link",
        "fchmodat-through",
        "utimensat-through",
        "utimensat-link",
        "chown-link",
        "ro-write",
        "ro-rdwr",
        "ro-trunc",
        "ro-creat",
        "ro-mkdir",
        "ro-unlink",
        "ro-chmod",
        "ro-utime",
        "ro-fchmod",
        "ro-mmap-shared-w",
        "ro-rename-into-w",
        "ro-link-into-w",
    ] {
        assert_eq!(result(&t, name), "E13", "{name}: {t}");
    }
    for k in 3..=8 {
        assert_eq!(result(&t, &format!("dotdot-{k}")), "E13");
    }
    for k in 1..=8 {
        assert_eq!(result(&t, &format!("dotdot-w-{k}")), "E13");
    }
    assert_eq!(result(&t, "loop"), "E40");
    assert_eq!(result(&t, "at-file-fd"), "E20");
    assert_eq!(result(&t, "at-closed-fd"), "E9");
    assert_eq!(result(&t, "bad-ptr"), "E14");
    assert_eq!(result(&t, "kernel-ptr"), "E14");
    for dev in [
        "/dev/sda",
        "/dev/kvm",
        "/dev/tty",
        "/dev/mem",
        "/dev/full",
        "/dev/fd/3",
        "/proc/self/mem",
        "/proc/self/fd/3",
        "/proc/1/environ",
        "/sys/kernel",
        "/dev/../etc/passwd",
        "/dev/null/../../etc/passwd",
    ] {
        assert_eq!(result(&t, &format!("dev:{dev}")), "E13", "{dev}");
    }
    // Existence outside is not told apart.
    for (a, b) in [
        ("stat-through-exists", "stat-through-missing"),
        ("access-through-exists", "access-through-missing"),
        ("mkdir-through-exists", "mkdir-through-missing"),
        ("mkdir-dotdot-exists", "mkdir-dotdot-missing"),
        ("stat-dotdot-exists", "stat-dotdot-missing"),
        ("stat-etc-shadow", "stat-etc-nothing"),
    ] {
        assert_eq!(result(&t, a), result(&t, b), "{a} vs {b}");
    }
    assert_outside_untouched(&out);
    assert_eq!(std::fs::read_to_string(ro.join("ro.txt")).unwrap(), "ro\n");
    assert_eq!(
        std::fs::read_dir(&ro).unwrap().count(),
        1,
        "the read-only root changed"
    );
    assert!(w.join("sub/secret").exists() && w.join("evil").is_symlink());
}

/// `W/a/b` is a second root below the write root `W`, so `W/a` is an ancestor of a root the
/// program can rename and replace by a symlink; `stat` must not follow it by path.
fn ancestor_stat(nested_is_write: bool, target: &Path) -> String {
    let d = TempDir::new(&format!("h13-ancestor-{nested_is_write}"));
    let exe = hostile(&d);
    let w = d.join("w");
    let nested = w.join("a/b");
    std::fs::create_dir_all(&nested).unwrap();
    let run = if nested_is_write {
        // --dir W --allow-write W --allow-write W/a/b
        guest(
            &exe,
            &["ancestor", w.to_str().unwrap(), target.to_str().unwrap()],
            &w,
            &[&w, &nested],
            64 << 20,
            RUN_TIMEOUT,
        )
    } else {
        // --dir W/a/b --allow-write W ("read the data, write anywhere here")
        guest(
            &exe,
            &["ancestor", w.to_str().unwrap(), target.to_str().unwrap()],
            &nested,
            &[&w],
            64 << 20,
            RUN_TIMEOUT,
        )
    };
    text(&run)
}

#[test]
fn stat_through_a_swapped_ancestor_of_a_nested_root_never_reaches_outside() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("h13-ancestor-target");
    let out = make_outside(&d);
    for nested_is_write in [true, false] {
        let t = ancestor_stat(nested_is_write, &out.join("secret"));
        assert_eq!(result(&t, "rename-a"), "ok", "{t}");
        assert_eq!(result(&t, "symlink-a"), "ok", "{t}");
        // Today: stat-a=ok, size=27 mode=100600 (the outside secret's metadata), and
        // with /etc/shadow its size and mode; a missing target gives ENOENT instead.
        assert_eq!(
            result(&t, "stat-a"),
            "E13",
            "nested write root {nested_is_write}: stat followed the program's symlink by path: {t}"
        );
        let missing = ancestor_stat(nested_is_write, &out.join("nothing"));
        assert_eq!(
            result(&missing, "stat-a"),
            result(&t, "stat-a"),
            "existence outside told apart"
        );
    }
}

/// The largest resident set of this process while `f` runs, above what it was before.
fn rss_growth<R>(f: impl FnOnce() -> R) -> (R, u64) {
    fn rss() -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        let kb: u64 = s
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .unwrap()
            .trim()
            .trim_end_matches(" kB")
            .trim()
            .parse()
            .unwrap();
        kb << 10
    }
    let stop = AtomicBool::new(false);
    let base = rss();
    std::thread::scope(|s| {
        let peak = s.spawn(|| {
            let mut peak = 0;
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(rss());
                std::thread::sleep(Duration::from_millis(2));
            }
            peak
        });
        let r = f();
        stop.store(true, Ordering::Relaxed);
        let peak = peak.join().unwrap();
        (r, peak.saturating_sub(base))
    })
}

const MIB: u64 = 1 << 20;

#[test]
fn mmap_of_dev_zero_beyond_guest_memory_is_bounded() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("h13-mmap-zero");
    let exe = hostile(&d);
    // A 64 MiB guest maps 1 GiB of /dev/zero (served since this change): the VMM reads the
    // whole length into a Vec before finding it does not fit (ENOMEM). 64 GiB would take the
    // host down.
    let (run, grew) = rss_growth(|| {
        guest(
            &exe,
            &["mmap", "/dev/zero", "1024"],
            &d.0,
            &[],
            64 << 20,
            RUN_TIMEOUT,
        )
    });
    assert_eq!(run.end, ProcessEnd::Exited(0), "{}", text(&run));
    assert!(
        grew < 256 * MIB,
        "the VMM grew by {} MiB for a 64 MiB guest ({})",
        grew / MIB,
        text(&run).trim()
    );
}

#[test]
fn mmap_of_a_sparse_file_beyond_guest_memory_is_bounded() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("h13-mmap-sparse");
    let exe = hostile(&d);
    let w = d.join("w");
    std::fs::create_dir_all(&w).unwrap();
    let big = w.join("big");
    let b = big.to_str().unwrap();
    let run = guest(
        &exe,
        &["sparse", b, "1024"],
        &w,
        &[&w],
        64 << 20,
        RUN_TIMEOUT,
    );
    assert_eq!(result(&text(&run), "ftruncate"), "ok");
    let (run, grew) =
        rss_growth(|| guest(&exe, &["mmap", b, "1024"], &w, &[&w], 64 << 20, RUN_TIMEOUT));
    let _ = std::fs::remove_file(&big);
    assert_eq!(run.end, ProcessEnd::Exited(0), "{}", text(&run));
    assert!(
        grew < 256 * MIB,
        "the VMM grew by {} MiB for a 64 MiB guest mapping a sparse file it made",
        grew / MIB
    );
}

#[test]
fn writev_of_many_iovecs_on_one_buffer_is_bounded() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("h13-writev");
    let exe = hostile(&d);
    // 256 iovecs of the same 4 MiB buffer: the VMM gathers 1 GiB before writing (1024 of them:
    // 4 GiB). Linux writes what it can; a short count is allowed.
    let (run, grew) =
        rss_growth(|| guest(&exe, &["writev", "256"], &d.0, &[], 64 << 20, RUN_TIMEOUT));
    assert_eq!(run.end, ProcessEnd::Exited(0), "{}", text(&run));
    assert!(
        grew < 256 * MIB,
        "the VMM grew by {} MiB for one writev of a 64 MiB guest",
        grew / MIB
    );
}

/// Opens counted by inotify on `path` while `f` runs.
fn opens_of<R>(path: &Path, f: impl FnOnce() -> R) -> (R, usize) {
    use rustix::fs::inotify;
    let fd = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC).unwrap();
    inotify::add_watch(&fd, path, inotify::WatchFlags::OPEN).unwrap();
    let r = f();
    let mut buf = [0u8; 4096];
    // Each event on the watched file itself is a bare `struct inotify_event` (16 bytes).
    let n = rustix::io::read(&fd, &mut buf).unwrap_or(0);
    (r, n / 16)
}

fn mknod_char(p: &Path, major: u32, minor: u32) -> bool {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p,
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_bits_truncate(0o600),
        rustix::fs::makedev(major, minor),
    )
    .is_ok()
}

#[test]
fn device_nodes_inside_a_root_are_never_opened() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("h13-devnode");
    let exe = hostile(&d);
    let dir = d.join("dev");
    std::fs::create_dir_all(&dir).unwrap();
    let nul = dir.join("nul");
    let ptmx = dir.join("ptmx");
    if !mknod_char(&nul, 1, 3) || !mknod_char(&ptmx, 5, 2) {
        super::note("   (mknod not permitted: skipped)");
        return;
    }
    // README: "other device nodes ... are never opened". The open is made, then refused:
    // the driver's open runs (a watchdog would start, a tape would rewind, a tty would
    // become the controlling terminal).
    let (run, opens) = opens_of(&nul, || {
        guest(
            &exe,
            &["opendev", nul.to_str().unwrap()],
            &dir,
            &[],
            64 << 20,
            RUN_TIMEOUT,
        )
    });
    assert_eq!(result(&text(&run), "opendev"), "E13");
    // A ptmx copy outside devpts: its driver's open fails with ENOENT, which comes back
    // instead of EACCES, so the driver ran.
    let run2 = guest(
        &exe,
        &["opendev", ptmx.to_str().unwrap()],
        &dir,
        &[],
        64 << 20,
        RUN_TIMEOUT,
    );
    assert_eq!(
        (opens, result(&text(&run2), "opendev")),
        (0, "E13"),
        "host device nodes were opened (inotify IN_OPEN count, ptmx copy's errno)"
    );
}

#[test]
fn o_path_opens_work_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("h13-opath");
    let exe = hostile(&d);
    std::fs::write(d.join("f"), "f\n").unwrap();
    // openat2 refuses O_PATH with any flag but O_DIRECTORY|O_NOFOLLOW|O_CLOEXEC, and the VMM
    // adds O_NONBLOCK: every O_PATH open fails with EINVAL (open(2) succeeds natively).
    let native = std::process::Command::new(&exe)
        .args(["opendev", d.join("f").to_str().unwrap()])
        .output()
        .unwrap();
    let native = String::from_utf8_lossy(&native.stdout).into_owned();
    assert_eq!(result(&native, "opendev-opath"), "ok");
    let run = guest(
        &exe,
        &["opendev", d.join("f").to_str().unwrap()],
        &d.0,
        &[],
        64 << 20,
        RUN_TIMEOUT,
    );
    assert_eq!(result(&text(&run), "opendev-opath"), "ok", "{}", text(&run));
}

#[test]
fn calls_on_o_path_descriptors_and_a_dir_that_is_also_the_write_dir_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("h13-opathcalls");
    let exe = hostile(&d);
    let f = d.join("f");
    std::fs::write(&f, "f\n").unwrap();
    let native = std::process::Command::new(&exe)
        .args(["opathcalls", f.to_str().unwrap()])
        .output()
        .unwrap();
    let native = String::from_utf8_lossy(&native.stdout).into_owned();
    assert!(native.contains("fchmod=E9") && native.contains("fchmod-rdonly=ok"));
    // --dir D --allow-write D: fchmod, futimens were EACCES (the read root was chosen).
    let run = guest(
        &exe,
        &["opathcalls", f.to_str().unwrap()],
        &d.0,
        &[&d.0],
        64 << 20,
        RUN_TIMEOUT,
    );
    assert_eq!(text(&run), native);
}

#[test]
fn trailing_dot_and_slash_names_fail_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("h13-names");
    let exe = hostile(&d);
    let make = |w: &Path| {
        let _ = std::fs::remove_dir_all(w);
        std::fs::create_dir_all(w.join("d1")).unwrap();
        std::fs::create_dir_all(w.join("d2")).unwrap();
        for f in ["f1", "f2", "f3", "f4"] {
            std::fs::write(w.join(f), f).unwrap();
        }
    };
    let listing = |w: &Path| -> BTreeSet<String> {
        std::fs::read_dir(w)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    };
    let nat = d.join("native");
    make(&nat);
    let native = std::process::Command::new(&exe)
        .args(["names", nat.to_str().unwrap()])
        .output()
        .unwrap();
    let native = String::from_utf8_lossy(&native.stdout).into_owned();
    let w = d.join("w");
    make(&w);
    let run = guest(
        &exe,
        &["names", w.to_str().unwrap()],
        &w,
        &[&w],
        64 << 20,
        RUN_TIMEOUT,
    );
    // Native: rmdir("d1/.") EINVAL, unlink("f1/") ENOTDIR, rename to or from "x/" ENOTDIR...
    // Today all succeed: Path::components drops the trailing "." and "/", so `rmdir d1/.`
    // removes d1 and `unlink f1/` removes the file.
    assert_eq!(text(&run), native, "results differ from native");
    assert_eq!(listing(&w), listing(&nat), "files removed or renamed");
}

#[test]
fn fifo_reads_block_as_natively() {
    let _kvm = kvm_or_skip!();
    require_busybox();
    let d = TempDir::new("h13-fifo");
    let fifo = d.join("fifo");
    sh(&format!("mkfifo {}", fifo.display()));
    let f2 = fifo.clone();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let mut w = std::fs::OpenOptions::new().write(true).open(&f2).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        // The guest may have given up already (EPIPE): that is the failure shown below.
        let _ = w.write_all(b"hello\n");
    });
    let run = guest(
        Path::new(BUSYBOX),
        &["cat", fifo.to_str().unwrap()],
        &d.0,
        &[],
        64 << 20,
        Duration::from_secs(20),
    );
    writer.join().unwrap();
    // Today: "cat: read error: Resource temporarily unavailable", status 1: the FIFO is
    // left non-blocking for a program that opened it blocking.
    assert_eq!(
        (text(&run), &run.end),
        ("hello\n".to_owned(), &ProcessEnd::Exited(0)),
        "stderr: {}",
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn fifo_writes_block_as_natively() {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("h13-fifo-write");
    let exe = hostile(&d);
    let fifo = d.join("fifo");
    sh(&format!("mkfifo {}", fifo.display()));
    const N: usize = 1 << 20;
    // The host end is open before the program opens its end (no writer yet: non-blocking
    // open, then blocking reads after poll).
    let mut rd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    rustix::fs::fcntl_setfl(&rd, rustix::fs::OFlags::empty()).unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let mut p = [rustix::event::PollFd::new(
                &rd,
                rustix::event::PollFlags::IN,
            )];
            rustix::event::poll(&mut p, None).unwrap();
            match rd.read(&mut buf).unwrap() {
                0 => break got,
                k => got.extend_from_slice(&buf[..k]),
            }
        }
    });
    let run = guest(
        &exe,
        &["fifowrite", fifo.to_str().unwrap(), &N.to_string()],
        &d.0,
        &[&d.0],
        64 << 20,
        Duration::from_secs(20),
    );
    let got = reader.join().unwrap();
    // Before: the non-blocking host write stopped at the pipe's 64 KiB (EAGAIN mid-way).
    assert_eq!(
        (text(&run), &run.end),
        (format!("fifowrite={N}\n"), &ProcessEnd::Exited(0))
    );
    assert_eq!(got.len(), N);
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, &b)| usize::from(b.wrapping_sub(b'a')) == i % 26)
    );
}

#[test]
fn poll_and_select_edge_cases_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("h13-select");
    let exe = hostile(&d);
    let native = std::process::Command::new(&exe)
        .arg("select")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let native = String::from_utf8_lossy(&native.stdout).into_owned();
    let run = guest(&exe, &["select"], &d.0, &[], 64 << 20, RUN_TIMEOUT);
    let t = text(&run);
    // Held: POLLNVAL for an unknown fd, EFAULT for a bad array, EINVAL for a huge nfds and
    // a negative select nfds.
    for k in ["poll", "poll-bad", "poll-huge", "select-neg"] {
        assert_eq!(result(&t, k), result(&native, k), "{k}: {t}");
    }
    // Differ: select with nfds above 1024 (Linux caps it at the descriptor table's size)
    // and a timeval with tv_usec >= 1,000,000 (Linux normalises it) are EINVAL here.
    for k in ["select-2048", "select-badtv"] {
        assert_eq!(result(&t, k), result(&native, k), "{k}: {t}");
    }
}

#[test]
fn timeout_ends_a_program_spinning_the_vmm_in_one_call() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("h13-madvise");
    let exe = build_c(&d.0, "dos", DOS_C);
    // madvise(MADV_DONTNEED) over 1 TiB: the VMM walks it page by page (2^28 pages, ~20 s),
    // and the deadline is looked at only after the call. Linux answers at once (ENOMEM).
    let start = Instant::now();
    let run = guest(
        &exe,
        &["madvise", "40"],
        &d.0,
        &[],
        64 << 20,
        Duration::from_secs(1),
    );
    let took = start.elapsed();
    // Natively the call fails at once (`madvise=-1/12`, ENOMEM for the unmapped range) and
    // the program exits 0: answering as fast is as good as ending it at the deadline.
    let native = std::process::Command::new(&exe)
        .args(["madvise", "40"])
        .output()
        .unwrap();
    let native = String::from_utf8_lossy(&native.stdout).into_owned();
    assert_eq!(native, "madvise=-1/12\n");
    let answered = run.end == ProcessEnd::Exited(0) && text(&run) == native;
    assert!(
        (matches!(run.end, ProcessEnd::Timeout(_)) || answered) && took < Duration::from_secs(5),
        "--timeout 1 ended after {took:?} with {:?} ({})",
        run.end,
        text(&run)
    );
}

#[test]
fn a_huge_directory_lists_completely_and_in_bounded_memory() {
    let _kvm = kvm_or_skip!();
    require_busybox();
    let d = TempDir::new("h13-hugedir");
    let big = d.join("big");
    std::fs::create_dir_all(&big).unwrap();
    for i in 0..30_000 {
        std::fs::write(big.join(format!("entry-with-a-longish-name-{i:06}")), "").unwrap();
    }
    let (run, grew) = rss_growth(|| {
        guest(
            Path::new(BUSYBOX),
            &["ls", "-1a", big.to_str().unwrap()],
            &d.0,
            &[],
            64 << 20,
            RUN_TIMEOUT,
        )
    });
    assert_eq!(run.end, ProcessEnd::Exited(0));
    assert_eq!(text(&run).lines().count(), 30_002, "with . and ..");
    assert!(grew < 256 * MIB, "grew {} MiB", grew / MIB);
}

#[test]
fn nanosleep_with_a_negative_time_fails_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("h13-sleepneg");
    let exe = build_c(&d.0, "dos", DOS_C);
    for what in ["sleep", "sleepneg"] {
        let native = std::process::Command::new(&exe)
            .args([what, "0"])
            .output()
            .unwrap();
        let native = String::from_utf8_lossy(&native.stdout).into_owned();
        assert_eq!(native, format!("{what}=-1/22\n"));
        // Before: tv_sec -1 read as 2^64 - 1 seconds, a sleep until the run's timeout.
        let run = guest(&exe, &[what, "0"], &d.0, &[], 64 << 20, RUN_TIMEOUT);
        assert_eq!((&run.end, text(&run)), (&ProcessEnd::Exited(0), native));
    }
}
