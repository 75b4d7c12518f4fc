/* Address-space changes under threads that block, take signals, exit the process, or hammer
 * tracked memory with plain and locked stores (issue 13's address-space lock, second review).
 * Every mode prints only what a native run prints: counts that native semantics fix. */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <fcntl.h>
#include <unistd.h>

static volatile int done;
static volatile uint64_t *H;   /* hammered page */
static uint32_t *W;            /* futex word page */
static unsigned char *R;       /* read() target page */
static volatile long handled;  /* SIGUSR1 handler runs */
static volatile uint64_t *S;   /* page the handler writes */
static int pipefd[2];
static volatile pid_t sleeper_tid, hammer_tid;

static void *anon(size_t n) {
    void *p = mmap(0, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) { perror("mmap"); exit(3); }
    return p;
}

static void on_usr1(int s) {
    (void)s;
    S[handled & 511] = 0xabc0000 + (uint64_t)handled;
    handled++;
}

static void *hammer(void *arg) {
    long id = (long)arg;
    hammer_tid = (pid_t)syscall(SYS_gettid);
    uint64_t n = 0;
    while (!done) { H[id * 8 + (n & 7)] = n; n++; }
    return 0;
}

static void *waiter(void *arg) {
    (void)arg;
    while (__atomic_load_n(W, __ATOMIC_SEQ_CST) == 0)
        syscall(SYS_futex, W, FUTEX_WAIT_PRIVATE, 0, 0, 0, 0);
    W[1] = 0x77;
    return 0;
}

static volatile int stop_reading;
static int read_loop;
static const char *data_path = "r13b.dat";
static void *reader(void *arg) {
    (void)arg;
    long got = 0;
    /* read() into a buffer straddling two tracked pages: in a loop while the main thread
     * churns ("loop"), or once after it (having waited on a futex meanwhile) */
    if (!read_loop) {
        while (__atomic_load_n(W, __ATOMIC_SEQ_CST) == 0)
            syscall(SYS_futex, W, FUTEX_WAIT_PRIVATE, 0, 0, 0, 0);
        return (void *)pread(pipefd[0], R + 4090, 16, 0);
    }
    while (!stop_reading) {
        memset(R + 4090, 0, 16);
        got = pread(pipefd[0], R + 4090, 16, 0);
        if (got != 16) break;
    }
    return (void *)got;
}

static void *sleeper(void *arg) {
    (void)arg;
    sleeper_tid = (pid_t)syscall(SYS_gettid);
    struct timespec ts = {0, 200000};
    /* an alternate stack in a tracked mapping: signal frames are pushed onto it */
    stack_t ss = {.ss_sp = anon(65536), .ss_size = 65536};
    sigaltstack(&ss, 0);
    while (!done) nanosleep(&ts, 0);
    return 0;
}

