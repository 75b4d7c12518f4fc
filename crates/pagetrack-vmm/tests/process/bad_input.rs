//! Bad input and containment: a missing program, a dynamic executable, a non-ELF file, a
//! 32-bit ELF, programs that fault, fork, escape `--dir` or write without `--allow-write`:
//! clear errors or `-errno` results, no panic, no host side effect.

use std::path::Path;

use pagetrack_testkit::kvm_or_skip;
use pagetrack_vmm::Error;
use pagetrack_vmm::process::{Input, Output, Process, ProcessConfig, ProcessEnd};

use super::memtest::build_c;
use super::{BUSYBOX, Mode, TempDir, require_busybox, run_guest};

/// Does what `argv[1]` says and prints the results.
const PROBE_C: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static void try_open(const char *p, int flags) {
    int fd = open(p, flags, 0644);
    printf("%s %d\n", p, fd >= 0 ? 0 : errno);
    if (fd >= 0) close(fd);
}

int main(int argc, char **argv) {
    const char *what = argc > 1 ? argv[1] : "";
    if (!strcmp(what, "segv")) { *(volatile int *)0x10 = 1; }
    if (!strcmp(what, "ud")) { __builtin_trap(); }
    if (!strcmp(what, "div")) { __asm__ volatile("xor %%ecx, %%ecx; div %%ecx" ::: "eax", "ecx", "edx"); }
    if (!strcmp(what, "abort")) { abort(); }
    if (!strcmp(what, "io")) { __asm__ volatile("outb %%al, $0x80" ::: "memory"); }
    if (!strcmp(what, "spoof")) { __asm__ volatile("outb %%al, $0xf6" ::: "memory"); }
    if (!strcmp(what, "kread")) { printf("%d\n", *(volatile int *)0xffe0000); }
    if (!strcmp(what, "stub")) { *(volatile char *)0x7ffffffff000 = 0; }
    if (!strcmp(what, "exit")) { exit(atoi(argv[2])); }
    if (!strcmp(what, "fork")) {
        pid_t p = fork();
        printf("fork %d %d\n", (int)p, p < 0 ? errno : 0);
        if (p == 0) _exit(0);
        return 0;
    }
    if (!strcmp(what, "escape")) {
        try_open("inside.txt", O_RDONLY);
        try_open("../outside.txt", O_RDONLY);
        try_open("sub/../../outside.txt", O_RDONLY);
        try_open("/etc/passwd", O_RDONLY);
        try_open("link", O_RDONLY);
        try_open("missing.txt", O_RDONLY);
        try_open("new.txt", O_WRONLY | O_CREAT | O_TRUNC);
        try_open("inside.txt", O_RDWR);
        return 0;
    }
    if (!strcmp(what, "host")) {
        printf("socket %d\n", socket(AF_INET, SOCK_STREAM, 0) < 0 ? errno : 0);
        printf("kill %d\n", kill(1, SIGTERM) < 0 ? errno : 0);
        printf("execve %d\n", execl("/bin/true", "true", (char *)0) < 0 ? errno : 0);
        printf("unknown %d\n", syscall(500) < 0 ? errno : 0);
        return 0;
    }
    return 3;
}
"#;

fn probe(name: &str) -> (TempDir, std::path::PathBuf) {
    let d = TempDir::new(name);
    let exe = build_c(&d.0, "probe", PROBE_C);
    (d, exe)
}

fn run(exe: &Path, args: &[&str], dir: &Path) -> pagetrack_vmm::process::ProcessOutcome {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    run_guest(kvm, exe, args, dir, Input::Null, Mode::Untracked).outcome
}

fn load_error(kvm: kvm_ioctls::Kvm, program: &Path) -> String {
    match Process::with_kvm(kvm, ProcessConfig::new(program)) {
        Ok(_) => panic!("{} loaded", program.display()),
        Err(e @ Error::InvalidGuestImage { .. }) => {
            // The message and its causes, as the CLI prints them.
            let mut msg = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                msg = format!("{msg}: {c}");
                cause = c.source();
            }
            msg
        }
        Err(e) => panic!("{}: unexpected error kind {e:?}", program.display()),
    }
}

