#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/select.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

static char P[8][8192];
static const char *J(int i, const char *a, const char *b) {
    snprintf(P[i], sizeof P[i], "%s/%s", a, b);
    return P[i];
}
static void res(const char *name, long r) {
    if (r < 0) printf("%s=E%d\n", name, errno); else printf("%s=ok\n", name);
    fflush(stdout);
}
/* Opens, and if it opened, reads: the outside secret must never come back. */
static void try_open(const char *name, int dirfd, const char *p, int flags) {
    errno = 0;
    int fd = openat(dirfd, p, flags, 0644);
    res(name, fd);
    if (fd >= 0) {
        char b[128];
        long k = read(fd, b, sizeof b - 1);
        if (k > 0) { b[k] = 0; if (strstr(b, "TOPSECRET")) printf("LEAK %s\n", name); }
        if (flags & (O_WRONLY | O_RDWR)) { if (write(fd, "PWNED", 5) == 5) printf("WROTE %s\n", name); }
        close(fd);
    }
}

int main(int argc, char **argv) {
    const char *what = argv[1];
    if (!strcmp(what, "escape")) {
        const char *W = argv[2], *O = argv[3], *RO = argv[4];
        /* No descriptor of the VMM's is the program's. */
        for (int fd = 3; fd < 1024; fd++) {
            if (fcntl(fd, F_GETFD) >= 0) printf("VMMFD %d\n", fd);
            struct stat st;
            if (fstat(fd, &st) == 0) printf("VMMFD-stat %d\n", fd);
        }
        char name[64];
        try_open("abs-link", AT_FDCWD, J(0, W, "evil/secret"), O_RDONLY);
        try_open("rel-link", AT_FDCWD, J(0, W, "rel/secret"), O_RDONLY);
        try_open("abs-link-self", AT_FDCWD, J(0, W, "evil"), O_RDONLY | O_DIRECTORY);
        try_open("dangling-creat", AT_FDCWD, J(0, W, "dang"), O_WRONLY | O_CREAT);
        try_open("dangling-excl", AT_FDCWD, J(0, W, "dang"), O_WRONLY | O_CREAT | O_EXCL);
        try_open("reldangling-creat", AT_FDCWD, J(0, W, "reldang"), O_WRONLY | O_CREAT);
        try_open("trunc-through", AT_FDCWD, J(0, W, "evil/victim"), O_WRONLY | O_TRUNC);
        try_open("append-through", AT_FDCWD, J(0, W, "rel/victim"), O_WRONLY | O_APPEND);
        try_open("tmpfile-through", AT_FDCWD, J(0, W, "evil"), O_TMPFILE | O_RDWR);
        try_open("loop", AT_FDCWD, J(0, W, "loop1"), O_RDONLY);
        try_open("chain", AT_FDCWD, J(0, W, "chain1/secret"), O_RDONLY);
        for (int k = 1; k <= 8; k++) {
            char p[512] = "";
            strcat(p, W);
            for (int i = 0; i < k; i++) strcat(p, i % 2 ? "/sub/.." : "/..");
            strcat(p, "/outside/secret");
            snprintf(name, sizeof name, "dotdot-%d", k);
            try_open(name, AT_FDCWD, p, O_RDONLY);
            snprintf(name, sizeof name, "dotdot-w-%d", k);
            try_open(name, AT_FDCWD, p, O_WRONLY | O_TRUNC);
        }
        try_open("dotdot-mid", AT_FDCWD, J(0, W, "sub/../../../outside/./secret"), O_RDONLY);
        try_open("dotdot-through-link", AT_FDCWD, J(0, W, "evil/../outside/secret"), O_RDONLY);
        int wfd = open(W, O_RDONLY | O_DIRECTORY);
        int ffd = open(J(0, W, "inside"), O_RDONLY);
        res("open-W", wfd);
        try_open("at-file-fd", ffd, "x", O_RDONLY);
        try_open("at-closed-fd", 77, "secret", O_RDONLY);
        try_open("at-neg-fd", -5, "secret", O_RDONLY);
        try_open("at-W-dotdot", wfd, "../../outside/secret", O_RDONLY);
        try_open("at-W-evil", wfd, "evil/secret", O_RDONLY);
        try_open("at-W-abs", wfd, J(1, O, "secret"), O_RDONLY);
        try_open("at-W-creat-evil", wfd, "evil/new", O_WRONLY | O_CREAT);
        /* A directory descriptor kept across its rename and a symlink swapped into its place. */
        int sfd = open(J(0, W, "sub"), O_RDONLY | O_DIRECTORY);
        res("rename-sub-away", rename(J(0, W, "sub"), J(1, W, "sub-moved")));
        res("link-into-sub", symlink(O, J(0, W, "sub")));
        try_open("at-moved-dotdot", sfd, "../sub/secret", O_RDONLY);
        try_open("at-moved-creat-dotdot", sfd, "../sub/made", O_WRONLY | O_CREAT);
        try_open("at-moved-self", sfd, "secret", O_RDONLY);
        unlink(J(0, W, "sub"));
        rename(J(1, W, "sub-moved"), J(0, W, "sub"));
        /* Names made by the program. */
        res("link-from-outside", link(J(0, W, "evil/secret"), J(1, W, "stolen")));
        res("link-to-outside", link(J(0, W, "inside"), J(1, O, "linked")));
        res("linkat-follow", syscall(SYS_linkat, AT_FDCWD, J(0, W, "evil"), AT_FDCWD, J(1, W, "hl"), AT_SYMLINK_FOLLOW));
        res("symlink-abs-made", symlink(J(1, O, "secret"), J(0, W, "s1")));
        try_open("symlink-abs-open", AT_FDCWD, J(0, W, "s1"), O_RDONLY);
        res("symlink-rel-made", symlink("../../outside/secret", J(0, W, "s2")));
        try_open("symlink-rel-open", AT_FDCWD, J(0, W, "s2"), O_RDONLY);
        res("symlink-in-outside", symlink("x", J(0, O, "made-link")));
        res("rename-out", rename(J(0, W, "inside"), J(1, O, "moved")));
        res("rename-in", rename(J(0, O, "secret"), J(1, W, "stolen")));
        res("rename-through", rename(J(0, W, "evil/secret"), J(1, W, "stolen")));
        res("exchange-out", syscall(SYS_renameat2, AT_FDCWD, J(0, W, "inside"), AT_FDCWD, J(1, O, "victim"), 2));
        res("exchange-in", syscall(SYS_renameat2, AT_FDCWD, J(0, W, "sub"), AT_FDCWD, J(1, W, "evil"), 2));
        try_open("after-exchange", AT_FDCWD, J(0, W, "sub/secret"), O_RDONLY);
        syscall(SYS_renameat2, AT_FDCWD, J(0, W, "sub"), AT_FDCWD, J(1, W, "evil"), 2);
        res("whiteout", syscall(SYS_renameat2, AT_FDCWD, J(0, W, "inside2"), AT_FDCWD, J(1, W, "wh"), 4));
        res("unlink-root", unlink(W));
        res("rmdir-root", rmdir(W));
        res("rmdir-root-dot", rmdir(J(0, W, ".")));
        res("rmdir-root-slash", rmdir(J(0, W, "")));
        res("unlinkat-dot", unlinkat(wfd, ".", AT_REMOVEDIR));
        res("rmdir-parent", rmdir(J(0, W, "..")));
        res("rename-root", rename(W, J(1, W, "../w2")));
        res("mkdir-through", mkdir(J(0, W, "evil/newdir"), 0755));
        res("unlink-through", unlink(J(0, W, "evil/victim")));
        res("rmdir-through", rmdir(J(0, W, "evil/..")));
        res("chmod-through", chmod(J(0, W, "evil/secret"), 0777));
        res("chmod-link", chmod(J(0, W, "s1"), 0777));
        res("fchmodat-through", fchmodat(wfd, "evil/secret", 0777, 0));
        int lfd = open(J(0, W, "s1"), O_PATH | O_NOFOLLOW);
        res("opath-symlink", lfd);
        res("fchmod-opath-symlink", fchmod(lfd, 0777));
        res("fchmodat-empty-symlink", syscall(SYS_fchmodat, lfd, "", 0777));
        struct timespec ts[2] = {{0, 0}, {0, 0}};
        res("futimens-opath-symlink", utimensat(lfd, "", ts, AT_EMPTY_PATH));
        res("utimensat-through", utimensat(AT_FDCWD, J(0, W, "evil/secret"), ts, 0));
        res("utimensat-link", utimensat(AT_FDCWD, J(0, W, "s1"), ts, 0));
        res("chown-link", chown(J(0, W, "s1"), 1234, 1234));
        res("truncate-through", truncate(J(0, W, "evil/victim"), 0));
        res("truncate-link", truncate(J(0, W, "s1"), 0));
        int ofd = open(J(0, W, "out.txt"), O_WRONLY | O_CREAT, 0644);
        res("sendfile-from-ro-to-w", sendfile(ofd, ffd, NULL, 100));
        res("sendfile-from-dir", sendfile(ofd, wfd, NULL, 100));
        res("sendfile-to-bad", sendfile(200, ffd, NULL, 100));
        res("copy_file_range", syscall(SYS_copy_file_range, ffd, NULL, ofd, NULL, 100, 0));
        /* Devices and the kernel's interfaces. */
        const char *devs[] = {"/dev/sda", "/dev/kvm", "/dev/tty", "/dev/mem", "/dev/full", "/dev/stdin",
                              "/dev/fd/0", "/dev/fd/3", "/proc/self/mem", "/proc/self/fd/0", "/proc/self/fd/3",
                              "/proc/1/environ", "/proc/self/exe", "/sys/kernel", "/dev/../etc/passwd",
                              "/dev/null/../../etc/passwd", "/dev//null", "/dev/./null", NULL};
        for (int i = 0; devs[i]; i++) {
            snprintf(name, sizeof name, "dev:%s", devs[i]);
            try_open(name, AT_FDCWD, devs[i], O_RDWR);
        }
        /* Lengths and bytes. */
        static char longp[6000];
        memset(longp, 'a', sizeof longp - 1);
        longp[0] = '/';
        try_open("long-6000", AT_FDCWD, longp, O_RDONLY);
        char *deep = malloc(4096 * 2);
        strcpy(deep, W);
        while (strlen(deep) < 4000) strcat(deep, "/.");
        strcat(deep, "/inside");
        try_open("deep-dots", AT_FDCWD, deep, O_RDONLY);
        try_open("bad-ptr", AT_FDCWD, (const char *)8, O_RDONLY);
        try_open("kernel-ptr", AT_FDCWD, (const char *)0xffffffff81000000UL, O_RDONLY);
        /* The read-only root. */
        try_open("ro-write", AT_FDCWD, J(0, RO, "ro.txt"), O_WRONLY);
        try_open("ro-rdwr", AT_FDCWD, J(0, RO, "ro.txt"), O_RDWR);
        try_open("ro-trunc", AT_FDCWD, J(0, RO, "ro.txt"), O_RDONLY | O_TRUNC);
        try_open("ro-creat", AT_FDCWD, J(0, RO, "new.txt"), O_RDONLY | O_CREAT);
        try_open("ro-append", AT_FDCWD, J(0, RO, "ro.txt"), O_RDONLY | O_APPEND);
        res("ro-mkdir", mkdir(J(0, RO, "newdir"), 0755));
        res("ro-unlink", unlink(J(0, RO, "ro.txt")));
        res("ro-chmod", chmod(J(0, RO, "ro.txt"), 0777));
        res("ro-utime", utimensat(AT_FDCWD, J(0, RO, "ro.txt"), ts, 0));
        int rofd = open(J(0, RO, "ro.txt"), O_RDONLY);
        res("ro-fchmod", fchmod(rofd, 0777));
        res("ro-ftruncate", ftruncate(rofd, 0));
        res("ro-write-fd", write(rofd, "x", 1));
        int opfd = open(J(0, RO, "ro.txt"), O_PATH);
        res("ro-opath-fchmod", fchmod(opfd, 0777));
        res("ro-opath-write", write(opfd, "x", 1));
        res("ro-mmap-shared-w", (long)mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, rofd, 0) == -1 ? -1 : 0);
        res("ro-rename-into-w", rename(J(0, RO, "ro.txt"), J(1, W, "taken")));
        res("ro-link-into-w", link(J(0, RO, "ro.txt"), J(1, W, "taken")));
        /* What stat and access say about the outside. */
        struct stat st;
        res("stat-through-exists", stat(J(0, W, "evil/secret"), &st));
        res("stat-through-missing", stat(J(0, W, "evil/nothing"), &st));
        res("stat-dangling", stat(J(0, W, "dang"), &st));
        res("access-through-exists", access(J(0, W, "evil/secret"), F_OK));
        res("access-through-missing", access(J(0, W, "evil/nothing"), F_OK));
        res("mkdir-through-exists", mkdir(J(0, W, "evil/secret"), 0755));
        res("mkdir-through-missing", mkdir(J(0, W, "evil/nothing"), 0755));
        res("mkdir-dotdot-exists", mkdir(J(0, W, "../outside/secret"), 0755));
        res("mkdir-dotdot-missing", mkdir(J(0, W, "../outside/nothing"), 0755));
        res("stat-dotdot-exists", stat(J(0, W, "../outside/secret"), &st));
        res("stat-dotdot-missing", stat(J(0, W, "../outside/nothing"), &st));
        res("stat-etc-shadow", stat("/etc/shadow", &st));
        res("stat-etc-nothing", stat("/etc/nothing-here", &st));
        return 0;
    }
    if (!strcmp(what, "ancestor")) {
        /* W/a/b is a second write root; W/a can be swapped by the program. */
        const char *W = argv[2], *target = argv[3];
        struct stat st;
        res("rename-a", rename(J(0, W, "a"), J(1, W, "a2")));
        res("symlink-a", symlink(target, J(0, W, "a")));
        errno = 0;
        int r = stat(J(0, W, "a"), &st);
        res("stat-a", r);
        if (r == 0) printf("size=%ld mode=%o ino=%ld\n", (long)st.st_size, st.st_mode, (long)st.st_ino);
        r = lstat(J(0, W, "a"), &st);
        if (r == 0) printf("lsize=%ld lmode=%o\n", (long)st.st_size, st.st_mode);
        errno = 0;
        res("mkdir-a", mkdir(J(0, W, "a"), 0755));
        return 0;
    }
    if (!strcmp(what, "mmap")) {
        /* mmap FILE MiB: a private read mapping larger than guest memory. */
        int fd = open(argv[2], O_RDONLY);
        if (fd < 0) { perror("open"); return 1; }
        size_t len = (size_t)atol(argv[3]) << 20;
        void *p = mmap(0, len, PROT_READ, MAP_PRIVATE, fd, 0);
        printf("mmap=%s\n", p == MAP_FAILED ? strerror(errno) : "ok");
        return 0;
    }
    if (!strcmp(what, "sparse")) {
        /* sparse FILE MiB: make a sparse file that size. */
        int fd = open(argv[2], O_RDWR | O_CREAT | O_TRUNC, 0644);
        if (fd < 0) { perror("open"); return 1; }
        res("ftruncate", ftruncate(fd, (off_t)atol(argv[3]) << 20));
        return 0;
    }
    if (!strcmp(what, "writev")) {
        /* writev N: N iovecs of 4 MiB, all the same buffer, to /dev/null. */
        int n = atoi(argv[2]);
        size_t sz = 4 << 20;
        char *buf = malloc(sz);
        memset(buf, 'x', sz);
        struct iovec *v = calloc(n, sizeof *v);
        for (int i = 0; i < n; i++) { v[i].iov_base = buf; v[i].iov_len = sz; }
        int fd = open("/dev/null", O_WRONLY);
        long r = writev(fd, v, n);
        printf("writev=%ld\n", r);
        return 0;
    }
    if (!strcmp(what, "opendev")) {
        try_open("opendev", AT_FDCWD, argv[2], O_RDONLY);
        try_open("opendev-opath", AT_FDCWD, argv[2], O_PATH);
        return 0;
    }
    if (!strcmp(what, "fifowrite")) {
        /* fifowrite FIFO N: one blocking write of N bytes (more than a pipe holds). */
        int fd = open(argv[2], O_WRONLY);
        if (fd < 0) { perror("open"); return 1; }
        size_t n = (size_t)atol(argv[3]);
        char *b = malloc(n);
        for (size_t i = 0; i < n; i++) b[i] = (char)('a' + i % 26);
        printf("fifowrite=%ld\n", (long)write(fd, b, n));
        return 0;
    }
    if (!strcmp(what, "opathcalls")) {
        /* opathcalls FILE: what an O_PATH descriptor allows. */
        int fd = open(argv[2], O_PATH);
        struct timespec om[2] = {{0, UTIME_OMIT}, {0, UTIME_OMIT}};
        struct stat st;
        char b[4];
        res("opath", fd);
        res("fchmod", fchmod(fd, 0644));
        res("fchown", fchown(fd, -1, -1));
        res("futimens", futimens(fd, om));
        res("read", read(fd, b, sizeof b));
        res("fstat", fstat(fd, &st));
        printf("getfl=%o\n", fcntl(fd, F_GETFL));
        /* A plain descriptor under a directory that is both --dir and --allow-write. */
        int rfd = open(argv[2], O_RDONLY);
        res("fchmod-rdonly", fchmod(rfd, 0644));
        return 0;
    }
    if (!strcmp(what, "names")) {
        /* names W: trailing "/." and "/" on the last component. */
        const char *W = argv[2];
        res("rmdir-dot", rmdir(J(0, W, "d1/.")));
        res("unlink-slash", unlink(J(0, W, "f1/")));
        res("rename-to-slash", rename(J(0, W, "f2"), J(1, W, "g2/")));
        res("rename-from-slash", rename(J(0, W, "f3/"), J(1, W, "g3")));
        res("mkdir-dot", mkdir(J(0, W, "d2/."), 0755));
        res("link-slash", link(J(0, W, "f4/"), J(1, W, "g4")));
        res("symlink-slash", symlink("x", J(0, W, "g5/")));
        return 0;
    }
    if (!strcmp(what, "select")) {
        fd_set r;
        FD_ZERO(&r);
        FD_SET(0, &r);
        struct timeval tv = {0, 0};
        long k = syscall(SYS_select, 2048, &r, NULL, NULL, &tv);
        printf("select-2048=%ld/%d\n", k, k < 0 ? errno : 0);
        close(99); /* natively, a test runner may have left it open */
        struct pollfd pf[2] = {{0, POLLIN, 0}, {99, POLLIN, 0}};
        k = poll(pf, 2, 0);
        printf("poll=%ld rev0=%x rev1=%x\n", k, pf[0].revents, pf[1].revents);
        k = poll((struct pollfd *)16, 1, 0);
        printf("poll-bad=%ld/%d\n", k, k < 0 ? errno : 0);
        k = poll(pf, 1u << 30, 0);
        printf("poll-huge=%ld/%d\n", k, k < 0 ? errno : 0);
        k = syscall(SYS_select, -1, NULL, NULL, NULL, &tv);
        printf("select-neg=%ld/%d\n", k, k < 0 ? errno : 0);
        tv.tv_usec = 2000000;
        k = syscall(SYS_select, 1, &r, NULL, NULL, &tv);
        printf("select-badtv=%ld/%d\n", k, k < 0 ? errno : 0);
        return 0;
    }
    return 3;
}
