//! Containment against a hostile program: guests racing renames and symlink swaps against
//! each other's path calls (the check-then-use race), a directory listed after its path was
//! swapped for an outward symlink, roots that would expose procfs, and programs `execve`
//! would refuse (no execute permission, not a regular file).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use pagetrack_testkit::kvm_or_skip;
use pagetrack_vmm::process::{Input, Output, Process, ProcessConfig, ProcessEnd, ProcessOutcome};
use pagetrack_vmm::{Error, ProgramRefusal};

use super::memtest::build_c;
use super::{BUSYBOX, ENV, RUN_TIMEOUT, TempDir, require_busybox};

/// `swap ROOT N`: swaps `ROOT/d` (a directory) and `ROOT/evil` (a host-made symlink to the
/// outside) N times. `probe ROOT N`: N rounds of path calls through `ROOT/d` that would
/// reach the outside if the swap won: read, create, truncate, stat, list, move out.
/// `hammer ROOT N`: N rounds of just truncate and create through `ROOT/d`.
/// `dents ROOT`: opens `ROOT/d`, swaps the symlink into its place, then lists the open
/// descriptor.
const RACE_C: &str = r#"
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static char P[16][512];
static const char *path(int i, const char *root, const char *rest) {
    snprintf(P[i], sizeof P[i], "%s/%s", root, rest);
    return P[i];
}

static void list_fd(int fd, const char *tag) {
    char buf[4096];
    for (;;) {
        long n = syscall(SYS_getdents64, fd, buf, sizeof buf);
        if (n <= 0) break;
        for (long off = 0; off < n;) {
            unsigned short reclen = *(unsigned short *)(buf + off + 16);
            printf("%s %s\n", tag, buf + off + 19);
            off += reclen;
        }
    }
}

int main(int argc, char **argv) {
    const char *what = argv[1], *root = argv[2];
    long n = argc > 3 ? atol(argv[3]) : 0;
    if (!strcmp(what, "swap")) {
        for (long i = 0; i < n; i++) {
            rename(path(0, root, "d"), path(1, root, "tmp"));
            rename(path(2, root, "evil"), path(0, root, "d"));
            rename(path(0, root, "d"), path(2, root, "evil"));
            rename(path(1, root, "tmp"), path(0, root, "d"));
        }
        printf("swapped %ld\n", n);
        return 0;
    }
    if (!strcmp(what, "probe")) {
        char buf[64];
        long served = 0;
        for (long i = 0; i < n; i++) {
            int fd = open(path(3, root, "d/secret"), O_RDONLY);
            if (fd >= 0) {
                long k = read(fd, buf, sizeof buf - 1);
                if (k > 0) { buf[k] = 0; if (strstr(buf, "TOPSECRET")) printf("LEAK read\n"); }
                close(fd);
                served++;
            }
            fd = open(path(4, root, "d/created"), O_WRONLY | O_CREAT, 0644);
            if (fd >= 0) { write(fd, "x", 1); close(fd); }
            fd = open(path(5, root, "d/victim"), O_WRONLY | O_TRUNC);
            if (fd >= 0) close(fd);
            struct stat st;
            if (stat(path(3, root, "d/secret"), &st) == 0 && st.st_size == 27)
                printf("LEAK stat size\n");
            if (stat(path(6, root, "d/outside-only"), &st) == 0)
                printf("LEAK stat exists\n");
            fd = open(path(7, root, "d"), O_RDONLY | O_DIRECTORY);
            if (fd >= 0) { list_fd(fd, "LIST"); close(fd); }
            if (rename(path(3, root, "d/secret"), path(8, root, "stolen")) == 0) {
                fd = open(path(8, root, "stolen"), O_RDONLY);
                if (fd >= 0) {
                    long k = read(fd, buf, sizeof buf - 1);
                    if (k > 0) { buf[k] = 0; if (strstr(buf, "TOPSECRET")) printf("LEAK stolen\n"); }
                    close(fd);
                }
                /* Put it back, waiting out the swappers if need be (while `d` is the
                   symlink or away, the rename is refused), so the next round has it. */
                for (long t = 0; t < 10000000; t++)
                    if (rename(path(8, root, "stolen"), path(3, root, "d/secret")) == 0) break;
            }
            unlink(path(4, root, "d/created"));
        }
        printf("probed %ld served %ld\n", n, served);
        return 0;
    }
    if (!strcmp(what, "dotdot")) {
        /* Through a symlink whose target has `..`: with RESOLVE_BENEATH the host kernel answers
           EAGAIN when any rename on the host raced that `..`; the program must never see it. */
        long failed = 0;
        for (long i = 0; i < n; i++) {
            int fd = open(path(0, root, "up/secret"), O_RDONLY);
            if (fd < 0) { failed++; printf("errno %d\n", errno); } else close(fd);
        }
        printf("opened %ld failed %ld\n", n - failed, failed);
        return 0;
    }
    if (!strcmp(what, "hammer")) {
        /* The cheapest calls whose damage is done before any check after them could act. */
        for (long i = 0; i < n; i++) {
            int fd = open(path(5, root, "d/victim"), O_WRONLY | O_TRUNC);
            if (fd >= 0) close(fd);
            fd = open(path(4, root, "d/created"), O_WRONLY | O_CREAT, 0644);
            if (fd >= 0) close(fd);
        }
        printf("hammered %ld\n", n);
        return 0;
    }
    if (!strcmp(what, "dents")) {
        int fd = open(path(0, root, "d"), O_RDONLY | O_DIRECTORY);
        if (fd < 0) { perror("open d"); return 1; }
        if (rename(path(0, root, "d"), path(1, root, "gone"))) { perror("rename d"); return 1; }
        if (rename(path(2, root, "evil"), path(0, root, "d"))) { perror("rename evil"); return 1; }
        list_fd(fd, "ENTRY");
        close(fd);
        /* The swapped-in name is the symlink: listing through it is refused. */
        fd = open(path(0, root, "d"), O_RDONLY | O_DIRECTORY);
        printf("reopen %s\n", fd < 0 ? "refused" : "opened");
        return 0;
    }
    return 3;
}
"#;

