/* test_v2.c: the calls C API version 2 added: waking from any thread,
 * fd sets, the cancellation rule for every wait, the blocking pool and
 * streams, with this program as the owner. */
#include <fcntl.h>
#include <unistd.h>

#include "harness.h"

/* ---- signals ------------------------------------------------------------------ */

struct sig_state {
    double timeouts[4];
    int rounds, n;
    unsigned events[4];
    atomic_int value; /* written by the signalling thread */
};

static int
sig_step(ab_op *op)
{
    struct sig_state *s = ab_op_state(op);
    AB_BEGIN(op);
    for (s->n = 0; s->n < s->rounds; s->n++) {
        AB_AWAIT_OR_CANCEL(op, ab_await_signal(op, s->timeouts[s->n]));
        s->events[s->n] = ab_op_event(op);
    }
    return ab_return_int(op, atomic_load(&s->value));
    AB_END(op);
}

static const ab_op_type sig_type = {
    .name = "signal",
    .state_size = sizeof(struct sig_state),
    .step = sig_step,
};

static ab_op *
sig_new(int rounds, double t0, double t1)
{
    ab_op *op = th_op_new(&sig_type);
    struct sig_state *s = ab_op_state(op);
    s->rounds = rounds;
    s->timeouts[0] = t0;
    s->timeouts[1] = t1;
    return op;
}

/* A signal before the op even started is kept for its first wait. */
static void
test_signal_before_wait(void)
{
    th_sink ts;
    th_sink_init(&ts);
    ab_op *op = sig_new(1, 10.0, 0);
    ab_op_signal(op);
    double t0 = th_now();
    CHECK_OK(ab_submit(op, &ts.sink));
    TH_FINISH(&ts, op);
    CHECK(th_now() - t0 < 2.0);
    CHECK_EQ(ab_op_error(op), 0);
    CHECK_EQ(((struct sig_state *)ab_op_state(op))->events[0], AB_EV_SIGNAL);
    ab_op_release(op);
    th_sink_destroy(&ts);
}

/* The timeout comes first; a signal after it is kept for the next wait. */
static void
test_signal_timeout_then_kept(void)
{
    th_sink ts;
    th_sink_init(&ts);
    ab_op *op = sig_new(2, 0.05, 10.0);
    struct sig_state *s = ab_op_state(op);
    CHECK_OK(ab_submit(op, &ts.sink));
    th_sleep(0.2); /* the first wait timed out; the second waits */
    ab_op_signal(op);
    TH_FINISH(&ts, op);
    CHECK_EQ(s->events[0], AB_EV_TIMER);
    CHECK_EQ(s->events[1], AB_EV_SIGNAL);
    ab_op_release(op);
    th_sink_destroy(&ts);
}

struct blaster {
    ab_op *op;
    atomic_int *go;
    int count;
};

static void *
blast(void *arg)
{
    struct blaster *b = arg;
    while (!atomic_load(b->go))
        ;
    for (int i = 0; i < b->count; i++)
        ab_op_signal(b->op);
    ab_op_release(b->op); /* its own reference, maybe the last */
    return NULL;
}

/* 8 threads, 2000 signals each, on an op that takes one: the op wakes once,
 * signals after it finished are harmless, the engine is woken far less
 * often than signalled, and the last release may be any thread's. */
static void
test_signal_burst_from_threads(void)
{
    enum { THREADS = 8, EACH = 2000 };
    th_sink ts;
    th_sink_init(&ts);
    ab_op *op = sig_new(1, 10.0, 0);
    CHECK_OK(ab_submit(op, &ts.sink));
    th_sleep(0.02);
    ab_stats before, after;
    ab_stats_get(&before);
    atomic_int go = 0;
    pthread_t t[THREADS];
    struct blaster b[THREADS];
    for (int i = 0; i < THREADS; i++) {
        ab_op_retain(op);
        b[i] = (struct blaster){op, &go, EACH};
        CHECK_OK(pthread_create(&t[i], NULL, blast, &b[i]));
    }
    atomic_store(&go, 1);
    TH_FINISH(&ts, op);
    ab_op_release(op); /* before the threads are done: one of them frees it */
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
    ab_stats_get(&after);
    uint64_t wakeups = after.engine_wakeups - before.engine_wakeups;
    fprintf(stderr, "   %d signals woke the engine %" PRIu64 " times\n", THREADS * EACH,
            wakeups);
    CHECK(wakeups < THREADS * EACH / 4);
    th_sink_destroy(&ts);
}

