/* ppoll and pselect6 signal masks (issue 13): SIGUSR1 is blocked and pending; a ppoll or
 * pselect whose mask lets it in must end with EINTR at once and run the handler, with the
 * old mask back afterwards; one whose mask keeps it blocked waits its timeout; one that
 * finds a descriptor ready returns it, and the signal stays pending under the old mask.
 * Usage: pmask FIFO [threaded] (with a second thread, idle in pause, the waits go the
 * threaded way). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/select.h>
#include <time.h>
#include <unistd.h>

static volatile int handled;
static void *idle(void *a) { for (;;) pause(); return a; }
static void on_usr1(int s) { (void)s; handled++; }

static const char *res(int r) { return r < 0 ? (errno == EINTR ? "EINTR" : "error") : r ? "ready" : "timeout"; }

static void after(const char *what, int r) {
    sigset_t cur, pend;
    sigprocmask(SIG_BLOCK, 0, &cur);
    sigpending(&pend);
    printf("%s: %s, handler ran %d, SIGUSR1 %s and %s\n", what, res(r), handled,
           sigismember(&cur, SIGUSR1) ? "blocked" : "unblocked",
           sigismember(&pend, SIGUSR1) ? "pending" : "not pending");
    handled = 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, 0, _IONBF, 0);
    if (argc < 2) return 2;
    int fd = open(argv[1], O_RDWR); /* a FIFO with nothing in it */
    if (fd < 0) return 2;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, 0);
    sigset_t usr1, none;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigemptyset(&none);
    sigprocmask(SIG_BLOCK, &usr1, 0);
    if (argc > 2) {
        pthread_t t;
        pthread_create(&t, 0, idle, 0);
    }
    struct timespec long_wait = {5, 0}, short_wait = {0, 50000000};
    struct pollfd p = {fd, POLLIN, 0};
    int r;

    raise(SIGUSR1);
    r = ppoll(&p, 1, &long_wait, &none);
    after("ppoll letting SIGUSR1 in", r);

    raise(SIGUSR1);
    r = ppoll(&p, 1, &short_wait, &usr1);
    after("ppoll keeping SIGUSR1 blocked", r);
    /* still pending: let it in */
    r = ppoll(&p, 1, &long_wait, &none);
    after("ppoll letting the pending SIGUSR1 in", r);

    raise(SIGUSR1);
    fd_set rd;
    FD_ZERO(&rd);
    FD_SET(fd, &rd);
    r = pselect(fd + 1, &rd, 0, 0, &long_wait, &none);
    after("pselect letting SIGUSR1 in", r);

    raise(SIGUSR1);
    if (write(fd, "x", 1) != 1) return 3;
    r = ppoll(&p, 1, &long_wait, &none);
    after("ppoll with a ready descriptor and SIGUSR1 let in", r);

    FD_ZERO(&rd);
    FD_SET(fd, &rd);
    r = pselect(fd + 1, &rd, 0, 0, &short_wait, &usr1);
    after("pselect with a ready descriptor, SIGUSR1 blocked", r);
    return 0;
}
