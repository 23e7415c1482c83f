/* The bundled demo: a small multi-threaded "service" that leaks on an error
 * path. Four workers handle 70 simulated requests each (280 in all). Every
 * 7th request fails to parse, and handle_request returns early without
 * freeing the body that read_body allocated: 40 leaks of 512 bytes. Every
 * 10th request also remembers its client in a list nobody frees: 28 list
 * nodes of 16 bytes and 28 names of 10 bytes (strdup is an allocator
 * wrapper, so the names count at remember_client). Everything else is
 * freed. The counts are deterministic, so under the tracer in exact mode
 * the report shows:
 *
 *     read_body         20480 bytes  40 objects
 *     remember_client     728 bytes  56 objects
 *
 * Build and run it with scripts/demo.sh. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define WORKERS 4
#define REQUESTS_PER_WORKER 70
#define BODY_SIZE 512

/* Keep the demo's functions out of line and uncloned (no read_body.isra.0),
 * so the report names them as written. */
#if defined(__clang__)
#define SITE __attribute__((noinline))
#else
#define SITE __attribute__((noinline, noclone))
#endif

struct request {
    int id;
    char *headers;
    char *body;
    size_t body_len;
};

struct client {
    char *name;
    struct client *next;
};

static struct client *clients;
static pthread_mutex_t clients_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned long checksum;
static pthread_mutex_t checksum_lock = PTHREAD_MUTEX_INITIALIZER;

SITE char *read_headers(int id) {
    char *h = calloc(16, 16);
    snprintf(h, 256, "GET /item/%d HTTP/1.1\r\nHost: demo\r\n", id);
    return h;
}

/* The body arrives in chunks; the buffer grows with realloc, then is
 * replaced by one of its final size. */
SITE char *read_body(int id, size_t *len) {
    char *chunked = NULL;
    size_t have = 0;
    for (int chunk = 0; chunk < 4; chunk++) {
        chunked = realloc(chunked, have + 128);
        memset(chunked + have, 'a' + (id + chunk) % 26, 128);
        have += 128;
    }
    char *body = malloc(BODY_SIZE);
    memcpy(body, chunked, BODY_SIZE);
    free(chunked);
    *len = BODY_SIZE;
    return body;
}

/* Fails for every 7th request. */
SITE int parse_request(const struct request *r) {
    char *copy = strdup(r->headers);
    int ok = strstr(copy, "GET ") == copy && r->id % 7 != 0;
    free(copy);
    return ok;
}

/* The second, smaller leak: a list of client names that only grows. */
SITE void remember_client(int id) {
    char name[16];
    snprintf(name, sizeof name, "client-%02d", id % 100);
    struct client *c = malloc(sizeof *c);
    c->name = strdup(name);
    pthread_mutex_lock(&clients_lock);
    c->next = clients;
    clients = c;
    pthread_mutex_unlock(&clients_lock);
}

SITE char *render_response(const struct request *r) {
    char *out = malloc(1024);
    int n = snprintf(out, 1024, "HTTP/1.1 200 OK\r\nContent-Length: %zu\r\n\r\n", r->body_len);
    memcpy(out + n, r->body, r->body_len < (size_t)(1024 - n) ? r->body_len : (size_t)(1024 - n));
    return out;
}

SITE int handle_request(int id) {
    struct request r = {.id = id};
    r.headers = read_headers(id);
    r.body = read_body(id, &r.body_len);
    if (id % 10 == 0) remember_client(id);
    if (!parse_request(&r)) {
        /* The bug: the body is not freed on this path. */
        free(r.headers);
        return -1;
    }
    char *response = render_response(&r);
    unsigned long sum = 0;
    for (size_t i = 0; i < 1024; i++) sum += (unsigned char)response[i];
    pthread_mutex_lock(&checksum_lock);
    checksum += sum;
    pthread_mutex_unlock(&checksum_lock);
    free(response);
    free(r.body);
    free(r.headers);
    return 0;
}

static void *worker(void *arg) {
    int first = (int)(long)arg * REQUESTS_PER_WORKER;
    long failed = 0;
    for (int i = 0; i < REQUESTS_PER_WORKER; i++)
        if (handle_request(first + i) != 0) failed++;
    return (void *)failed;
}

int main(void) {
    pthread_t threads[WORKERS];
    long failed = 0;
    for (long i = 0; i < WORKERS; i++) pthread_create(&threads[i], NULL, worker, (void *)i);
    for (int i = 0; i < WORKERS; i++) {
        void *f;
        pthread_join(threads[i], &f);
        failed += (long)f;
    }
    int remembered = 0;
    for (struct client *c = clients; c; c = c->next) remembered++;
    printf("handled %d requests, %ld failed to parse, %d clients remembered\n",
           WORKERS * REQUESTS_PER_WORKER, failed, remembered);
    return 0;
}
