/* test_stress.c: several threads, each the owner of its own sink, submit
 * and cancel ops of every kind at once.  Every op must finish exactly
 * once, with success or -ECANCELED, and nothing may stay in flight.
 *
 * AB_STRESS_OPS sets the total op count (default 200000);
 * AB_STRESS_THREADS the number of threads (default 6). */
#include "harness.h"

enum kind { K_NOW, K_TIMER, K_WORK, K_FOREVER, K_KINDS };
enum { WINDOW = 256 };

struct st_state {
    int id;
    enum kind kind;
    double delay;
    int win; /* index in its thread's window */
    int cancel_sent;
    atomic_int worked;
};

static atomic_uchar *finishes; /* per op id */
static atomic_long successes, cancels;
static long total;

static void
st_work(ab_op *op)
{
    struct st_state *s = ab_op_state(op);
    atomic_store(&s->worked, 1);
}

static int
st_step(ab_op *op)
{
    struct st_state *s = ab_op_state(op);
    AB_BEGIN(op);
    /* if, not switch: AB_AWAIT's case labels must belong to AB_BEGIN's. */
    if (s->kind == K_TIMER) {
        AB_AWAIT(op, ab_await_timer(op, s->delay));
    } else if (s->kind == K_WORK) {
        AB_AWAIT(op, ab_await_work(op, st_work));
        CHECK(atomic_load(&s->worked));
    } else if (s->kind == K_FOREVER) {
        AB_AWAIT(op, ab_await_cancel(op));
    }
    return ab_return_int(op, s->id);
    AB_END(op);
}

static const ab_op_type st_type = {
    .name = "stress",
    .state_size = sizeof(struct st_state),
    .step = st_step,
};

struct worker {
    pthread_t thread;
    int first_id, count;
    unsigned seed;
    th_sink ts;
    ab_op *win[WINDOW];
    int n_win;
};

static void
cancel_one(ab_op *op)
{
    struct st_state *s = ab_op_state(op);
    s->cancel_sent = 1;
    ab_cancel(op);
}

static void
handle(struct worker *w, ab_op *op, int msg)
{
    struct st_state *s = ab_op_state(op);
    CHECK_EQ(msg, AB_MSG_FINISHED);
    CHECK(s->win >= 0 && s->win < w->n_win && w->win[s->win] == op);
    CHECK_EQ(atomic_fetch_add(&finishes[s->id], 1), 0);
    int err = ab_op_error(op);
    if (err == 0) {
        CHECK(s->kind != K_FOREVER);
        CHECK_EQ(ab_op_result_kind(op), AB_RESULT_INT);
        CHECK_EQ(ab_op_result_int(op), s->id);
        atomic_fetch_add(&successes, 1);
    } else {
        if (err != -ECANCELED)
            fprintf(stderr, "op %d kind %d: %s\n", s->id, s->kind, ab_strerror(err));
        CHECK_EQ(err, -ECANCELED);
        CHECK(s->cancel_sent);
        atomic_fetch_add(&cancels, 1);
    }
    ab_op_collect(op);
    w->win[s->win] = w->win[--w->n_win];
    ((struct st_state *)ab_op_state(w->win[s->win]))->win = s->win;
    if (rand_r(&w->seed) % 8 == 0)
        ab_cancel(op); /* after the finish: harmless */
    ab_op_release(op);
}

static void
submit_one(struct worker *w, int id)
{
    ab_op *op = th_op_new(&st_type);
    struct st_state *s = ab_op_state(op);
    s->id = id;
    s->kind = (enum kind)(rand_r(&w->seed) % K_KINDS);
    s->delay = (rand_r(&w->seed) % 2000) * 1e-6;
    s->win = w->n_win;
    w->win[w->n_win++] = op;
    CHECK_OK(ab_submit(op, &w->ts.sink));
    if (rand_r(&w->seed) % 6 == 0)
        cancel_one(op);
}

static void *
worker_main(void *arg)
{
    struct worker *w = arg;
    int next = 0, msg;
    th_sink_init(&w->ts);
    while (next < w->count || w->n_win > 0) {
        while (next < w->count && w->n_win < WINDOW)
            submit_one(w, w->first_id + next++);
        if (w->n_win > 0 && rand_r(&w->seed) % 3 == 0)
            cancel_one(w->win[rand_r(&w->seed) % w->n_win]);
        /* Ops that only a cancel ends must get one before we block. */
        for (int i = 0; i < w->n_win; i++) {
            struct st_state *s = ab_op_state(w->win[i]);
            if (s->kind == K_FOREVER && !s->cancel_sent)
                cancel_one(w->win[i]);
        }
        ab_op *op = th_next(&w->ts, 20.0, &msg);
        if (op == NULL) {
            fprintf(stderr, "thread with first id %d: %d ops stuck\n", w->first_id, w->n_win);
            exit(1);
        }
        handle(w, op, msg);
        while (w->ts.batch != NULL) {
            op = th_next(&w->ts, 0, &msg);
            handle(w, op, msg);
        }
    }
    th_sink_destroy(&w->ts);
    return NULL;
}

int
main(void)
{
    total = th_env_long("AB_STRESS_OPS", 200000);
    int n_threads = (int)th_env_long("AB_STRESS_THREADS", 6);
    CHECK(total > 0 && n_threads > 0 && n_threads <= 64);
    finishes = calloc((size_t)total, sizeof(*finishes));
    CHECK(finishes != NULL);
    struct worker *w = calloc((size_t)n_threads, sizeof(*w));
    CHECK(w != NULL);
    ab_stats before, after;
    ab_stats_get(&before);
    double t0 = th_now();
    long id = 0;
    for (int i = 0; i < n_threads; i++) {
        w[i].first_id = (int)id;
        w[i].count = (int)(total / n_threads + (i < total % n_threads));
        w[i].seed = 0x9e3779b9u * (unsigned)(i + 1) ^ (unsigned)time(NULL);
        id += w[i].count;
        CHECK_OK(pthread_create(&w[i].thread, NULL, worker_main, &w[i]));
    }
    CHECK_EQ(id, total);
    for (int i = 0; i < n_threads; i++)
        CHECK_OK(pthread_join(w[i].thread, NULL));
    ab_stats_get(&after);
    for (long i = 0; i < total; i++)
        CHECK_EQ(finishes[i], 1);
    CHECK_EQ(atomic_load(&successes) + atomic_load(&cancels), total);
    CHECK_EQ(after.submitted - before.submitted, total);
    CHECK_EQ(after.completed - before.completed, atomic_load(&successes));
    CHECK_EQ(after.cancelled - before.cancelled, atomic_load(&cancels));
    fprintf(stderr, "%ld ops on %d threads in %.2f s: %ld ok, %ld cancelled; "
            "%" PRIu64 " engine and %" PRIu64 " sink wake-ups\n",
            total, n_threads, th_now() - t0, atomic_load(&successes), atomic_load(&cancels),
            after.engine_wakeups - before.engine_wakeups,
            after.sink_wakeups - before.sink_wakeups);
    free(w);
    free(finishes);
    return th_done();
}