/* What a library thread does: write the outcome, signal, let go. */
static void *
late_callback(void *arg)
{
    ab_op *op = arg;
    th_sleep(0.02);
    atomic_store(&((struct sig_state *)ab_op_state(op))->value, 42);
    ab_op_signal(op);
    ab_op_release(op);
    return NULL;
}

static int
foreign_step(ab_op *op)
{
    pthread_t t;
    AB_BEGIN(op);
    ab_op_retain(op); /* the callback's */
    if (pthread_create(&t, NULL, late_callback, op) != 0) {
        ab_op_release(op);
        return ab_fail(op, -EAGAIN);
    }
    pthread_detach(t);
    AB_AWAIT(op, ab_await_signal(op, -1));
    return ab_return_int(op, atomic_load(&((struct sig_state *)ab_op_state(op))->value));
    AB_END(op);
}

static const ab_op_type foreign_type = {
    .name = "foreign",
    .state_size = sizeof(struct sig_state),
    .step = foreign_step,
};

static void
test_foreign_thread_outcome(void)
{
    th_sink ts;
    th_sink_init(&ts);
    for (int i = 0; i < 50; i++) {
        ab_op *op = th_op_new(&foreign_type);
        CHECK_OK(ab_submit(op, &ts.sink));
        TH_FINISH(&ts, op);
        CHECK_EQ(ab_op_error(op), 0);
        CHECK_EQ(ab_op_result_int(op), 42);
        ab_op_release(op);
    }
    /* Cancelled while the callback is pending: it still comes, harmlessly. */
    ab_op *op = th_op_new(&foreign_type);
    CHECK_OK(ab_submit(op, &ts.sink));
    ab_cancel(op);
    TH_FINISH(&ts, op);
    CHECK_EQ(ab_op_error(op), -ECANCELED);
    ab_op_release(op);
    th_sleep(0.1);
    th_sink_destroy(&ts);
}

/* ---- fd sets ------------------------------------------------------------------- */

struct fds_state {
    int r[2];          /* read ends watched */
    int resumes;
    int ready[8];      /* fds reported per resume, as a bit per r[] index */
    unsigned why[8];
};

static void
record_ready(ab_op *op, struct fds_state *s)
{
    int fd;
    unsigned ev;
    s->why[s->resumes] = ab_op_event(op);
    while (ab_fds_next(op, &fd, &ev)) {
        CHECK_EQ(ev, AB_EV_READ);
        s->ready[s->resumes] |= fd == s->r[0] ? 1 : fd == s->r[1] ? 2 : 4;
    }
    s->resumes++;
}

static int
fds_step(ab_op *op)
{
    struct fds_state *s = ab_op_state(op);
    AB_BEGIN(op);
    CHECK_OK(ab_fds_watch(op, s->r[0], AB_EV_READ));
    CHECK_OK(ab_fds_watch(op, s->r[1], AB_EV_READ));
    CHECK_EQ(ab_fds_watch(op, -1, AB_EV_READ), -EBADF);
    CHECK_EQ(ab_fds_watch(op, s->r[0], 1u << 20), -EINVAL);
    /* Both are readable already: one resume reports both. */
    AB_AWAIT(op, ab_await_fds(op, 5.0));
    record_ready(op, s);
    /* Not waiting on the set while a timer runs: the readiness stays. */
    AB_AWAIT(op, ab_await_timer(op, 0.05));
    AB_AWAIT(op, ab_await_fds(op, 5.0));
    record_ready(op, s);
    /* Drop r[0] (as before closing it), watch only r[1], drained now. */
    CHECK_OK(ab_fds_watch(op, s->r[0], 0));
    {
        char buf[16];
        CHECK(read(s->r[1], buf, sizeof(buf)) > 0);
    }
    AB_AWAIT(op, ab_await_fds(op, 0.05));
    record_ready(op, s); /* times out: r[0] is readable but not watched */
    return ab_return_none(op);
    AB_END(op);
}

