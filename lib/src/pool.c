/* pool.c: native worker threads for blocking or CPU-heavy functions.
 *
 * The engine queues an op; a worker runs op->work(op) without any lock
 * held and posts AB_EV_WORK back to the engine.  Threads start on first
 * use; their number follows ab_pool_configure, growing at once and
 * shrinking as idle workers notice.  Workers are joinable: one that left
 * is joined by the next grow or stop, so that a stopped pool has no thread
 * left at all (a fork must not count one). */
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

/* How much lower than the process the workers run (nice levels). */
#define AB__WORKER_NICE 10

#include "ab-internal.h"

struct worker {
    pthread_t thread;
    int leave; /* told to leave (a stop, or the pool shrank) */
    int left;  /* returned from worker_main: join it */
    struct worker *next;
};

static struct pool {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    ab_op *head, *tail;
    int target;  /* threads wanted; 0 = CPU count */
    int threads; /* workers not told to leave */
    struct worker *workers;
} P = {
    .mu = PTHREAD_MUTEX_INITIALIZER,
    .cv = PTHREAD_COND_INITIALIZER,
};

static int
wanted(void)
{
    if (P.target > 0)
        return P.target;
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

static void *
worker_main(void *arg)
{
    struct worker *self = arg;
    pthread_setname_np(pthread_self(), "ab-worker");
#ifdef __linux__
    /* A worker yields the CPU to the threads that run event loops: with
     * every core busy in the pool, a loop still wakes up on time.  On
     * Linux, nice is per thread. */
    setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), AB__WORKER_NICE);
#endif
    pthread_mutex_lock(&P.mu);
    for (;;) {
        while (P.head == NULL && !self->leave && P.threads <= wanted())
            pthread_cond_wait(&P.cv, &P.mu);
        if (self->leave)
            break;
        if (P.threads > wanted()) {
            P.threads--;
            self->leave = 1;
            break;
        }
        ab_op *op = P.head;
        P.head = op->pool_next;
        if (P.head == NULL)
            P.tail = NULL;
        pthread_mutex_unlock(&P.mu);
        /* A cancelled op that has not started its work skips it. */
        if (!atomic_load(&op->cancel_asked))
            op->work(op);
        ab__engine_post(op, AB_EV_WORK);
        pthread_mutex_lock(&P.mu);
    }
    self->left = 1;
    pthread_mutex_unlock(&P.mu);
    return NULL;
}

/* With P.mu held: take the workers that left off the list, to join them
 * once P.mu is released. */
static struct worker *
take_left(void)
{
    struct worker *left = NULL, **link = &P.workers;
    while (*link != NULL) {
        struct worker *w = *link;
        if (w->left) {
            *link = w->next;
            w->next = left;
            left = w;
        } else {
            link = &w->next;
        }
    }
    return left;
}

static void
join_all(struct worker *list)
{
    while (list != NULL) {
        struct worker *next = list->next;
        pthread_join(list->thread, NULL);
        free(list);
        list = next;
    }
}

/* With P.mu held. */
static int
grow(void)
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = 0;
    while (P.threads < wanted()) {
        struct worker *w = calloc(1, sizeof(*w));
        if (w == NULL) {
            rc = -ENOMEM;
            break;
        }
        rc = -pthread_create(&w->thread, NULL, worker_main, w);
        if (rc < 0) {
            free(w);
            break;
        }
        w->next = P.workers;
        P.workers = w;
        P.threads++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return P.threads > 0 ? 0 : rc;
}

int
ab_pool_configure(int workers)
{
    if (workers < 0 || workers > 1024)
        return -EINVAL;
    pthread_mutex_lock(&P.mu);
    P.target = workers;
    int rc = P.threads > 0 ? grow() : 0;
    pthread_cond_broadcast(&P.cv); /* let extra workers leave */
    struct worker *left = take_left();
    pthread_mutex_unlock(&P.mu);
    join_all(left);
    return rc;
}

int
ab_pool_size(void)
{
    pthread_mutex_lock(&P.mu);
    int n = wanted();
    pthread_mutex_unlock(&P.mu);
    return n;
}

int
ab__pool_submit(ab_op *op)
{
    pthread_mutex_lock(&P.mu);
    int rc = grow();
    if (rc == 0) {
        op->pool_next = NULL;
        if (P.tail != NULL)
            P.tail->pool_next = op;
        else
            P.head = op;
        P.tail = op;
        pthread_cond_signal(&P.cv);
    }
    struct worker *left = take_left();
    pthread_mutex_unlock(&P.mu);
    join_all(left);
    return rc;
}

void
ab__pool_resume(void)
{
    pthread_mutex_lock(&P.mu);
    if (P.head != NULL)
        grow();
    pthread_mutex_unlock(&P.mu);
}

/* Every worker there is now leaves (workers a later submit starts are
 * new ones, whatever this stop is doing). */
void
ab__pool_stop(int join)
{
    pthread_mutex_lock(&P.mu);
    for (struct worker *w = P.workers; w != NULL; w = w->next) {
        if (!w->leave) {
            w->leave = 1;
            P.threads--;
        }
    }
    pthread_cond_broadcast(&P.cv);
    struct worker *list = NULL;
    if (join) {
        list = P.workers;
        P.workers = NULL;
    }
    pthread_mutex_unlock(&P.mu);
    /* Not joined, a worker in a long function leaves after it; the next
     * grow or stop joins it. */
    join_all(list);
}

void
ab__pool_forget(void)
{
    pthread_mutex_lock(&P.mu);
    P.head = P.tail = NULL;
    pthread_mutex_unlock(&P.mu);
}

void ab__pool_atfork_prepare(void) { pthread_mutex_lock(&P.mu); }
void ab__pool_atfork_parent(void) { pthread_mutex_unlock(&P.mu); }

/* No worker exists in the child; queued ops belong to the parent. */
void
ab__pool_atfork_child(void)
{
    pthread_mutex_init(&P.mu, NULL);
    pthread_cond_init(&P.cv, NULL);
    P.head = P.tail = NULL;
    P.threads = 0;
    while (P.workers != NULL) {
        struct worker *next = P.workers->next;
        free(P.workers);
        P.workers = next;
    }
}
