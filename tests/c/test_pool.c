/* test_pool.c: ab_await_work and the worker pool. */
#include <unistd.h>

#include "harness.h"

/* A gate that pool functions wait on, and what they saw. */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int open;
    int started; /* functions that began */
    int running, max_running;
    int late_from;              /* jobs started after this many are late */
    int late_running, late_max; /* concurrency among late jobs only */
} G = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 1, 0, 0, 0, 1 << 30, 0, 0};

static void
gate_set(int open)
{
    pthread_mutex_lock(&G.mu);
    G.open = open;
    pthread_cond_broadcast(&G.cv);
    pthread_mutex_unlock(&G.mu);
}

static void
gate_reset(void)
{
    pthread_mutex_lock(&G.mu);
    G.started = G.running = G.max_running = 0;
    G.late_from = 1 << 30;
    G.late_running = G.late_max = 0;
    pthread_mutex_unlock(&G.mu);
}

/* Wait until `n` functions began, up to 10 s. */
static void
wait_started(int n)
{
    double until = th_now() + 10.0;
    pthread_mutex_lock(&G.mu);
    while (G.started < n) {
        pthread_mutex_unlock(&G.mu);
        CHECK(th_now() < until);
        th_sleep(0.001);
        pthread_mutex_lock(&G.mu);
    }
    pthread_mutex_unlock(&G.mu);
}

struct work_state {
    double hold;          /* seconds fn sleeps once the gate is open */
    pthread_t step_thread, work_thread;
    atomic_int ran, returned;
    unsigned resumed_with;
};

static void
work_fn(ab_op *op)
{
    struct work_state *s = ab_op_state(op);
    s->work_thread = pthread_self();
    atomic_store(&s->ran, 1);
    pthread_mutex_lock(&G.mu);
    int late = G.started++ >= G.late_from;
    if (++G.running > G.max_running)
        G.max_running = G.running;
    if (late && ++G.late_running > G.late_max)
        G.late_max = G.late_running;
    while (!G.open)
        pthread_cond_wait(&G.cv, &G.mu);
    pthread_mutex_unlock(&G.mu);
    if (s->hold > 0)
        th_sleep(s->hold);
    pthread_mutex_lock(&G.mu);
    G.running--;
    G.late_running -= late;
    pthread_mutex_unlock(&G.mu);
    atomic_store(&s->returned, 1);
}

static int
work_step(ab_op *op)
{
    struct work_state *s = ab_op_state(op);
    AB_BEGIN(op);
    s->step_thread = pthread_self();
    AB_AWAIT_OR_CANCEL(op, ab_await_work(op, work_fn));
    s->resumed_with = ab_op_event(op);
    /* Resumed only once fn returned (or was skipped). */
    CHECK(atomic_load(&s->returned) || !atomic_load(&s->ran));
    if (ab_op_cancelled(op))
        return ab_fail(op, -ECANCELED);
    return ab_return_int(op, atomic_load(&s->ran));
    AB_END(op);
}

static const ab_op_type work_type = {
    .name = "work",
    .state_size = sizeof(struct work_state),
    .step = work_step,
};

static ab_op *
work_new(double hold)
{
    ab_op *op = th_op_new(&work_type);
    ((struct work_state *)ab_op_state(op))->hold = hold;
    return op;
}

static void
test_off_engine(void)
{
    th_sink ts;
    th_sink_init(&ts);
    ab_op *op = work_new(0);
    CHECK_OK(ab_submit(op, &ts.sink));
    TH_FINISH(&ts, op);
    struct work_state *s = ab_op_state(op);
    CHECK_EQ(ab_op_error(op), 0);
    CHECK_EQ(ab_op_result_int(op), 1);
    CHECK_EQ(s->resumed_with, AB_EV_WORK);
    CHECK(!pthread_equal(s->step_thread, s->work_thread));
    CHECK(!pthread_equal(s->work_thread, pthread_self()));
    CHECK(pthread_equal(s->step_thread, th_engine_thread()));
    ab_op_release(op);
    th_sink_destroy(&ts);
}

/* Run n ops holding `hold` seconds each; the largest number running at once. */
static int
run_parallel(int n, double hold)
{
    th_sink ts;
    th_sink_init(&ts);
    ab_op *ops[64];
    CHECK(n <= 64);
    gate_reset();
    for (int i = 0; i < n; i++) {
        ops[i] = work_new(hold);
        CHECK_OK(ab_submit(ops[i], &ts.sink));
    }
    for (int i = 0, msg; i < n; i++) {
        ab_op *op = th_next(&ts, 10.0, &msg);
        CHECK(op != NULL && msg == AB_MSG_FINISHED);
        CHECK_EQ(ab_op_error(op), 0);
        ab_op_collect(op);
    }
    for (int i = 0; i < n; i++)
        ab_op_release(ops[i]);
    th_sink_destroy(&ts);
    return G.max_running;
}

static void
test_parallel_and_configure(void)
{
    CHECK_EQ(ab_pool_configure(-1), -EINVAL);
    CHECK_EQ(ab_pool_configure(1025), -EINVAL);
    CHECK_OK(ab_pool_configure(0));
    CHECK_EQ(ab_pool_size(), sysconf(_SC_NPROCESSORS_ONLN));

    CHECK_OK(ab_pool_configure(4));
    CHECK_EQ(ab_pool_size(), 4);
    double t0 = th_now();
    CHECK_EQ(run_parallel(8, 0.05), 4);
    double took = th_now() - t0;
    CHECK(took >= 0.095 && took < 2.0);

    /* Shrinking takes effect as idle workers notice. */
    CHECK_OK(ab_pool_configure(2));
    CHECK_EQ(ab_pool_size(), 2);
    th_sleep(0.05); /* idle workers notice */
    CHECK_EQ(run_parallel(6, 0.02), 2);
    CHECK_OK(ab_pool_configure(6));
    CHECK_EQ(run_parallel(12, 0.03), 6);
}