static const ab_op_type fds_type = {
    .name = "fds",
    .state_size = sizeof(struct fds_state),
    .step = fds_step,
};

static void
test_fd_set(void)
{
    th_sink ts;
    th_sink_init(&ts);
    int p0[2], p1[2];
    CHECK_OK(pipe2(p0, O_NONBLOCK | O_CLOEXEC));
    CHECK_OK(pipe2(p1, O_NONBLOCK | O_CLOEXEC));
    CHECK(write(p0[1], "a", 1) == 1);
    CHECK(write(p1[1], "b", 1) == 1);
    ab_op *op = th_op_new(&fds_type);
    struct fds_state *s = ab_op_state(op);
    s->r[0] = p0[0];
    s->r[1] = p1[0];
    CHECK_OK(ab_submit(op, &ts.sink));
    TH_FINISH(&ts, op);
    CHECK_EQ(ab_op_error(op), 0);
    CHECK_EQ(s->resumes, 3);
    CHECK_EQ(s->why[0], AB_EV_FDS);
    CHECK_EQ(s->ready[0], 3);
    CHECK_EQ(s->why[1], AB_EV_FDS);
    CHECK_EQ(s->ready[1], 3);
    CHECK_EQ(s->why[2], AB_EV_TIMER);
    CHECK_EQ(s->ready[2], 0);
    ab_op_release(op);
    for (int i = 0; i < 2; i++) {
        close(p0[i]);
        close(p1[i]);
    }
    th_sink_destroy(&ts);
}

/* A set cancelled while it waits: its events go with the op. */
static int
fds_wait_step(ab_op *op)
{
    struct fds_state *s = ab_op_state(op);
    AB_BEGIN(op);
    CHECK_OK(ab_fds_watch(op, s->r[0], AB_EV_READ));
    AB_AWAIT(op, ab_await_fds(op, -1));
    return ab_return_none(op);
    AB_END(op);
}

static const ab_op_type fds_wait_type = {
    .name = "fds_wait",
    .state_size = sizeof(struct fds_state),
    .step = fds_wait_step,
};

static void
test_fd_set_cancel(void)
{
    th_sink ts;
    th_sink_init(&ts);
    int p[2];
    CHECK_OK(pipe2(p, O_NONBLOCK | O_CLOEXEC));
    ab_op *op = th_op_new(&fds_wait_type);
    ((struct fds_state *)ab_op_state(op))->r[0] = p[0];
    CHECK_OK(ab_submit(op, &ts.sink));
    th_sleep(0.02);
    ab_waiting w;
    ab_op_waiting(op, &w);
    CHECK_EQ(w.kind, AB_WAITING_FDS);
    ab_cancel(op);
    TH_FINISH(&ts, op);
    CHECK_EQ(ab_op_error(op), -ECANCELED);
    ab_op_release(op);
    /* Readable after the op is gone: nothing fires into freed memory. */
    CHECK(write(p[1], "x", 1) == 1);
    th_sleep(0.05);
    close(p[0]);
    close(p[1]);
    th_sink_destroy(&ts);
}

/* ---- the cancellation rule ------------------------------------------------------ */

struct teardown_state {
    int wfd;
    unsigned events[8];
    atomic_int ran_work, ran_blocking, saw_cancelled;
};

static void
teardown_work(ab_op *op)
{
    struct teardown_state *s = ab_op_state(op);
    if (ab_work_cancelled(op))
        atomic_store(&s->saw_cancelled, 1);
    atomic_store(&s->ran_work, 1);
}

static void
teardown_blocking(ab_op *op)
{
    struct teardown_state *s = ab_op_state(op);
    if (ab_work_cancelled(op))
        atomic_store(&s->saw_cancelled, 1);
    atomic_store(&s->ran_blocking, 1);
}

/* Cancelled while waiting, then every kind of wait, each of which must
 * run normally (armed after the cancel). */
