/* A parent that leaks before and after fork, a child that leaks 111 bytes
 * and exits, then an exec of exec_target (argv[1]), which leaks 222 bytes.
 * Each process prints its pid so tests/processes.rs can match trace files. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common.h"

NOINLINE void leak_parent_before_fork(void) { keep(malloc(333)); }
NOINLINE void leak_parent_after_fork(void) { keep(malloc(444)); }
NOINLINE void leak_in_child(void) { keep(malloc(111)); }

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    printf("parent %d\n", (int)getpid());
    fflush(stdout);
    leak_parent_before_fork();
    pid_t child = fork();
    if (child < 0) return 3;
    if (child == 0) {
        leak_in_child();
        printf("child %d\n", (int)getpid());
        fflush(stdout);
        exit(0);
    }
    int status = 0;
    waitpid(child, &status, 0);
    leak_parent_after_fork();
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return 4;
    fflush(stdout);
    execl(argv[1], argv[1], (char *)NULL);
    perror("execl");
    return 5;
}
