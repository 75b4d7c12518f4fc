/* SA_RESTART (issue 13): a thread blocked in read(2) on a pipe, or in FUTEX_WAIT without a
 * timeout, gets signals whose handler has SA_RESTART or not. Linux restarts the call after an
 * SA_RESTART handler and fails it with EINTR otherwise. Usage: restart read|futex 0|1 FIFO. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int fds[2];
static volatile int waiting, done, interrupted;
static int word;
static long result;
static int err;
static char buf[16];

static void on_usr1(int s) {
    (void)s;
    if (waiting) interrupted = 1;
}

static void *reader(void *arg) {
    long r;
    waiting = 1;
    if (!strcmp(arg, "read"))
        r = read(fds[0], buf, sizeof buf);
    else
        r = syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
    err = r < 0 ? errno : 0;
    waiting = 0;
    result = r;
    done = 1;
    return 0;
}

static void pace(void) {
    struct timespec ts = {0, 2000000};
    nanosleep(&ts, 0);
}

int main(int argc, char **argv) {
    setvbuf(stdout, 0, _IONBF, 0);
    if (argc < 4) return 2;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = atoi(argv[2]) ? SA_RESTART : 0;
    sigaction(SIGUSR1, &sa, 0);
    fds[0] = open(argv[3], O_RDWR); /* a FIFO: no writer needed to open */
    fds[1] = open(argv[3], O_WRONLY);
    if (fds[0] < 0 || fds[1] < 0) return 2;
    pthread_t t;
    pthread_create(&t, 0, reader, argv[1]);
    while (!waiting) pace();
    /* Signals until one has met the thread in its call (and, without SA_RESTART, ended it). */
    for (int i = 0; i < 2000 && !done && !(interrupted && i >= 20); i++) {
        pthread_kill(t, SIGUSR1);
        pace();
    }
    /* Then what ends a restarted call: data, or wake-ups. */
    if (!strcmp(argv[1], "read")) {
        if (!done && write(fds[1], "hello", 5) != 5) return 3;
    } else {
        while (!done) {
            syscall(SYS_futex, &word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
            pace();
        }
    }
    pthread_join(t, 0);
    printf("%s with%s SA_RESTART: interrupted %s, returned %ld (%s)\n", argv[1],
           sa.sa_flags ? "" : "out", interrupted ? "yes" : "no", result,
           result < 0 ? (err == EINTR ? "EINTR" : "other error") : "ok");
    return 0;
}
