/* Review of issue 13's threads, as a hostile program's author would attack them. Each
 * subcommand prints lines that must match a native run (or ends as a native run does). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/select.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <linux/futex.h>
#include <linux/sched.h>

static const char *ename(long r) {
    if (r >= 0) return "ok";
    switch (-r) {
    case EINVAL: return "EINVAL"; case EPERM: return "EPERM"; case EFAULT: return "EFAULT";
    case EAGAIN: return "EAGAIN"; case E2BIG: return "E2BIG"; case ENOSYS: return "ENOSYS";
    case ETIMEDOUT: return "ETIMEDOUT"; case EINTR: return "EINTR"; case ESRCH: return "ESRCH";
    case ENOMEM: return "ENOMEM";
    default: return "other";
    }
}

static long sys(long n, long a, long b, long c, long d, long e, long f) {
    long r = syscall(n, a, b, c, d, e, f);
    return r < 0 ? -errno : r;
}

/* Raw thread creation: the child calls fn on its own stack, then SYS_exit(0). */
static long raw_clone(long flags, void *stack, void *ptid, void *ctid, long tls, void (*fn)(void)) {
    long ret;
    register long r10 asm("r10") = (long)ctid;
    register long r8 asm("r8") = tls;
    register long r12 asm("r12") = (long)fn;
    asm volatile("syscall\n\t"
                 "test %%rax, %%rax\n\t"
                 "jnz 1f\n\t"
                 "call *%%r12\n\t"
                 "mov $60, %%eax\n\t"
                 "xor %%edi, %%edi\n\t"
                 "syscall\n\t"
                 "ud2\n"
                 "1:"
                 : "=a"(ret)
                 : "a"(SYS_clone), "D"(flags), "S"(stack), "d"(ptid), "r"(r10), "r"(r8), "r"(r12)
                 : "rcx", "r11", "memory");
    return ret;
}

static long raw_clone3(struct clone_args *ca, size_t size, void (*fn)(void)) {
    long ret;
    register long r12 asm("r12") = (long)fn;
    asm volatile("syscall\n\t"
                 "test %%rax, %%rax\n\t"
                 "jnz 1f\n\t"
                 "call *%%r12\n\t"
                 "mov $60, %%eax\n\t"
                 "xor %%edi, %%edi\n\t"
                 "syscall\n\t"
                 "ud2\n"
                 "1:"
                 : "=a"(ret)
                 : "a"(435), "D"(ca), "S"(size), "r"(r12)
                 : "rcx", "r11", "memory");
    return ret;
}

#define THREAD_FLAGS (CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM)

static volatile int child_ran;
static void child_fn(void) { child_ran = 1; }

