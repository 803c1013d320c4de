/* test_ops.c: ops on the engine: timers, fd readiness, cancellation,
 * results, errors, and the protothread macros. */
#include <fcntl.h>
#include <math.h>
#include <sched.h>
#include <stdint.h>
#include <sys/socket.h>
#include <unistd.h>

#include "harness.h"

static atomic_int cleanups;
static pthread_t cleanup_thread;

static void
count_cleanup(ab_op *op)
{
    (void)op;
    cleanup_thread = pthread_self();
    atomic_fetch_add(&cleanups, 1);
}

/* ---- timer ------------------------------------------------------------------ */

struct timer_state {
    double delay;
    int rounds, done;
    double armed, fired;
};

static int
timer_step(ab_op *op)
{
    struct timer_state *s = ab_op_state(op);
    AB_BEGIN(op);
    for (s->done = 0; s->done < (s->rounds ? s->rounds : 1); s->done++) {
        s->armed = th_now();
        AB_AWAIT(op, ab_await_timer(op, s->delay));
        s->fired = th_now();
        CHECK(ab_op_event(op) == AB_EV_TIMER);
    }
    return ab_return_float(op, s->fired - s->armed);
    AB_END(op);
}

static const ab_op_type timer_type = {
    .name = "timer",
    .state_size = sizeof(struct timer_state),
    .step = timer_step,
    .cleanup = count_cleanup,
};

static ab_op *
timer_new(double delay)
{
    ab_op *op = th_op_new(&timer_type);
    ((struct timer_state *)ab_op_state(op))->delay = delay;
    return op;
}

static void
test_timer_not_early(void)
{
    enum { N = 40 };
    th_sink ts;
    th_sink_init(&ts);
    ab_op *ops[N];
    for (int i = 0; i < N; i++) {
        ops[i] = timer_new(0.001 * (i % 20 + 1));
        CHECK_OK(ab_submit(ops[i], &ts.sink));
    }
    int seen = 0, early = 0, msg;
    while (seen < N) {
        ab_op *op = th_next(&ts, 10.0, &msg);
        CHECK(op != NULL);
        CHECK_EQ(msg, AB_MSG_FINISHED);
        ab_op_collect(op);
        struct timer_state *s = ab_op_state(op);
        CHECK_EQ(ab_op_error(op), 0);
        CHECK_EQ(ab_op_result_kind(op), AB_RESULT_FLOAT);
        /* Measured with CLOCK_MONOTONIC from the moment the step armed it. */
        if (ab_op_result_float(op) < s->delay) {
            if (early < 5)
                fprintf(stderr, "timer of %.3f ms fired after %.3f ms\n",
                        s->delay * 1e3, ab_op_result_float(op) * 1e3);
            early++;
        }
        seen++;
    }
    for (int i = 0; i < N; i++)
        ab_op_release(ops[i]);
    th_sink_destroy(&ts);
    CHECK_EQ(early, 0);
}

static void
test_timer_zero_negative_repeat(void)
{
    th_sink ts;
    th_sink_init(&ts);
    const double delays[] = {0.0, -1.0, -INFINITY, -0.0};
    for (size_t i = 0; i < sizeof(delays) / sizeof(delays[0]); i++) {
        ab_op *op = timer_new(delays[i]);
        CHECK_OK(ab_submit(op, &ts.sink));
        TH_FINISH(&ts, op);
        CHECK_EQ(ab_op_error(op), 0);
        ab_op_release(op);
    }
    /* Re-arming from inside the timer's own callback. */
    ab_op *op = timer_new(0.002);
    ((struct timer_state *)ab_op_state(op))->rounds = 3;
    CHECK_OK(ab_submit(op, &ts.sink));
    TH_FINISH(&ts, op);
    CHECK_EQ(ab_op_error(op), 0);
    CHECK_EQ(((struct timer_state *)ab_op_state(op))->done, 3);
    ab_op_release(op);
    th_sink_destroy(&ts);
}