/// The outside: a secret, a victim file, a name only it has.
fn outside(d: &TempDir) -> PathBuf {
    let out = d.join("outside");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("secret"), "TOPSECRET-outside-27-bytes\n").unwrap();
    std::fs::write(out.join("victim"), "keep me\n").unwrap();
    std::fs::write(out.join("outside-only"), "o\n").unwrap();
    out
}

/// The allowed directory: `d/` with its own secret and victim, `evil` → the outside.
fn inside(d: &TempDir, out: &Path) -> PathBuf {
    let root = d.join("root");
    std::fs::create_dir_all(root.join("d")).unwrap();
    std::fs::write(root.join("d/secret"), "inside\n").unwrap();
    std::fs::write(root.join("d/victim"), "victim inside\n").unwrap();
    std::os::unix::fs::symlink(out, root.join("evil")).unwrap();
    root
}

/// The outside is exactly as made: the same names, the same bytes.
fn assert_outside_untouched(out: &Path) {
    let names: BTreeSet<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let want: BTreeSet<String> = ["outside-only", "secret", "victim"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    assert_eq!(names, want, "names outside changed");
    assert_eq!(
        std::fs::read_to_string(out.join("secret")).unwrap(),
        "TOPSECRET-outside-27-bytes\n"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("victim")).unwrap(),
        "keep me\n"
    );
}

/// No file under `dir` (symlinks not followed) holds the outside secret.
fn assert_no_secret_inside(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        if t.is_dir() {
            assert_no_secret_inside(&e.path());
        } else if t.is_file() {
            let b = std::fs::read(e.path()).unwrap();
            assert!(
                !String::from_utf8_lossy(&b).contains("TOPSECRET"),
                "the secret was moved inside to {}",
                e.path().display()
            );
        }
    }
}

fn race_guest(exe: &Path, root: &Path, args: &[&str]) -> ProcessOutcome {
    let mut argv = vec![args[0], root.to_str().unwrap()];
    argv.extend_from_slice(&args[1..]);
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let cfg = ProcessConfig::new(exe)
        .args(argv)
        .env(ENV)
        .mem(64 << 20)
        .dir(root)
        .allow_write(root)
        .stdin(Input::Null)
        .stdout(Output::Capture)
        .stderr(Output::Capture)
        .timeout(Some(RUN_TIMEOUT));
    Process::with_kvm(kvm, cfg).unwrap().run().unwrap()
}

#[test]
fn host_renames_racing_a_dotdot_never_fail_an_open() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("dotdot");
    let exe = build_c(&d.0, "dotdot", RACE_C);
    let out = outside(&d);
    let root = inside(&d, &out);
    std::fs::create_dir(root.join("sub")).unwrap();
    std::os::unix::fs::symlink("sub/../d", root.join("up")).unwrap();
    let busy = d.join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("a"), "").unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (o, renames) = std::thread::scope(|s| {
        let renamer = s.spawn(|| {
            let mut k = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (a, b) = (busy.join("a"), busy.join("b"));
                let (from, to) = if k.is_multiple_of(2) { (a, b) } else { (b, a) };
                std::fs::rename(from, to).unwrap();
                k += 1;
            }
            k
        });
        let o = race_guest(&exe, &root, &["dotdot", "20000"]);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (o, renamer.join().unwrap())
    });
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.end, ProcessEnd::Exited(0), "{text}");
    assert!(renames > 0);
    assert_eq!(
        text.lines().last(),
        Some("opened 20000 failed 0"),
        "{renames} host renames: {text}"
    );
}

