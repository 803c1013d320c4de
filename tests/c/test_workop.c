/* test_workop.c: work ops (AB_TYPE_WORK, AB_TYPE_BLOCKING), whose one step
 * runs on a pool thread and finishes there, without the engine. */
#include <sched.h>
#include <unistd.h>

#include "harness.h"

struct wstate {
    int gate;          /* wait until `open` is set (test_cancel_*) */
    int suspend;       /* 1: return AB_SUSPEND; 2: try ab_await_timer */
    int give_bytes;    /* return a malloc'd result (freed on cancel) */
    pthread_t step_thread, cleanup_thread;
    char thread_name[16];
    unsigned event;
    atomic_int ran, cleanups, saw_cancel;
    int await_rc;
};

static atomic_int open_gate = 1;
static atomic_int in_step;

static int
wstep(ab_op *op)
{
    struct wstate *s = ab_op_state(op);
    s->step_thread = pthread_self();
    pthread_getname_np(pthread_self(), s->thread_name, sizeof(s->thread_name));
    s->event = ab_op_event(op);
    atomic_fetch_add(&in_step, 1);
    atomic_store(&s->ran, 1);
    while (s->gate && !atomic_load(&open_gate)) {
        if (ab_work_cancelled(op))
            atomic_store(&s->saw_cancel, 1);
        th_sleep(0.0005);
    }
    atomic_fetch_sub(&in_step, 1);
    if (s->suspend == 1)
        return AB_SUSPEND;
    if (s->suspend == 2) {
        s->await_rc = ab_await_timer(op, 0.001);
        AB_BEGIN(op);
        AB_AWAIT(op, s->await_rc);
        AB_END(op);
    }
    if (s->give_bytes)
        return ab_return_bytes(op, "result", 6);
    return ab_return_int(op, 42);
}

static void
wcleanup(ab_op *op)
{
    struct wstate *s = ab_op_state(op);
    s->cleanup_thread = pthread_self();
    atomic_fetch_add(&s->cleanups, 1);
}

static const ab_op_type work_type = {
    .name = "test.work",
    .state_size = sizeof(struct wstate),
    .flags = AB_TYPE_WORK,
    .step = wstep,
    .cleanup = wcleanup,
};

static const ab_op_type blocking_type = {
    .name = "test.blocking",
    .state_size = sizeof(struct wstate),
    .flags = AB_TYPE_BLOCKING,
    .step = wstep,
    .cleanup = wcleanup,
};

static const ab_op_type no_step_type = {
    .name = "test.nostep",
    .flags = AB_TYPE_WORK,
};

/* The step runs on a CPU pool thread, once, and the engine is never woken
 * for the op: loop -> worker -> sink. */
static void
test_runs_on_worker(void)
{
    th_sink ts;
    th_sink_init(&ts);
    CHECK_OK(ab_pool_configure(2));
    /* The first submit may start the engine (and the pool). */
    ab_op *first = th_op_new(&work_type);
    CHECK_OK(ab_submit(first, &ts.sink));
    TH_FINISH(&ts, first);
    ab_op_release(first);
    pthread_t engine = th_engine_thread();

    ab_stats before;
    ab_stats_get(&before);
    enum { N = 200 };
    for (int i = 0; i < N; i++) {
        ab_op *op = th_op_new(&work_type);
        CHECK_OK(ab_submit(op, &ts.sink));
        TH_FINISH(&ts, op);
        struct wstate *s = ab_op_state(op);
        CHECK_EQ(ab_op_error(op), 0);
        CHECK_EQ(ab_op_result_kind(op), AB_RESULT_INT);
        CHECK_EQ(ab_op_result_int(op), 42);
        CHECK_EQ(s->event, AB_EV_START);
        CHECK_STR(s->thread_name, "ab-worker");
        CHECK(!pthread_equal(s->step_thread, pthread_self()));
        CHECK(!pthread_equal(s->step_thread, engine));
        /* cleanup: once, on the worker, before the outcome reached us */
        CHECK_EQ(atomic_load(&s->cleanups), 1);
        CHECK(pthread_equal(s->cleanup_thread, s->step_thread));
        ab_op_release(op);
    }
    ab_stats after;
    ab_stats_get(&after);
    CHECK_EQ(after.engine_wakeups - before.engine_wakeups, 0);
    CHECK_EQ(after.submitted - before.submitted, N);
    CHECK_EQ(after.completed - before.completed, N);
    CHECK_EQ(after.in_flight, 0);
    th_sink_destroy(&ts);
}

static void
test_blocking_pool(void)
{
    th_sink ts;
    th_sink_init(&ts);
    ab_op *op = th_op_new(&blocking_type);
    CHECK_OK(ab_submit(op, &ts.sink));
    TH_FINISH(&ts, op);
    struct wstate *s = ab_op_state(op);
    CHECK_EQ(ab_op_result_int(op), 42);
    CHECK_STR(s->thread_name, "ab-blocking");
    ab_op_release(op);
    th_sink_destroy(&ts);
}

