/* test_lifecycle.c: engine stop and restart, pause and resume, stops when
 * idle, fork, sink retirement, engine calls. */
#include <dirent.h>
#include <sched.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"

/* ---- op types ------------------------------------------------------------- */

static int
timer_step(ab_op *op)
{
    AB_BEGIN(op);
    AB_AWAIT(op, ab_await_timer(op, *(double *)ab_op_state(op)));
    return ab_return_int(op, 7);
    AB_END(op);
}

static const ab_op_type timer_type = {
    .name = "timer",
    .state_size = sizeof(double),
    .step = timer_step,
};

static int
forever_step(ab_op *op)
{
    AB_BEGIN(op);
    AB_AWAIT(op, ab_await_cancel(op));
    return ab_return_none(op);
    AB_END(op);
}

static const ab_op_type forever_type = {.name = "forever", .step = forever_step};

static void
noop_work(ab_op *op)
{
    *(int *)ab_op_state(op) = 1;
}

static int
work_step(ab_op *op)
{
    AB_BEGIN(op);
    AB_AWAIT(op, ab_await_work(op, noop_work));
    return ab_return_int(op, *(int *)ab_op_state(op));
    AB_END(op);
}

static const ab_op_type work_type = {.name = "work", .state_size = sizeof(int), .step = work_step};

/* Run one op of `type` to its end on a fresh sink; its error. */
static int
run_one(const ab_op_type *type, double delay)
{
    th_sink ts;
    th_sink_init(&ts);
    ab_op *op = th_op_new(type);
    if (type->state_size == sizeof(double))
        *(double *)ab_op_state(op) = delay;
    CHECK_OK(ab_submit(op, &ts.sink));
    TH_FINISH(&ts, op);
    int err = ab_op_error(op);
    if (err == 0 && type != &forever_type)
        CHECK(ab_op_result_int(op) == 7 || ab_op_result_int(op) == 1);
    ab_op_release(op);
    th_sink_destroy(&ts);
    return err;
}

/* ---- stop and start ---------------------------------------------------------- */

static void
test_stop_start(void)
{
    ab_engine_stop(); /* not running: returns at once */
    CHECK_OK(ab_engine_start());
    CHECK_OK(ab_engine_start());
    for (int i = 0; i < 20; i++) {
        CHECK_OK(run_one(&timer_type, 0.001));
        CHECK_OK(run_one(&work_type, 0));
        ab_engine_stop();
        ab_engine_stop();
    }
    /* A submit restarts a stopped engine. */
    CHECK_OK(run_one(&timer_type, 0.0));
    ab_stats st;
    ab_stats_get(&st);
    CHECK_EQ(st.in_flight, 0);
}

/* ---- sink retirement ------------------------------------------------------- */

static atomic_int freed_sinks;
static pthread_t freed_on;

static void
free_sink(ab_sink *sink)
{
    th_sink *ts = sink->user;
    freed_on = pthread_self();
    th_sink_free(ts);
    free(ts);
    atomic_fetch_add(&freed_sinks, 1);
}

static void
wait_freed(int n)
{
    double until = th_now() + 10.0;
    while (atomic_load(&freed_sinks) < n && th_now() < until)
        th_sleep(0.001);
    CHECK_EQ(atomic_load(&freed_sinks), n);
}

static void
test_sink_retire(void)
{
    pthread_t engine = th_engine_thread();
    atomic_store(&freed_sinks, 0);
    for (int i = 0; i < 10; i++) {
        th_sink *ts = malloc(sizeof(*ts));
        th_sink_init(ts);
        ab_op *op = th_op_new(&timer_type);
        CHECK_OK(ab_submit(op, &ts->sink));
        TH_FINISH(ts, op);
        ab_op_release(op);
        ab_sink_retire(&ts->sink, free_sink);
        wait_freed(i + 1);
        CHECK(pthread_equal(freed_on, engine));
    }
    /* Engine not running: freed at once, on this thread. */
    ab_engine_stop();
    th_sink *ts = malloc(sizeof(*ts));
    th_sink_init(ts);
    ab_sink_retire(&ts->sink, free_sink);
    CHECK_EQ(atomic_load(&freed_sinks), 11);
    CHECK(pthread_equal(freed_on, pthread_self()));
}

