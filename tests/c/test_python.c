/* test_python.c: the "await a Python awaitable" protocol, with the test
 * playing the owner: AB_MSG_PYTHON out, ab_python_done back. */
#include "harness.h"

struct py_state {
    int slot;
    int answers[2];
    unsigned events[2];
};

static int
py_step(ab_op *op)
{
    struct py_state *s = ab_op_state(op);
    AB_BEGIN(op);
    AB_AWAIT(op, ab_await_python(op, s->slot));
    s->events[0] = ab_op_event(op);
    s->answers[0] = ab_op_python_failed(op);
    AB_AWAIT(op, ab_await_python(op, s->slot + 1));
    s->events[1] = ab_op_event(op);
    s->answers[1] = ab_op_python_failed(op);
    return ab_return_python(op);
    AB_END(op);
}

static const ab_op_type py_type = {
    .name = "py",
    .state_size = sizeof(struct py_state),
    .flags = AB_TYPE_AWAITS_PYTHON,
    .step = py_step,
};

static ab_op *
expect_msg(th_sink *ts, int want)
{
    int msg = 0;
    ab_op *op = th_next(ts, 10.0, &msg);
    CHECK(op != NULL);
    CHECK_EQ(msg, want);
    return op;
}

static void
test_round_trip(void)
{
    th_sink ts;
    th_sink_init(&ts);
    ab_op *op = th_op_new(&py_type);
    struct py_state *s = ab_op_state(op);
    s->slot = 4;
    CHECK_OK(ab_submit(op, &ts.sink));
    CHECK(expect_msg(&ts, AB_MSG_PYTHON) == op);
    CHECK_EQ(ab_op_python_slot(op), 4);
    th_expect_quiet(&ts, 0.02); /* the op waits for the owner */
    ab_python_done(op, 0);
    CHECK(expect_msg(&ts, AB_MSG_PYTHON) == op);
    CHECK_EQ(ab_op_python_slot(op), 5);
    ab_python_done(op, 1);
    CHECK(expect_msg(&ts, AB_MSG_FINISHED) == op);
    ab_op_collect(op);
    CHECK_EQ(ab_op_error(op), 0);
    CHECK_EQ(ab_op_result_kind(op), AB_RESULT_PYTHON);
    CHECK_EQ(s->events[0], AB_EV_PYTHON);
    CHECK_EQ(s->events[1], AB_EV_PYTHON);
    CHECK_EQ(s->answers[0], 0);
    CHECK_EQ(s->answers[1], 1);
    ab_op_release(op);
    th_sink_destroy(&ts);
}

/* A cancel while the owner runs the awaitable waits for its answer. */
static void
test_cancel_while_waiting(void)
{
    th_sink ts;
    th_sink_init(&ts);
    ab_op *op = th_op_new(&py_type);
    CHECK_OK(ab_submit(op, &ts.sink));
    CHECK(expect_msg(&ts, AB_MSG_PYTHON) == op);
    ab_cancel(op);
    th_expect_quiet(&ts, 0.05);
    ab_python_done(op, 1);
    CHECK(expect_msg(&ts, AB_MSG_FINISHED) == op);
    ab_op_collect(op);
    CHECK_EQ(ab_op_error(op), -ECANCELED);
    ab_op_release(op);
    th_sink_destroy(&ts);
}

/* Many ops; the owner answers each as soon as it sees it, so an op can be
 * pushed again while the batch that carried it is still being walked. */
static void
test_many_answered_in_batch(void)
{
    enum { N = 2000 };
    th_sink ts;
    th_sink_init(&ts);
    static ab_op *ops[N];
    static int python_msgs[N];
    for (int i = 0; i < N; i++) {
        ops[i] = th_op_new(&py_type);
        ((struct py_state *)ab_op_state(ops[i]))->slot = i;
        CHECK_OK(ab_submit(ops[i], &ts.sink));
    }
    int finished = 0, msg;
    while (finished < N) {
        ab_op *op = th_next(&ts, 10.0, &msg);
        CHECK(op != NULL);
        struct py_state *s = ab_op_state(op);
        if (msg == AB_MSG_PYTHON) {
            int slot = ab_op_python_slot(op);
            CHECK(slot == s->slot || slot == s->slot + 1);
            python_msgs[s->slot]++;
            ab_python_done(op, slot & 1);
        } else {
            CHECK_EQ(msg, AB_MSG_FINISHED);
            CHECK_EQ(ab_op_error(op), 0);
            CHECK_EQ(python_msgs[s->slot], 2);
            ab_op_collect(op);
            finished++;
        }
    }
    for (int i = 0; i < N; i++)
        ab_op_release(ops[i]);
    th_expect_quiet(&ts, 0.02);
    th_sink_destroy(&ts);
}

int
main(void)
{
    TH_RUN(test_round_trip);
    TH_RUN(test_cancel_while_waiting);
    TH_RUN(test_many_answered_in_batch);
    return th_done();
}
