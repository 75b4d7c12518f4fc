//! Threads: a pthread program (create and join, a mutex-protected counter, an atomic
//! counter, condvar ping-pong, thread-local variables, `pthread_exit` values, signals to a
//! thread, per-thread masks, more threads over time than vCPUs at once) gives native's
//! output untracked and tracked, and the replay oracle accounts for every event of the
//! tracked runs; `exit_group` from one thread ends threads blocked in futex waits; a thread
//! blocked forever meets the timeout; the thread limit answers `EAGAIN`.

use std::process::Command;
use std::time::Duration;

use pagetrack_testkit::kvm_or_skip;
use pagetrack_vmm::process::{Input, Output, ProcessConfig, ProcessEnd, Region};

use super::memtest::build;
use super::{ENV, Mode, TempDir, note, run_config, run_guest};

const THREADS_C: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <linux/futex.h>

#define N 6
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static long counter;                 /* data, under the mutex */
static long atomic_counter;          /* data, atomics only */
static long *slots;                  /* heap: one per thread, under the mutex */
static __thread long tls_val = 5;
static __thread char tls_buf[32];
static long iters;

static void *worker(void *arg) {
    long id = (long)arg;
    if (tls_val != 5) abort();       /* each thread starts from the TLS image */
    tls_val = id * 100;
    snprintf(tls_buf, sizeof tls_buf, "worker %ld", id);
    for (long i = 0; i < iters; i++) {
        pthread_mutex_lock(&mu);
        counter++;
        slots[id] += 2;
        pthread_mutex_unlock(&mu);
        __atomic_fetch_add(&atomic_counter, 1, __ATOMIC_SEQ_CST);
        if (tls_val != id * 100) abort();
    }
    char *r = malloc(64);
    snprintf(r, 64, "%s tls %ld own-tid %d", tls_buf, tls_val, (int)(gettid() != getpid()));
    if (id == 3) pthread_exit(r);     /* the same value, by pthread_exit */
    return r;
}

/* Condvar ping-pong: two threads take turns. */
static pthread_mutex_t pm = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pc = PTHREAD_COND_INITIALIZER;
static int turn, rounds_done;
static long rounds;
static void *pinger(void *arg) {
    int me = (int)(long)arg;
    for (long i = 0; i < rounds; i++) {
        pthread_mutex_lock(&pm);
        while (turn != me) pthread_cond_wait(&pc, &pm);
        turn = !me;
        rounds_done++;
        pthread_cond_broadcast(&pc);
        pthread_mutex_unlock(&pm);
    }
    return (void *)(long)(me + 40);
}

/* A signal for one thread: its handler sets that thread's own flag. */
static __thread volatile sig_atomic_t got_usr1;
static void on_usr1(int s) { (void)s; got_usr1 = 1; }
static volatile int kill_ready;
static void *target(void *arg) {
    (void)arg;
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &s, 0);   /* this thread only */
    __atomic_store_n(&kill_ready, 1, __ATOMIC_SEQ_CST);
    while (!got_usr1) sched_yield();
    return (void *)(long)got_usr1;
}

static void *quick(void *arg) { return (void *)((long)arg * 3); }

/* exit_group from a thread while the others wait in futex calls. */
static int never;
static pthread_barrier_t bar;
static void *sleeper(void *arg) {
    (void)arg;
    pthread_barrier_wait(&bar);
    for (;;) syscall(SYS_futex, &never, FUTEX_WAIT_PRIVATE, 0, 0, 0, 0);
    return 0;
}
static void *exiter(void *arg) {
    (void)arg;
    pthread_barrier_wait(&bar);
    exit(7);
}

/* exit_group from a thread while main waits in a read of a FIFO no one writes. */
static void *late_exiter(void *arg) {
    (void)arg;
    for (int i = 0; i < 1000; i++) sched_yield();   /* not needed for the outcome */
    exit(9);
}

