/* A hostile program racing address-space changes against stores that pagetrack completes in
 * userspace (issue 13). Hammer threads store generation tags into one page P without pause;
 * the main thread keeps replacing P's memory (mmap MAP_FIXED over it, or mremap of a fresh
 * page onto it: P stays mapped throughout, so no store ever faults) and maps new pages Q,
 * which get the frames P just lost. Native semantics: a fresh mapping is all zero, and later
 * holds only the stores made to it; P's untouched words stay zero; a page mremap'd onto P
 * keeps its contents. The output must match a native run's. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define HAMMERS 4
#define RING 8
#define WORDS 512
#define USED (HAMMERS * 8)   /* words of P the hammers store to */
#define MARK 511             /* word of P only the main thread writes */
#define QTAG 100             /* word of Q the main thread writes */

static uint64_t *P;
static volatile int done;
static volatile uint64_t gen;

static void *hammer(void *arg) {
    uint64_t id = (uint64_t)arg, n = 0;
    while (!done) {
        ((volatile uint64_t *)P)[id * 8 + (n & 7)] = gen << 16 | id;
        n++;
    }
    return 0;
}

static long nonzero(volatile uint64_t *q, int skip) {
    long bad = 0;
    for (int i = 0; i < WORDS; i++)
        if (i != skip && q[i]) bad++;
    return bad;
}

int main(int argc, char **argv) {
    setvbuf(stdout, 0, _IONBF, 0);
    int rounds = argc > 1 ? atoi(argv[1]) : 1000;
    P = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (P == MAP_FAILED) return 2;
    pthread_t t[HAMMERS];
    for (long i = 0; i < HAMMERS; i++) pthread_create(&t[i], 0, hammer, (void *)i);
    volatile uint64_t *ring[RING] = {0};
    long dirty = 0, foreign = 0, lost = 0, failed = 0;
    for (int r = 0; r < rounds; r++) {
        /* The oldest Q goes first, so that the frame P loses next is the one the new Q
         * gets (the VMM reuses the last frame freed). */
        volatile uint64_t *old = ring[r % RING];
        if (old) {
            foreign += nonzero(old, QTAG) + (old[QTAG] != (0xb0b0ULL << 32 | (uint64_t)(r - RING)));
            munmap((void *)old, 4096);
        }
        uint64_t mark = 0;
        if (r & 1) {
            uint64_t *n = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (n == MAP_FAILED) { failed++; continue; }
            mark = 0x5eed0000ULL | (uint64_t)r;
            n[MARK] = mark;
            if (mremap(n, 4096, 4096, MREMAP_MAYMOVE | MREMAP_FIXED, P) != P) failed++;
        } else if (mmap(P, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != P) {
            failed++;
        }
        gen++;
        if (P[MARK] != mark) lost++;
        for (int i = USED; i < WORDS; i++)
            if (i != MARK && P[i]) foreign++;
        for (int i = 0; i < USED; i++) {
            uint64_t v = ((volatile uint64_t *)P)[i];
            if (v && ((v & 0xffff) != (uint64_t)i / 8 || (v >> 16) > gen)) foreign++;
        }
        volatile uint64_t *q = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (q == MAP_FAILED) { failed++; ring[r % RING] = 0; continue; }
        dirty += nonzero(q, -1) != 0;
        q[QTAG] = 0xb0b0ULL << 32 | (uint64_t)r;
        ring[r % RING] = q;
    }
    done = 1;
    for (int i = 0; i < HAMMERS; i++) pthread_join(t[i], 0);
    printf("remap race: %d rounds, %ld fresh pages not zero, %ld foreign values, %ld moved marks lost, %ld failed calls\n",
           rounds, dirty, foreign, lost, failed);
    return 0;
}