/* ---- fork ------------------------------------------------------------------- */

/* Run body() in a forked child; 0 if it ran to its end, else -1.  The
 * child reports success through a pipe, so that valgrind's exit code for
 * the child (which abandons the parent's engine by design) does not count
 * when AB_UNDER_VALGRIND is set. */
static int
in_child(void (*body)(void))
{
    int p[2], status;
    CHECK_OK(pipe(p));
    fflush(stderr);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        close(p[0]);
        body();
        CHECK_EQ(write(p[1], "K", 1), 1);
        _exit(0);
    }
    close(p[1]);
    double until = th_now() + 10.0;
    for (;;) {
        pid_t r = waitpid(pid, &status, WNOHANG);
        CHECK(r >= 0);
        if (r == pid)
            break;
        if (th_now() > until) {
            fprintf(stderr, "child %d hung: killed\n", (int)pid);
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            close(p[0]);
            return -1;
        }
        th_sleep(0.002);
    }
    char c = 0;
    ssize_t n = read(p[0], &c, 1);
    close(p[0]);
    if (n != 1 || c != 'K' || !WIFEXITED(status)) {
        fprintf(stderr, "child failed: status 0x%x\n", status);
        return -1;
    }
    if (WEXITSTATUS(status) != 0 && getenv("AB_UNDER_VALGRIND") == NULL) {
        fprintf(stderr, "child exited with %d\n", WEXITSTATUS(status));
        return -1;
    }
    return 0;
}

/* In the child: a fresh engine runs new ops; the inherited op is dead. */
static unsigned parent_gen;
static ab_op *inherited;

static void
child_checks(void)
{
    CHECK(ab_fork_generation() > parent_gen);
    CHECK(ab_op_generation(inherited) == parent_gen);
    ab_cancel(inherited); /* of an earlier generation: does nothing */
    CHECK_OK(run_one(&timer_type, 0.005));
    CHECK_OK(run_one(&work_type, 0));
    th_sink ts;
    th_sink_init(&ts);
    ab_op *op = th_op_new(&forever_type);
    CHECK_OK(ab_submit(op, &ts.sink));
    th_expect_quiet(&ts, 0.01);
    ab_cancel(op);
    TH_FINISH(&ts, op);
    CHECK_EQ(ab_op_error(op), -ECANCELED);
    ab_op_release(op);
    th_sink_destroy(&ts);
    /* Its message can never come: the owner collects it itself.  (Ops the
     * parent's engine still held at the fork stay unfreed in the child, so
     * only in_flight is checked here.) */
    ab_op_collect(inherited);
    ab_op_release(inherited);
    ab_stats st;
    ab_stats_get(&st);
    CHECK_EQ(st.in_flight, 0);
    ab_engine_stop();
}

static void
child_runs_one(void)
{
    CHECK_OK(run_one(&timer_type, 0.001));
    CHECK_OK(run_one(&work_type, 0));
    ab_engine_stop();
}

static void
test_fork(void)
{
    th_sink ts;
    th_sink_init(&ts);
    ab_op *inflight = th_op_new(&forever_type);
    CHECK_OK(ab_submit(inflight, &ts.sink));
    CHECK_OK(run_one(&work_type, 0)); /* the pool runs in the parent */
    unsigned gen = ab_fork_generation();
    CHECK_EQ(ab_op_generation(inflight), gen);

    parent_gen = gen;
    inherited = inflight;
    for (int i = 0; i < 5; i++)
        CHECK_EQ(in_child(child_checks), 0);
    /* The parent is unaffected. */
    CHECK_EQ(ab_fork_generation(), gen);
    CHECK_OK(run_one(&timer_type, 0.002));
    CHECK_OK(run_one(&work_type, 0));
    th_expect_quiet(&ts, 0.02);
    ab_cancel(inflight);
    TH_FINISH(&ts, inflight);
    CHECK_EQ(ab_op_error(inflight), -ECANCELED);
    ab_op_release(inflight);
    th_sink_destroy(&ts);

    /* Fork while idle after a stop: the child starts its own engine. */
    ab_engine_stop();
    CHECK_EQ(in_child(child_runs_one), 0);
}