static char *new_stack(void) {
    char *s = mmap(0, 65536, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return s + 65536;
}

/* Waits for the word a CLONE_CHILD_CLEARTID child clears. */
static void wait_clear(volatile int *w) {
    while (*w) syscall(SYS_futex, w, FUTEX_WAIT, *w, 0, 0, 0);
}

static void *ro_page(int fill) {
    int *p = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (int i = 0; i < 1024; i++) p[i] = fill;
    mprotect(p, 4096, PROT_READ);
    return p;
}

static long one_clone(const char *name, long flags, void *ptid, long tls) {
    static volatile int ctid;
    ctid = 1;
    child_ran = 0;
    long r = raw_clone(flags | CLONE_CHILD_CLEARTID, new_stack(), ptid, (void *)&ctid, tls, child_fn);
    if (r > 0) wait_clear(&ctid);
    printf("%s: %s ran %d\n", name, ename(r < 0 ? r : 0), child_ran);
    return r;
}

static int clone_odd(void) {
    one_clone("plain", THREAD_FLAGS, 0, 0);
    one_clone("no sighand", CLONE_VM | CLONE_FILES | CLONE_FS | CLONE_THREAD, 0, 0);
    one_clone("thread without vm", CLONE_SIGHAND | CLONE_THREAD, 0, 0);
    one_clone("settls kernel", THREAD_FLAGS | CLONE_SETTLS, 0, (long)0xffff888000000000UL);
    one_clone("settls noncanonical", THREAD_FLAGS | CLONE_SETTLS, 0, (long)0x8000000000000000UL);
    int *ro = ro_page(0x11111111);
    one_clone("parent_settid read-only", THREAD_FLAGS | CLONE_PARENT_SETTID, ro, 0);
    printf("read-only word after: %x\n", ro[0]);
    one_clone("parent_settid unmapped", THREAD_FLAGS | CLONE_PARENT_SETTID, (void *)0x10000, 0);
    one_clone("parent_settid kernel", THREAD_FLAGS | CLONE_PARENT_SETTID, (void *)0xffffffff81000000UL, 0);
    return 0;
}

static int settid_tracked(void) {
    /* Tid words in tracked memory (heap, data, stack): the VMM's stores are tracked too. */
    static int data_word;
    int *heap_word = malloc(sizeof *heap_word);
    volatile int stack_word = 0;
    long r = one_clone("parent_settid heap", THREAD_FLAGS | CLONE_PARENT_SETTID, heap_word, 0);
    printf("heap word is the tid %d\n", r > 0 && *heap_word == r);
    r = one_clone("parent_settid data", THREAD_FLAGS | CLONE_PARENT_SETTID, &data_word, 0);
    printf("data word is the tid %d\n", r > 0 && data_word == r);
    r = one_clone("parent_settid stack", THREAD_FLAGS | CLONE_PARENT_SETTID, (void *)&stack_word, 0);
    printf("stack word is the tid %d\n", r > 0 && stack_word == r);
    return 0;
}

/* A bad child stack: the child's first push faults, which ends the process with SIGSEGV. */
static int clone_badstack(const char *which) {
    void *s = !strcmp(which, "unmapped") ? (void *)0x20000 : (void *)0x8000000000001000UL;
    static volatile int ctid = 1;
    long r = raw_clone(THREAD_FLAGS | CLONE_CHILD_CLEARTID, s, 0, (void *)&ctid, 0, child_fn);
    if (r <= 0) { printf("clone %s\n", ename(r)); return 0; }
    wait_clear(&ctid);
    printf("child survived\n");
    return 0;
}

/* set_tid_address to a read-only page: natively the clear at exit fails silently. */
static void cleartid_fn(void) {
    extern int *cleartid_target;
    syscall(SYS_set_tid_address, cleartid_target);
}
int *cleartid_target;
static int cleartid_ro(void) {
    cleartid_target = ro_page(0x22222222);
    static volatile int ctid = 1;
    long tid = raw_clone(THREAD_FLAGS, new_stack(), 0, 0, 0, cleartid_fn);
    if (tid <= 0) { printf("clone %s\n", ename(tid)); return 1; }
    /* Until the thread is gone. */
    while (sys(SYS_tgkill, getpid(), tid, 0, 0, 0, 0) == 0) sched_yield();
    (void)ctid;
    printf("read-only clear-tid word after exit: %x\n", cleartid_target[0]);
    return 0;
}

static int clone3_bad(void) {
    struct {
        struct clone_args a;
        char tail[64];
    } b;
    static volatile int ctid;
#define C3(name, size, mod) do { \
        memset(&b, 0, sizeof b); \
        ctid = 1; child_ran = 0; \
        b.a.flags = THREAD_FLAGS | CLONE_CHILD_CLEARTID; \
        b.a.child_tid = (uint64_t)(uintptr_t)&ctid; \
        char *top = new_stack(); \
        b.a.stack = (uint64_t)(uintptr_t)(top - 65536); \
        b.a.stack_size = 65536; \
        mod; \
        long r = raw_clone3(&b.a, size, child_fn); \
        if (r > 0) wait_clear(&ctid); \
        printf("clone3 %s: %s ran %d\n", name, ename(r < 0 ? r : 0), child_ran); \
    } while (0)
    C3("good", sizeof(struct clone_args), (void)0);
    C3("size 63", 63, (void)0);
    C3("size 4097", 4097, (void)0);
    C3("size 96 nonzero tail", 96, b.tail[4] = 1);
    C3("size 96 zero tail", 96, (void)0);
    C3("stack with size 0", sizeof(struct clone_args), b.a.stack = (uint64_t)(uintptr_t)top; b.a.stack_size = 0);
    C3("stack overflowing", sizeof(struct clone_args), b.a.stack = ~0UL - 16; b.a.stack_size = 4096);
    C3("flags beyond 32 bits", sizeof(struct clone_args), b.a.flags |= 1UL << 40);
    long r = sys(435, 0x10000, sizeof(struct clone_args), 0, 0, 0, 0);
    printf("clone3 unmapped args: %s\n", ename(r));
    return 0;
}

