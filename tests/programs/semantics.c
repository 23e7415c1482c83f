/* glibc allocation semantics, printed as facts (never addresses or usable
 * sizes, which may differ under the tracer): tests/semantics.rs runs this
 * bare and traced and requires identical output and exit code. Every
 * allocator is called through a volatile function pointer so gcc cannot
 * fold the calls it knows about (malloc(SIZE_MAX) == NULL, free(malloc(n)))
 * at compile time. */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"

static void *(*volatile p_malloc)(size_t) = malloc;
static void *(*volatile p_calloc)(size_t, size_t) = calloc;
static void *(*volatile p_realloc)(void *, size_t) = realloc;
static void *(*volatile p_reallocarray)(void *, size_t, size_t) = reallocarray;
static void (*volatile p_free)(void *) = free;
static int (*volatile p_posix_memalign)(void **, size_t, size_t) = posix_memalign;
static void *(*volatile p_aligned_alloc)(size_t, size_t) = aligned_alloc;
static void *(*volatile p_memalign)(size_t, size_t) = memalign;
static void *(*volatile p_valloc)(size_t) = valloc;
static void *(*volatile p_pvalloc)(size_t) = pvalloc;
static size_t (*volatile p_usable)(void *) = malloc_usable_size;

static int failures;

static void fact(const char *what, long value) { printf("%s: %ld\n", what, value); }

static void expect(const char *what, int ok) {
    printf("%s: %s\n", what, ok ? "ok" : "FAILED");
    if (!ok) failures++;
}

static const char *err_name(int e) {
    switch (e) {
    case 0: return "0";
    case ENOMEM: return "ENOMEM";
    case EINVAL: return "EINVAL";
    case EILSEQ: return "EILSEQ";
    default: return "other";
    }
}

static void null_and_errno(const char *what, void *p, int err) {
    printf("%s: %s errno=%s\n", what, p ? "non-NULL" : "NULL", err_name(err));
    if (p) p_free(p);
}

static int aligned(void *p, size_t a) { return p && ((uintptr_t)p % a) == 0; }

static void fill(unsigned char *p, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++) p[i] = (unsigned char)(seed + i * 7);
}

static int check(const unsigned char *p, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++)
        if (p[i] != (unsigned char)(seed + i * 7)) return 0;
    return 1;
}

/* Grows and shrinks one block across glibc's size classes and its mmap
 * threshold; the prefix written first must survive every move. */
static void realloc_preserves(const char *what, void *start, size_t first) {
    static const size_t sizes[] = {16, 100, 4000, 70000, 200000, 3u << 20, 100000, 5000, 50, 8};
    unsigned char *p = start;
    size_t kept = first;
    fill(p, kept, 11);
    int ok = 1;
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        p = p_realloc(p, sizes[i]);
        if (!p) { ok = 0; break; }
        if (sizes[i] < kept) kept = sizes[i];
        ok &= check(p, kept, 11);
        ok &= p_usable(p) >= sizes[i];
        ok &= aligned(p, 16);
    }
    p_free(p);
    expect(what, ok);
}

/* Every byte malloc_usable_size says is the program's survives a realloc
 * that grows the block, and one that moves it from size class to size
 * class (the program may use all of them). */
static void usable_bytes_survive_realloc(size_t first, size_t then) {
    unsigned char *p = p_malloc(first);
    size_t usable = p_usable(p);
    fill(p, usable, 5);
    unsigned char *q = p_realloc(p, then);
    char what[96];
    snprintf(what, sizeof what, "usable bytes of a %zu-byte block survive realloc to %zu", first, then);
    expect(what, q && usable >= first && check(q, usable < then ? usable : then, 5));
    p_free(q);
}

static void on_signal(int sig) {
    /* Allocating in a handler that interrupted no allocator call (raise is
     * synchronous) is legal and must be traced or skipped, never crash. */
    void *p = p_malloc(64 + (size_t)sig);
    keep(p);
    p_free(p);
}

