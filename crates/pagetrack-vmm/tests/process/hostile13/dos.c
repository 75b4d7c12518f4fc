#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    const char *w = argv[1];
    long len = 1L << atoi(argv[2]);
    long r = -2;
    if (!strcmp(w, "madvise")) r = syscall(SYS_madvise, 0x100000000L, len, 4);
    if (!strcmp(w, "mprotect")) r = syscall(SYS_mprotect, 0x100000000L, len, 1);
    if (!strcmp(w, "munmap")) r = syscall(SYS_munmap, 0x100000000L, len);
    if (!strcmp(w, "mmapfix")) r = syscall(SYS_mmap, 0x100000000L, len, 3, 0x32, -1, 0);
    if (!strcmp(w, "sleep")) { long ts[2] = {-1, 1}; r = syscall(SYS_nanosleep, ts, 0); }
    if (!strcmp(w, "sleepneg")) { long ts[2] = {-1, 0}; r = syscall(SYS_nanosleep, ts, 0); }
    printf("%s=%ld/%d\n", w, r, r < 0 ? errno : 0);
    return 0;
}