static int futex_odd(void) {
    static int w[4] = {0, 5, 0, 0};
    int *ro = ro_page(7);
    struct timespec t;
#define F(name, ...) printf("futex %s: %s\n", name, ename(sys(SYS_futex, __VA_ARGS__)))
    F("unaligned", (long)((char *)w + 1), FUTEX_WAIT, 0, 0, 0, 0);
    F("unmapped wait", 0x10000, FUTEX_WAIT, 0, 0, 0, 0);
    F("kernel wait", (long)0xffffffff81000000UL, FUTEX_WAIT, 0, 0, 0, 0);
    F("read-only mismatch", (long)ro, FUTEX_WAIT_PRIVATE, 1, 0, 0, 0);
    t = (struct timespec){0, 1000000};
    F("read-only timeout", (long)ro, FUTEX_WAIT_PRIVATE, 7, (long)&t, 0, 0);
    t = (struct timespec){-1, 0};
    F("negative timeout", (long)w, FUTEX_WAIT_PRIVATE, 0, (long)&t, 0, 0);
    t = (struct timespec){0, 1000000000};
    F("nsec 1e9", (long)w, FUTEX_WAIT_PRIVATE, 0, (long)&t, 0, 0);
    F("timeout unmapped", (long)w, FUTEX_WAIT_PRIVATE, 0, 0x10000, 0, 0);
    t = (struct timespec){0, 1};
    F("bitset absolute past", (long)w, FUTEX_WAIT_BITSET_PRIVATE, 0, (long)&t, 0, -1);
    F("bitset 0", (long)w, FUTEX_WAIT_BITSET_PRIVATE, 0, 0, 0, 0);
    F("wake bitset 0", (long)w, FUTEX_WAKE_BITSET_PRIVATE, 1, 0, 0, 0);
    F("wake unmapped private", 0x10000, FUTEX_WAKE_PRIVATE, 1, 0, 0, 0);
    F("wait realtime flag", (long)w, FUTEX_WAIT | FUTEX_CLOCK_REALTIME, 1, 0, 0, 0);
    F("cmp_requeue mismatch", (long)w, FUTEX_CMP_REQUEUE_PRIVATE, 1, 1, (long)&w[2], 99);
    F("requeue unaligned target", (long)w, FUTEX_REQUEUE_PRIVATE, 1, 1, (long)((char *)w + 2), 0);
    F("requeue to itself", (long)w, FUTEX_REQUEUE_PRIVATE, 0, 100, (long)w, 0);
    F("op 99", (long)w, 99, 0, 0, 0, 0);
    return 0;
}

/* Two waiters requeued back and forth between two words many times, then woken. */
static int fa, fb, woke_count;
static void *fwaiter(void *arg) {
    (void)arg;
    while (__atomic_load_n(&fa, __ATOMIC_SEQ_CST) == 0) syscall(SYS_futex, &fa, FUTEX_WAIT_PRIVATE, 0, 0, 0, 0);
    __atomic_fetch_add(&woke_count, 1, __ATOMIC_SEQ_CST);
    return 0;
}
static int requeue_loop(void) {
    pthread_t t[2];
    for (int i = 0; i < 2; i++) pthread_create(&t[i], 0, fwaiter, 0);
    for (int i = 0; i < 5000; i++) {
        syscall(SYS_futex, &fa, FUTEX_REQUEUE_PRIVATE, 0, 2, &fb, 0);
        syscall(SYS_futex, &fb, FUTEX_REQUEUE_PRIVATE, 0, 2, &fa, 0);
    }
    __atomic_store_n(&fa, 1, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, &fa, FUTEX_WAKE_PRIVATE, 10, 0, 0, 0);
    syscall(SYS_futex, &fb, FUTEX_WAKE_PRIVATE, 10, 0, 0, 0);
    for (int i = 0; i < 2; i++) pthread_join(t[i], 0);
    printf("requeue loop: %d woke\n", woke_count);
    return 0;
}