int main(void) {
    void *p, *q;
    int rc;

    /* malloc(0) returns a unique, freeable pointer. */
    p = p_malloc(0);
    q = p_malloc(0);
    expect("malloc(0) non-NULL", p != NULL && q != NULL && p != q);
    p_free(p);
    p_free(q);

    p_free(NULL);
    expect("free(NULL) returns", 1);

    p = p_realloc(NULL, 10);
    expect("realloc(NULL, 10) acts as malloc", p != NULL && p_usable(p) >= 10);
    /* glibc frees the block and returns NULL for realloc(p, 0). */
    q = p_realloc(p, 0);
    fact("realloc(p, 0) returns NULL", q == NULL);
    if (q) p_free(q);

    fact("malloc_usable_size(NULL)", (long)p_usable(NULL));

    /* Failed allocations: NULL and ENOMEM. */
    errno = 0;
    p = p_malloc(SIZE_MAX);
    null_and_errno("malloc(SIZE_MAX)", p, errno);
    errno = 0;
    p = p_malloc((size_t)PTRDIFF_MAX + 1);
    null_and_errno("malloc(PTRDIFF_MAX + 1)", p, errno);
    errno = 0;
    p = p_calloc(SIZE_MAX / 2, 4);
    null_and_errno("calloc overflow", p, errno);
    errno = 0;
    p = p_calloc(1, SIZE_MAX - 4096);
    null_and_errno("calloc(1, huge)", p, errno);

    p = p_malloc(32);
    fill(p, 32, 5);
    errno = 0;
    q = p_reallocarray(p, SIZE_MAX / 2, 4);
    null_and_errno("reallocarray overflow", q, errno);
    expect("reallocarray overflow keeps the block", check(p, 32, 5));
    errno = 0;
    q = p_realloc(p, SIZE_MAX - 100);
    null_and_errno("realloc(p, huge)", q, errno);
    expect("failed realloc keeps the block", check(p, 32, 5));
    q = p_reallocarray(p, 10, 100);
    expect("reallocarray(p, 10, 100) grows and keeps data", q && check(q, 32, 5) && p_usable(q) >= 1000);
    p_free(q);

    /* posix_memalign reports errors by return value and leaves errno and
     * the output pointer alone. */
    static const size_t bad_alignments[] = {0, 3, 4, 24, 100};
    for (size_t i = 0; i < sizeof bad_alignments / sizeof *bad_alignments; i++) {
        char what[64];
        void *out = &rc;
        errno = EILSEQ;
        rc = p_posix_memalign(&out, bad_alignments[i], 16);
        snprintf(what, sizeof what, "posix_memalign(align %zu)", bad_alignments[i]);
        printf("%s: rc=%s errno=%s out untouched=%d\n", what, err_name(rc), err_name(errno), out == &rc);
    }
    errno = EILSEQ;
    p = NULL;
    rc = p_posix_memalign(&p, 64, SIZE_MAX - 1000);
    printf("posix_memalign(64, huge): rc=%s errno=%s\n", err_name(rc), err_name(errno));
    static const size_t good_alignments[] = {8, 16, 64, 4096, 65536, 1 << 21};
    for (size_t i = 0; i < sizeof good_alignments / sizeof *good_alignments; i++) {
        char what[64];
        size_t a = good_alignments[i];
        p = NULL;
        rc = p_posix_memalign(&p, a, 100);
        snprintf(what, sizeof what, "posix_memalign(%zu, 100) aligned", a);
        expect(what, rc == 0 && aligned(p, a) && p_usable(p) >= 100);
        p_free(p);

        p = p_aligned_alloc(a, 3 * a);
        snprintf(what, sizeof what, "aligned_alloc(%zu, %zu) aligned", a, 3 * a);
        expect(what, aligned(p, a) && p_usable(p) >= 3 * a);
        p_free(p);

        p = p_memalign(a, 10);
        snprintf(what, sizeof what, "memalign(%zu, 10) aligned", a);
        expect(what, aligned(p, a) && p_usable(p) >= 10);
        p_free(p);
    }
    /* What glibc does with odd alignments is printed, not judged: the
     * traced run must simply match it. */
    errno = 0;
    p = p_aligned_alloc(3, 16);
    printf("aligned_alloc(3, 16): %s errno=%s\n", p ? "non-NULL" : "NULL", err_name(errno));
    p_free(p);
    errno = 0;
    p = p_memalign(48, 16);
    printf("memalign(48, 16): %s aligned to 64=%d errno=%s\n", p ? "non-NULL" : "NULL", aligned(p, 64), err_name(errno));
    p_free(p);
    errno = 0;
    p = p_aligned_alloc(64, SIZE_MAX - 1000);
    null_and_errno("aligned_alloc(64, huge)", p, errno);

    long page = sysconf(_SC_PAGESIZE);
    p = p_valloc(10);
    expect("valloc(10) page-aligned", aligned(p, (size_t)page) && p_usable(p) >= 10);
    p_free(p);
    p = p_pvalloc(10);
    expect("pvalloc(10) page-aligned, a whole page", aligned(p, (size_t)page) && p_usable(p) >= (size_t)page);
    p_free(p);
    p = p_pvalloc(0);
    printf("pvalloc(0): %s\n", p ? "non-NULL" : "NULL");
    p_free(p);

    /* Data survives realloc of every kind of block. */
    realloc_preserves("realloc keeps data (malloc'd block)", p_malloc(16), 16);
    usable_bytes_survive_realloc(100, 30000);
    usable_bytes_survive_realloc(5000, 60000);
    usable_bytes_survive_realloc(40000, 70000);
    realloc_preserves("realloc keeps data (big block shrinking)", p_malloc(5u << 20), 5u << 20);
    p = NULL;
    p_posix_memalign(&p, 4096, 64);
    realloc_preserves("realloc keeps data (posix_memalign'd block)", p, 64);
    realloc_preserves("realloc keeps data (memalign'd block)", p_memalign(256, 300), 300);

    /* calloc zeroes, also memory that was dirty when freed. */
    p = p_malloc(8192);
    memset(p, 0xff, 8192);
    p_free(p);
    int zero = 1;
    for (int i = 0; i < 16; i++) {
        unsigned char *c = p_calloc(8192, 1);
        for (int k = 0; k < 8192; k++) zero &= c[k] == 0;
        memset(c, 0xee, 8192);
        p_free(c);
    }
    /* Blocks past 64 KiB (which a sampled calloc leaves to the real
     * calloc), reusing dirty memory. */
    for (int i = 0; i < 16; i++) {
        unsigned char *c = p_calloc(100000 + i * 4096, 1);
        for (int k = 0; k < 100000 + i * 4096; k++) zero &= c[k] == 0;
        memset(c, 0xdd, 100000 + i * 4096);
        p_free(c);
    }
    unsigned char *big = p_calloc(1000, 1000);
    for (int k = 0; k < 1000000; k++) zero &= big[k] == 0;
    p_free(big);
    expect("calloc returns zeroed memory", zero);

    /* A successful call does not change errno (the tracer's own system
     * calls must not leak into it). */
    errno = EILSEQ;
    p = p_malloc(100);
    p = p_realloc(p, 10000);
    q = p_calloc(10, 10);
    p_free(p);
    p_free(q);
    p = p_aligned_alloc(64, 64);
    p_free(p);
    printf("errno after successful calls: %s\n", err_name(errno));

    /* Every size up to 5000 round-trips, written to its last byte. */
    int sizes_ok = 1;
    for (size_t n = 0; n < 5000; n += 3) {
        unsigned char *b = p_malloc(n);
        memset(b, 0x5a, n);
        b = p_realloc(b, n + 1);
        sizes_ok &= b != NULL && p_usable(b) >= n + 1;
        p_free(b);
    }
    expect("sizes 0..5000 malloc/realloc/free", sizes_ok);

    signal(SIGUSR1, on_signal);
    for (int i = 0; i < 100; i++) raise(SIGUSR1);
    expect("allocating signal handler ran", 1);

    printf("failures: %d\n", failures);
    return failures == 0 ? 0 : 1;
}