static void
test_cancel_queued_skips_fn(void)
{
    th_sink ts;
    th_sink_init(&ts);
    CHECK_OK(ab_pool_configure(1));
    gate_reset();
    gate_set(0);
    ab_op *busy = work_new(0), *queued = work_new(0);
    CHECK_OK(ab_submit(busy, &ts.sink));
    wait_started(1);
    CHECK_OK(ab_submit(queued, &ts.sink));
    th_sleep(0.01);
    ab_cancel(queued);
    th_sleep(0.01);
    gate_set(1);
    int msg, seen = 0;
    for (ab_op *op; seen < 2; seen++) {
        CHECK((op = th_next(&ts, 10.0, &msg)) != NULL && msg == AB_MSG_FINISHED);
        ab_op_collect(op);
    }
    CHECK_EQ(ab_op_error(busy), 0);
    CHECK_EQ(ab_op_error(queued), -ECANCELED);
    CHECK_EQ(atomic_load(&((struct work_state *)ab_op_state(queued))->ran), 0);
    /* Skipped: the step is told so (AB_EV_CANCEL alone), not AB_EV_WORK. */
    CHECK_EQ(((struct work_state *)ab_op_state(queued))->resumed_with, AB_EV_CANCEL);
    ab_op_release(busy);
    ab_op_release(queued);
    th_sink_destroy(&ts);
}

static void
test_cancel_running_waits(void)
{
    th_sink ts;
    th_sink_init(&ts);
    CHECK_OK(ab_pool_configure(2));
    gate_reset();
    gate_set(0);
    ab_op *op = work_new(0.02);
    CHECK_OK(ab_submit(op, &ts.sink));
    wait_started(1);
    ab_cancel(op);
    /* fn still runs: nothing may be delivered yet. */
    th_expect_quiet(&ts, 0.05);
    struct work_state *s = ab_op_state(op);
    CHECK_EQ(atomic_load(&s->returned), 0);
    gate_set(1);
    TH_FINISH(&ts, op);
    CHECK_EQ(atomic_load(&s->returned), 1);
    CHECK_EQ(ab_op_error(op), -ECANCELED);
    /* Let finish, and told that a cancel interrupted it. */
    CHECK_EQ(s->resumed_with, AB_EV_WORK | AB_EV_CANCEL);
    ab_op_release(op);
    th_sink_destroy(&ts);
}

/* Cancel racing with the end of fn, many times: one outcome each. */
static void
test_cancel_race(void)
{
    th_sink ts;
    th_sink_init(&ts);
    CHECK_OK(ab_pool_configure(2));
    gate_set(1);
    for (int i = 0; i < 500; i++) {
        ab_op *op = work_new(0);
        CHECK_OK(ab_submit(op, &ts.sink));
        if (i % 3)
            th_sleep(1e-5 * (i % 7));
        ab_cancel(op);
        TH_FINISH(&ts, op);
        int err = ab_op_error(op);
        CHECK(err == 0 || err == -ECANCELED);
        ab_op_release(op);
    }
    th_expect_quiet(&ts, 0.02);
    th_sink_destroy(&ts);
}

/* A smaller pool bounds concurrency from the next job on, even while the
 * queue never empties: busy workers above the target must leave too. */
static void
test_shrink_under_load(void)
{
    enum { N = 12 };
    th_sink ts;
    th_sink_init(&ts);
    CHECK_OK(ab_pool_configure(4));
    gate_reset();
    gate_set(0);
    ab_op *ops[N];
    for (int i = 0; i < N; i++) {
        ops[i] = work_new(0.01);
        CHECK_OK(ab_submit(ops[i], &ts.sink));
    }
    wait_started(4);
    CHECK_OK(ab_pool_configure(1));
    pthread_mutex_lock(&G.mu);
    G.late_from = 4; /* the jobs queued behind the four running ones */
    pthread_mutex_unlock(&G.mu);
    gate_set(1);
    for (int i = 0, msg; i < N; i++) {
        ab_op *op = th_next(&ts, 10.0, &msg);
        CHECK(op != NULL && msg == AB_MSG_FINISHED);
        ab_op_collect(op);
    }
    for (int i = 0; i < N; i++)
        ab_op_release(ops[i]);
    th_sink_destroy(&ts);
    /* The four that were running finish; the queued ones then run one at
     * a time. */
    if (G.late_max != 1)
        fprintf(stderr, "after ab_pool_configure(1), %d queued jobs ran at once\n",
                G.late_max);
    CHECK_EQ(G.late_max, 1);
    gate_reset();
    CHECK_EQ(run_parallel(4, 0.01), 1);
}

int
main(void)
{
    TH_RUN(test_off_engine);
    TH_RUN(test_parallel_and_configure);
    TH_RUN(test_cancel_queued_skips_fn);
    TH_RUN(test_cancel_running_waits);
    TH_RUN(test_cancel_race);
    TH_RUN(test_shrink_under_load);
    return th_done();
}