/* A huge futex timeout, a wake from another thread ends it. */
static int hw;
static void *hwaker(void *arg) {
    (void)arg;
    for (int i = 0; i < 100; i++) sched_yield();
    __atomic_store_n(&hw, 1, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, &hw, FUTEX_WAKE_PRIVATE, 1, 0, 0, 0);
    return 0;
}
static int huge_timeout(void) {
    pthread_t t;
    pthread_create(&t, 0, hwaker, 0);
    struct timespec ts = {0x7fffffffffffffffL, 999999999};
    while (!__atomic_load_n(&hw, __ATOMIC_SEQ_CST)) {
        long r = sys(SYS_futex, (long)&hw, FUTEX_WAIT_PRIVATE, 0, (long)&ts, 0, 0);
        if (r < 0 && r != -EAGAIN && r != -EINTR) { printf("wait %s\n", ename(r)); return 1; }
    }
    pthread_join(t, 0);
    printf("huge timeout woken\n");
    return 0;
}

/* tgkill to a thread blocked in a futex wait; its handler runs and it returns. */
static __thread volatile sig_atomic_t got;
static volatile int tid_ready, fw;
static void on_usr1(int s) { (void)s; got = 1; }
static void *fblocked(void *arg) {
    (void)arg;
    tid_ready = gettid();
    long r = 0;
    while (!got) r = sys(SYS_futex, (long)&fw, FUTEX_WAIT_PRIVATE, 0, 0, 0, 0);
    (void)r;
    return (void *)(long)got;
}
static int tgkill_futex(void) {
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, 0);
    pthread_t t;
    pthread_create(&t, 0, fblocked, 0);
    while (!tid_ready) sched_yield();
    for (int i = 0; i < 50; i++) sched_yield();
    syscall(SYS_tgkill, getpid(), tid_ready, SIGUSR1);
    void *r;
    pthread_join(t, &r);
    printf("thread took its signal %ld, main %d\n", (long)r, (int)got);
    printf("tgkill sig 65: %s\n", ename(sys(SYS_tgkill, getpid(), getpid(), 65, 0, 0, 0)));
    return 0;
}

/* SIGKILL raised by a thread while main waits in a futex. */
static void *killer(void *arg) { (void)arg; raise(SIGKILL); return 0; }
static int raise_kill(void) {
    pthread_t t;
    pthread_create(&t, 0, killer, 0);
    static int never;
    for (;;) syscall(SYS_futex, &never, FUTEX_WAIT_PRIVATE, 0, 0, 0, 0);
}

/* Per-thread sigaltstack. */
static __thread char *alt_lo;
static __thread volatile int on_alt = -1;
static void on_usr2(int s) {
    (void)s;
    char here;
    on_alt = alt_lo && &here >= alt_lo && &here < alt_lo + 65536;
}
static volatile int alt_ready;
static void *altthread(void *arg) {
    (void)arg;
    alt_lo = malloc(65536);
    stack_t ss = {.ss_sp = alt_lo, .ss_size = 65536, .ss_flags = 0};
    sigaltstack(&ss, 0);
    alt_ready = 1;
    while (on_alt < 0) sched_yield();
    return (void *)(long)on_alt;
}
static int altstack(void) {
    struct sigaction sa = {0};
    sa.sa_handler = on_usr2;
    sa.sa_flags = SA_ONSTACK;
    sigaction(SIGUSR2, &sa, 0);
    pthread_t t;
    pthread_create(&t, 0, altthread, 0);
    while (!alt_ready) sched_yield();
    pthread_kill(t, SIGUSR2);
    void *r;
    pthread_join(t, &r);
    raise(SIGUSR2);
    stack_t cur;
    sigaltstack(0, &cur);
    printf("thread on its altstack %ld, main on one %d, main altstack disabled %d\n", (long)r,
           on_alt, !!(cur.ss_flags & SS_DISABLE));
    return 0;
}

