/* Leaks N blocks of SIZE bytes at leak_site and allocates+frees 4x as much
 * at churn_site: the sampling-accuracy probe of scripts/accuracy.sh. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
__attribute__((noinline)) void *leak_site(size_t n) { void *p = malloc(n); memset(p, 1, 8); return p; }
__attribute__((noinline)) void churn_site(size_t n) { void *p = malloc(n); memset(p, 2, 8); free(p); }
int main(int argc, char **argv) {
    long n = atol(argv[1]); size_t size = (size_t)atol(argv[2]);
    void **keep = malloc(sizeof(void *) * (size_t)n);
    for (long i = 0; i < n; i++) { keep[i] = leak_site(size); for (int k = 0; k < 4; k++) churn_site(size); }
    printf("%ld\n", n * (long)size);
    return 0;
}
