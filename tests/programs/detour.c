/* Frees through every way in that glibc's rewritten free (detour.rs) must
 * handle, and prints the bytes around its entry, so the test can tell
 * whether it was rewritten:
 *
 *     free: e8 .. .. .. .. 0f 1f 80 00 00 00 00 48 85 ff 0f 84 .. .. .. ..
 *
 * (12 bytes before __libc_free, 9 from it), and after the frees, which object
the program's own PLT slot for free points into (the tracer's library, or
libc once detour.rs has pointed it there):

 *     free slot: /lib/x86_64-linux-gnu/libc.so.6

Then: blocks of 1 MiB, at least
 * the default rate and so always recorded, leaked, freed through the PLT and
 * freed through a pointer to free from dlsym (the tracer's hook, not
 * glibc's entry); 64 KiB-aligned ordinary blocks, which
 * every free of them sends to the tracer's slow path as candidates;
 * free(NULL); and small blocks freed at once. See tests/sampled.rs. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
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

/* The value of the main program's PLT slot for free, found through its
 * dynamic section as the loader sees it. */
static int find_slot(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
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
        if (strcmp(str + sym[ELF64_R_SYM(rel[i].r_info)].st_name, "free") == 0)
            *(void **)data = *(void **)(base + rel[i].r_offset);
    return 1; /* the main program only: it comes first */
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
    int aligned = churn_aligned();
    void *slot = NULL;
    Dl_info where;
    dl_iterate_phdr(find_slot, &slot);
    printf("free slot: %s\n", slot && dladdr(slot, &where) ? where.dli_fname : "?");
    printf("aligned %d\n", aligned);
    return 0;
}