/* munmap of another thread's stack while it runs. */
static volatile int spin_started;
static void *spinner(void *arg) {
    (void)arg;
    volatile long local = 0;
    spin_started = 1;
    for (;;) local++;
    return 0;
}
static int unmap_stack(void) {
    size_t sz = 1 << 20;
    void *s = mmap(0, sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setstack(&a, s, sz);
    pthread_t t;
    pthread_create(&t, &a, spinner, 0);
    while (!spin_started) sched_yield();
    munmap(s, sz);
    pthread_join(t, 0);
    printf("spinner survived\n");
    return 0;
}

/* Stores to tracked heap pages while another thread keeps changing their protection (to
 * RWX and back, and its neighbour to read-only and back: the mapping splits and merges).
 * Every value must land. */
static int *hp;
static volatile int hp_done;
static void *storer(void *arg) {
    (void)arg;
    long bad = 0, rounds = 0;
    while (!hp_done || rounds < 50) {
        for (int k = 0; k < 1024; k++) hp[k] = (int)(rounds * 1024 + k);
        for (int k = 0; k < 1024; k++) bad += hp[k] != (int)(rounds * 1024 + k);
        rounds++;
    }
    return (void *)bad;
}
static int mprotect_race(void) {
    hp = aligned_alloc(4096, 8192);   /* brk heap */
    pthread_t t;
    pthread_create(&t, 0, storer, 0);
    char *next = (char *)hp + 4096;
    long errs = 0;
    for (int i = 0; i < 300; i++) {
        errs += mprotect(hp, 4096, PROT_READ | PROT_WRITE | PROT_EXEC) != 0;
        errs += mprotect(next, 4096, PROT_READ) != 0;
        sched_yield();
        errs += mprotect(hp, 4096, PROT_READ | PROT_WRITE) != 0;
        errs += mprotect(next, 4096, PROT_READ | PROT_WRITE) != 0;
    }
    hp_done = 1;
    void *bad;
    pthread_join(t, &bad);
    printf("mprotect race: %ld bad values, %ld mprotect errors\n", (long)bad, errs);
    return 0;
}

/* A thread spinning without system calls (optionally storing to tracked memory). */
static long *spin_heap;
static void *busy(void *arg) {
    if (arg) for (;;) (*spin_heap)++;
    for (;;) __asm__ volatile("" ::: "memory");
    return 0;
}
static int spin(int store) {
    spin_heap = malloc(64);
    pthread_t t;
    pthread_create(&t, 0, busy, store ? (void *)1 : 0);
    pthread_join(t, 0);
    return 1;
}

/* exit_group racing thread creation. */
static void *noop(void *arg) { return arg; }
static void *exit_soon(void *arg) { (void)arg; for (int i = 0; i < 20; i++) sched_yield(); exit(5); }
static int exit_race(void) {
    pthread_t e;
    pthread_create(&e, 0, exit_soon, 0);
    for (;;) {
        pthread_t t;
        if (pthread_create(&t, 0, noop, 0) == 0) pthread_detach(t);
    }
}

/* Huge thread stacks: creation fails cleanly when memory runs out. */
static pthread_mutex_t big_mu = PTHREAD_MUTEX_INITIALIZER;
static void *big_body(void *arg) {
    volatile char buf[4096];
    buf[0] = 1;
    (void)arg;
    pthread_mutex_lock(&big_mu);
    pthread_mutex_unlock(&big_mu);
    return 0;
}
static int big_stacks(long mib) {
    pthread_mutex_lock(&big_mu);
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setstacksize(&a, (size_t)mib << 20);
    static pthread_t t[100];
    int n = 0, err = 0;
    while (n < 100 && !(err = pthread_create(&t[n], &a, big_body, 0))) n++;
    pthread_mutex_unlock(&big_mu);
    for (int i = 0; i < n; i++) pthread_join(t[i], 0);
    printf("big stacks: created %d, then %s\n", n, err == EAGAIN ? "EAGAIN" : err == ENOMEM ? "ENOMEM" : err ? "other" : "none");
    return 0;
}

/* Blocking calls of one thread while another needs the kernel. */
static int fifo_fd;
static volatile int sel_started;
static void *selector(void *arg) {
    (void)arg;
    fd_set r;
    FD_ZERO(&r);
    FD_SET(fifo_fd, &r);
    struct timeval tv = {20, 0};
    sel_started = 1;
    int n = select(fifo_fd + 1, &r, 0, 0, &tv);
    return (void *)(long)n;
}
static int select_block(const char *fifo) {
    fifo_fd = open(fifo, O_RDWR);
    pthread_t t;
    pthread_create(&t, 0, selector, 0);
    while (!sel_started) sched_yield();
    struct timespec d = {0, 100000000};
    nanosleep(&d, 0);   /* not needed for the output: only makes the select wait first */
    write(fifo_fd, "x", 1);
    void *n;
    pthread_join(t, &n);
    printf("select saw %ld ready\n", (long)n);
    return 0;
}

static volatile int writer_started;
static void *full_writer(void *arg) {
    (void)arg;
    static char buf[1 << 20];
    writer_started = 1;
    long done = 0;
    while (done < (long)sizeof buf) {
        long k = write(fifo_fd, buf + done, sizeof buf - done);
        if (k <= 0) break;
        done += k;
    }
    return (void *)done;
}
static int write_full(const char *fifo) {
    fifo_fd = open(fifo, O_RDWR);
    pthread_t t;
    pthread_create(&t, 0, full_writer, 0);
    while (!writer_started) sched_yield();
    static char buf[65536];
    long got = 0;
    while (got < (1 << 20)) {
        long k = read(fifo_fd, buf, sizeof buf);
        if (k <= 0) break;
        got += k;
    }
    void *w;
    pthread_join(t, &w);
    printf("wrote %ld read %ld\n", (long)w, got);
    return 0;
}

static const char *lock_path;
static volatile int locked;
static void *ofd_waiter(void *arg) {
    (void)arg;
    int fd = open(lock_path, O_RDWR);
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1};
    long r = fcntl(fd, F_OFD_SETLKW, &fl);
    return (void *)r;
}
static int ofd_block(const char *path) {
    lock_path = path;
    int fd = open(path, O_RDWR | O_CREAT, 0600);
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1};
    if (fcntl(fd, F_OFD_SETLK, &fl)) { perror("lock"); return 1; }
    pthread_t t;
    pthread_create(&t, 0, ofd_waiter, 0);
    struct timespec d = {0, 200000000};
    nanosleep(&d, 0);   /* not needed for the output: only makes the other thread wait first */
    fl.l_type = F_UNLCK;
    long r = fcntl(fd, F_OFD_SETLK, &fl);
    void *w;
    pthread_join(t, &w);
    printf("unlock %ld, waiter got the lock %ld\n", r, (long)w);
    return 0;
}


