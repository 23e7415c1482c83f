/* Where each allocation hook's hot-path jump lands (patch.rs): looks up the
 * hook the program calls (ours under LD_PRELOAD), finds its conditional jump
 * with a 32-bit displacement (0f 85 or 0f 87) in the first 48 bytes, and
 * prints the module and symbol at the target, one line per hook:
 *
 *     malloc /path/of/hook.so -> /path/of/target.so symbol
 *
 * Then allocates and frees through every hook, so a wrong jump would crash
 * or corrupt the heap here. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(void) {
    static const char *names[] = {"malloc", "free", "calloc", "realloc", "posix_memalign",
                                  "aligned_alloc", "memalign", "valloc", "pvalloc"};
    for (unsigned k = 0; k < sizeof names / sizeof *names; k++) {
        const unsigned char *f = dlsym(RTLD_DEFAULT, names[k]);
        Dl_info hook, target;
        if (!f || !dladdr(f, &hook)) {
            printf("%s not found\n", names[k]);
            continue;
        }
        const char *to = "none", *sym = "-";
        for (int i = 0; i < 48; i++) {
            if (f[i] == 0x0f && (f[i + 1] == 0x85 || f[i + 1] == 0x87)) {
                int32_t rel;
                memcpy(&rel, f + i + 2, 4);
                if (dladdr(f + i + 6 + rel, &target)) {
                    to = target.dli_fname;
                    sym = target.dli_sname ? target.dli_sname : "?";
                }
                break;
            }
        }
        printf("%s %s -> %s %s\n", names[k], hook.dli_fname, to, sym);
    }
    unsigned long sum = 0;
    for (int round = 0; round < 1000; round++) {
        size_t n = 16 + (size_t)round * 37;
        char *a = malloc(n), *b = calloc(n, 1), *c = memalign(64, n), *d = aligned_alloc(32, 64);
        void *e = NULL;
        if (posix_memalign(&e, 128, n)) return 1;
        char *v = valloc(n), *pv = pvalloc(n);
        if (!a || !b || !c || !d || !e || !v || !pv) return 1;
        a[n - 1] = 1;
        a = realloc(a, 2 * n);
        if (!a) return 1;
        sum += (unsigned char)a[n - 1] + (unsigned char)b[n - 1];
        free(a), free(b), free(c), free(d), free(e), free(v), free(pv);
    }
    printf("sum %lu\n", sum);
    return 0;
}
