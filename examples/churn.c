/* A multi-threaded malloc churn benchmark: each thread keeps a live working
 * set of 4096 blocks and replaces one block per iteration with malloc,
 * calloc, realloc or an aligned allocation. Sizes are mostly 16-256 bytes,
 * with a tail up to 64 KiB and a rare 1 MiB block. Everything is freed at
 * the end. Deterministic (xorshift per thread), so runs compare.
 *
 *     churn [threads (default 2)] [iterations per thread (default 2000000)]
 *
 * It prints one line with the operation count and a checksum of the data it
 * touched; scripts/bench.sh times it bare and under the tracer. */
#define _GNU_SOURCE
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SLOTS 4096

static long iterations = 2000000;

static uint64_t xorshift64(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

static size_t pick_size(uint64_t r) {
    unsigned bucket = (unsigned)(r % 10000);
    if (bucket == 0) return 1 << 20;                      /* 0.01%: 1 MiB */
    if (bucket < 500) return 257 + (r >> 16) % 65280;     /* 5%: up to 64 KiB */
    return 16 + (r >> 16) % 241;                          /* the rest: 16-256 B */
}

struct result {
    unsigned index;
    unsigned long ops;
    unsigned long checksum;
};

static void *worker(void *arg) {
    struct result *res = arg;
    uint64_t seed = 0x2545f4914f6cdd1dull * (res->index + 1);
    void **slot = calloc(SLOTS, sizeof *slot);
    unsigned long sum = 0;
    for (long i = 0; i < iterations; i++) {
        uint64_t r = xorshift64(&seed);
        size_t k = (r >> 32) % SLOTS;
        size_t size = pick_size(xorshift64(&seed));
        unsigned char *p;
        switch (r % 20) {
        case 0: case 1: case 2:                 /* 15% calloc */
            free(slot[k]);
            p = calloc(1, size);
            break;
        case 3: case 4: case 5:                 /* 15% realloc */
            p = realloc(slot[k], size);
            break;
        case 6:                                 /* 5% aligned */
            free(slot[k]);
            if (r & 0x100) {
                void *q = NULL;
                p = posix_memalign(&q, 64, size) == 0 ? q : NULL;
            } else {
                p = aligned_alloc(32, (size + 31) & ~(size_t)31);
            }
            break;
        default:                                /* 65% malloc */
            free(slot[k]);
            p = malloc(size);
            break;
        }
        if (!p) {
            fprintf(stderr, "churn: allocation of %zu bytes failed\n", size);
            exit(1);
        }
        p[0] = (unsigned char)i;
        p[size - 1] = (unsigned char)(i >> 8);
        sum += p[0] + p[size - 1];
        slot[k] = p;
        res->ops++;
    }
    for (size_t k = 0; k < SLOTS; k++) free(slot[k]);
    free(slot);
    res->checksum = sum;
    return NULL;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    if (argc > 2) iterations = atol(argv[2]);
    if (threads < 1 || threads > 256 || iterations < 0) {
        fprintf(stderr, "usage: churn [threads 1-256] [iterations]\n");
        return 2;
    }
    pthread_t *t = calloc((size_t)threads, sizeof *t);
    struct result *res = calloc((size_t)threads, sizeof *res);
    for (int i = 0; i < threads; i++) {
        res[i].index = (unsigned)i;
        pthread_create(&t[i], NULL, worker, &res[i]);
    }
    unsigned long ops = 0, checksum = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(t[i], NULL);
        ops += res[i].ops;
        checksum += res[i].checksum;
    }
    free(t);
    free(res);
    printf("churn: %d threads, %lu operations, checksum %lu\n", threads, ops, checksum);
    return 0;
}