static void
test_timer_nan_and_infinite(void)
{
    th_sink ts;
    th_sink_init(&ts);
    ab_op *op = timer_new(NAN);
    CHECK_OK(ab_submit(op, &ts.sink));
    TH_FINISH(&ts, op);
    CHECK_EQ(ab_op_error(op), -EINVAL);
    ab_op_release(op);

    const double forever[] = {INFINITY, 1e300, 3e9};
    for (size_t i = 0; i < sizeof(forever) / sizeof(forever[0]); i++) {
        op = timer_new(forever[i]);
        CHECK_OK(ab_submit(op, &ts.sink));
        th_expect_quiet(&ts, 0.05);
        ab_cancel(op);
        TH_FINISH(&ts, op);
        CHECK_EQ(ab_op_error(op), -ECANCELED);
        ab_op_release(op);
    }
    th_sink_destroy(&ts);
}

static void
test_cancel_timer_mid_wait(void)
{
    th_sink ts;
    th_sink_init(&ts);
    pthread_t engine = th_engine_thread();
    atomic_store(&cleanups, 0);
    ab_op *op = timer_new(10.0);
    CHECK_OK(ab_submit(op, &ts.sink));
    th_sleep(0.02);
    double t0 = th_now();
    ab_cancel(op);
    ab_cancel(op); /* twice: still one outcome */
    TH_FINISH(&ts, op);
    CHECK(th_now() - t0 < 1.0);
    CHECK_EQ(ab_op_error(op), -ECANCELED);
    CHECK_EQ(atomic_load(&cleanups), 1);
    CHECK(pthread_equal(cleanup_thread, engine));
    /* Cancel after the finish is harmless and delivers nothing. */
    ab_cancel(op);
    th_expect_quiet(&ts, 0.05);
    ab_op_release(op);
    CHECK_EQ(atomic_load(&cleanups), 1);
    th_sink_destroy(&ts);
}

static void
test_cancel_after_finish(void)
{
    th_sink ts;
    th_sink_init(&ts);
    atomic_store(&cleanups, 0);
    ab_op *op = timer_new(0);
    CHECK_OK(ab_submit(op, &ts.sink));
    TH_FINISH(&ts, op);
    CHECK_EQ(ab_op_error(op), 0);
    ab_cancel(op);
    ab_op_release(op); /* the queued cancel keeps it alive */
    th_expect_quiet(&ts, 0.05);
    CHECK_EQ(atomic_load(&cleanups), 1);
    th_sink_destroy(&ts);
}

/* Wait for `op`'s AB_MSG_FINISHED on ts without collecting it. */
static void
finished_uncollected(th_sink *ts, ab_op *op)
{
    int msg = 0;
    ab_op *got = th_next(ts, 10.0, &msg);
    CHECK(got == op);
    CHECK_EQ(msg, AB_MSG_FINISHED);
}

static void *
release_soon(void *arg)
{
    if (((uintptr_t)arg & 1) != 0)
        sched_yield();
    ab_op_release((ab_op *)((uintptr_t)arg & ~(uintptr_t)1));
    return NULL;
}

/* ab_op_collect_held: the owner keeps a reference of its own, and the op
 * is freed by the last release, whoever's. */
static void
test_collect_held(void)
{
    th_sink ts;
    th_sink_init(&ts);
    ab_stats st;
    /* Only the owner holds: the collect leaves the op alive, and the
     * owner's own release frees it. */
    long freed = atomic_load(&th_ops_freed);
    ab_op *op = timer_new(0);
    CHECK_OK(ab_submit(op, &ts.sink));
    finished_uncollected(&ts, op);
    ab_op_collect_held(op);
    ab_stats_get(&st);
    CHECK_EQ(st.in_flight, 0);
    CHECK_EQ(atomic_load(&th_ops_freed), freed);
    CHECK_EQ(ab_op_error(op), 0); /* still ours */
    ab_op_release(op);
    CHECK_EQ(atomic_load(&th_ops_freed), freed + 1);
    /* A third holder (a queued cancel) outlives both of the owner's. */
    op = timer_new(0);
    CHECK_OK(ab_submit(op, &ts.sink));
    finished_uncollected(&ts, op);
    ab_cancel(op);
    ab_op_collect_held(op);
    ab_op_release(op);
    th_expect_quiet(&ts, 0.05);
    for (double until = th_now() + 10; atomic_load(&th_ops_freed) != freed + 2 && th_now() < until;)
        usleep(1000);
    CHECK_EQ(atomic_load(&th_ops_freed), freed + 2);
    /* Another thread's release races the collect (tsan sees each order):
     * freed once, never early. */
    for (int i = 0; i < 200; i++) {
        op = timer_new(0);
        CHECK_OK(ab_submit(op, &ts.sink));
        finished_uncollected(&ts, op);
        ab_op_retain(op);
        pthread_t t;
        CHECK_OK(pthread_create(&t, NULL, release_soon, (void *)((uintptr_t)op | (uintptr_t)(i & 1))));
        ab_op_collect_held(op);
        CHECK_EQ(ab_op_error(op), 0); /* still ours */
        ab_op_release(op);
        CHECK_OK(pthread_join(t, NULL));
        CHECK_EQ(atomic_load(&th_ops_freed), freed + 3 + i);
    }
    ab_stats_get(&st);
    CHECK_EQ(st.in_flight, 0);
    th_sink_destroy(&ts);
}