/* Forks from a second thread while the main thread keeps ops going. */
static atomic_int forking_done;

static void *
forker(void *arg)
{
    (void)arg;
    for (int i = 0; i < 20; i++)
        CHECK_EQ(in_child(child_runs_one), 0);
    atomic_store(&forking_done, 1);
    return NULL;
}

static void
test_fork_from_thread_while_busy(void)
{
    pthread_t t;
    atomic_store(&forking_done, 0);
    CHECK_OK(pthread_create(&t, NULL, forker, NULL));
    int rounds = 0;
    while (!atomic_load(&forking_done)) {
        CHECK_OK(run_one(&timer_type, 0.0005));
        CHECK_OK(run_one(&work_type, 0));
        rounds++;
    }
    CHECK_OK(pthread_join(t, NULL));
    fprintf(stderr, "%d rounds of ops beside 20 forks\n", rounds);
}

/* A retire posted just before a stop must still free the sink: the contract
 * is "once no notify can run any more", and after a stop none can. */
static void
test_retire_then_stop(void)
{
    atomic_store(&freed_sinks, 0);
    for (int i = 0; i < 20; i++) {
        th_sink *ts = malloc(sizeof(*ts));
        th_sink_init(ts);
        CHECK_OK(run_one(&timer_type, 0)); /* the engine runs */
        ab_sink_retire(&ts->sink, free_sink);
        ab_engine_stop();
        int freed = atomic_load(&freed_sinks);
        if (freed != i + 1)
            fprintf(stderr, "round %d: sink retired before a stop was never freed\n", i);
        CHECK_EQ(freed, i + 1);
    }
}

/* One thread retires sinks while another stops and starts the engine (as
 * an atexit hook would): every sink is freed exactly once. */
static atomic_int stopper_done;

static void *
stopper(void *arg)
{
    (void)arg;
    for (int i = 0; i < 200; i++) {
        CHECK_OK(ab_engine_start());
        th_sleep(0.0002);
        ab_engine_stop();
    }
    atomic_store(&stopper_done, 1);
    return NULL;
}

static void
test_retire_while_stopping(void)
{
    pthread_t t;
    atomic_store(&freed_sinks, 0);
    atomic_store(&stopper_done, 0);
    CHECK_OK(pthread_create(&t, NULL, stopper, NULL));
    int retired = 0;
    while (!atomic_load(&stopper_done)) {
        th_sink *ts = malloc(sizeof(*ts));
        th_sink_init(ts);
        ab_sink_retire(&ts->sink, free_sink);
        retired++;
        th_sleep(0.0001);
    }
    CHECK_OK(pthread_join(t, NULL));
    CHECK_OK(ab_engine_start());
    ab_engine_stop();
    int freed = atomic_load(&freed_sinks);
    if (freed != retired)
        fprintf(stderr, "%d sinks retired, %d freed\n", retired, freed);
    CHECK_EQ(freed, retired);
}

/* ab_sink_retire is not a submission: stats must not count it. */
static void
test_retire_not_counted(void)
{
    CHECK_OK(run_one(&timer_type, 0));
    ab_stats before, after;
    ab_stats_get(&before);
    th_sink *ts = malloc(sizeof(*ts));
    th_sink_init(ts);
    int freed = atomic_load(&freed_sinks);
    ab_sink_retire(&ts->sink, free_sink);
    wait_freed(freed + 1);
    th_sleep(0.05); /* the engine finishes the retirement after free_fn */
    ab_stats_get(&after);
    CHECK_EQ(after.submitted - before.submitted, 0);
    CHECK_EQ(after.completed - before.completed, 0);
}

/* A cancel posted after the finish holds a reference on the inbox; a stop
 * right after must not lose it (the op would never be freed). */
