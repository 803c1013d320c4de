/* pool.c: native worker threads, in two pools.
 *
 * The CPU pool (ab_await_work) has one thread per CPU, at a lower priority,
 * all started on first use.  The blocking pool (ab_await_blocking) is for
 * calls that mostly wait: its threads start one at a time, when a call
 * finds none idle, up to its size (64 by default), so that a burst of slow
 * DNS lookups never holds up CPU work and CPU work never holds up them.
 *
 * The engine queues an op; a worker runs op->work(op) without any lock
 * held and posts AB_EV_WORK back to the engine.  A work op (AB_TYPE_WORK)
 * is queued by its owner's ab_submit instead, and the worker runs its one
 * step and hands the outcome to the sink itself.  The number of threads
 * follows ab_pool_configure / ab_blocking_configure, growing at once and
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

struct pool;

struct worker {
    struct pool *pool;
    pthread_t thread;
    int leave; /* told to leave (a stop, or the pool shrank) */
    int left;  /* returned from worker_main: join it */
    pid_t tid; /* its gettid(), for ab_thread_wait_gone */
    struct worker *next;
};

struct pool {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    ab_op *head, *tail;
    int target;  /* threads wanted; 0 = CPU count (CPU pool only) */
    int threads; /* workers not told to leave */
    int idle;    /* workers waiting for work */
    int queued;  /* ops on the queue */
    int on_demand; /* start threads only when no worker is idle */
    int nice;
    int ncpu;    /* CPUs online, read when the pool starts or is configured */
    const char *name;
    struct worker *workers;
};

static struct pool P = {
    .mu = PTHREAD_MUTEX_INITIALIZER,
    .cv = PTHREAD_COND_INITIALIZER,
    .nice = AB__WORKER_NICE,
    .name = "ab-worker",
};
static struct pool B = {
    .mu = PTHREAD_MUTEX_INITIALIZER,
    .cv = PTHREAD_COND_INITIALIZER,
    .target = 64,
    .on_demand = 1,
    .name = "ab-blocking",
};

/* With p->mu held.  sysconf reads a file in /sys (three system calls):
 * once per start or configure, not per op. */
static void
count_cpus(struct pool *p)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    p->ncpu = n > 0 ? (int)n : 1;
}

static int
wanted(const struct pool *p)
{
    if (p->target > 0)
        return p->target;
    return p->ncpu > 0 ? p->ncpu : 1;
}

static void *
worker_main(void *arg)
{
    struct worker *self = arg;
    struct pool *p = self->pool;
    pthread_setname_np(pthread_self(), p->name);
    self->tid = gettid(); /* read by the joiner after pthread_join */
#ifdef __linux__
    /* A CPU worker yields the CPU to the threads that run event loops:
     * with every core busy in the pool, a loop still wakes up on time.
     * On Linux, nice is per thread. */
    if (p->nice)
        setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), p->nice);
#endif
    pthread_mutex_lock(&p->mu);
    for (;;) {
        p->idle++;
        while (p->head == NULL && !self->leave && p->threads <= wanted(p))
            pthread_cond_wait(&p->cv, &p->mu);
        p->idle--;
        if (self->leave)
            break;
        if (p->threads > wanted(p)) {
            p->threads--;
            self->leave = 1;
            break;
        }
        ab_op *op = p->head;
        p->head = op->pool_next;
        if (p->head == NULL)
            p->tail = NULL;
        p->queued--;
        pthread_mutex_unlock(&p->mu);
        if (AB__WORK_OP(op)) {
            ab__work_op_run(op); /* finished here, without the engine */
        } else {
            /* Work that a cancel interrupted before it started is skipped
             * (the step resumes with AB_EV_CANCEL); work armed after the
             * cancel always runs. */
            if (ab_work_cancelled(op))
                op->work_skipped = 1;
            else
                op->work(op);
            ab__engine_post(op, AB_EV_WORK);
        }
        pthread_mutex_lock(&p->mu);
    }
    self->left = 1;
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

/* With p->mu held: take the workers that left off the list, to join them
 * once p->mu is released. */
static struct worker *
take_left(struct pool *p)
{
    struct worker *left = NULL, **link = &p->workers;
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
        ab_thread_wait_gone(list->tid);
        free(list);
        list = next;
    }
}

/* With p->mu held: start workers up to the pool's size, or for an
 * on-demand pool one more if none is idle for the work queued. */
