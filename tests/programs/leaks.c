/* Exact-mode test program: known leaks at distinct call sites, made by four
 * threads that churn far more memory than they leak (every churned block is
 * freed). The expected figures are in tests/exact.rs. */
#define _GNU_SOURCE
#include <malloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#define THREADS 4

/* 10 x malloc(100) per thread. */
NOINLINE void leak_a(void) {
    for (int i = 0; i < 10; i++) {
        char *p = malloc(100);
        memset(p, 'a', 100);
        keep(p);
    }
}

/* 3 x calloc(4, 250) per thread. */
NOINLINE void leak_b(void) {
    for (int i = 0; i < 3; i++) keep(calloc(4, 250));
}

/* A realloc chain that ends at 777 bytes and is never freed: one object per
 * thread, counted at its final size. */
NOINLINE void leak_c(void) {
    char *p = realloc(NULL, 10);
    memset(p, 'c', 10);
    p = realloc(p, 5000);
    p = realloc(p, 100);
    p = realloc(p, 777);
    keep(p);
}

/* 5 x posix_memalign(64, 320) per thread. */
NOINLINE void leak_d(void) {
    for (int i = 0; i < 5; i++) {
        void *p = NULL;
        if (posix_memalign(&p, 64, 320) != 0) abort();
        keep(p);
    }
}

/* 2 x strdup of a 10-character string per thread: 11 bytes each, reported
 * at leak_e because strdup is an allocator wrapper. */
NOINLINE void leak_e(void) {
    static const char text[] = "0123456789";
    for (int i = 0; i < 2; i++) keep(strdup(text));
}

/* reallocarray(NULL, 6, 50) and aligned_alloc(128, 256), once per thread. */
NOINLINE void leak_f(void) {
    keep(reallocarray(NULL, 6, 50));
    keep(aligned_alloc(128, 256));
}

/* Once, from the main thread. */
NOINLINE void leak_main_once(void) { keep(malloc(4242)); }

/* Allocates and frees 20000 blocks of every kind the tracer hooks. Nothing
 * allocated here survives, so it must not appear in the leak report. */
NOINLINE void churn(uint64_t seed) {
    enum { SLOTS = 64 };
    void *slot[SLOTS] = {0};
    for (int i = 0; i < 20000; i++) {
        uint64_t r = xorshift64(&seed);
        int k = (int)(r % SLOTS);
        size_t size = 16 + (r >> 8) % 240;
        if ((r >> 20) % 50 == 0) size = 4096 + (r >> 30) % 60000;
        switch ((r >> 40) % 6) {
        case 0:
        case 1:
            free(slot[k]);
            slot[k] = malloc(size);
            break;
        case 2:
            free(slot[k]);
            slot[k] = calloc(1, size);
            break;
        case 3:
            slot[k] = realloc(slot[k], size);
            break;
        case 4: {
            void *p = NULL;
            free(slot[k]);
            slot[k] = posix_memalign(&p, 32, size) == 0 ? p : NULL;
            break;
        }
        default:
            free(slot[k]);
            slot[k] = memalign(256, size);
            break;
        }
        if (slot[k]) memset(slot[k], (int)i, size < malloc_usable_size(slot[k]) ? size : malloc_usable_size(slot[k]));
        keep(slot[k]);
    }
    for (int k = 0; k < SLOTS; k++) free(slot[k]);
}

static void *worker(void *arg) {
    uint64_t seed = 0x9e3779b97f4a7c15ull * (uintptr_t)arg + 1;
    churn(seed);
    leak_a();
    churn(seed + 1);
    leak_b();
    leak_c();
    churn(seed + 2);
    leak_d();
    leak_e();
    leak_f();
    churn(seed + 3);
    return NULL;
}

int main(void) {
    pthread_t t[THREADS];
    for (uintptr_t i = 0; i < THREADS; i++) pthread_create(&t[i], NULL, worker, (void *)(i + 1));
    leak_main_once();
    for (int i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
    printf("done\n");
    return 0;
}