/* Address-space changes one thread makes, seen by another that used the old mapping. */
static char *volatile shared_page;
static int phase;
static void wait_phase(int p) { while (__atomic_load_n(&phase, __ATOMIC_SEQ_CST) != p) sched_yield(); }
static void set_phase(int p) { __atomic_store_n(&phase, p, __ATOMIC_SEQ_CST); }
static void *remapper(void *arg) {
    (void)arg;
    char *p = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    p[0] = 'A';
    shared_page = p;
    set_phase(1);
    wait_phase(2);
    munmap(p, 4096);
    char *q = mmap(p, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    q[0] = 'B';
    set_phase(3);
    wait_phase(4);
    mprotect(q, 4096, PROT_READ);
    set_phase(5);
    return 0;
}

static pthread_mutex_t hold = PTHREAD_MUTEX_INITIALIZER;
static void *holder(void *arg) {
    (void)arg;
    pthread_mutex_lock(&hold);
    pthread_mutex_unlock(&hold);
    return 0;
}

int main(int argc, char **argv) {
    const char *what = argc > 1 ? argv[1] : "all";
    if (!strcmp(what, "exitgroup")) {
        pthread_t t[4];
        pthread_barrier_init(&bar, 0, 4);
        for (int i = 0; i < 3; i++) pthread_create(&t[i], 0, sleeper, 0);
        pthread_create(&t[3], 0, exiter, 0);
        pthread_join(t[0], 0);
        return 1;
    }
    if (!strcmp(what, "readblock") || !strcmp(what, "pollblock")) {
        int fd = open(argv[2], O_RDWR);   /* a writer too: the read never sees EOF */
        if (fd < 0) { perror("open"); return 2; }
        pthread_t t;
        pthread_create(&t, 0, late_exiter, 0);
        char c;
        struct pollfd p = { fd, POLLIN, 0 };
        if (what[0] == 'p') poll(&p, 1, -1);
        else read(fd, &c, 1);
        return 1;
    }
    if (!strcmp(what, "remap")) {
        pthread_t t;
        pthread_create(&t, 0, remapper, 0);
        wait_phase(1);
        printf("before munmap: %c\n", shared_page[0]);
        set_phase(2);
        wait_phase(3);
        printf("after remap: %c\n", shared_page[0]);
        set_phase(4);
        wait_phase(5);
        printf("after mprotect: %c, now a store\n", shared_page[0]);
        fflush(stdout);
        shared_page[0] = 'C';   /* SIGSEGV: read-only since the other thread's mprotect */
        printf("the store went through\n");
        return 0;
    }
    if (!strcmp(what, "hang")) {
        pthread_t t;
        pthread_barrier_init(&bar, 0, 1);
        pthread_create(&t, 0, sleeper, 0);
        pthread_join(t, 0);
        return 1;
    }
    if (!strcmp(what, "limit")) {
        /* Threads wait on a mutex main holds; main creates them until refused. */
        pthread_mutex_lock(&hold);
        static pthread_t t[200];
        int n = 0, err = 0;
        pthread_attr_t small;
        pthread_attr_init(&small);
        pthread_attr_setstacksize(&small, 65536);
        while (n < 200) {
            err = pthread_create(&t[n], &small, holder, 0);
            if (err) break;
            n++;
        }
        printf("created %d then %s\n", n, err == EAGAIN ? "EAGAIN" : err ? strerror(err) : "none");
        pthread_mutex_unlock(&hold);
        for (int i = 0; i < n; i++) pthread_join(t[i], 0);
        printf("joined %d\n", n);
        return 0;
    }
    iters = argc > 2 ? atol(argv[2]) : 1000;
    rounds = argc > 3 ? atol(argv[3]) : 200;
    slots = calloc(N, sizeof *slots);
    pthread_t t[N];
    for (long i = 0; i < N; i++)
        if (pthread_create(&t[i], 0, worker, (void *)i)) { printf("create failed\n"); return 1; }
    for (int i = 0; i < N; i++) {
        void *r;
        pthread_join(t[i], &r);
        printf("%s\n", (char *)r);
        free(r);
    }
    long sum = 0;
    for (int i = 0; i < N; i++) sum += slots[i];
    printf("counter %ld atomic %ld slots %ld (want %ld)\n", counter, atomic_counter, sum, N * iters);
    printf("main tls %ld\n", tls_val);

    pthread_t a, b;
    pthread_create(&a, 0, pinger, (void *)0L);
    pthread_create(&b, 0, pinger, (void *)1L);
    void *ra, *rb;
    pthread_join(a, &ra);
    pthread_join(b, &rb);
    printf("ping-pong %d rounds, returns %ld %ld\n", rounds_done, (long)ra, (long)rb);

    signal(SIGUSR1, on_usr1);
    pthread_t k;
    pthread_create(&k, 0, target, 0);
    while (!__atomic_load_n(&kill_ready, __ATOMIC_SEQ_CST)) sched_yield();
    pthread_kill(k, SIGUSR1);
    void *rk;
    pthread_join(k, &rk);
    sigset_t cur;
    pthread_sigmask(SIG_BLOCK, 0, &cur);
    printf("thread got its signal %ld, main got one %d, main blocks SIGUSR2 %d\n",
           (long)rk, (int)got_usr1, sigismember(&cur, SIGUSR2));

    long total = 0;
    for (long i = 0; i < 150; i++) {
        pthread_t q;
        void *r;
        if (pthread_create(&q, 0, quick, (void *)i)) { printf("quick %ld failed\n", i); return 1; }
        pthread_join(q, &r);
        total += (long)r;
    }
    printf("150 threads one after another: %ld\n", total);
    cpu_set_t cs;
    printf("affinity %d\n", sched_getaffinity(0, sizeof cs, &cs) == 0 && CPU_COUNT(&cs) > 0);
    return 0;
}
"#;

fn native(exe: &std::path::Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new(exe).args(args).output().unwrap();
    assert!(out.status.success(), "native {args:?}: {:?}", out.status);
    out.stdout
}

#[test]
fn pthreads_match_native_untracked_and_tracked() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("threads");
    let exe = build(&d.0, "threads", THREADS_C, &["-pthread"]);
    for (mode, args) in [
        (Mode::Untracked, ["all", "20000", "2000"]),
        (Mode::StackHeapData, ["all", "300", "100"]),
        (Mode::Writable, ["all", "50", "20"]),
    ] {
        let want = native(&exe, &args);
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let run = run_guest(kvm, &exe, &args, &d.0, Input::Null, mode);
        let o = &run.outcome;
        note(&format!(
            "   threads {mode:?}: {} exits, {} syscalls, {} trapped stores, {} atomic rmws, oracle {:?}",
            o.stats.exits,
            o.stats.syscalls.total(),
            o.stats.vm.trapped_writes,
            o.stats.vm.atomic_rmws,
            run.oracle
                .as_ref()
                .map(|r| (r.vcpu_events, r.device_events, r.replayed))
        ));
        assert_eq!(
            o.end,
            ProcessEnd::Exited(0),
            "{mode:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&want),
            "{mode:?}: output differs from native"
        );
        assert_eq!(o.stats.syscalls.unknown, Default::default(), "{mode:?}");
        if let Some(r) = &run.oracle {
            r.assert_holds(&format!("threads {mode:?}"));
        }
    }
}