static int
teardown_step(ab_op *op)
{
    struct teardown_state *s = ab_op_state(op);
    AB_BEGIN(op);
    AB_AWAIT_OR_CANCEL(op, ab_await_cancel(op));
    s->events[0] = ab_op_event(op);
    AB_AWAIT_OR_CANCEL(op, ab_await_timer(op, 0.01));
    s->events[1] = ab_op_event(op);
    AB_AWAIT_OR_CANCEL(op, ab_await_fd(op, s->wfd, AB_EV_WRITE, 5.0));
    s->events[2] = ab_op_event(op);
    AB_AWAIT_OR_CANCEL(op, ab_await_work(op, teardown_work));
    s->events[3] = ab_op_event(op);
    AB_AWAIT_OR_CANCEL(op, ab_await_blocking(op, teardown_blocking));
    s->events[4] = ab_op_event(op);
    ab_op_signal(op); /* the engine's own reference covers the call */
    AB_AWAIT_OR_CANCEL(op, ab_await_signal(op, 5.0));
    s->events[5] = ab_op_event(op);
    AB_AWAIT_OR_CANCEL(op, ab_await_fds(op, 0.01));
    s->events[6] = ab_op_event(op);
    return ab_fail(op, -ECANCELED);
    AB_END(op);
}

static const ab_op_type teardown_type = {
    .name = "teardown",
    .state_size = sizeof(struct teardown_state),
    .step = teardown_step,
};

static void
test_waits_after_cancel_run(void)
{
    th_sink ts;
    th_sink_init(&ts);
    int p[2];
    CHECK_OK(pipe2(p, O_NONBLOCK | O_CLOEXEC));
    ab_op *op = th_op_new(&teardown_type);
    struct teardown_state *s = ab_op_state(op);
    s->wfd = p[1];
    CHECK_OK(ab_submit(op, &ts.sink));
    th_sleep(0.02);
    ab_cancel(op);
    TH_FINISH(&ts, op);
    CHECK_EQ(ab_op_error(op), -ECANCELED);
    CHECK_EQ(s->events[0], AB_EV_CANCEL);
    CHECK_EQ(s->events[1], AB_EV_TIMER);
    CHECK_EQ(s->events[2], AB_EV_WRITE);
    CHECK_EQ(s->events[3], AB_EV_WORK);
    CHECK_EQ(s->events[4], AB_EV_WORK);
    CHECK_EQ(s->events[5], AB_EV_SIGNAL);
    CHECK_EQ(s->events[6], AB_EV_TIMER);
    CHECK_EQ(atomic_load(&s->ran_work), 1);
    CHECK_EQ(atomic_load(&s->ran_blocking), 1);
    CHECK_EQ(atomic_load(&s->saw_cancelled), 0);
    ab_op_release(op);
    close(p[0]);
    close(p[1]);
    th_sink_destroy(&ts);
}

struct long_state {
    atomic_int started;
    double ran_for;
};

/* A long loop that looks at ab_work_cancelled now and then. */
static void
long_work(ab_op *op)
{
    struct long_state *s = ab_op_state(op);
    double t0 = th_now();
    atomic_store(&s->started, 1);
    while (!ab_work_cancelled(op) && th_now() - t0 < 10.0)
        th_sleep(0.001);
    s->ran_for = th_now() - t0;
}

static int
long_step(ab_op *op)
{
    AB_BEGIN(op);
    AB_AWAIT(op, ab_await_work(op, long_work));
    return ab_return_none(op);
    AB_END(op);
}

static const ab_op_type long_type = {
    .name = "long",
    .state_size = sizeof(struct long_state),
    .step = long_step,
};

static void
test_work_sees_cancel(void)
{
    th_sink ts;
    th_sink_init(&ts);
    ab_op *op = th_op_new(&long_type);
    struct long_state *s = ab_op_state(op);
    CHECK_OK(ab_submit(op, &ts.sink));
    while (!atomic_load(&s->started))
        th_sleep(0.001);
    th_sleep(0.05);
    ab_cancel(op);
    TH_FINISH(&ts, op);
    CHECK_EQ(ab_op_error(op), -ECANCELED);
    CHECK(s->ran_for < 2.0);
    ab_op_release(op);
    th_sink_destroy(&ts);
}

/* ---- the blocking pool -------------------------------------------------------------- */

struct nap_state {
    double seconds;
    int blocking;
};