static void
test_stop_keeps_posted_ops(void)
{
    for (int i = 0; i < 20; i++) {
        th_sink ts;
        th_sink_init(&ts);
        ab_op *op = th_op_new(&timer_type);
        CHECK_OK(ab_submit(op, &ts.sink));
        TH_FINISH(&ts, op);
        ab_cancel(op);
        ab_op_release(op);
        ab_engine_stop();
        th_sink_destroy(&ts);
        double until = th_now() + 1.0;
        long made, freed;
        while ((made = atomic_load(&th_ops_made)) != (freed = atomic_load(&th_ops_freed)) &&
               th_now() < until)
            th_sleep(0.001);
        if (made != freed)
            fprintf(stderr, "round %d: op with a cancel queued at the stop never freed\n", i);
        CHECK_EQ(made, freed);
    }
}


/* ---- a stop pauses what is in flight; a start resumes it ----------------------- */

static void
slow_work(ab_op *op)
{
    th_sleep(0.05);
    *(int *)ab_op_state(op) = 1;
}

static int
slow_work_step(ab_op *op)
{
    AB_BEGIN(op);
    AB_AWAIT(op, ab_await_work(op, slow_work));
    return ab_return_int(op, *(int *)ab_op_state(op));
    AB_END(op);
}

static const ab_op_type slow_work_type = {
    .name = "slow_work", .state_size = sizeof(int), .step = slow_work_step};

static void
test_stop_pauses_and_start_resumes(void)
{
    th_sink ts;
    th_sink_init(&ts);
    CHECK_OK(ab_pool_configure(1));
    ab_op *timer = th_op_new(&timer_type), *busy = th_op_new(&slow_work_type),
          *queued = th_op_new(&work_type), *forever = th_op_new(&forever_type);
    *(double *)ab_op_state(timer) = 0.1;
    CHECK_OK(ab_submit(timer, &ts.sink));
    CHECK_OK(ab_submit(busy, &ts.sink));
    CHECK_OK(ab_submit(queued, &ts.sink)); /* behind busy on the one worker */
    CHECK_OK(ab_submit(forever, &ts.sink));
    th_sleep(0.01);
    ab_engine_stop(); /* with four ops in flight */
    ab_cancel(forever); /* posted while stopped: kept for the start */
    th_expect_quiet(&ts, 0.2); /* the timer is due, the work done: nothing runs */
    ab_stats st;
    ab_stats_get(&st);
    CHECK_EQ(st.in_flight, 4);
    CHECK_OK(ab_engine_start());
    int seen = 0;
    for (int i = 0; i < 4; i++) {
        int msg;
        ab_op *op = th_next(&ts, 10.0, &msg);
        CHECK(op != NULL && msg == AB_MSG_FINISHED);
        if (op == forever)
            CHECK_EQ(ab_op_error(op), -ECANCELED);
        else
            CHECK_OK(ab_op_error(op));
        seen |= op == timer ? 1 : op == busy ? 2 : op == queued ? 4 : 8;
        ab_op_collect(op);
    }
    CHECK_EQ(seen, 15);
    CHECK_EQ(ab_op_result_int(queued), 1);
    ab_op_release(timer);
    ab_op_release(busy);
    ab_op_release(queued);
    ab_op_release(forever);
    th_sink_destroy(&ts);
    CHECK_OK(ab_pool_configure(0));
}

/* ---- idle stops: no thread is left, and submits never race one into a hang ---- */

/* Threads of the process before the library started any. */
static int threads_at_start;

static int
threads_of_process(void)
{
    int n = 0;
    DIR *d = opendir("/proc/self/task");
    CHECK(d != NULL);
    for (struct dirent *e; (e = readdir(d)) != NULL;)
        n += e->d_name[0] != '.';
    closedir(d);
    return n;
}