#[test]
fn racing_symlink_swaps_never_reach_outside() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("race");
    let exe = build_c(&d.0, "race", RACE_C);
    let out = outside(&d);
    let root = inside(&d, &out);
    // Bounded by rounds, not time: two swappers against a prober and a hammer, all at once.
    // (Against the check-then-open code this replaced, the hammer created a file outside.)
    let outcomes: Vec<ProcessOutcome> = std::thread::scope(|s| {
        let jobs: Vec<_> = [
            ["swap", "30000"],
            ["swap", "30000"],
            ["probe", "3000"],
            ["hammer", "20000"],
        ]
        .into_iter()
        .map(|a| {
            let (exe, root) = (&exe, &root);
            s.spawn(move || race_guest(exe, root, &a))
        })
        .collect();
        jobs.into_iter().map(|j| j.join().unwrap()).collect()
    });
    let mut served = 0;
    for o in &outcomes {
        let text = String::from_utf8_lossy(&o.stdout);
        assert_eq!(o.end, ProcessEnd::Exited(0), "{text}");
        assert!(!text.contains("LEAK"), "leaked: {text}");
        assert!(!text.contains("TOPSECRET"), "{text}");
        for l in text.lines().filter(|l| l.starts_with("LIST ")) {
            assert!(
                [
                    "LIST .",
                    "LIST ..",
                    "LIST secret",
                    "LIST victim",
                    "LIST created"
                ]
                .contains(&l),
                "a listing showed {l:?}"
            );
        }
        if let Some(l) = text.lines().find(|l| l.starts_with("probed ")) {
            served += l.rsplit(' ').next().unwrap().parse::<u64>().unwrap();
        }
        // The swaps went through the VMM: thousands of renames, not refusals.
        if text.starts_with("swapped") {
            assert!(o.stats.syscalls.by_number.get(&82).copied().unwrap_or(0) >= 4 * 30000);
        }
    }
    // The race may starve the prober of every round it tried; alone, it must be served.
    let alone = race_guest(&exe, &root, &["probe", "1"]);
    let text = String::from_utf8_lossy(&alone.stdout);
    assert_eq!(
        text.lines().last(),
        Some("probed 1 served 1"),
        "{served} served during the race"
    );
    assert_outside_untouched(&out);
    assert_no_secret_inside(&root);
}

#[test]
fn listing_an_open_directory_after_its_path_was_swapped_shows_the_directory() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("dents-swap");
    let exe = build_c(&d.0, "race", RACE_C);
    let out = outside(&d);
    let root = inside(&d, &out);
    let o = race_guest(&exe, &root, &["dents"]);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(o.end, ProcessEnd::Exited(0), "{text}");
    let entries: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("ENTRY "))
        .collect();
    assert_eq!(
        entries,
        [".", "..", "secret", "victim"].into_iter().collect(),
        "{text}"
    );
    assert!(text.contains("reopen refused"), "{text}");
    assert!(root.join("gone/secret").exists() && root.join("d").is_symlink());
    assert_outside_untouched(&out);
}

fn load_error(program: &Path, cfg: impl FnOnce(ProcessConfig) -> ProcessConfig) -> Error {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    match Process::with_kvm(kvm, cfg(ProcessConfig::new(program))) {
        Ok(_) => panic!("{} loaded", program.display()),
        Err(e) => e,
    }
}

#[test]
fn roots_exposing_proc_are_refused() {
    let _kvm = kvm_or_skip!();
    require_busybox();
    let d = TempDir::new("procroot");
    let bb = Path::new(BUSYBOX);
    for (what, e) in [
        ("--dir /", load_error(bb, |c| c.dir("/"))),
        ("--dir /proc", load_error(bb, |c| c.dir("/proc"))),
        (
            "--allow-write /proc",
            load_error(bb, |c| c.dir(&d.0).allow_write("/proc")),
        ),
    ] {
        let msg = e.to_string();
        assert!(
            matches!(e, Error::ProcUnderRoot { .. }) && msg.contains("/proc"),
            "{what}: {msg}"
        );
    }
}

#[test]
fn programs_execve_would_refuse_are_refused() {
    let _kvm = kvm_or_skip!();
    require_busybox();
    let d = TempDir::new("noexec");
    let copy = d.join("busybox-noexec");
    std::fs::copy(BUSYBOX, &copy).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o644)).unwrap();
    let fifo = d.join("fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    for (program, want) in [
        (copy.as_path(), ProgramRefusal::NotExecutable),
        (Path::new("/dev/zero"), ProgramRefusal::NotRegular),
        (fifo.as_path(), ProgramRefusal::NotRegular),
        (d.0.as_path(), ProgramRefusal::NotRegular),
    ] {
        match load_error(program, |c| c) {
            Error::ProgramRefused { reason, .. } if reason == want => {}
            other => panic!("{}: {other:?}", program.display()),
        }
    }
    // With execute permission the same bytes run.
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let o = Process::with_kvm(
        kvm,
        ProcessConfig::new(&copy)
            .args(["true"])
            .argv0("busybox")
            .stdin(Input::Null)
            .stdout(Output::Capture),
    )
    .unwrap()
    .run()
    .unwrap();
    assert_eq!(o.end, ProcessEnd::Exited(0));
}
