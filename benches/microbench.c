/* The per-call cost probe of scripts/bench.sh: N times malloc(64) then
 * free, nothing else, on one thread. Run under callgrind at two values of N;
 * the difference in instructions divided by the difference in N is the cost
 * of one malloc+free pair with start-up cancelled out.
 *
 *     microbench N
 *
 * The pointer goes through a volatile so the compiler cannot pair up and
 * delete the malloc/free calls. */
#include <stdio.h>
#include <stdlib.h>

static void *volatile sink;

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    for (long i = 0; i < n; i++) {
        sink = malloc(64);
        free(sink);
    }
    return 0;
}
