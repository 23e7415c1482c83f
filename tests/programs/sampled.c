/* Sampled-mode test program: one site leaks 20000 x 100 bytes (2,000,000
 * bytes); other sites allocate and free more than a hundred times as much,
 * some of it freed by another thread. See tests/sampled.rs. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#define LEAKS 20000
#define HANDOFF 1024

NOINLINE void leak_small(void) {
    char *p = malloc(100);
    memset(p, 1, 100);
    keep(p);
}

/* Allocated and freed at once: nothing outstanding. */
NOINLINE void churn_site(size_t size) {
    char *p = malloc(size);
    memset(p, 2, size);
    keep(p);
    free(p);
}

/* Blocks allocated here are freed by the other thread. */
NOINLINE void *handoff_alloc(size_t size) {
    char *p = malloc(size);
    memset(p, 3, size);
    return p;
}

static void *queue[HANDOFF];
static int head, tail;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int producer_done;

static void *producer(void *arg) {
    (void)arg;
    for (int i = 0; i < 200000; i++) {
        churn_site(200);
        void *p = handoff_alloc(64 + i % 256);
        pthread_mutex_lock(&lock);
        while ((tail + 1) % HANDOFF == head) pthread_cond_wait(&cond, &lock);
        queue[tail] = p;
        tail = (tail + 1) % HANDOFF;
        pthread_cond_broadcast(&cond);
        pthread_mutex_unlock(&lock);
    }
    pthread_mutex_lock(&lock);
    producer_done = 1;
    pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
    return NULL;
}

static void *consumer(void *arg) {
    (void)arg;
    int leaked = 0;
    for (;;) {
        if (leaked < LEAKS) {
            leak_small();
            leaked++;
            for (int i = 0; i < 10; i++) churn_site(150);
        }
        pthread_mutex_lock(&lock);
        while (head == tail && !producer_done && leaked >= LEAKS) pthread_cond_wait(&cond, &lock);
        if (head == tail && producer_done && leaked >= LEAKS) {
            pthread_mutex_unlock(&lock);
            break;
        }
        while (head != tail) {
            free(queue[head]);
            head = (head + 1) % HANDOFF;
        }
        pthread_cond_broadcast(&cond);
        pthread_mutex_unlock(&lock);
    }
    return NULL;
}

int main(void) {
    pthread_t p, c;
    pthread_create(&p, NULL, producer, NULL);
    pthread_create(&c, NULL, consumer, NULL);
    pthread_join(p, NULL);
    pthread_join(c, NULL);
    printf("leaked %d x 100 bytes\n", LEAKS);
    return 0;
}