static void
test_stop_if_idle_leaves_no_thread(void)
{
    CHECK_OK(run_one(&timer_type, 0.001));
    CHECK_OK(run_one(&work_type, 0)); /* the pool's workers start */
    CHECK(threads_of_process() > threads_at_start);
    th_sink ts;
    th_sink_init(&ts);
    ab_op *op = th_op_new(&forever_type);
    CHECK_OK(ab_submit(op, &ts.sink));
    CHECK_EQ(ab_engine_stop_if_idle(), 0); /* one in flight: nothing stops */
    ab_cancel(op);
    TH_FINISH(&ts, op);
    ab_op_release(op);
    th_sink_destroy(&ts);
    CHECK_EQ(ab_engine_stop_if_idle(), 1);
    CHECK_EQ(threads_of_process(), threads_at_start);
    CHECK_EQ(ab_engine_stop_if_idle(), 1); /* stopped already */
    CHECK_OK(run_one(&work_type, 0)); /* and it all starts again */
    CHECK_OK(run_one(&timer_type, 0.001));
}

static atomic_int idle_stopper_done;

static void *
idle_stopper(void *arg)
{
    long *stops = arg;
    while (!atomic_load(&idle_stopper_done)) {
        *stops += ab_engine_stop_if_idle();
        sched_yield(); /* under valgrind, one thread runs at a time */
    }
    return NULL;
}

/* One thread stops the engine whenever nothing is in flight, as the
 * courier does; another submits one op at a time, each submit racing a
 * stop.  Every op must finish (a submit lost to a stop would hang). */
static void
test_stop_if_idle_races_submits(void)
{
    long stops = 0, n = th_env_long("AB_STRESS_OPS", 200000) / 40;
    pthread_t t;
    atomic_store(&idle_stopper_done, 0);
    CHECK_OK(pthread_create(&t, NULL, idle_stopper, &stops));
    for (long i = 0; i < n; i++)
        CHECK_OK(run_one(i % 3 == 0 ? &work_type : &timer_type, 0));
    atomic_store(&idle_stopper_done, 1);
    CHECK_OK(pthread_join(t, NULL));
    fprintf(stderr, "%ld ops, %ld idle stops between them\n", n, stops);
    CHECK(stops > 0);
}

/* ---- engine calls --------------------------------------------------------------- */

static pthread_t call_thread;
static atomic_int call_ran;

static void
record_call(void *arg)
{
    call_thread = pthread_self();
    atomic_store(&call_ran, *(int *)arg);
}

static void
test_engine_call(void)
{
    pthread_t engine = th_engine_thread();
    int token = 42;
    atomic_store(&call_ran, 0);
    ab_engine_call(record_call, &token);
    for (int i = 0; i < 10000 && !atomic_load(&call_ran); i++)
        th_sleep(0.0001);
    CHECK_EQ(atomic_load(&call_ran), 42);
    CHECK(pthread_equal(call_thread, engine));
    /* Not running: at once, here. */
    ab_engine_stop();
    token = 7;
    ab_engine_call(record_call, &token);
    CHECK_EQ(atomic_load(&call_ran), 7);
    CHECK(pthread_equal(call_thread, pthread_self()));
}

/* ---- what an op waits for, seen from the owner -------------------------------- */

static int
fd_step(ab_op *op)
{
    AB_BEGIN(op);
    AB_AWAIT(op, ab_await_fd(op, *(int *)ab_op_state(op), AB_EV_READ, -1));
    return ab_return_none(op);
    AB_END(op);
}

static const ab_op_type fd_type = {.name = "fd", .state_size = sizeof(int), .step = fd_step};

static void
wait_kind(ab_op *op, ab_waiting_kind kind)
{
    ab_waiting w;
    for (int i = 0; i < 10000; i++) {
        ab_op_waiting(op, &w);
        if (w.kind == kind)
            return;
        th_sleep(0.0001);
    }
    fprintf(stderr, "%s: waiting kind %d, expected %d\n", ab_op_type_of(op)->name, w.kind,
            kind);
    exit(1);
}

