/* Big leaks under the default sampling rate (512 KiB): blocks at least as
 * large as the rate are always recorded with their true size, so the report
 * is exact for them however the small allocations around them are sampled.
 * See tests/sampled.rs. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

/* 4 x 1 MiB. */
NOINLINE void leak_big(void) {
    for (int i = 0; i < 4; i++) {
        char *p = malloc(1 << 20);
        memset(p, 1, 1 << 20);
        keep(p);
    }
}

/* 2 blocks of exactly the default rate, 524288 bytes: the boundary. */
NOINLINE void leak_at_rate(void) {
    for (int i = 0; i < 2; i++) {
        char *p = calloc(1, 524288);
        keep(p);
    }
}

/* 1 MiB blocks allocated and freed: nothing outstanding. */
NOINLINE void churn_big(void) {
    for (int i = 0; i < 20; i++) {
        char *p = malloc(1 << 20);
        memset(p, 2, 4096);
        keep(p);
        free(p);
    }
}

NOINLINE void churn_small(void) {
    uint64_t seed = 42;
    for (int i = 0; i < 100000; i++) {
        size_t size = 16 + xorshift64(&seed) % 240;
        char *p = malloc(size);
        keep(p);
        free(p);
    }
}

int main(void) {
    churn_small();
    leak_big();
    churn_big();
    leak_at_rate();
    churn_small();
    printf("done\n");
    return 0;
}