static void
test_cancel_before_start(void)
{
    th_sink ts;
    th_sink_init(&ts);
    for (int i = 0; i < 100; i++) {
        atomic_store(&cleanups, 0);
        ab_op *op = timer_new(5.0);
        CHECK_OK(ab_submit(op, &ts.sink));
        ab_cancel(op);
        TH_FINISH(&ts, op);
        CHECK_EQ(ab_op_error(op), -ECANCELED);
        ab_op_release(op);
        CHECK_EQ(atomic_load(&cleanups), 1);
    }
    /* Never submitted: cancel does nothing, cleanup runs at release. */
    atomic_store(&cleanups, 0);
    ab_op *op = timer_new(1.0);
    ab_cancel(op);
    ab_op_release(op);
    CHECK_EQ(atomic_load(&cleanups), 1);
    th_sink_destroy(&ts);
}

static void
test_submit_twice(void)
{
    th_sink ts;
    th_sink_init(&ts);
    ab_op *op = timer_new(0);
    CHECK_OK(ab_submit(op, &ts.sink));
    CHECK_EQ(ab_submit(op, &ts.sink), AB_ESTATE);
    TH_FINISH(&ts, op);
    th_expect_quiet(&ts, 0.02);
    ab_op_release(op);
    th_sink_destroy(&ts);
}

/* ---- await cancel ------------------------------------------------------------ */

static int
forever_step(ab_op *op)
{
    AB_BEGIN(op);
    AB_AWAIT(op, ab_await_cancel(op));
    return ab_return_none(op);
    AB_END(op);
}

static const ab_op_type forever_type = {
    .name = "forever",
    .step = forever_step,
    .cleanup = count_cleanup,
};

static void
test_await_cancel(void)
{
    th_sink ts;
    th_sink_init(&ts);
    atomic_store(&cleanups, 0);
    ab_op *op = th_op_new(&forever_type);
    CHECK_OK(ab_submit(op, &ts.sink));
    th_expect_quiet(&ts, 0.05);
    ab_cancel(op);
    TH_FINISH(&ts, op);
    CHECK_EQ(ab_op_error(op), -ECANCELED);
    CHECK_EQ(atomic_load(&cleanups), 1);
    ab_op_release(op);
    th_sink_destroy(&ts);
}

/* ---- fd readiness ------------------------------------------------------------ */

struct fd_state {
    int fd;
    unsigned events;
    double timeout;
};

static int
fd_step(ab_op *op)
{
    struct fd_state *s = ab_op_state(op);
    AB_BEGIN(op);
    AB_AWAIT(op, ab_await_fd(op, s->fd, s->events, s->timeout));
    return ab_return_int(op, ab_op_event(op));
    AB_END(op);
}

static const ab_op_type fd_type = {
    .name = "fd",
    .state_size = sizeof(struct fd_state),
    .step = fd_step,
    .cleanup = count_cleanup,
};

/* Run one fd op to its end; its error, or its AB_EV_* bits. */
static long long
run_fd(th_sink *ts, int fd, unsigned events, double timeout)
{
    ab_op *op = th_op_new(&fd_type);
    struct fd_state *s = ab_op_state(op);
    s->fd = fd;
    s->events = events;
    s->timeout = timeout;
    CHECK_OK(ab_submit(op, &ts->sink));
    TH_FINISH(ts, op);
    long long r = ab_op_error(op) ? ab_op_error(op) : ab_op_result_int(op);
    ab_op_release(op);
    return r;
}