static void
test_op_waiting(void)
{
    int p[2];
    CHECK_OK(pipe(p));
    th_sink ts;
    th_sink_init(&ts);
    ab_op *timer = th_op_new(&timer_type), *fd = th_op_new(&fd_type),
          *forever = th_op_new(&forever_type), *work = th_op_new(&slow_work_type);
    *(double *)ab_op_state(timer) = 30;
    *(int *)ab_op_state(fd) = p[0];
    ab_waiting w;
    ab_op_waiting(timer, &w);
    CHECK_EQ(w.kind, AB_WAITING_NOTHING);
    CHECK_OK(ab_submit(timer, &ts.sink));
    CHECK_OK(ab_submit(fd, &ts.sink));
    CHECK_OK(ab_submit(forever, &ts.sink));
    CHECK_OK(ab_submit(work, &ts.sink));
    wait_kind(timer, AB_WAITING_TIMER);
    wait_kind(forever, AB_WAITING_CANCEL);
    wait_kind(work, AB_WAITING_WORK);
    wait_kind(fd, AB_WAITING_FD);
    ab_op_waiting(fd, &w);
    CHECK_EQ(w.fd, p[0]);
    CHECK_EQ(w.events, AB_EV_READ);
    ab_cancel(timer);
    ab_cancel(fd);
    ab_cancel(forever);
    ab_op *ops[] = {timer, fd, forever, work};
    for (int i = 0; i < 4; i++) {
        int msg;
        ab_op *op = th_next(&ts, 10.0, &msg);
        CHECK(op != NULL);
        ab_op_collect(op);
    }
    for (int i = 0; i < 4; i++) {
        ab_op_waiting(ops[i], &w);
        CHECK_EQ(w.kind, AB_WAITING_NOTHING); /* finished */
        ab_op_release(ops[i]);
    }
    th_sink_destroy(&ts);
    close(p[0]);
    close(p[1]);
}

/* ---- abandon: an owner that goes away for good ----------------------------------- */

/* In a child: what it abandons is leaked by design, which the sanitizers'
 * leak checks would report at the parent's exit. */
static void
abandon_in_child(void)
{
    th_sink ts;
    th_sink_init(&ts);
    ab_op *op = th_op_new(&forever_type);
    CHECK_OK(ab_submit(op, &ts.sink));
    ab_engine_abandon();
    ab_stats st;
    ab_stats_get(&st);
    CHECK_EQ(st.in_flight, 0);
    CHECK_OK(run_one(&timer_type, 0.001)); /* a fresh engine */
    CHECK_OK(run_one(&work_type, 0));
    th_expect_quiet(&ts, 0.05); /* the abandoned op never answers */
    ab_engine_stop();
}

static void
test_abandon(void)
{
    CHECK_EQ(in_child(abandon_in_child), 0);
}

static void *
nothing(void *arg)
{
    return arg;
}

int
main(void)
{
    /* A first thread, joined: a sanitizer starts its own helper thread
     * with the program's first thread, and that one stays. */
    pthread_t first;
    CHECK_OK(pthread_create(&first, NULL, nothing, NULL));
    CHECK_OK(pthread_join(first, NULL));
    threads_at_start = threads_of_process();
    TH_RUN(test_stop_start);
    TH_RUN(test_sink_retire);
#if defined(__SANITIZE_THREAD__)
    /* TSan cannot follow a child of a multi-threaded process that starts
     * threads ("dup thread with used id"): the fork tests run elsewhere. */
    fprintf(stderr, "-- fork tests skipped under ThreadSanitizer\n");
#else
    TH_RUN(test_fork);
    TH_RUN(test_fork_from_thread_while_busy);
#endif
    TH_RUN(test_retire_not_counted);
    TH_RUN(test_retire_then_stop);
    TH_RUN(test_stop_keeps_posted_ops);
    TH_RUN(test_retire_while_stopping);
    TH_RUN(test_stop_pauses_and_start_resumes);
    TH_RUN(test_engine_call);
    TH_RUN(test_op_waiting);
    TH_RUN(test_stop_if_idle_leaves_no_thread);
    TH_RUN(test_stop_if_idle_races_submits);
#if !defined(__SANITIZE_THREAD__)
    TH_RUN(test_abandon);
#endif
    return th_done();
}