/* clock_nanosleep(TIMER_ABSTIME) in a thread while another runs: it sleeps until then. */
static void *abs_sleeper(void *arg) {
    (void)arg;
    struct timespec now, until, after;
    clock_gettime(CLOCK_MONOTONIC, &now);
    until = now;
    until.tv_nsec += 200000000;
    if (until.tv_nsec >= 1000000000) { until.tv_sec++; until.tv_nsec -= 1000000000; }
    int r = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, 0);
    clock_gettime(CLOCK_MONOTONIC, &after);
    long reached = after.tv_sec > until.tv_sec || (after.tv_sec == until.tv_sec && after.tv_nsec >= until.tv_nsec);
    return (void *)(long)(r == 0 && reached);
}
static int abs_sleep(void) {
    pthread_t t;
    pthread_create(&t, 0, abs_sleeper, 0);
    void *ok;
    pthread_join(t, &ok);
    printf("absolute sleep in a thread reached its time %ld\n", (long)ok);
    return 0;
}

/* sigwait in one thread for a signal another thread sends. */
static volatile int sw_ready;
static void *sig_waiter(void *arg) {
    (void)arg;
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR1);
    int sig = 0;
    sw_ready = 1;
    sigwait(&s, &sig);
    return (void *)(long)sig;
}
static int sigwait_thread(void) {
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &s, 0);   /* inherited by the waiter */
    pthread_t t;
    pthread_create(&t, 0, sig_waiter, 0);
    while (!sw_ready) sched_yield();
    struct timespec d = {0, 100000000};
    nanosleep(&d, 0);   /* not needed for the output: only makes the sigwait wait first */
    pthread_kill(t, SIGUSR1);
    void *sig;
    pthread_join(t, &sig);
    printf("sigwait got %ld\n", (long)sig);
    return 0;
}

/* A signal to a thread blocked reading (or polling) a FIFO no one writes: the handler runs
 * and the call returns EINTR. The sender repeats until the reader saw it (no race). */
static volatile int sr_done;
static volatile sig_atomic_t sr_got;
static void on_sr(int s) { (void)s; sr_got = 1; }
static int sr_poll;
static void *sig_reader(void *arg) {
    (void)arg;
    char c;
    long r;
    do {
        if (sr_poll) {
            struct pollfd p = {fifo_fd, POLLIN, 0};
            r = poll(&p, 1, -1);
        } else {
            r = read(fifo_fd, &c, 1);
        }
    } while (!(r < 0 && errno == EINTR && sr_got));
    sr_done = 1;
    return 0;
}
static int sig_read(const char *fifo, int use_poll) {
    sr_poll = use_poll;
    fifo_fd = open(fifo, O_RDWR);
    struct sigaction sa = {0};
    sa.sa_handler = on_sr;   /* no SA_RESTART */
    sigaction(SIGUSR1, &sa, 0);
    pthread_t t;
    pthread_create(&t, 0, sig_reader, 0);
    while (!sr_done) {
        pthread_kill(t, SIGUSR1);
        struct timespec d = {0, 20000000};
        nanosleep(&d, 0);
    }
    pthread_join(t, 0);
    printf("reader interrupted by its signal\n");
    return 0;
}