static void
test_fd_readiness(void)
{
    th_sink ts;
    th_sink_init(&ts);
    int p[2];
    CHECK_OK(pipe(p));

    double t0 = th_now();
    CHECK_EQ(run_fd(&ts, p[0], AB_EV_READ, 0.05), AB_EV_TIMER);
    CHECK(th_now() - t0 >= 0.045);
    CHECK_EQ(run_fd(&ts, p[1], AB_EV_WRITE, 1.0), AB_EV_WRITE);
    CHECK_EQ(run_fd(&ts, p[1], AB_EV_WRITE, -1), AB_EV_WRITE);
    CHECK_EQ(run_fd(&ts, p[1], AB_EV_WRITE, INFINITY), AB_EV_WRITE);
    CHECK_EQ(write(p[1], "x", 1), 1);
    CHECK_EQ(run_fd(&ts, p[0], AB_EV_READ, 1.0), AB_EV_READ);

    /* Readiness that comes while the op waits, with no timeout. */
    char c;
    CHECK_EQ(read(p[0], &c, 1), 1);
    ab_op *op = th_op_new(&fd_type);
    struct fd_state *s = ab_op_state(op);
    s->fd = p[0];
    s->events = AB_EV_READ;
    s->timeout = -1;
    CHECK_OK(ab_submit(op, &ts.sink));
    th_expect_quiet(&ts, 0.03);
    CHECK_EQ(write(p[1], "y", 1), 1);
    TH_FINISH(&ts, op);
    CHECK_EQ(ab_op_error(op), 0);
    CHECK_EQ(ab_op_result_int(op), AB_EV_READ);
    ab_op_release(op);
    CHECK_EQ(read(p[0], &c, 1), 1);

    /* socketpair, both directions asked, only writable. */
    int sv[2];
    CHECK_OK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv));
    CHECK_EQ(run_fd(&ts, sv[0], AB_EV_READ | AB_EV_WRITE, 1.0), AB_EV_WRITE);
    CHECK_EQ(write(sv[1], "z", 1), 1);
    CHECK_EQ(run_fd(&ts, sv[0], AB_EV_READ | AB_EV_WRITE, 1.0), AB_EV_READ | AB_EV_WRITE);
    close(sv[0]);
    close(sv[1]);

    /* Bad arguments fail the op; nothing is armed. */
    int closed = dup(p[0]);
    close(closed);
    CHECK_EQ(run_fd(&ts, closed, AB_EV_READ, 1.0), -EBADF);
    CHECK_EQ(run_fd(&ts, -1, AB_EV_READ, 1.0), -EBADF);
    CHECK_EQ(run_fd(&ts, p[0], AB_EV_READ, NAN), -EINVAL);
    CHECK_EQ(run_fd(&ts, p[0], 0, 1.0), -EINVAL);
    CHECK_EQ(run_fd(&ts, p[0], AB_EV_TIMER, 1.0), -EINVAL);
    /* epoll refuses regular files: the op gets epoll_ctl's errno. */
    int file = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    CHECK(file >= 0);
    long long rc = run_fd(&ts, file, AB_EV_READ, 1.0);
    if (rc != -EPERM)
        fprintf(stderr, "regular file: %lld (%s)\n", rc, ab_strerror((int)rc));
    CHECK(rc < 0);
    close(file);
    close(p[0]);
    close(p[1]);
    th_sink_destroy(&ts);
}

static void
test_fd_cancel(void)
{
    th_sink ts;
    th_sink_init(&ts);
    int p[2];
    CHECK_OK(pipe(p));
    atomic_store(&cleanups, 0);
    ab_op *op = th_op_new(&fd_type);
    struct fd_state *s = ab_op_state(op);
    s->fd = p[0];
    s->events = AB_EV_READ;
    s->timeout = -1;
    CHECK_OK(ab_submit(op, &ts.sink));
    th_expect_quiet(&ts, 0.02);
    ab_cancel(op);
    TH_FINISH(&ts, op);
    CHECK_EQ(ab_op_error(op), -ECANCELED);
    CHECK_EQ(atomic_load(&cleanups), 1);
    ab_op_release(op);
    /* The event is gone: readiness now delivers nothing. */
    CHECK_EQ(write(p[1], "x", 1), 1);
    th_expect_quiet(&ts, 0.05);
    /* The fd can be waited on again by a new op. */
    CHECK_EQ(run_fd(&ts, p[0], AB_EV_READ, 1.0), AB_EV_READ);
    close(p[0]);
    close(p[1]);
    th_sink_destroy(&ts);
}