static void churn(int rounds, void *fixed) {
    for (int r = 0; r < rounds; r++) {
        void *a = anon(3 * 4096);
        ((volatile char *)a)[4096] = 1;
        munmap(a, 4096);
        mremap((char *)a + 4096, 2 * 4096, 4096, 0);
        munmap((char *)a + 4096, 4096);
        mmap(fixed, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        mprotect((void *)W, 4096, PROT_READ);
        mprotect((void *)W, 4096, PROT_READ | PROT_WRITE);
        void *b = sbrk(0);
        sbrk(8192);
        ((volatile char *)b)[100] = 1;
        sbrk(-8192);
        madvise(a, 4096, MADV_DONTNEED);
        if (sleeper_tid && r % 16 == 0) syscall(SYS_tgkill, getpid(), sleeper_tid, SIGUSR1);
    }
}

static int blocked(int rounds) {
    H = anon(4096);
    W = anon(4096);
    R = anon(8192);
    S = anon(4096);
    void *spare = anon(4096);
    struct sigaction sa = {.sa_handler = on_usr1, .sa_flags = SA_ONSTACK | SA_RESTART};
    sigaction(SIGUSR1, &sa, 0);
    pipefd[1] = open(data_path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (pipefd[1] < 0 || write(pipefd[1], "0123456789abcdef", 16) != 16) return 2;
    pipefd[0] = open(data_path, O_RDONLY);
    if (pipefd[0] < 0) return 2;
    pthread_t th[5];
    pthread_create(&th[0], 0, hammer, (void *)0);
    pthread_create(&th[1], 0, hammer, (void *)1);
    pthread_create(&th[2], 0, waiter, 0);
    pthread_create(&th[3], 0, reader, 0);
    pthread_create(&th[4], 0, sleeper, 0);
    while (!sleeper_tid) sched_yield();
    churn(rounds, spare);
    __atomic_store_n(W, 1, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, W, FUTEX_WAKE_PRIVATE, 2, 0, 0, 0);
    stop_reading = 1;
    void *got = 0;
    pthread_join(th[2], 0);
    pthread_join(th[3], &got);
    done = 1;
    pthread_join(th[0], 0);
    pthread_join(th[1], 0);
    pthread_join(th[4], 0);
    long sane = 0;
    for (long i = 0; i < handled && i < 512; i++) sane += S[i] == 0xabc0000 + (uint64_t)i;
    printf("blocked: read %ld bytes '%.16s', futex word %#x, handler ran %s, frames %s\n",
           (long)got, (char *)R + 4090, W[1], handled > 0 ? "yes" : "no",
           sane == (handled < 512 ? handled : 512) ? "sane" : "CORRUPT");
    return 0;
}

static void *exiter(void *arg) {
    (void)arg;
    while (__atomic_load_n(W, __ATOMIC_SEQ_CST) < 300) sched_yield();
    syscall(SYS_exit_group, 7);
    return 0;
}

static int exitgroup(void) {
    H = anon(4096);
    W = anon(4096);
    void *spare = anon(4096);
    pthread_t th[3];
    pthread_create(&th[0], 0, hammer, (void *)0);
    pthread_create(&th[1], 0, hammer, (void *)1);
    pthread_create(&th[2], 0, exiter, 0);
    printf("exitgroup: started\n");
    for (int r = 0;; r++) {
        __atomic_store_n(W, (uint32_t)r, __ATOMIC_SEQ_CST);
        churn(1, spare);
    }
    return 0;
}

#define MANY 63 /* with the main thread: 64, pagetrack's limit */
#define PER 10
static uint64_t *counter; /* tracked: lock xadd re-executed by pagetrack */

static void *many_body(void *arg) {
    long id = (long)arg, bad = 0;
    for (int r = 0; r < PER; r++) {
        uint64_t *p = anon(4096);
        for (int i = 0; i < 512; i++) p[i] = (uint64_t)id << 32 | (uint64_t)(r * 512 + i);
        for (int i = 0; i < 512; i++) bad += p[i] != ((uint64_t)id << 32 | (uint64_t)(r * 512 + i));
        __atomic_fetch_add(&counter[id % 8], 1, __ATOMIC_SEQ_CST);
        uint64_t old = counter[8];
        while (!__atomic_compare_exchange_n(&counter[8], &old, old + 3, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {}
        __atomic_exchange_n(&counter[9 + id], (uint64_t)r, __ATOMIC_SEQ_CST);
        munmap(p, 4096);
    }
    return (void *)bad;
}

static int many(void) {
    counter = anon(4096);
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setstacksize(&at, 65536);
    pthread_t th[MANY];
    for (long i = 0; i < MANY; i++)
        { int e = pthread_create(&th[i], &at, many_body, (void *)i); if (e) { printf("create %ld failed: %s\n", i, strerror(e)); return 2; } }
    long bad = 0;
    for (int i = 0; i < MANY; i++) { void *b; pthread_join(th[i], &b); bad += (long)b; }
    uint64_t sum = 0, last = 0;
    for (int i = 0; i < 8; i++) sum += counter[i];
    for (int i = 0; i < MANY; i++) last += counter[9 + i];
    printf("many: %d threads, %ld bad words, xadd %llu, cmpxchg %llu, xchg %llu\n", MANY, bad,
           (unsigned long long)sum, (unsigned long long)counter[8], (unsigned long long)last);
    return 0;
}

/* Not compared with native: iterations of a munmap loop in `secs` seconds with `k` hammers. */
static int starve(int k, double secs) {
    H = anon(4096);
    W = anon(4096);
    void *spare = anon(4096);
    pthread_t th[8];
    for (long i = 0; i < k; i++) pthread_create(&th[i], 0, hammer, (void *)i);
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    long n = 0;
    do {
        void *a = anon(4096);
        ((volatile char *)a)[0] = 1;
        munmap(a, 4096);
        n++;
        clock_gettime(CLOCK_MONOTONIC, &t);
    } while ((t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9 < secs);
    done = 1;

    for (long i = 0; i < k; i++) pthread_join(th[i], 0);

    (void)spare;
    printf("starve: %d hammers, %ld munmap iterations in %.1f s\n", k, n, secs);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, 0, _IONBF, 0);
    const char *m = argc > 1 ? argv[1] : "blocked";
    read_loop = argc > 3 && !strcmp(argv[3], "loop");
    if (argc > 4) data_path = argv[4]; /* blocked ROUNDS once|loop FILE */
    if (!strcmp(m, "blocked")) return blocked(argc > 2 ? atoi(argv[2]) : 500);
    if (!strcmp(m, "exitgroup")) return exitgroup();
    if (!strcmp(m, "many")) return many();
    if (!strcmp(m, "starve")) return starve(argc > 2 ? atoi(argv[2]) : 4, argc > 3 ? atof(argv[3]) : 2);
    return 2;
}
