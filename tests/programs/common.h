/* Shared by the end-to-end test programs: keeps the compiler from moving,
 * merging or deleting the allocations the tests count. */
#ifndef MTRACE_TEST_COMMON_H
#define MTRACE_TEST_COMMON_H

#include <stdint.h>

/* A named call site must stay a frame of its own: gcc's noipa also forbids
 * cloning (leak_a.constprop.0) and inter-procedural shortcuts, so the
 * analyzer sees exactly the function name the test asserts on. */
#if defined(__clang__)
#define NOINLINE __attribute__((noinline))
#else
#define NOINLINE __attribute__((noipa))
#endif

/* gcc removes a malloc whose result is never used, and a malloc/free pair
 * with nothing in between; passing the pointer to an empty asm with a memory
 * clobber makes the block observable at no cost. */
static inline void keep(void *p) { __asm__ volatile("" : : "r"(p) : "memory"); }

/* Deterministic pseudo-random numbers (Marsaglia's xorshift64): the same
 * sequence on every run, so counts in the tests never depend on luck. */
static inline uint64_t xorshift64(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

#endif