/* ---- results and errors ------------------------------------------------------ */

enum outcome { OUT_NONE, OUT_INT, OUT_FLOAT, OUT_BYTES, OUT_STR, OUT_EMPTY, OUT_FAIL_MSG,
               OUT_FAIL_LONG, OUT_FAIL_POSITIVE, OUT_SUSPEND, OUT_FALL_THROUGH,
               OUT_OVERWRITE };

static const char bytes_with_nul[] = {'a', '\0', 'b', '\xff'};
static char long_msg[400];

static int
outcome_step(ab_op *op)
{
    enum outcome *o = ab_op_state(op);
    AB_BEGIN(op);
    switch (*o) {
    case OUT_NONE:
        return ab_return_none(op);
    case OUT_INT:
        return ab_return_int(op, INT64_MIN);
    case OUT_FLOAT:
        return ab_return_float(op, -2.5e-300);
    case OUT_BYTES: {
        char buf[sizeof(bytes_with_nul)];
        memcpy(buf, bytes_with_nul, sizeof(buf));
        int rc = ab_return_bytes(op, buf, sizeof(buf));
        memset(buf, 0, sizeof(buf)); /* the op owns a copy */
        return rc;
    }
    case OUT_STR: {
        char buf[] = "h\xc3\xa9llo";
        int rc = ab_return_str(op, buf, 4);
        memset(buf, 0, sizeof(buf));
        return rc;
    }
    case OUT_EMPTY:
        return ab_return_bytes(op, NULL, 0);
    case OUT_FAIL_MSG:
        return ab_fail_msg(op, -EIO, "disk %d said %s", 7, "no");
    case OUT_FAIL_LONG:
        return ab_fail_msg(op, AB_EUSER - 3, "%s", long_msg);
    case OUT_FAIL_POSITIVE:
        return ab_fail(op, EIO);
    case OUT_SUSPEND:
        return AB_SUSPEND;
    case OUT_FALL_THROUGH:
        break;
    case OUT_OVERWRITE:
        ab_return_str(op, "first", 5);
        ab_return_bytes(op, "second", 6);
        return ab_return_int(op, 3);
    }
    AB_END(op);
}

static const ab_op_type outcome_type = {
    .name = "outcome",
    .state_size = sizeof(enum outcome),
    .step = outcome_step,
};

static ab_op *
run_outcome(th_sink *ts, enum outcome o)
{
    ab_op *op = th_op_new(&outcome_type);
    *(enum outcome *)ab_op_state(op) = o;
    CHECK_OK(ab_submit(op, &ts->sink));
    TH_FINISH(ts, op);
    return op;
}

static void
test_results(void)
{
    th_sink ts;
    th_sink_init(&ts);
    size_t len = 99;
    ab_op *op = run_outcome(&ts, OUT_NONE);
    CHECK_EQ(ab_op_error(op), 0);
    CHECK_EQ(ab_op_result_kind(op), AB_RESULT_NONE);
    CHECK(ab_op_result_data(op, &len) == NULL && len == 0);
    CHECK(ab_op_error_message(op) == NULL);
    ab_op_release(op);

    op = run_outcome(&ts, OUT_INT);
    CHECK_EQ(ab_op_result_kind(op), AB_RESULT_INT);
    CHECK(ab_op_result_int(op) == INT64_MIN);
    ab_op_release(op);

    op = run_outcome(&ts, OUT_FLOAT);
    CHECK_EQ(ab_op_result_kind(op), AB_RESULT_FLOAT);
    CHECK(ab_op_result_float(op) == -2.5e-300);
    ab_op_release(op);

    op = run_outcome(&ts, OUT_BYTES);
    CHECK_EQ(ab_op_result_kind(op), AB_RESULT_BYTES);
    const char *data = ab_op_result_data(op, &len);
    CHECK_EQ(len, sizeof(bytes_with_nul));
    CHECK(memcmp(data, bytes_with_nul, len) == 0);
    ab_op_release(op);

    op = run_outcome(&ts, OUT_STR);
    CHECK_EQ(ab_op_result_kind(op), AB_RESULT_STR);
    data = ab_op_result_data(op, &len);
    CHECK_EQ(len, 4);
    CHECK_STR(data, "h\xc3\xa9l"); /* NUL-terminated copy of 4 bytes */
    ab_op_release(op);

    op = run_outcome(&ts, OUT_EMPTY);
    CHECK_EQ(ab_op_result_kind(op), AB_RESULT_BYTES);
    data = ab_op_result_data(op, &len);
    CHECK(data != NULL && len == 0);
    ab_op_release(op);

    op = run_outcome(&ts, OUT_OVERWRITE);
    CHECK_EQ(ab_op_result_kind(op), AB_RESULT_INT);
    CHECK_EQ(ab_op_result_int(op), 3);
    ab_op_release(op);
    th_sink_destroy(&ts);
}

