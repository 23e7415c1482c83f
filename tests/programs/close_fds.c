/* A daemon-like program that changes to / and closes every descriptor it
 * did not open, then opens a file of its own and puts it on every free
 * descriptor number from 3 to 599 (as a program that opens many files, or
 * dup2s onto fixed numbers, might): whatever number the tracer's trace file
 * had now names the program's file. It allocates and frees for a while, more
 * than the trace file had room for (the tracer's writer appends all along
 * and must grow the file), leaks at two known call sites, one before and
 * one after the closing, and finally checks that its file still holds
 * exactly what it wrote.
 *
 *     close_fds OWN_FILE
 *
 * Prints "own file intact" or "own file changed" and exits 0 unless
 * something of its own failed. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

#define OWN_BYTES 65536

static void *leaked[200];

NOINLINE static void leak_before_closing(void) {
    for (int i = 0; i < 10; i++) {
        leaked[i] = malloc(500);
        keep(leaked[i]);
    }
}

NOINLINE static void leak_after_closing(void) {
    for (int i = 0; i < 100; i++) {
        leaked[100 + i] = malloc(1000);
        keep(leaked[100 + i]);
    }
}

/* Short-lived blocks, so that the writer has records to append while the
 * program's file sits on the trace file's old number. */
NOINLINE static void churn(int n) {
    for (int i = 0; i < n; i++) {
        void *p = malloc(64 + (i & 255));
        keep(p);
        free(p);
    }
}

static void pause_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: close_fds OWN_FILE\n");
        return 2;
    }
    leak_before_closing();
    churn(2000);
    pause_ms(50);

    /* What a daemon does: away from the directory it started in, and every
     * descriptor but the standard three goes. (Its own file's path is made
     * absolute first.) */
    char own[8192] = "";
    if (argv[1][0] != '/' && !getcwd(own, 4096)) {
        perror("getcwd");
        return 1;
    }
    if (argv[1][0] != '/') strcat(own, "/");
    strncat(own, argv[1], 4000);
    if (chdir("/") != 0) {
        perror("chdir");
        return 1;
    }
    if (close_range(3, ~0U, 0) != 0) {
        for (int n = 3; n < 1024; n++) close(n);
    }
    int fd = open(own, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        perror("open");
        return 1;
    }
    static char pattern[OWN_BYTES];
    for (int i = 0; i < OWN_BYTES; i++) pattern[i] = 'a' + i % 26;
    if (write(fd, pattern, OWN_BYTES) != OWN_BYTES) {
        perror("write");
        return 1;
    }
    for (int n = 3; n < 600; n++) {
        if (n != fd) dup2(fd, n);
    }

    /* 300,000 events in exact mode, about 2 MB: past the first megabyte
     * the trace file had room for. */
    for (int round = 0; round < 5; round++) {
        churn(30000);
        pause_ms(30);
    }
    leak_after_closing();
    pause_ms(50);

    static char back[OWN_BYTES + 1];
    ssize_t got = pread(fd, back, sizeof back, 0);
    int intact = got == OWN_BYTES && memcmp(back, pattern, OWN_BYTES) == 0;
    printf("own file %s (%zd bytes)\n", intact ? "intact" : "changed", got);
    return 0;
}
