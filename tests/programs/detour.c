/* Frees and allocates through every way in that glibc's rewritten free and
 * malloc (detour.rs) must handle, and prints the bytes around their entries,
 * so the test can tell whether they were rewritten:
 *
 *     free: e8 .. .. .. .. 0f 1f 80 00 00 00 00 48 85 ff 0f 84 .. .. .. ..
 *     malloc: 41 54 55 53 48 89 fb 48 83 ec 10 80 3d .. .. .. .. 00 0f 84 ..
 *     calloc: 41 55 48 89 f8 41 54 55 53 48 83 ec 18 48 f7 e6 48 89 c3 ..
 *
 * (12 bytes before __libc_free, 9 from it; the first 33 of __libc_malloc,
 * the first 56 of __libc_calloc),
 * and after the calls, which objects the program's own PLT slots for free,
 * malloc and calloc point into (the tracer's library, or libc once detour.rs has
 * pointed them there):
 *
 *     free slot: /lib/x86_64-linux-gnu/libc.so.6
 *     malloc slot: /lib/x86_64-linux-gnu/libc.so.6

Then: blocks of 1 MiB, at least
 * the default rate and so always recorded, leaked, freed through the PLT and
 * freed through a pointer to free from dlsym (the tracer's hook, not
 * glibc's entry); 64 KiB-aligned ordinary blocks, which
 * every free of them sends to the tracer's slow path as candidates;
 * free(NULL); and small blocks freed at once. See tests/sampled.rs. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <elf.h>
#include <link.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

extern void __libc_free(void *);
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);

/* Whether `n` bytes at `p` are all zero. */
static int zeroed(const unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i]) return 0;
    return 1;
}

/* 1 MiB blocks (always recorded at the default rate) through the ways to
 * malloc that do not go through the program's PLT slot for malloc: a
 * pointer from dlsym (the tracer's hook), realloc of NULL, and the aligned
 * allocators with an alignment glibc hands to its malloc; and memalign
 * with alignments glibc takes though they are not powers of two (0 and 24:
 * malloc's 16, and 32). */
NOINLINE void leak_other_ways(void) {
    void *(*volatile get)(size_t) = (void *(*)(size_t))dlsym(RTLD_DEFAULT, "malloc");
    void *p = get(1 << 20);
    void *q = realloc(NULL, 1 << 20);
    void *r = memalign(16, 1 << 20);
    void *s = aligned_alloc(16, 1 << 20);
    void *t = NULL;
    if (posix_memalign(&t, 8, 1 << 20) != 0) abort();
    size_t volatile zero = 0, odd = 24;
    void *u = memalign(zero, 1 << 20);
    void *v = memalign(odd, 1 << 20);
    if (!p || !q || !r || !s || !t || !u || !v || (uintptr_t)v % 32) abort();
    keep(p), keep(q), keep(r), keep(s), keep(t), keep(u), keep(v);
}

/* calloc through the PLT, 1 MiB twice, each zeroed; dirtied so that
 * recycled memory would show. */
NOINLINE void leak_calloc(void) {
    for (int i = 0; i < 2; i++) {
        unsigned char *p = calloc(1 << 10, 1 << 10);
        if (!p || !zeroed(p, 1 << 20)) abort();
        keep(p);
    }
}

/* The same ways with small and medium blocks, all freed: they move the
 * countdown, so a way charged twice (or not at all) moves every later
 * sample point. */
NOINLINE void churn_other_ways(void) {
    void *(*volatile get)(size_t) = (void *(*)(size_t))dlsym(RTLD_DEFAULT, "malloc");
    uint64_t seed = 11;
    for (int i = 0; i < 20000; i++) {
        size_t n = 16 + xorshift64(&seed) % 4000;
        void *p = NULL;
        switch (i % 7) {
        case 0: p = get(n); break;
        case 1: p = realloc(NULL, n); break;
        case 2: p = memalign(i % 12 == 2 ? 0 : 16, n); break;
        case 3: p = aligned_alloc(16, n); break;
        case 4: if (posix_memalign(&p, i % 12 == 4 ? 8 : 16, n) != 0) abort(); break;
        case 5: p = calloc(1 + i % 3, n); if (p && !zeroed(p, n)) abort(); break;
        default: p = malloc(n); break;
        }
        if (!p) abort();
        memset(p, 0xab, n);
        keep(p);
        free(p);
    }
}

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
    /* From the loader, not `= free`: an executable that takes free's
     * address calls it through that address's GOT slot, not its PLT. */
    void (*volatile release)(void *) = (void (*)(void *))dlsym(RTLD_DEFAULT, "free");
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