static void
wait_in_step(int n)
{
    for (int i = 0; atomic_load(&in_step) < n; i++) {
        CHECK(i < 100000);
        th_sleep(0.0001);
    }
}

/* A cancel before a worker took the op: the step never runs. */
static void
test_cancel_queued(void)
{
    th_sink ts;
    th_sink_init(&ts);
    CHECK_OK(ab_pool_configure(1));
    atomic_store(&open_gate, 0);
    ab_op *busy = th_op_new(&work_type), *queued = th_op_new(&work_type);
    ((struct wstate *)ab_op_state(busy))->gate = 1;
    CHECK_OK(ab_submit(busy, &ts.sink));
    wait_in_step(1);
    CHECK_OK(ab_submit(queued, &ts.sink));
    ab_waiting w;
    ab_op_waiting(queued, &w);
    CHECK_EQ(w.kind, AB_WAITING_WORK);
    ab_cancel(queued);
    th_expect_quiet(&ts, 0.02); /* nothing finishes while the pool is busy */
    atomic_store(&open_gate, 1);
    int msg;
    for (int seen = 0; seen < 2; seen++) {
        ab_op *op = th_next(&ts, 10.0, &msg);
        CHECK(op != NULL && msg == AB_MSG_FINISHED);
        ab_op_collect(op);
    }
    CHECK_EQ(ab_op_error(busy), 0);
    CHECK_EQ(ab_op_error(queued), -ECANCELED);
    CHECK(ab_op_cancelled(queued));
    struct wstate *q = ab_op_state(queued);
    CHECK_EQ(atomic_load(&q->ran), 0);
    CHECK_EQ(atomic_load(&q->cleanups), 1); /* cleanup runs all the same */
    ab_op_release(busy);
    ab_op_release(queued);
    th_sink_destroy(&ts);
    CHECK_OK(ab_pool_configure(0));
}

/* A cancel while the step runs: the step sees ab_work_cancelled, the op
 * fails with -ECANCELED and the result it made is freed (valgrind, ASan). */
static void
test_cancel_running(void)
{
    th_sink ts;
    th_sink_init(&ts);
    atomic_store(&open_gate, 0);
    ab_op *op = th_op_new(&work_type);
    struct wstate *s = ab_op_state(op);
    s->gate = 1;
    s->give_bytes = 1;
    CHECK_OK(ab_submit(op, &ts.sink));
    wait_in_step(1);
    ab_cancel(op);
    for (int i = 0; !atomic_load(&s->saw_cancel); i++) {
        CHECK(i < 100000);
        th_sleep(0.0001);
    }
    th_expect_quiet(&ts, 0.01); /* the step still runs */
    atomic_store(&open_gate, 1);
    TH_FINISH(&ts, op);
    CHECK_EQ(ab_op_error(op), -ECANCELED);
    CHECK(ab_op_cancelled(op));
    CHECK_EQ(ab_op_result_kind(op), AB_RESULT_NONE);
    ab_stats st;
    ab_stats_get(&st);
    CHECK_EQ(st.in_flight, 0);
    ab_op_release(op);
    th_sink_destroy(&ts);
}

/* Cancels racing with the end of the step: one outcome each, nothing lost. */
static void
test_cancel_race(void)
{
    th_sink ts;
    th_sink_init(&ts);
    for (int i = 0; i < 2000; i++) {
        ab_op *op = th_op_new(&work_type);
        CHECK_OK(ab_submit(op, &ts.sink));
        if (i % 3)
            th_sleep(1e-6 * (i % 7));
        ab_cancel(op);
        ab_cancel(op); /* twice: harmless */
        TH_FINISH(&ts, op);
        int err = ab_op_error(op);
        CHECK(err == 0 || err == -ECANCELED);
        CHECK_EQ(atomic_load(&((struct wstate *)ab_op_state(op))->cleanups), 1);
        ab_op_release(op);
    }
    th_expect_quiet(&ts, 0.01);
    th_sink_destroy(&ts);
}

/* A work op cannot wait: suspending, or an await, fails it clearly. */
static void
test_cannot_wait(void)
{
    th_sink ts;
    th_sink_init(&ts);
    ab_op *op = th_op_new(&work_type);
    ((struct wstate *)ab_op_state(op))->suspend = 1;
    CHECK_OK(ab_submit(op, &ts.sink));
    TH_FINISH(&ts, op);
    CHECK_EQ(ab_op_error(op), AB_ESTATE);
    CHECK(ab_op_error_message(op) != NULL);
    CHECK(strstr(ab_op_error_message(op), "test.work") != NULL);
    ab_op_release(op);

    op = th_op_new(&work_type);
    struct wstate *s = ab_op_state(op);
    s->suspend = 2;
    CHECK_OK(ab_submit(op, &ts.sink));
    TH_FINISH(&ts, op);
    CHECK_EQ(s->await_rc, AB_ESTATE);
    CHECK_EQ(ab_op_error(op), AB_ESTATE);
    ab_op_release(op);
    th_sink_destroy(&ts);
}