static int
grow(struct pool *p)
{
    if (p->threads == 0)
        count_cpus(p);
    int rc = 0;
    if (p->threads >= wanted(p) || (p->on_demand && p->idle >= p->queued))
        return 0; /* the common case: no thread to start */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    while (p->threads < wanted(p) && (!p->on_demand || p->idle < p->queued)) {
        struct worker *w = calloc(1, sizeof(*w));
        if (w == NULL) {
            rc = -ENOMEM;
            break;
        }
        w->pool = p;
        rc = -pthread_create(&w->thread, NULL, worker_main, w);
        if (rc < 0) {
            free(w);
            break;
        }
        w->next = p->workers;
        p->workers = w;
        p->threads++;
        if (p->on_demand)
            break; /* one per call that found none idle */
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return p->threads > 0 ? 0 : rc;
}

static int
configure(struct pool *p, int workers)
{
    pthread_mutex_lock(&p->mu);
    p->target = workers;
    count_cpus(p);
    int rc = p->threads > 0 && !p->on_demand ? grow(p) : 0;
    pthread_cond_broadcast(&p->cv); /* let extra workers leave */
    struct worker *left = take_left(p);
    pthread_mutex_unlock(&p->mu);
    join_all(left);
    return rc;
}

static int
size_of(struct pool *p)
{
    pthread_mutex_lock(&p->mu);
    if (p->threads == 0)
        count_cpus(p);
    int n = wanted(p);
    pthread_mutex_unlock(&p->mu);
    return n;
}

int
ab_pool_configure(int workers)
{
    if (workers < 0 || workers > 1024)
        return -EINVAL;
    return configure(&P, workers);
}

int
ab_blocking_configure(int threads)
{
    if (threads < 1 || threads > 1024)
        return -EINVAL;
    return configure(&B, threads);
}

int ab_pool_size(void) { return size_of(&P); }
int ab_blocking_size(void) { return size_of(&B); }

int
ab__pool_submit(ab_op *op)
{
    struct pool *p = op->work_blocking ? &B : &P;
    pthread_mutex_lock(&p->mu);
    p->queued++;
    int rc = grow(p);
    if (rc == 0) {
        op->pool_next = NULL;
        if (p->tail != NULL)
            p->tail->pool_next = op;
        else
            p->head = op;
        p->tail = op;
        pthread_cond_signal(&p->cv);
    } else {
        p->queued--;
    }
    struct worker *left = take_left(p);
    pthread_mutex_unlock(&p->mu);
    join_all(left);
    return rc;
}

void
ab__pool_stats(ab_stats *out)
{
    pthread_mutex_lock(&P.mu);
    out->pool_queued = (uint64_t)P.queued;
    out->pool_threads = (uint64_t)P.threads;
    pthread_mutex_unlock(&P.mu);
    pthread_mutex_lock(&B.mu);
    out->blocking_queued = (uint64_t)B.queued;
    out->blocking_threads = (uint64_t)B.threads;
    pthread_mutex_unlock(&B.mu);
}

static void
resume_one(struct pool *p)
{
    pthread_mutex_lock(&p->mu);
    if (p->head != NULL)
        grow(p);
    pthread_mutex_unlock(&p->mu);
}

void
ab__pool_resume(void)
{
    resume_one(&P);
    resume_one(&B);
}

/* Every worker there is now leaves (workers a later submit starts are
 * new ones, whatever this stop is doing). */
static void
stop_one(struct pool *p, int join)
{
    pthread_mutex_lock(&p->mu);
    for (struct worker *w = p->workers; w != NULL; w = w->next) {
        if (!w->leave) {
            w->leave = 1;
            p->threads--;
        }
    }
    pthread_cond_broadcast(&p->cv);
    struct worker *list = NULL;
    if (join) {
        list = p->workers;
        p->workers = NULL;
    }
    pthread_mutex_unlock(&p->mu);
    /* Not joined, a worker in a long function leaves after it; the next
     * grow or stop joins it. */
    join_all(list);
}

void
ab__pool_stop(int join)
{
    stop_one(&P, join);
    stop_one(&B, join);
}

void
ab__pool_forget(void)
{
    struct pool *pools[] = {&P, &B};
    for (int i = 0; i < 2; i++) {
        pthread_mutex_lock(&pools[i]->mu);
        pools[i]->head = pools[i]->tail = NULL;
        pools[i]->queued = 0;
        pthread_mutex_unlock(&pools[i]->mu);
    }
}

void
ab__pool_atfork_prepare(void)
{
    pthread_mutex_lock(&P.mu);
    pthread_mutex_lock(&B.mu);
}

void
ab__pool_atfork_parent(void)
{
    pthread_mutex_unlock(&B.mu);
    pthread_mutex_unlock(&P.mu);
}

/* No worker exists in the child; queued ops belong to the parent. */
static void
child_one(struct pool *p)
{
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->head = p->tail = NULL;
    p->threads = p->idle = p->queued = 0;
    while (p->workers != NULL) {
        struct worker *next = p->workers->next;
        free(p->workers);
        p->workers = next;
    }
}

void
ab__pool_atfork_child(void)
{
    child_one(&P);
    child_one(&B);
}