static void
test_errors(void)
{
    th_sink ts;
    th_sink_init(&ts);
    ab_op *op = run_outcome(&ts, OUT_FAIL_MSG);
    CHECK_EQ(ab_op_error(op), -EIO);
    CHECK_STR(ab_op_error_message(op), "disk 7 said no");
    ab_op_release(op);

    memset(long_msg, 'm', sizeof(long_msg) - 1);
    op = run_outcome(&ts, OUT_FAIL_LONG);
    CHECK_EQ(ab_op_error(op), AB_EUSER - 3);
    CHECK_EQ(strlen(ab_op_error_message(op)), 200);
    ab_op_release(op);

    op = run_outcome(&ts, OUT_FAIL_POSITIVE);
    CHECK_EQ(ab_op_error(op), AB_ESTATE);
    ab_op_release(op);

    op = run_outcome(&ts, OUT_SUSPEND);
    CHECK_EQ(ab_op_error(op), AB_ESTATE);
    CHECK(ab_op_error_message(op) != NULL);
    CHECK(strstr(ab_op_error_message(op), "outcome") != NULL);
    CHECK(strstr(ab_op_error_message(op), "without awaiting") != NULL);
    ab_op_release(op);

    op = run_outcome(&ts, OUT_FALL_THROUGH);
    CHECK_EQ(ab_op_error(op), AB_ESTATE);
    ab_op_release(op);
    th_sink_destroy(&ts);
}

static void
test_strerror(void)
{
    CHECK_STR(ab_strerror(AB_EFORKED), "operation was in flight when the process forked");
    CHECK_STR(ab_strerror(AB_EPYTHON), "the awaited Python awaitable raised");
    CHECK_STR(ab_strerror(AB_ESHUTDOWN), "the engine was shut down");
    CHECK_STR(ab_strerror(AB_ESTATE), "operation used in the wrong state");
    CHECK(ab_strerror(AB_EUSER) != NULL);
    CHECK_STR(ab_strerror(-ENOENT), strerror(ENOENT));
    CHECK_STR(ab_strerror(-ECANCELED), strerror(ECANCELED));
    CHECK_STR(ab_strerror(-EBADF), strerror(EBADF));
    const int odd[] = {AB_EUSER - 1, -4096, -1000000, 1, 0x7fffffff, (int)0x80000000};
    for (size_t i = 0; i < sizeof(odd) / sizeof(odd[0]); i++)
        CHECK(ab_strerror(odd[i]) != NULL && ab_strerror(odd[i])[0] != '\0');
    /* The codes sit below every errno. */
    CHECK(AB_EFORKED < -4095 && AB_EUSER < AB_ESTATE);
}

int
main(void)
{
    TH_RUN(test_strerror);
    TH_RUN(test_timer_zero_negative_repeat);
    TH_RUN(test_timer_nan_and_infinite);
    TH_RUN(test_timer_not_early);
    TH_RUN(test_cancel_timer_mid_wait);
    TH_RUN(test_cancel_after_finish);
    TH_RUN(test_cancel_before_start);
    TH_RUN(test_collect_held);
    TH_RUN(test_submit_twice);
    TH_RUN(test_await_cancel);
    TH_RUN(test_fd_readiness);
    TH_RUN(test_fd_cancel);
    TH_RUN(test_results);
    TH_RUN(test_errors);
    return th_done();
}