/// Heap and data tracked while six threads hammer a mutex-protected and an atomic counter:
/// the locked read-modify-writes of several vCPUs on the same tracked frames must all land,
/// and every event replay.
#[test]
fn threads_hammering_tracked_memory_replay_exactly() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("threads-replay");
    let exe = build(&d.0, "threads", THREADS_C, &["-pthread"]);
    let args = ["all", "1000", "20"];
    let want = native(&exe, &args);
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let cfg = ProcessConfig::new(&exe)
        .args(args)
        .env(ENV)
        .dir(&d.0)
        .stdin(Input::Null)
        .stdout(Output::Capture)
        .stderr(Output::Capture)
        .track([Region::Heap, Region::Data])
        .timeout(Some(super::RUN_TIMEOUT));
    let run = run_config(kvm, cfg);
    let o = &run.outcome;
    assert_eq!(o.end, ProcessEnd::Exited(0));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&want)
    );
    assert!(
        o.stats.vm.atomic_rmws > 0,
        "no locked rmw trapped: {:?}",
        o.stats.vm
    );
    let r = run.oracle.unwrap();
    r.assert_holds("threads hammering heap and data");
}

#[test]
fn exit_group_from_a_thread_ends_threads_waiting_in_futex() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("threads-exitgroup");
    let exe = build(&d.0, "threads", THREADS_C, &["-pthread"]);
    let status = Command::new(&exe).arg("exitgroup").status().unwrap();
    assert_eq!(status.code(), Some(7), "native");
    for mode in [Mode::Untracked, Mode::StackHeapData] {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let run = run_guest(kvm, &exe, &["exitgroup"], &d.0, Input::Null, mode);
        assert_eq!(run.outcome.end, ProcessEnd::Exited(7), "{mode:?}");
        if let Some(r) = &run.oracle {
            assert!(r.errors.is_empty(), "{:?}", r.errors);
            assert_eq!(r.replayed, r.frames);
        }
    }
}

