/* pool.c: native worker threads for blocking or CPU-heavy functions.
 *
 * The engine queues an op; a worker runs op->work(op) without any lock
 * held and posts AB_EV_WORK back to the engine.  Threads start on first
 * use; their number follows ab_pool_configure, growing at once and
 * shrinking as idle workers notice. */
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

/* How much lower than the process the workers run (nice levels). */
#define AB__WORKER_NICE 10

#include "ab-internal.h"

static struct pool {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    ab_op *head, *tail;
    int target;  /* threads wanted; 0 = CPU count */
    int threads; /* threads alive */
    int stopping;
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
    (void)arg;
    pthread_setname_np(pthread_self(), "ab-worker");
#ifdef __linux__
    /* A worker yields the CPU to the threads that run event loops: with
     * every core busy in the pool, a loop still wakes up on time.  On
     * Linux, nice is per thread. */
    setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), AB__WORKER_NICE);
#endif
    pthread_mutex_lock(&P.mu);
    for (;;) {
        while (P.head == NULL && !P.stopping && P.threads <= wanted())
            pthread_cond_wait(&P.cv, &P.mu);
        if (P.stopping || P.threads > wanted())
            break;
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
    P.threads--;
    pthread_mutex_unlock(&P.mu);
    return NULL;
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
        pthread_t t;
        rc = -pthread_create(&t, NULL, worker_main, NULL);
        if (rc < 0)
            break;
        pthread_detach(t);
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
    pthread_mutex_unlock(&P.mu);
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
    P.stopping = 0;
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
    pthread_mutex_unlock(&P.mu);
    return rc;
}

void
ab__pool_stop(void)
{
    pthread_mutex_lock(&P.mu);
    P.stopping = 1;
    P.head = P.tail = NULL;
    pthread_cond_broadcast(&P.cv);
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
    P.stopping = 0;
}
