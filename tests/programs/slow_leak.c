/* A service with a slow leak and a one-time cache: at start, fill_cache
 * allocates 64 blocks of 16 KiB (1 MiB) and keeps them; then every 2 ms a
 * simulated client disconnects and on_disconnect leaks 300 bytes, for
 * about 1.2 s (600 disconnects), with churn around it. In the middle, a
 * 4 MiB burst in build_index is allocated and freed again, so the peak of
 * live bytes lies there. Prints the counts it leaked. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common.h"

static void sleep_ms(long ms) {
    struct timespec ts = {0, ms * 1000000L};
    nanosleep(&ts, NULL);
}

NOINLINE void fill_cache(void) {
    for (int i = 0; i < 64; i++) keep(memset(malloc(16384), 1, 16384));
}

NOINLINE void on_disconnect(void) { keep(memset(malloc(300), 2, 300)); }

NOINLINE void build_index(void) {
    void *blocks[64];
    for (int i = 0; i < 64; i++) blocks[i] = memset(malloc(65536), 3, 65536);
    sleep_ms(50);
    for (int i = 0; i < 64; i++) free(blocks[i]);
}

NOINLINE void handle_request(int i) {
    char *p = malloc(100 + i % 200);
    memset(p, 4, 100);
    free(p);
}

int main(void) {
    fill_cache();
    for (int i = 0; i < 600; i++) {
        handle_request(i);
        on_disconnect();
        if (i == 300) build_index();
        sleep_ms(2);
    }
    printf("leaked 600 x 300 bytes\n");
    return 0;
}
