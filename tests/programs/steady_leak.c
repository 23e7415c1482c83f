/* Leaks 1000 bytes about every millisecond at leak_steady and prints
 * "leaked <objects>" after every 10 leaks, until killed. tests/crash.rs
 * kills it with SIGKILL and reads what the tracer left on disk. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common.h"

NOINLINE void leak_steady(void) {
    char *p = malloc(1000);
    memset(p, 7, 1000);
    keep(p);
}

/* Freed at once: keeps the trace busy with events that cancel out. */
NOINLINE void churn(void) {
    for (int i = 0; i < 20; i++) {
        void *p = malloc(64 + i);
        keep(p);
        free(p);
    }
}

int main(void) {
    struct timespec ms = {0, 1000000};
    for (long n = 1;; n++) {
        leak_steady();
        churn();
        if (n % 10 == 0) {
            printf("leaked %ld\n", n);
            fflush(stdout);
        }
        nanosleep(&ms, NULL);
    }
}
