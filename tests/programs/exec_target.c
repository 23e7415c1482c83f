/* Run by fork_exec through execl: same pid, new program image. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "common.h"

NOINLINE void leak_after_exec(void) { keep(malloc(222)); }

int main(void) {
    leak_after_exec();
    printf("exec %d\n", (int)getpid());
    return 0;
}