/// Gives `p` execute permission, so what is tested is its content.
pub fn executable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn load_missing_program_is_a_clear_error() {
    let kvm = kvm_or_skip!();
    let msg = load_error(kvm, Path::new("/nonexistent/program"));
    assert!(
        msg.contains("/nonexistent/program") && msg.contains("No such file"),
        "{msg}"
    );
}

#[test]
fn load_missing_program_keeps_the_host_error_as_its_source() {
    let kvm = kvm_or_skip!();
    let program = Path::new("/nonexistent/program");
    let err = Process::with_kvm(kvm, ProcessConfig::new(program))
        .expect_err("a missing program is refused");
    let Error::InvalidGuestImage {
        program: Some(p),
        reason: pagetrack_vmm::ImageProblem::Open,
        source: Some(io),
    } = &err
    else {
        panic!("unexpected error {err:?}");
    };
    assert_eq!(p, program);
    assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
    // The message names the program and the step; the cause is the source, not repeated.
    assert_eq!(
        err.to_string(),
        "invalid guest image: /nonexistent/program: cannot open it"
    );
    assert!(std::error::Error::source(&err).is_some());
}

#[test]
fn load_dynamic_executable_is_refused() {
    let kvm = kvm_or_skip!();
    let msg = load_error(kvm, Path::new("/bin/ls"));
    assert!(
        msg.contains("dynamically linked") && msg.contains("static"),
        "{msg}"
    );
}

