/* Threads that allocate, leak and exit long before main does, including a
 * leak from a thread-specific-data destructor, which runs during the
 * thread's exit. tests/processes.rs checks every leak is reported. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"

#define SHORT_THREADS 20

static pthread_key_t key;

NOINLINE void leak_in_joined_thread(void) { keep(malloc(555)); }
NOINLINE void leak_in_short_thread(void) { keep(malloc(10)); }
NOINLINE void leak_in_detached_thread(void) { keep(malloc(4321)); }
NOINLINE void leak_in_key_destructor(void) { keep(malloc(66)); }

static void destructor(void *value) {
    free(value);
    leak_in_key_destructor();
}

static void *joined(void *arg) {
    (void)arg;
    for (int i = 0; i < 1000; i++) {
        void *p = malloc(32 + i);
        keep(p);
        free(p);
    }
    leak_in_joined_thread();
    return NULL;
}

static void *short_lived(void *arg) {
    (void)arg;
    pthread_setspecific(key, strdup("value"));
    leak_in_short_thread();
    return NULL;
}

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int detached_done;

static void *detached(void *arg) {
    (void)arg;
    leak_in_detached_thread();
    pthread_mutex_lock(&lock);
    detached_done = 1;
    pthread_cond_signal(&cond);
    pthread_mutex_unlock(&lock);
    return NULL;
}

int main(void) {
    pthread_t t;
    pthread_key_create(&key, destructor);
    pthread_create(&t, NULL, joined, NULL);
    pthread_join(t, NULL);
    for (int i = 0; i < SHORT_THREADS; i++) {
        pthread_create(&t, NULL, short_lived, NULL);
        pthread_join(t, NULL);
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_create(&t, &attr, detached, NULL);
    pthread_mutex_lock(&lock);
    while (!detached_done) pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
    /* Let the detached thread finish exiting before main does. */
    usleep(50000);
    printf("done\n");
    return 0;
}