static void
nap(ab_op *op)
{
    th_sleep(((struct nap_state *)ab_op_state(op))->seconds);
}

static int
nap_step(ab_op *op)
{
    struct nap_state *s = ab_op_state(op);
    AB_BEGIN(op);
    AB_AWAIT(op, s->blocking ? ab_await_blocking(op, nap) : ab_await_work(op, nap));
    return ab_return_none(op);
    AB_END(op);
}

static const ab_op_type nap_type = {
    .name = "nap",
    .state_size = sizeof(struct nap_state),
    .step = nap_step,
};

static ab_op *
nap_new(double seconds, int blocking)
{
    ab_op *op = th_op_new(&nap_type);
    *(struct nap_state *)ab_op_state(op) = (struct nap_state){seconds, blocking};
    return op;
}

static void
test_blocking_pool(void)
{
    enum { N = 20 };
    th_sink ts;
    th_sink_init(&ts);
    CHECK_EQ(ab_blocking_configure(0), -EINVAL);
    CHECK_EQ(ab_blocking_size(), 64);
    CHECK_OK(ab_pool_configure(1));
    /* The one CPU worker is busy: blocking calls do not wait for it. */
    ab_op *cpu = nap_new(1.0, 0), *ops[N];
    CHECK_OK(ab_submit(cpu, &ts.sink));
    th_sleep(0.02);
    double t0 = th_now();
    for (int i = 0; i < N; i++)
        CHECK_OK(ab_submit(ops[i] = nap_new(0.2, 1), &ts.sink));
    ab_stats st;
    th_sleep(0.1);
    ab_stats_get(&st);
    /* One thread per call that found none idle (under valgrind, calls
     * armed late may find an early one idle again). */
    CHECK(st.blocking_threads >= (th_env_long("AB_UNDER_VALGRIND", 0) ? 2 : N));
    CHECK(st.blocking_threads <= 64);
    CHECK_EQ(st.pool_threads, 1);
    for (int i = 0; i < N; i++) {
        int msg = 0;
        ab_op *op = th_next(&ts, 10.0, &msg);
        CHECK(op != NULL && op != cpu && msg == AB_MSG_FINISHED);
        ab_op_collect(op);
    }
    double took = th_now() - t0;
    fprintf(stderr, "   %d blocking calls of 0.2 s beside a busy CPU pool: %.3f s\n", N, took);
    /* Under valgrind threads start slowly: only the order is checked. */
    CHECK(took < (th_env_long("AB_UNDER_VALGRIND", 0) ? 5.0 : 0.8));
    TH_FINISH(&ts, cpu);
    for (int i = 0; i < N; i++)
        ab_op_release(ops[i]);
    ab_op_release(cpu);
    /* Queue depths: two CPU jobs on one worker leave one queued. */
    ab_op *a = nap_new(0.2, 0), *b = nap_new(0.2, 0);
    CHECK_OK(ab_submit(a, &ts.sink));
    CHECK_OK(ab_submit(b, &ts.sink));
    th_sleep(0.05);
    ab_stats_get(&st);
    CHECK_EQ(st.pool_queued, 1);
    CHECK_EQ(st.blocking_queued, 0);
    for (int i = 0; i < 2; i++) {
        int msg = 0;
        ab_op *op = th_next(&ts, 10.0, &msg);
        CHECK(op != NULL);
        ab_op_collect(op);
    }
    ab_op_release(a);
    ab_op_release(b);
    CHECK_OK(ab_pool_configure(0));
    th_sink_destroy(&ts);
}

/* ---- streams -------------------------------------------------------------------- */

struct stream_state {
    int n, produced;
    int yield_after_close; /* the rc of a yield once the stream was closed */
    unsigned demand_event;
};

static int
stream_step(ab_op *op)
{
    struct stream_state *s = ab_op_state(op);
    AB_BEGIN(op);
    while (s->produced < s->n) {
        if (ab_stream_room(op) <= 0) {
            AB_AWAIT_OR_CANCEL(op, ab_await_demand(op));
            s->demand_event = ab_op_event(op);
            if (ab_op_cancelled(op)) {
                s->yield_after_close = ab_yield_int(op, -1);
                return ab_fail(op, -ECANCELED);
            }
            continue;
        }
        int rc = ab_yield_int(op, s->produced++);
        if (rc < 0)
            return ab_fail(op, rc);
    }
    return ab_return_none(op);
    AB_END(op);
}