#[test]
fn load_non_elf_and_32bit_elf_are_refused() {
    let kvm = kvm_or_skip!();
    let d = TempDir::new("badelf");
    let script = d.join("script.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    executable(&script);
    assert!(load_error(kvm, &script).contains("not an ELF file"));

    // A minimal ELF32 header: i386 executable with one program header.
    let mut elf32 = vec![0u8; 84];
    elf32[..4].copy_from_slice(b"\x7fELF");
    elf32[4] = 1; // ELFCLASS32
    elf32[5] = 1; // little-endian
    elf32[6] = 1; // version
    elf32[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf32[18..20].copy_from_slice(&3u16.to_le_bytes()); // EM_386
    elf32[24..28].copy_from_slice(&0x0804_8054u32.to_le_bytes()); // entry
    elf32[28..32].copy_from_slice(&52u32.to_le_bytes()); // phoff
    elf32[40..42].copy_from_slice(&52u16.to_le_bytes()); // ehsize
    elf32[42..44].copy_from_slice(&32u16.to_le_bytes()); // phentsize
    elf32[44..46].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let p = d.join("elf32");
    std::fs::write(&p, &elf32).unwrap();
    executable(&p);
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let msg = load_error(kvm, &p);
    assert!(msg.contains("32-bit"), "{msg}");
}

fn elf64_exit0(mem_size: u64) -> Vec<u8> {
    pagetrack_testkit::static_elf64(&pagetrack_testkit::EXIT0_CODE, mem_size)
}

#[test]
fn huge_memsz_is_refused_within_guest_memory() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("hugebss");
    // 1 TiB, 64 TiB, and up to the end of user space: refused before any per-page work,
    // with the sizes in the message (this ran out of host memory before).
    for mem_size in [1u64 << 40, 64 << 40, 0x8000_0000_0000 - 0x40_0000] {
        let p = d.join(&format!("huge-{mem_size:x}"));
        std::fs::write(&p, elf64_exit0(mem_size)).unwrap();
        executable(&p);
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        match Process::with_kvm(kvm, ProcessConfig::new(&p)) {
            Err(e @ Error::ImageTooLarge { need, free, .. }) => {
                assert!(need >= mem_size && free < 256 << 20, "{e}");
                let msg = e.to_string();
                assert!(msg.contains("MiB") && msg.contains("--mem"), "{msg}");
            }
            other => panic!("{mem_size:#x}: {other:?}"),
        }
    }
    // What fits runs: 64 MiB of bss in 256 MiB, untouched.
    let p = d.join("fits");
    std::fs::write(&p, elf64_exit0(64 << 20)).unwrap();
    executable(&p);
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let o = Process::with_kvm(kvm, ProcessConfig::new(&p).stdin(Input::Null))
        .unwrap()
        .run()
        .unwrap();
    assert_eq!(o.end, ProcessEnd::Exited(0));
}

#[test]
fn faulting_programs_end_with_the_signal_and_a_clear_report() {
    let _kvm = kvm_or_skip!();
    let (d, exe) = probe("faults");
    let o = run(&exe, &["segv"], &d.0);
    let ProcessEnd::Signaled {
        signal: 11,
        exception: Some(ex),
        detail,
    } = &o.end
    else {
        panic!("segv: {:?}", o.end);
    };
    assert_eq!((ex.vector, ex.cr2), (14, Some(0x10)), "{detail}");
    assert!(
        detail.contains("SIGSEGV") && detail.contains("#PF") && detail.contains("address 0x10"),
        "{detail}"
    );
    assert_eq!(o.end.status(), 139);

    let o = run(&exe, &["ud"], &d.0);
    assert!(
        matches!(&o.end, ProcessEnd::Signaled { signal: 4, .. }),
        "ud: {:?}",
        o.end
    );
    assert_eq!(o.end.status(), 132);
    let o = run(&exe, &["div"], &d.0);
    assert!(
        matches!(&o.end, ProcessEnd::Signaled { signal: 8, .. }),
        "div: {:?}",
        o.end
    );
    let o = run(&exe, &["abort"], &d.0);
    assert!(
        matches!(
            &o.end,
            ProcessEnd::Signaled {
                signal: 6,
                exception: None,
                ..
            }
        ),
        "abort: {:?}",
        o.end
    );
    let o = run(&exe, &["exit", "42"], &d.0);
    assert_eq!(o.end, ProcessEnd::Exited(42));
}

#[test]
fn the_program_cannot_reach_ports_the_cpl0_region_or_the_stub() {
    let _kvm = kvm_or_skip!();
    let (d, exe) = probe("isolation");
    // Port I/O other than the system-call port: #GP through the TSS I/O bitmap.
    let o = run(&exe, &["io"], &d.0);
    let ProcessEnd::Signaled {
        signal: 11,
        exception: Some(ex),
        ..
    } = &o.end
    else {
        panic!("io: {:?}", o.end);
    };
    assert_eq!(ex.vector, 13);
    // The system-call port outside the stub is not a system call.
    let o = run(&exe, &["spoof"], &d.0);
    assert!(
        matches!(&o.end, ProcessEnd::Crashed(m) if m.contains("outside the system-call stub")),
        "{:?}",
        o.end
    );
    // The CPL0 structures (GDT, IDT, TSS, stubs) are supervisor pages: a protection fault.
    let o = run(&exe, &["kread"], &d.0);
    let ProcessEnd::Signaled {
        signal: 11,
        exception: Some(ex),
        ..
    } = &o.end
    else {
        panic!("kread: {:?}", o.end);
    };
    assert_eq!(
        (ex.vector, ex.error_code.map(|e| e & 5)),
        (14, Some(5)),
        "user read of a present supervisor page"
    );
    // The stub page is read-only.
    let o = run(&exe, &["stub"], &d.0);
    assert!(
        matches!(&o.end, ProcessEnd::Signaled { signal: 11, .. }),
        "stub: {:?}",
        o.end
    );
}

#[test]
fn fork_exec_sockets_and_signals_are_refused() {
    let _kvm = kvm_or_skip!();
    let (d, exe) = probe("fork");
    let o = run(&exe, &["fork"], &d.0);
    assert_eq!(o.end, ProcessEnd::Exited(0));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "fork -1 1\n",
        "fork gets EPERM"
    );
    let o = run(&exe, &["host"], &d.0);
    assert_eq!(o.end, ProcessEnd::Exited(0));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "socket 13\nkill 1\nexecve 1\nunknown 38\n",
        "EACCES, EPERM, EPERM, ENOSYS"
    );
    assert_eq!(o.stats.syscalls.unknown.get(&500), Some(&1));
    assert!(
        o.stats.syscalls.refused.contains_key(&59),
        "execve counted as refused"
    );
}

