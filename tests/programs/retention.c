/* RSS far above live bytes with nothing leaked (tests/retention.rs): four
 * threads each allocate BYTES_PER_THREAD in small blocks (64-1024 B), then
 * `retain` frees all but one block in a thousand, so glibc keeps the freed
 * memory in its per-thread arenas (the survivors pin it) and RSS stays high
 * while the live bytes are small; `leak` frees nothing, so RSS and live
 * bytes are both high. Either way the program then sleeps long enough for
 * the tracer to record RSS and glibc's figures a few times, and exits. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common.h"

#define THREADS 4
#define BYTES_PER_THREAD (80u << 20)
#define KEEP_ONE_IN 1000

static int retain;

struct result {
    uint64_t seed;
    size_t blocks;
    size_t kept_blocks;
    size_t kept_bytes;
};

NOINLINE void *alloc_block(size_t size) {
    char *p = malloc(size);
    if (!p) abort();
    memset(p, 0x5a, size);
    return p;
}

static void *worker(void *arg) {
    struct result *r = arg;
    uint64_t seed = r->seed;
    size_t cap = BYTES_PER_THREAD / 64 + 1;
    void **blocks = malloc(cap * sizeof *blocks);
    size_t *sizes = malloc(cap * sizeof *sizes);
    size_t n = 0, total = 0;
    while (total < BYTES_PER_THREAD && n < cap) {
        size_t size = 64 + xorshift64(&seed) % 961;
        blocks[n] = alloc_block(size);
        sizes[n++] = size;
        total += size;
    }
    r->blocks = n;
    for (size_t i = 0; i < n; i++) {
        if (i % KEEP_ONE_IN == KEEP_ONE_IN - 1) {
            r->kept_blocks++;
            r->kept_bytes += sizes[i];
        } else if (retain) {
            free(blocks[i]);
        } else {
            r->kept_blocks++;
            r->kept_bytes += sizes[i];
        }
    }
    free(sizes);
    free(blocks);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 2 || (strcmp(argv[1], "retain") && strcmp(argv[1], "leak"))) {
        fprintf(stderr, "usage: %s retain|leak\n", argv[0]);
        return 2;
    }
    retain = strcmp(argv[1], "retain") == 0;
    pthread_t t[THREADS];
    struct result r[THREADS];
    memset(r, 0, sizeof r);
    for (int i = 0; i < THREADS; i++) {
        r[i].seed = 0x9e3779b97f4a7c15ull * (uint64_t)(i + 1);
        pthread_create(&t[i], NULL, worker, &r[i]);
    }
    size_t blocks = 0, kept_blocks = 0, kept_bytes = 0;
    for (int i = 0; i < THREADS; i++) {
        pthread_join(t[i], NULL);
        blocks += r[i].blocks;
        kept_blocks += r[i].kept_blocks;
        kept_bytes += r[i].kept_bytes;
    }
    /* Several STATS records (MTRACE_RS_STATS_MS=50 in the test) after the
     * frees: the analyzer judges the memory at the end. */
    struct timespec pause = {0, 300 * 1000 * 1000};
    nanosleep(&pause, NULL);
    printf("allocated %zu blocks, kept %zu blocks %zu bytes\n", blocks, kept_blocks, kept_bytes);
    return 0;
}