static const ab_op_type stream_type = {
    .name = "stream",
    .state_size = sizeof(struct stream_state),
    .step = stream_step,
};

static ab_op *
stream_new(int n, int max)
{
    ab_op *op = th_op_new(&stream_type);
    ((struct stream_state *)ab_op_state(op))->n = n;
    CHECK_OK(ab_op_set_stream(op, max));
    return op;
}

/* Take and check the items of one message; returns how many. */
static int
take_items(ab_op *op, int *next_expected)
{
    int n = 0;
    for (ab_item *it = ab_op_take_items(op), *next; it != NULL; it = next) {
        next = ab_item_next(it);
        CHECK_EQ(ab_item_kind(it), AB_RESULT_INT);
        CHECK_EQ(ab_item_int(it), *next_expected);
        (*next_expected)++;
        ab_item_free(it);
        n++;
    }
    return n;
}

static void
test_stream_backpressure(void)
{
    enum { N = 20000, MAX = 16 };
    th_sink ts;
    th_sink_init(&ts);
    ab_op *op = stream_new(N, MAX);
    CHECK_OK(ab_submit(op, &ts.sink));
    int expected = 0, messages = 0, finished = 0, most = 0;
    /* A slow start: the producer fills the buffer and waits. */
    th_sleep(0.05);
    ab_waiting w;
    ab_op_waiting(op, &w);
    CHECK_EQ(w.kind, AB_WAITING_DEMAND);
    while (!finished) {
        int msg = 0;
        ab_op *got = th_next(&ts, 10.0, &msg);
        CHECK(got == op);
        messages++;
        if (msg & AB_MSG_ITEMS) {
            int n = take_items(op, &expected);
            if (n > most)
                most = n;
            ab_stream_consumed(op, n);
        }
        finished = (msg & AB_MSG_FINISHED) != 0;
    }
    ab_op_collect(op);
    fprintf(stderr, "   %d items in %d messages, at most %d at once\n", N, messages, most);
    CHECK_EQ(expected, N);
    CHECK_EQ(ab_op_error(op), 0);
    CHECK(most <= MAX);
    CHECK(messages < N);
    ab_op_release(op);
    th_sink_destroy(&ts);
}

static void
test_stream_closed(void)
{
    th_sink ts;
    th_sink_init(&ts);
    ab_op *op = stream_new(1000, 4);
    struct stream_state *s = ab_op_state(op);
    CHECK_OK(ab_submit(op, &ts.sink));
    th_sleep(0.05); /* four items out, the producer waits for demand */
    ab_cancel(op);
    int expected = 0, finished = 0;
    while (!finished) {
        int msg = 0;
        CHECK(th_next(&ts, 10.0, &msg) == op);
        finished = (msg & AB_MSG_FINISHED) != 0;
        /* left untaken: freed with the op */
    }
    ab_op_collect(op);
    (void)expected;
    CHECK_EQ(ab_op_error(op), -ECANCELED);
    CHECK_EQ(s->demand_event, AB_EV_CANCEL);
    CHECK_EQ(s->yield_after_close, -ECANCELED);
    CHECK_EQ(s->produced, 4);
    ab_op_release(op);
    /* Not a stream: yields and demand refuse. */
    ab_op *plain = th_op_new(&stream_type);
    CHECK_EQ(ab_yield_int(plain, 1), AB_ESTATE);
    ab_op_release(plain);
    th_sink_destroy(&ts);
}

int
main(void)
{
    TH_RUN(test_signal_before_wait);
    TH_RUN(test_signal_timeout_then_kept);
    TH_RUN(test_signal_burst_from_threads);
    TH_RUN(test_foreign_thread_outcome);
    TH_RUN(test_fd_set);
    TH_RUN(test_fd_set_cancel);
    TH_RUN(test_waits_after_cancel_run);
    TH_RUN(test_work_sees_cancel);
    TH_RUN(test_blocking_pool);
    TH_RUN(test_stream_backpressure);
    TH_RUN(test_stream_closed);
    return th_done();
}
