/* harness.h: shared helpers for the C tests of lib/.
 *
 * A test sink whose notify signals a condvar, waits with deadlines so a
 * hang fails instead of stalling, CHECK macros that print file:line and
 * exit non-zero, and a leak count of the ops a test created. */
#ifndef AB_TEST_HARNESS_H
#define AB_TEST_HARNESS_H

#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ab.h"

/* ---- checks ---------------------------------------------------------------- */

#define CHECK(cond)                                                           \
    do {                                                                      \
        if (!(cond)) {                                                        \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__,  \
                    #cond);                                                   \
            exit(1);                                                          \
        }                                                                     \
    } while (0)

#define CHECK_INT(a, op, b)                                                   \
    do {                                                                      \
        long long th__a = (long long)(a), th__b = (long long)(b);             \
        if (!(th__a op th__b)) {                                              \
            fprintf(stderr, "%s:%d: CHECK failed: %s %s %s (%lld vs %lld)\n", \
                    __FILE__, __LINE__, #a, #op, #b, th__a, th__b);           \
            exit(1);                                                          \
        }                                                                     \
    } while (0)

#define CHECK_EQ(a, b) CHECK_INT(a, ==, b)

#define CHECK_STR(a, b)                                                       \
    do {                                                                      \
        const char *th__a = (a), *th__b = (b);                                \
        if (th__a == NULL || th__b == NULL || strcmp(th__a, th__b) != 0) {    \
            fprintf(stderr, "%s:%d: CHECK failed: %s == %s (\"%s\" vs \"%s\")\n", \
                    __FILE__, __LINE__, #a, #b, th__a ? th__a : "(null)",     \
                    th__b ? th__b : "(null)");                                \
            exit(1);                                                          \
        }                                                                     \
    } while (0)

/* Zero or the error, as a CHECK. */
#define CHECK_OK(call) CHECK_EQ((call), 0)

/* Run one test function; AB_TEST_ONLY=name runs only that one. */
#define TH_RUN(fn)                                                            \
    do {                                                                      \
        const char *th__only = getenv("AB_TEST_ONLY");                        \
        if (th__only == NULL || *th__only == '\0' || strcmp(th__only, #fn) == 0) { \
            fprintf(stderr, "-- %s\n", #fn);                                  \
            fn();                                                             \
        }                                                                     \
    } while (0)

static inline double
th_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static inline void
th_sleep(double seconds)
{
    struct timespec ts = {(time_t)seconds,
                          (long)((seconds - (double)(time_t)seconds) * 1e9)};
    while (nanosleep(&ts, &ts) != 0)
        ;
}

static inline void
th_deadline(struct timespec *ts, double timeout)
{
    clock_gettime(CLOCK_REALTIME, ts);
    double ns = (double)ts->tv_nsec + timeout * 1e9;
    ts->tv_sec += (time_t)(ns / 1e9);
    ts->tv_nsec = (long)(ns - (double)(time_t)(ns / 1e9) * 1e9);
}

/* ---- op accounting: every op made with th_op_new must be freed ----------- */

static atomic_long th_ops_made, th_ops_freed;
static char th_magic;

static void
th_release_hook(ab_op *op)
{
    if (*(char **)ab_op_owner(op) == &th_magic)
        atomic_fetch_add(&th_ops_freed, 1);
}

/* Before main: every op, the engine's own included, gets the owner area
 * the hook reads. */
__attribute__((constructor)) static void
th_install_hook(void)
{
    ab_set_owner_size(sizeof(char *));
    ab_set_release_hook(th_release_hook);
}

static inline ab_op *
th_op_new(const ab_op_type *type)
{
    ab_op *op = ab_op_new(type);
    CHECK(op != NULL);
    *(char **)ab_op_owner(op) = &th_magic;
    atomic_fetch_add(&th_ops_made, 1);
    return op;
}

/* ---- the test sink ---------------------------------------------------------- */

typedef struct th_sink {
    ab_sink sink;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int signaled;
    atomic_long notifies;
    atomic_int retired;
    ab_op *batch; /* owner-local: the rest of a taken batch */
} th_sink;

static void
th_notify(ab_sink *sink)
{
    th_sink *ts = sink->user;
    atomic_fetch_add(&ts->notifies, 1);
    pthread_mutex_lock(&ts->mu);
    ts->signaled = 1;
    pthread_cond_broadcast(&ts->cv);
    pthread_mutex_unlock(&ts->mu);
}

static inline void
th_sink_init(th_sink *ts)
{
    memset(ts, 0, sizeof(*ts));
    pthread_mutex_init(&ts->mu, NULL);
    pthread_cond_init(&ts->cv, NULL);
    ab_sink_init(&ts->sink, th_notify, ts);
}

/* Free a sink's resources; for a retire callback, where no notify can
 * run any more. */
static inline void
th_sink_free(th_sink *ts)
{
    CHECK(ts->batch == NULL);
    CHECK(ab_sink_take(&ts->sink) == NULL);
    pthread_mutex_destroy(&ts->mu);
    pthread_cond_destroy(&ts->cv);
}

static void
th_retired(ab_sink *sink)
{
    atomic_store(&((th_sink *)sink->user)->retired, 1);
}

/* The owner is done with the sink.  The engine may still be inside
 * th_notify for the push that finished the last op: retire the sink (the
 * engine answers once no notify can run) before destroying its mutex. */
static inline void
th_sink_destroy(th_sink *ts)
{
    ab_sink_retire(&ts->sink, th_retired);
    for (int i = 0; !atomic_load(&ts->retired); i++) {
        CHECK(i < 100000); /* 10 s */
        th_sleep(0.0001);
    }
    th_sink_free(ts);
}

/* Wait until notified or the deadline passes; 0 if notified. */
static inline int
th_sink_wait(th_sink *ts, const struct timespec *deadline)
{
    int rc = 0, signaled;
    pthread_mutex_lock(&ts->mu);
    while (!ts->signaled && rc == 0)
        rc = pthread_cond_timedwait(&ts->cv, &ts->mu, deadline);
    signaled = ts->signaled;
    ts->signaled = 0;
    pthread_mutex_unlock(&ts->mu);
    return signaled ? 0 : -1;
}

/* The next message, waiting up to `timeout` seconds; NULL on timeout.  The
 * next link is read before the op is returned, as the contract asks. */
static inline ab_op *
th_next(th_sink *ts, double timeout, int *msg)
{
    struct timespec deadline;
    th_deadline(&deadline, timeout);
    for (;;) {
        if (ts->batch == NULL)
            ts->batch = ab_sink_take(&ts->sink);
        if (ts->batch != NULL) {
            ab_op *op = ts->batch;
            ts->batch = ab_sink_next(op);
            *msg = (int)ab_sink_msgs(op);
            return op;
        }
        if (th_sink_wait(ts, &deadline) < 0) {
            ts->batch = ab_sink_take(&ts->sink);
            if (ts->batch == NULL)
                return NULL;
        }
    }
}

/* Wait for `op` to finish and collect it (the test keeps its reference). */
#define TH_FINISH(ts, op) th_finish_at((ts), (op), __FILE__, __LINE__)

static inline void
th_finish_at(th_sink *ts, ab_op *op, const char *file, int line)
{
    int msg = 0;
    ab_op *got = th_next(ts, 10.0, &msg);
    if (got == NULL) {
        fprintf(stderr, "%s:%d: op did not finish within 10 s\n", file, line);
        exit(1);
    }
    if (got != op || msg != AB_MSG_FINISHED) {
        fprintf(stderr, "%s:%d: expected op %p FINISHED, got %p msg %d\n", file,
                line, (void *)op, (void *)got, msg);
        exit(1);
    }
    ab_op_collect(op);
}

/* Nothing more arrives on the sink within `seconds`. */
static inline void
th_expect_quiet(th_sink *ts, double seconds)
{
    int msg;
    ab_op *op = th_next(ts, seconds, &msg);
    if (op != NULL) {
        fprintf(stderr, "unexpected message %d for op %p (%s)\n", msg, (void *)op,
                ab_op_type_of(op)->name);
        exit(1);
    }
}

/* ---- the engine thread, observed from a step ------------------------------- */

static int
th_probe_step(ab_op *op)
{
    *(pthread_t *)ab_op_state(op) = pthread_self();
    return ab_return_none(op);
}

static const ab_op_type th_probe_type = {
    .name = "probe",
    .state_size = sizeof(pthread_t),
    .step = th_probe_step,
};

static inline pthread_t
th_engine_thread(void)
{
    th_sink ts;
    th_sink_init(&ts);
    ab_op *op = th_op_new(&th_probe_type);
    CHECK_OK(ab_submit(op, &ts.sink));
    TH_FINISH(&ts, op);
    pthread_t t = *(pthread_t *)ab_op_state(op);
    ab_op_release(op);
    th_sink_destroy(&ts);
    return t;
}

/* ---- end of a test program --------------------------------------------------- */

static inline void
th_expect_idle(void)
{
    ab_stats st;
    ab_stats_get(&st);
    CHECK_EQ(st.in_flight, 0);
    /* The engine may still hold inbox references for a moment. */
    double until = th_now() + 5.0;
    while (atomic_load(&th_ops_made) != atomic_load(&th_ops_freed) && th_now() < until)
        th_sleep(0.001);
    CHECK_EQ(atomic_load(&th_ops_made), atomic_load(&th_ops_freed));
}

static inline int
th_done(void)
{
    th_expect_idle();
    ab_engine_stop();
    /* The stop tells pool workers to leave without joining them: give them
     * a moment, or valgrind reports their thread memory as possibly lost. */
    th_sleep(0.05);
    fprintf(stderr, "ok\n");
    return 0;
}

static inline long
th_env_long(const char *name, long fallback)
{
    const char *s = getenv(name);
    return s != NULL && *s != '\0' ? strtol(s, NULL, 10) : fallback;
}

#endif