/* execve and fork from a thread while another runs: clear errors, the program goes on. */
static void *spin_short(void *arg) { for (int i = 0; i < 1000; i++) sched_yield(); return arg; }
static int exec_fork(void) {
    pthread_t t;
    pthread_create(&t, 0, spin_short, 0);
    char *argv[] = {"/bin/true", 0};
    int r = execve("/bin/true", argv, 0);
    int e = errno;
    pid_t p = fork();
    if (p == 0) _exit(0);
    int fe = errno;
    pthread_join(t, 0);
    printf("execve %d %s, fork %s %s\n", r, e ? "err" : "none", p < 0 ? "failed" : "ok", fe ? "err" : "none");
    return 0;
}

/* readv of two iovecs in a thread, from a FIFO another thread writes 4 bytes at a time:
 * each call returns the 4 bytes there are (the first iovec), none is lost. */
static void *split_reader(void *arg) {
    (void)arg;
    char a[4], b[4];
    struct iovec v[2] = {{a, 4}, {b, 4}};
    long r1 = readv(fifo_fd, v, 2);
    char first[4];
    memcpy(first, a, 4);
    long r2 = readv(fifo_fd, v, 2);
    printf("readv %ld %.4s, readv %ld %.4s\n", r1, first, r2, a);
    return 0;
}
static int readv_split(const char *fifo) {
    fifo_fd = open(fifo, O_RDWR);
    pthread_t t;
    pthread_create(&t, 0, split_reader, 0);
    struct timespec d = {0, 100000000};
    nanosleep(&d, 0);   /* not needed for the output: only makes the reader wait first */
    if (write(fifo_fd, "abcd", 4) != 4) return 1;
    nanosleep(&d, 0);
    if (write(fifo_fd, "efgh", 4) != 4) return 1;
    pthread_join(t, 0);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, 0, _IONBF, 0);
    const char *w = argv[1];
    if (!strcmp(w, "clone_odd")) return clone_odd();
    if (!strcmp(w, "settid_tracked")) return settid_tracked();
    if (!strcmp(w, "badstack")) return clone_badstack(argv[2]);
    if (!strcmp(w, "cleartid_ro")) return cleartid_ro();
    if (!strcmp(w, "clone3_bad")) return clone3_bad();
    if (!strcmp(w, "futex_odd")) return futex_odd();
    if (!strcmp(w, "requeue_loop")) return requeue_loop();
    if (!strcmp(w, "huge_timeout")) return huge_timeout();
    if (!strcmp(w, "tgkill_futex")) return tgkill_futex();
    if (!strcmp(w, "raise_kill")) return raise_kill();
    if (!strcmp(w, "altstack")) return altstack();
    if (!strcmp(w, "unmap_stack")) return unmap_stack();
    if (!strcmp(w, "mprotect_race")) return mprotect_race();
    if (!strcmp(w, "spin")) return spin(0);
    if (!strcmp(w, "spin_store")) return spin(1);
    if (!strcmp(w, "exit_race")) return exit_race();
    if (!strcmp(w, "big_stacks")) return big_stacks(atol(argv[2]));
    if (!strcmp(w, "select_block")) return select_block(argv[2]);
    if (!strcmp(w, "write_full")) return write_full(argv[2]);
    if (!strcmp(w, "readv_split")) return readv_split(argv[2]);
    if (!strcmp(w, "ofd_block")) return ofd_block(argv[2]);
    if (!strcmp(w, "exec_fork")) return exec_fork();
    if (!strcmp(w, "abs_sleep")) return abs_sleep();
    if (!strcmp(w, "sigwait_thread")) return sigwait_thread();
    if (!strcmp(w, "sig_read")) return sig_read(argv[2], 0);
    if (!strcmp(w, "sig_poll")) return sig_read(argv[2], 1);
    return 99;
}