/* Bad types and uses: a clear error, nothing taken. */
static void
test_bad_use(void)
{
    ab_op *op = th_op_new(&no_step_type);
    th_sink ts;
    th_sink_init(&ts);
    CHECK_EQ(ab_submit(op, &ts.sink), -EINVAL);
    ab_stats st;
    ab_stats_get(&st);
    CHECK_EQ(st.in_flight, 0);
    ab_op_release(op); /* the only reference: freed */

    op = th_op_new(&work_type);
    CHECK_EQ(ab_op_set_stream(op, 4), -EINVAL);
    CHECK_OK(ab_submit(op, &ts.sink));
    CHECK_EQ(ab_submit(op, &ts.sink), AB_ESTATE); /* twice */
    ab_op_signal(op);                              /* harmless */
    TH_FINISH(&ts, op);
    CHECK_EQ(ab_op_result_int(op), 42);
    ab_op_release(op);
    th_sink_destroy(&ts);
}

/* The worker notifies the sink itself.  A sink retired at once after its
 * last op was taken (without waiting for the notify) must not be freed
 * while that notify still runs. */
struct slow_sink {
    ab_sink sink;
    atomic_int notifying, retired, late;
};

static void
slow_notify(ab_sink *sink)
{
    struct slow_sink *ss = sink->user;
    atomic_store(&ss->notifying, 1);
    th_sleep(0.0002);
    if (atomic_load(&ss->retired))
        atomic_store(&ss->late, 1);
    atomic_store(&ss->notifying, 0);
}

static void
slow_retired(ab_sink *sink)
{
    struct slow_sink *ss = sink->user;
    if (atomic_load(&ss->notifying))
        atomic_store(&ss->late, 1);
    atomic_store(&ss->retired, 1);
}

static void
test_retire_waits_for_notify(void)
{
    for (int i = 0; i < 300; i++) {
        struct slow_sink *ss = calloc(1, sizeof(*ss));
        CHECK(ss != NULL);
        ab_sink_init(&ss->sink, slow_notify, ss);
        ab_op *op = th_op_new(&work_type);
        CHECK_OK(ab_submit(op, &ss->sink));
        /* Taken as soon as it is there, not when notified: the notify may
         * still be running when the retire below is posted. */
        ab_op *got;
        for (double until = th_now() + 10.0; (got = ab_sink_take(&ss->sink)) == NULL;) {
            CHECK(th_now() < until);
            sched_yield();
        }
        CHECK(got == op && ab_sink_next(got) == NULL);
        CHECK_EQ(ab_sink_msgs(got), AB_MSG_FINISHED);
        ab_op_collect(op);
        ab_op_release(op);
        ab_sink_retire(&ss->sink, slow_retired);
        for (int j = 0; !atomic_load(&ss->retired); j++) {
            CHECK(j < 100000);
            th_sleep(0.0001);
        }
        CHECK_EQ(atomic_load(&ss->late), 0);
        CHECK_EQ(atomic_load(&ss->notifying), 0);
        free(ss);
    }
}

/* Many owners submitting at once: every op finishes exactly once. */
struct burst_arg {
    int n;
};

static void *
burst_thread(void *arg)
{
    struct burst_arg *a = arg;
    th_sink ts;
    th_sink_init(&ts);
    ab_op **ops = calloc((size_t)a->n, sizeof(*ops));
    CHECK(ops != NULL);
    for (int i = 0; i < a->n; i++) {
        ops[i] = th_op_new(&work_type);
        CHECK_OK(ab_submit(ops[i], &ts.sink));
        if (i % 5 == 0)
            ab_cancel(ops[i]);
    }
    int msg;
    for (int i = 0; i < a->n; i++) {
        ab_op *op = th_next(&ts, 10.0, &msg);
        CHECK(op != NULL && msg == AB_MSG_FINISHED);
        ab_op_collect(op);
    }
    th_expect_quiet(&ts, 0.01);
    for (int i = 0; i < a->n; i++) {
        int err = ab_op_error(ops[i]);
        CHECK(err == 0 || (i % 5 == 0 && err == -ECANCELED));
        ab_op_release(ops[i]);
    }
    free(ops);
    th_sink_destroy(&ts);
    return NULL;
}

static void
test_many_owners(void)
{
    enum { T = 4 };
    pthread_t t[T];
    struct burst_arg a = {getenv("AB_UNDER_VALGRIND") ? 300 : 5000};
    for (int i = 0; i < T; i++)
        CHECK_OK(pthread_create(&t[i], NULL, burst_thread, &a));
    for (int i = 0; i < T; i++)
        pthread_join(t[i], NULL);
    ab_stats st;
    ab_stats_get(&st);
    CHECK_EQ(st.in_flight, 0);
}

int
main(void)
{
    TH_RUN(test_runs_on_worker);
    TH_RUN(test_blocking_pool);
    TH_RUN(test_cancel_queued);
    TH_RUN(test_cancel_running);
    TH_RUN(test_cancel_race);
    TH_RUN(test_cannot_wait);
    TH_RUN(test_bad_use);
    TH_RUN(test_retire_waits_for_notify);
    TH_RUN(test_many_owners);
    return th_done();
}