#[test]
fn paths_outside_dir_are_eacces_and_writes_need_allow_write() {
    let _kvm = kvm_or_skip!();
    let (d, exe) = probe("escape");
    let root = d.join("root");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("inside.txt"), "in").unwrap();
    std::fs::write(d.join("outside.txt"), "out").unwrap();
    std::os::unix::fs::symlink(d.join("outside.txt"), root.join("link")).unwrap();
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let cfg = ProcessConfig::new(&exe)
        .args(["escape"])
        .dir(&root)
        .stdout(Output::Capture)
        .stderr(Output::Capture)
        .stdin(Input::Null);
    // Relative paths resolve against the host's current directory (the crate's, under
    // cargo test), which is outside `root`: every relative open is refused.
    let cwd = std::env::current_dir().unwrap();
    let o = Process::with_kvm(kvm, cfg).unwrap().run().unwrap();
    assert_eq!(o.end, ProcessEnd::Exited(0));
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        text.lines().all(|l| l.ends_with(" 13")),
        "cwd {}: {text}",
        cwd.display()
    );

    // With absolute paths inside root: reads work, escapes fail, writes need --allow-write.
    let abs = |p: &str| root.join(p).to_str().unwrap().to_owned();
    let src = PROBE_C
        .replace("\"inside.txt\"", &format!("{:?}", abs("inside.txt")))
        .replace(
            "\"../outside.txt\"",
            &format!("{:?}", abs("../outside.txt")),
        )
        .replace(
            "\"sub/../../outside.txt\"",
            &format!("{:?}", abs("sub/../../outside.txt")),
        )
        .replace("\"link\"", &format!("{:?}", abs("link")))
        .replace("\"missing.txt\"", &format!("{:?}", abs("missing.txt")))
        .replace("\"new.txt\"", &format!("{:?}", abs("new.txt")));
    let exe = build_c(&d.0, "probe-abs", &src);
    for allow in [false, true] {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let mut cfg = ProcessConfig::new(&exe)
            .args(["escape"])
            .dir(&root)
            .stdout(Output::Capture)
            .stdin(Input::Null);
        if allow {
            cfg = cfg.allow_write(&root);
        }
        let o = Process::with_kvm(kvm, cfg).unwrap().run().unwrap();
        assert_eq!(o.end, ProcessEnd::Exited(0));
        let got: Vec<i32> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        let w = if allow { 0 } else { 13 };
        // inside, ../outside, sub/../../outside, /etc/passwd, link, missing, new (write), rdwr
        assert_eq!(got, vec![0, 13, 13, 13, 13, 2, w, w], "allow_write {allow}");
        assert_eq!(
            root.join("new.txt").exists(),
            allow,
            "no host side effect without --allow-write"
        );
        assert!(o.stats.syscalls.refused.values().sum::<u64>() >= 4);
    }
    assert_eq!(std::fs::read(d.join("outside.txt")).unwrap(), b"out");
}

#[test]
fn busybox_reading_outside_dir_is_permission_denied() {
    let _kvm = kvm_or_skip!();
    require_busybox();
    let d = TempDir::new("grep");
    std::fs::write(d.join("ok.txt"), "fine\n").unwrap();
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let ok = d.join("ok.txt");
    // `-f/etc/passwd` is not a file name argument, so /etc/passwd stays outside.
    let run = run_guest(
        kvm,
        Path::new(BUSYBOX),
        &["grep", "-f/etc/passwd", ok.to_str().unwrap()],
        &d.0,
        Input::Null,
        Mode::Untracked,
    );
    let err = String::from_utf8_lossy(&run.outcome.stderr);
    assert!(
        err.contains("/etc/passwd") && err.contains("Permission denied"),
        "{err}"
    );
    assert_eq!(run.outcome.end, ProcessEnd::Exited(2), "{err}");
}
