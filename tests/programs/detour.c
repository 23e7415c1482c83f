/* Frees through every way in that glibc's rewritten free (detour.rs) must
 * handle, and prints the bytes around its entry, so the test can tell
 * whether it was rewritten:
 *
 *     free: e8 .. .. .. .. 0f 1f 80 00 00 00 00 48 85 ff 0f 84 .. .. .. ..
 *
 * (12 bytes before __libc_free, 9 from it). Then: blocks of 1 MiB, at least
 * the default rate and so always recorded, leaked, freed through the PLT and
 * freed through a pointer to free taken at run time (which reaches the
 * tracer's hook, not glibc's entry); 64 KiB-aligned ordinary blocks, which
 * every free of them sends to the tracer's slow path as candidates;
 * free(NULL); and small blocks freed at once. See tests/sampled.rs. */
#define _GNU_SOURCE
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

extern void __libc_free(void *);

NOINLINE void leak_big(void) {
    for (int i = 0; i < 3; i++) {
        char *p = malloc(1 << 20);
        memset(p, 1, 4096);
        keep(p);
    }
}

NOINLINE void churn_big(void) {
    for (int i = 0; i < 10; i++) {
        char *p = malloc(1 << 20);
        keep(p);
        free(p);
    }
}

NOINLINE void churn_big_pointer(void) {
    void (*volatile release)(void *) = free;
    for (int i = 0; i < 10; i++) {
        char *p = malloc(1 << 20);
        keep(p);
        release(p);
    }
}

/* Returns how many of the blocks were 64 KiB-aligned (all, from glibc). */
NOINLINE int churn_aligned(void) {
    int aligned = 0;
    for (int i = 0; i < 200; i++) {
        char *p = memalign(65536, 200);
        if (!p) abort();
        aligned += ((uintptr_t)p & 0xffff) == 0;
        p[0] = 1;
        keep(p);
        free(p);
    }
    return aligned;
}

NOINLINE void churn_small(void) {
    uint64_t seed = 7;
    for (int i = 0; i < 200000; i++) {
        char *p = malloc(16 + xorshift64(&seed) % 240);
        keep(p);
        free(p);
        free(NULL);
    }
}

int main(void) {
    const unsigned char *entry = (const unsigned char *)__libc_free;
    printf("free:");
    for (int i = -12; i < 9; i++) printf(" %02x", entry[i]);
    printf("\n");
    churn_small();
    leak_big();
    churn_big();
    churn_big_pointer();
    printf("aligned %d\n", churn_aligned());
    return 0;
}