/// munmap, a `MAP_FIXED` remap and mprotect by one thread reach a thread that used the old
/// mapping before it runs again: it reads the new page, and its store to the page made
/// read-only faults, as natively.
#[test]
fn address_space_changes_by_one_thread_reach_the_others() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("threads-remap");
    let exe = build(&d.0, "threads", THREADS_C, &["-pthread"]);
    let out = Command::new(&exe).arg("remap").output().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(11), "native");
    for mode in [Mode::Untracked, Mode::Writable] {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let run = run_guest(kvm, &exe, &["remap"], &d.0, Input::Null, mode);
        assert!(
            matches!(run.outcome.end, ProcessEnd::Signaled { signal: 11, .. }),
            "{mode:?}: {:?}",
            run.outcome.end
        );
        assert_eq!(
            String::from_utf8_lossy(&run.outcome.stdout),
            String::from_utf8_lossy(&out.stdout),
            "{mode:?}"
        );
    }
}

/// A thread waiting in a read or a poll of a FIFO waits without the kernel's lock: another
/// thread's `exit_group` ends the run (before the timeout, which would be status 124).
#[test]
fn exit_group_from_a_thread_ends_a_thread_waiting_for_input() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("threads-readblock");
    let exe = build(&d.0, "threads", THREADS_C, &["-pthread"]);
    let fifo = d.fifo("fifo");
    let fifo = fifo.as_str();
    for what in ["readblock", "pollblock"] {
        let status = Command::new(&exe).args([what, fifo]).status().unwrap();
        assert_eq!(status.code(), Some(9), "native");
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let cfg = ProcessConfig::new(&exe)
            .args([what, fifo])
            .env(ENV)
            .dir(&d.0)
            .allow_write(&d.0)
            .stdin(Input::Null)
            .stdout(Output::Capture)
            .stderr(Output::Capture)
            .timeout(Some(Duration::from_secs(60)));
        let run = run_config(kvm, cfg);
        assert_eq!(
            run.outcome.end,
            ProcessEnd::Exited(9),
            "{what}: {}",
            String::from_utf8_lossy(&run.outcome.stderr)
        );
    }
}

#[test]
fn a_thread_blocked_forever_meets_the_timeout() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("threads-hang");
    let exe = build(&d.0, "threads", THREADS_C, &["-pthread"]);
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let cfg = ProcessConfig::new(&exe)
        .args(["hang"])
        .env(ENV)
        .dir(&d.0)
        .stdin(Input::Null)
        .stdout(Output::Capture)
        .stderr(Output::Capture)
        .timeout(Some(Duration::from_secs(1)));
    let run = run_config(kvm, cfg);
    assert!(
        matches!(run.outcome.end, ProcessEnd::Timeout(_)),
        "{:?}",
        run.outcome.end
    );
    assert_eq!(run.outcome.end.status(), 124);
}

#[test]
fn threads_beyond_the_limit_get_eagain() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("threads-limit");
    let exe = build(&d.0, "threads", THREADS_C, &["-pthread"]);
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let run = run_guest(kvm, &exe, &["limit"], &d.0, Input::Null, Mode::Untracked);
    assert_eq!(run.outcome.end, ProcessEnd::Exited(0));
    assert_eq!(
        String::from_utf8_lossy(&run.outcome.stdout),
        "created 63 then EAGAIN\njoined 63\n",
        "64 threads with main"
    );
}
