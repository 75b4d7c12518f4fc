/* Stores whose completion takes more than one KVM exit: an 8-byte store straddling two
 * tracked pages (two MMIO fragments, KVM translates both before the first exit) and a 16-byte
 * SSE store (two 8-byte MMIO exits to one frame). Hammer threads store without pause; the
 * main thread replaces the second page (mmap MAP_FIXED over it: it stays mapped, no store
 * faults) and maps fresh pages Q, which get the frame just freed (the VMM reuses the last
 * frame freed). Natively a fresh page is all zero. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define HAMMERS 2
#define RING 4
static unsigned char *P; /* two pages */
static volatile int done;
static int sse;

static void *hammer(void *arg) {
    long id = (long)arg;
    uint64_t v = 0x1111111111111111ULL * (uint64_t)(id + 1);
    if (sse) {
        /* 16 bytes at page 2 + 64*id: one fragment, two 8-byte exits */
        unsigned char *at = P + 4096 + 64 * id;
        uint64_t pair[2] = {v, v};
        while (!done)
            __asm__ volatile("movdqu (%1), %%xmm0\n\tmovdqu %%xmm0, (%0)" ::"r"(at), "r"(pair) : "xmm0", "memory");
    } else {
        /* 8 bytes straddling the two pages: 4 in page 1, 4 in page 2 */
        unsigned char *at = P + 4092;
        while (!done)
            __asm__ volatile("movq %1, (%0)" ::"r"(at), "r"(v) : "memory");
    }
    return 0;
}

static int shown, argc_show;
static long nonzero(volatile uint64_t *q) {
    long bad = 0;
    for (int i = 0; i < 512; i++)
        if (q[i]) {
            bad++;
            if (argc_show && shown++ < 4) fprintf(stderr, "word %d = %#llx\n", i, (unsigned long long)q[i]);
        }
    return bad;
}

int main(int argc, char **argv) {
    setvbuf(stdout, 0, _IONBF, 0);
    argc_show = argc > 3; sse = argc > 1 && !strcmp(argv[1], "sse");
    int rounds = argc > 2 ? atoi(argv[2]) : 2000;
    P = mmap(0, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (P == MAP_FAILED) return 2;
    pthread_t t[HAMMERS];
    for (long i = 0; i < HAMMERS; i++) pthread_create(&t[i], 0, hammer, (void *)i);
    volatile uint64_t *ring[RING] = {0};
    long dirty = 0, failed = 0;
    for (int r = 0; r < rounds; r++) {
        volatile uint64_t *old = ring[r % RING];
        if (old) {
            dirty += nonzero(old) != 0;
            munmap((void *)old, 4096);
        }
        if (mmap(P + 4096, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != P + 4096)
            failed++;
        volatile uint64_t *q = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (q == MAP_FAILED) { failed++; ring[r % RING] = 0; continue; }
        dirty += nonzero(q) != 0;
        ring[r % RING] = q;
    }
    done = 1;
    for (int i = 0; i < HAMMERS; i++) pthread_join(t[i], 0);
    printf("split race (%s): %d rounds, %ld fresh pages not zero, %ld failed calls\n",
           sse ? "sse" : "straddle", rounds, dirty, failed);
    return 0;
}