/* The value of the main program's PLT slot for a function, found through
 * its dynamic section as the loader sees it. */
struct slot_query {
    const char *name;
    void *value;
};

static int find_slot(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
    struct slot_query *q = data;
    ElfW(Addr) base = info->dlpi_addr;
    const ElfW(Dyn) *dyn = NULL;
    for (int i = 0; i < info->dlpi_phnum; i++)
        if (info->dlpi_phdr[i].p_type == PT_DYNAMIC)
            dyn = (const ElfW(Dyn) *)(base + info->dlpi_phdr[i].p_vaddr);
    if (!dyn) return 1;
    const ElfW(Rela) *rel = NULL;
    const ElfW(Sym) *sym = NULL;
    const char *str = NULL;
    size_t relsz = 0;
    for (; dyn->d_tag != DT_NULL; dyn++) {
        ElfW(Addr) v = dyn->d_un.d_ptr < base ? base + dyn->d_un.d_ptr : dyn->d_un.d_ptr;
        if (dyn->d_tag == DT_JMPREL) rel = (const ElfW(Rela) *)v;
        if (dyn->d_tag == DT_PLTRELSZ) relsz = dyn->d_un.d_val;
        if (dyn->d_tag == DT_SYMTAB) sym = (const ElfW(Sym) *)v;
        if (dyn->d_tag == DT_STRTAB) str = (const char *)v;
    }
    for (size_t i = 0; rel && sym && str && i < relsz / sizeof *rel; i++)
        if (strcmp(str + sym[ELF64_R_SYM(rel[i].r_info)].st_name, q->name) == 0)
            q->value = *(void **)(base + rel[i].r_offset);
    return 1; /* the main program only: it comes first */
}

int main(void) {
    const unsigned char *entry = (const unsigned char *)__libc_free;
    printf("free:");
    for (int i = -12; i < 9; i++) printf(" %02x", entry[i]);
    printf("\n");
    const unsigned char *m = (const unsigned char *)__libc_malloc;
    printf("malloc:");
    for (int i = 0; i < 33; i++) printf(" %02x", m[i]);
    printf("\n");
    const unsigned char *c = (const unsigned char *)__libc_calloc;
    printf("calloc:");
    for (int i = 0; i < 56; i++) printf(" %02x", c[i]);
    printf("\n");
    /* Sizes glibc refuses: 2^63 or more, and a product that overflows. */
    size_t volatile big = SIZE_MAX - 4096, half = SIZE_MAX / 2;
    errno = 0;
    void *huge = malloc(big);
    printf("huge: %s\n", !huge && errno == ENOMEM ? "NULL ENOMEM" : "?");
    errno = 0;
    void *over = calloc(half, 4);
    printf("overflow: %s\n", !over && errno == ENOMEM ? "NULL ENOMEM" : "?");
    errno = 0;
    void *huge_calloc = calloc(1, big);
    printf("huge calloc: %s\n", !huge_calloc && errno == ENOMEM ? "NULL ENOMEM" : "?");
    churn_small();
    leak_other_ways();
    leak_calloc();
    churn_other_ways();
    leak_big();
    churn_big();
    churn_big_pointer();
    int aligned = churn_aligned();
    Dl_info where;
    const char *names[] = {"free", "malloc", "calloc"};
    for (int i = 0; i < 3; i++) {
        struct slot_query q = {names[i], NULL};
        dl_iterate_phdr(find_slot, &q);
        printf("%s slot: %s\n", names[i], q.value && dladdr(q.value, &where) ? where.dli_fname : "?");
    }
    printf("aligned %d\n", aligned);
    return 0;
}
