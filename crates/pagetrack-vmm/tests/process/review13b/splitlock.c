/* Locked read-modify-writes on a counter straddling two tracked pages (a split lock): two
 * threads add 1 each N times; natively the counter ends at 2N. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

static volatile uint64_t *C;
static int n;

static void *adder(void *arg) {
    (void)arg;
    for (int i = 0; i < n; i++) __atomic_fetch_add(C, 1, __ATOMIC_SEQ_CST);
    return 0;
}

int main(int argc, char **argv) {
    n = argc > 1 ? atoi(argv[1]) : 20000;
    unsigned char *p = mmap(0, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 2;
    C = (volatile uint64_t *)(p + 4092);
    pthread_t t[2];
    for (long i = 0; i < 2; i++) pthread_create(&t[i], 0, adder, 0);
    for (int i = 0; i < 2; i++) pthread_join(t[i], 0);
    printf("split lock: %llu of %d\n", (unsigned long long)*C, 2 * n);
    return 0;
}
