/* sendfile to a full FIFO (issue 13): the call waits for room, and the thread that drains
 * the FIFO must run meanwhile (the VMM may not wait holding its kernel lock). Every byte
 * arrives once, in order, and the input offset (the file's, or the one passed) moves by
 * what was sent. Usage: sendfile FIFO FILE. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <unistd.h>

#define SIZE 300000
static int rfd;
static long want, got, bad;

static unsigned char at(long i) { return (unsigned char)(i * 7 + i / 251); }

static void *drain(void *arg) {
    (void)arg;
    static unsigned char b[8192];
    long filler = want - 2L * SIZE; /* the bytes that filled the FIFO first: all 'f' */
    while (got < want) {
        ssize_t k = read(rfd, b, sizeof b);
        if (k <= 0) break;
        for (ssize_t i = 0; i < k; i++, got++) {
            long j = got < filler ? -1 : (got - filler) % SIZE;
            if (b[i] != (j < 0 ? 'f' : at(j))) bad++;
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, 0, _IONBF, 0);
    if (argc < 3) return 2;
    int in = open(argv[2], O_RDWR | O_CREAT | O_TRUNC, 0600);
    static unsigned char data[SIZE];
    for (long i = 0; i < SIZE; i++) data[i] = at(i);
    if (in < 0 || write(in, data, SIZE) != SIZE || lseek(in, 0, SEEK_SET) != 0) return 2;
    rfd = open(argv[1], O_RDWR);
    int wfd = open(argv[1], O_WRONLY);
    int fill = open(argv[1], O_WRONLY | O_NONBLOCK);
    if (rfd < 0 || wfd < 0 || fill < 0) return 2;
    long filled = 0;
    for (;;) {
        ssize_t k = write(fill, "ffffffffffffffff", 16);
        if (k <= 0) break;
        filled += k;
    }
    want = filled + 2L * SIZE;
    pthread_t t;
    pthread_create(&t, 0, drain, 0);
    /* Linux may send less than asked into a pipe: both loops go on until all is sent. */
    long a = 0, b = 0, calls = 0;
    while (a < SIZE) {                          /* from the file's offset */
        ssize_t k = sendfile(wfd, in, NULL, SIZE - a);
        if (k <= 0) break;
        a += k, calls++;
    }
    off_t off = 0;
    while (b < SIZE) {                          /* from an offset of its own */
        ssize_t k = sendfile(wfd, in, &off, SIZE - b);
        if (k <= 0) break;
        b += k, calls++;
    }
    long pos = lseek(in, 0, SEEK_CUR);
    pthread_join(t, 0);
    printf("FIFO full (%s), sent %ld then %ld (offset now %ld), file offset %ld, reader got %ld of %ld, %ld wrong\n",
           filled > 0 ? "yes" : "no", a, b, (long)off, pos, got, want, bad);
    return 0;
}
