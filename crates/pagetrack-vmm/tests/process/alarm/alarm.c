/* One thread blocked on a FIFO (nobody else writes it) when its own timer fires: as Linux,
 * read restarts after an SA_RESTART handler (which writes the byte it then returns) and
 * fails with EINTR after any other; poll fails with EINTR after either.
 * Usage: alarm FIFO */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

static int fd;
static volatile int handled;

static void on_alarm(int sig) {
    (void)sig;
    handled++;
    char c = 'x';
    if (write(fd, &c, 1) != 1) _exit(3);
}

static void arm(int flags) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = flags;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval it = {{0, 0}, {0, 50000}};
    setitimer(ITIMER_REAL, &it, NULL);
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    fd = open(argv[1], O_RDWR); /* O_RDWR: the FIFO never reads as ended */
    if (fd < 0) return 2;
    char b[8];
    for (int restart = 1; restart >= 0; restart--) {
        arm(restart ? SA_RESTART : 0);
        ssize_t n = read(fd, b, sizeof b);
        int e = errno;
        printf("read, %s: %zd %s, handled %d\n", restart ? "SA_RESTART" : "no SA_RESTART", n,
               n < 0 ? strerror(e) : "", handled);
        if (n < 0) {
            n = read(fd, b, sizeof b); /* the handler's byte */
            printf("  then read %zd\n", n);
        }
    }
    arm(SA_RESTART);
    struct pollfd p = {fd, POLLIN, 0};
    int k = poll(&p, 1, 10000);
    int e = errno;
    printf("poll: %d %s, handled %d\n", k, k < 0 ? strerror(e) : "", handled);
    return 0;
}
