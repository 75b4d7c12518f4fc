//! Signals the program sends itself and its timers: handlers with the Linux signal frame
//! and `rt_sigreturn`, `SA_SIGINFO`, `sigaltstack`, the blocked mask, `SIG_IGN` and the
//! default actions, `alarm`/`setitimer` with `pause`, compared with native (`SIGPIPE`: the CLI's tests).

use std::process::Command;

use pagetrack_testkit::kvm_or_skip;
use pagetrack_vmm::process::{Input, ProcessEnd};

use super::memtest::build_c;
use super::{Mode, TempDir, run_guest};

const SIGNALS_C: &str = r#"
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <stdlib.h>
#include <sys/time.h>
static volatile sig_atomic_t got, alarms;
static void on_usr1(int s) { got += s; }
static void on_info(int s, siginfo_t *si, void *uc) { (void)uc; printf("info sig %d code %d\n", s, si->si_code); got++; }
static void on_alrm(int s) { (void)s; alarms++; }
static char alt[65536];
static void on_alt(int s) { int x; printf("on alt stack: %d\n", (char*)&x >= alt && (char*)&x < alt + sizeof alt); (void)s; }
static volatile sig_atomic_t ticks;
static void on_tick(int s) {
    volatile double h = 0;
    for (int i = 0; i < 100; i++) h += i * 0.25 + s;
    ticks++;
}
int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "term")) { raise(SIGTERM); return 3; }
    if (argc > 1 && !strcmp(argv[1], "compute")) {
        /* No system call in the loop: only a timer delivered between two instructions
           ends it; the handler's vector registers must not leak into the loop's. */
        signal(SIGALRM, on_tick);
        struct itimerval it = {{0, 2000}, {0, 2000}};
        setitimer(ITIMER_REAL, &it, 0);
        double y = 0, z = 0.5;
        long n = 0, bad = 0;
        while (ticks < 3) {
            n++;
            y += 1.0;
            z = z * 0.5 + 0.25;
            if ((double)n != y || z != 0.5) bad++;
        }
        struct itimerval off = {{0, 0}, {0, 0}};
        setitimer(ITIMER_REAL, &off, 0);
        printf("ticks %d bad %ld\n", ticks >= 3, bad);
        return 0;
    }
    signal(SIGUSR1, on_usr1);
    raise(SIGUSR1);
    printf("after raise: %d\n", got);
    signal(SIGUSR2, SIG_IGN);
    raise(SIGUSR2);
    printf("ignored SIGUSR2 survived\n");
    raise(SIGCHLD);
    printf("default-ignored SIGCHLD survived\n");
    struct sigaction sa; memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_info; sa.sa_flags = SA_SIGINFO;
    sigaction(SIGHUP, &sa, 0);
    kill(getpid(), SIGHUP);
    sigset_t m; sigemptyset(&m); sigaddset(&m, SIGUSR1);
    sigprocmask(SIG_BLOCK, &m, 0);
    raise(SIGUSR1);
    printf("blocked: %d\n", got);
    sigprocmask(SIG_UNBLOCK, &m, 0);
    printf("unblocked: %d\n", got);
    stack_t ss; ss.ss_sp = alt; ss.ss_size = sizeof alt; ss.ss_flags = 0;
    sigaltstack(&ss, 0);
    memset(&sa, 0, sizeof sa); sa.sa_handler = on_alt; sa.sa_flags = SA_ONSTACK;
    sigaction(SIGWINCH, &sa, 0);
    raise(SIGWINCH);
    signal(SIGALRM, on_alrm);
    alarm(1);
    pause();
    printf("alarm then pause: %d\n", alarms);
    struct itimerval it = {{0, 20000}, {0, 20000}};
    setitimer(ITIMER_REAL, &it, 0);
    while (alarms < 4) pause();
    it.it_value.tv_usec = 0; it.it_interval.tv_usec = 0;
    setitimer(ITIMER_REAL, &it, 0);
    printf("interval timer: %d\n", alarms);
    sigset_t blockalrm, old, none, now;
    sigemptyset(&blockalrm);
    sigaddset(&blockalrm, SIGALRM);
    sigemptyset(&none);
    sigprocmask(SIG_BLOCK, &blockalrm, &old);
    struct itimerval once = {{0, 0}, {0, 10000}};
    setitimer(ITIMER_REAL, &once, 0);
    int before = alarms;
    int r = sigsuspend(&none);
    sigprocmask(SIG_BLOCK, 0, &now);
    printf("sigsuspend %d: %d, SIGALRM blocked again: %d\n", r, alarms - before,
           sigismember(&now, SIGALRM));
    sigprocmask(SIG_SETMASK, &old, 0);
    double d = 1.5; for (int i = 0; i < 3; i++) { raise(SIGUSR1); d *= 2; }
    printf("%.1f %d\n", d, got);
    return 0;
}
"#;

fn native(exe: &std::path::Path, args: &[&str]) -> (Vec<u8>, Option<i32>, Option<i32>) {
    use std::os::unix::process::ExitStatusExt;
    let out = Command::new(exe).args(args).output().unwrap();
    (out.stdout, out.status.code(), out.status.signal())
}

#[test]
fn signal_handlers_masks_and_timers_match_native() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("signals");
    let exe = build_c(&d.0, "signals", SIGNALS_C);
    let (expected, code, _) = native(&exe, &[]);
    assert_eq!(code, Some(0));
    assert!(String::from_utf8_lossy(&expected).contains("on alt stack: 1"));
    for mode in [Mode::Untracked, Mode::StackHeapData] {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let run = run_guest(kvm, &exe, &[], &d.0, Input::Null, mode);
        assert_eq!(run.outcome.end, ProcessEnd::Exited(0), "{mode:?}: {run:?}");
        assert_eq!(
            String::from_utf8_lossy(&run.outcome.stdout),
            String::from_utf8_lossy(&expected),
            "{mode:?}"
        );
        assert!(run.outcome.stats.syscalls.unknown.is_empty(), "{mode:?}");
        if let Some(o) = &run.oracle {
            o.assert_holds(&format!("signals {mode:?}"));
        }
    }
}

#[test]
fn a_timer_interrupts_a_program_that_only_computes() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("sigcompute");
    let exe = build_c(&d.0, "signals", SIGNALS_C);
    let (expected, code, _) = native(&exe, &["compute"]);
    assert_eq!(code, Some(0));
    assert_eq!(expected, b"ticks 1 bad 0\n");
    for mode in [Mode::Untracked, Mode::StackHeapData] {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let run = run_guest(kvm, &exe, &["compute"], &d.0, Input::Null, mode);
        assert_eq!(run.outcome.end, ProcessEnd::Exited(0), "{mode:?}: {run:?}");
        assert_eq!(run.outcome.stdout, expected, "{mode:?}");
    }
}

#[test]
fn default_actions_end_the_program_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("sigdefault");
    let exe = build_c(&d.0, "signals", SIGNALS_C);
    // raise(SIGTERM): killed, 128 + 15.
    let (_, _, sig) = native(&exe, &["term"]);
    assert_eq!(sig, Some(15));
    let run = run_guest(
        kvm_ioctls::Kvm::new().unwrap(),
        &exe,
        &["term"],
        &d.0,
        Input::Null,
        Mode::Untracked,
    );
    assert_eq!(run.outcome.end.status(), 143, "{run:?}");
}
