/* The floor of scripts/bench.sh: an LD_PRELOAD interposer that does nothing
 * but forward every allocation entry point to glibc's internal names
 * (__libc_malloc and friends). Its cost over a bare run is the price of
 * interposition itself (the PLT indirection into a preloaded object), which
 * no tracer can go below.
 *
 *     gcc -O2 -shared -fPIC -o libforward.so forward.c */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void *__libc_valloc(size_t);
extern void *__libc_pvalloc(size_t);
extern size_t __malloc_usable_size(void *) __attribute__((weak));
extern size_t malloc_usable_size(void *);

#define EXPORT __attribute__((visibility("default")))

EXPORT void *malloc(size_t size) { return __libc_malloc(size); }
EXPORT void free(void *p) { __libc_free(p); }
EXPORT void *calloc(size_t n, size_t size) { return __libc_calloc(n, size); }
EXPORT void *realloc(void *p, size_t size) { return __libc_realloc(p, size); }
EXPORT void *memalign(size_t align, size_t size) { return __libc_memalign(align, size); }
EXPORT void *valloc(size_t size) { return __libc_valloc(size); }
EXPORT void *pvalloc(size_t size) { return __libc_pvalloc(size); }

EXPORT void *aligned_alloc(size_t align, size_t size) {
    /* glibc 2.36 accepts any power-of-two alignment here, as memalign does. */
    if (align == 0 || (align & (align - 1)) != 0) {
        errno = EINVAL;
        return NULL;
    }
    return __libc_memalign(align, size);
}

EXPORT int posix_memalign(void **out, size_t align, size_t size) {
    if (align < sizeof(void *) || (align & (align - 1)) != 0) return EINVAL;
    void *p = __libc_memalign(align, size);
    if (!p) return ENOMEM;
    *out = p;
    return 0;
}
