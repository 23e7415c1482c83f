/* A library whose constructor frees a block before the tracer's constructor
 * runs (preloaded after libmtrace_rs.so, it is initialized first): glibc's
 * free has run, and under Valgrind been translated, before detour.rs
 * rewrites it. See tests/sampled.rs.
 *
 *     cc -shared -fPIC -o early_free.so early_free.c */
#include <stdlib.h>

#include "common.h"

__attribute__((constructor)) static void early_free(void) {
    void *p = malloc(10);
    keep(p);
    free(p);
}
