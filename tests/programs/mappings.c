/* Anonymous mappings the program makes itself, for MTRACE_RS_MMAP=1:
 * reserve_arena maps 64 MiB and keeps 60 MiB of it (a 4 MiB hole is
 * unmapped from the middle), scratch_buffer maps 8 MiB and unmaps it,
 * grow_table maps 1 MiB and mremaps it to 3 MiB; a file mapping is made and
 * kept, and must not count. Prints the bytes it still holds anonymously. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common.h"

#define MIB (1024L * 1024L)

NOINLINE char *reserve_arena(void) {
    return mmap(NULL, 64 * MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
}

NOINLINE void scratch_buffer(void) {
    char *p = mmap(NULL, 8 * MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    p[0] = 1;
    munmap(p, 8 * MIB);
}

NOINLINE char *grow_table(void) {
    char *p = mmap(NULL, 1 * MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return mremap(p, 1 * MIB, 3 * MIB, MREMAP_MAYMOVE);
}

int main(void) {
    char *arena = reserve_arena();
    munmap(arena + 16 * MIB, 4 * MIB);
    scratch_buffer();
    char *table = grow_table();
    int fd = open("/proc/self/exe", O_RDONLY);
    void *file = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, fd, 0);
    keep(arena);
    keep(table);
    keep(file);
    printf("%ld\n", 60 * MIB + 3 * MIB);
    return 0;
}
