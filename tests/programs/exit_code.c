/* Allocates a little, prints, and exits with code 3: tests/config.rs checks
 * that a bad MTRACE_RS_* value changes neither output nor exit code. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

NOINLINE void leak_config(void) { keep(malloc(123)); }

int main(int argc, char **argv) {
    leak_config();
    char *s = strdup("unchanged output");
    printf("%s, %d args\n", s, argc);
    free(s);
    return 3;
}
