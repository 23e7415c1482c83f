/* The harness's own malloc churn (scripts/bench.sh): each thread keeps a
 * live working set of 8192 blocks and, per iteration, replaces one of them
 * with malloc, calloc, realloc, posix_memalign, aligned_alloc or memalign.
 * Sizes are mostly 16-256 B, with a 4% tail up to 64 KiB and a rare (1 in
 * 20000) 1 MiB block, so a tracer sees the small-object fast path, the
 * occasional large block and every allocation entry point. Deterministic
 * (xorshift64 seeded per thread), so bare and traced runs do the same work.
 *
 *     churn [threads (default 2)] [iterations per thread (default 12000000)]
 *
 * Every block is freed at the end; the program prints the number of
 * allocation calls and a checksum of the bytes it touched, so the compiler
 * cannot drop the work. */
#define _GNU_SOURCE
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SLOTS 8192

static long iterations = 12000000;

struct worker {
    pthread_t thread;
    unsigned index;
    unsigned long calls;    /* allocation + free calls made */
    unsigned long checksum;
};

static inline uint64_t xorshift64(uint64_t *state) {
    uint64_t x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *state = x;
}

static size_t pick_size(uint64_t r) {
    unsigned bucket = (unsigned)(r % 20000);
    if (bucket == 0) return (size_t)1 << 20;             /* 1 in 20000: 1 MiB */
    if (bucket < 800) return 257 + (r >> 20) % 65280;     /* 4%: up to 64 KiB */
    return 16 + (r >> 20) % 241;                          /* 96%: 16-256 B */
}

static void *run(void *arg) {
    struct worker *w = arg;
    uint64_t seed = 0x9e3779b97f4a7c15ull * (w->index + 1);
    void **slot = calloc(SLOTS, sizeof *slot);
    unsigned long calls = 1, sum = 0;
    if (!slot) abort();
    for (long i = 0; i < iterations; i++) {
        uint64_t r = xorshift64(&seed);
        size_t k = (r >> 40) % SLOTS;
        size_t size = pick_size(xorshift64(&seed));
        unsigned char *p = NULL;
        unsigned op = (unsigned)(r % 100);
        if (op < 60) {                          /* 60% malloc */
            free(slot[k]);
            p = malloc(size);
            calls += 2;
        } else if (op < 75) {                   /* 15% calloc */
            free(slot[k]);
            p = calloc(1, size);
            calls += 2;
        } else if (op < 92) {                   /* 17% realloc of a live block */
            p = realloc(slot[k], size);
            calls += 1;
        } else if (op < 96) {                   /* 4% posix_memalign */
            void *q = NULL;
            free(slot[k]);
            if (posix_memalign(&q, 64, size) == 0) p = q;
            calls += 2;
        } else if (op < 98) {                   /* 2% aligned_alloc */
            free(slot[k]);
            p = aligned_alloc(32, (size + 31) & ~(size_t)31);
            calls += 2;
        } else {                                /* 2% memalign */
            free(slot[k]);
            p = memalign(128, size);
            calls += 2;
        }
        if (!p) {
            fprintf(stderr, "churn: allocation of %zu bytes failed\n", size);
            exit(1);
        }
        p[0] = (unsigned char)i;
        p[size / 2] = (unsigned char)(i >> 4);
        p[size - 1] = (unsigned char)(i >> 8);
        sum += p[0] + p[size / 2] + p[size - 1];
        slot[k] = p;
    }
    for (size_t k = 0; k < SLOTS; k++) free(slot[k]);
    free(slot);
    w->calls = calls + SLOTS + 1;
    w->checksum = sum;
    return NULL;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    if (argc > 2) iterations = atol(argv[2]);
    if (threads < 1 || threads > 256 || iterations < 0) {
        fprintf(stderr, "usage: churn [threads 1-256] [iterations per thread]\n");
        return 2;
    }
    struct worker *w = calloc((size_t)threads, sizeof *w);
    if (!w) return 1;
    for (int i = 0; i < threads; i++) {
        w[i].index = (unsigned)i;
        if (pthread_create(&w[i].thread, NULL, run, &w[i]) != 0) {
            perror("churn: pthread_create");
            return 1;
        }
    }
    unsigned long calls = 0, checksum = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(w[i].thread, NULL);
        calls += w[i].calls;
        checksum += w[i].checksum;
    }
    free(w);
    printf("churn: %d threads, %lu allocator calls, checksum %lu\n", threads, calls, checksum);
    return 0;
}
