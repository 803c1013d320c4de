/* engine.c: the libevent thread that resumes ops.
 *
 * Every cross-thread call reaches the engine through one lock-free inbox
 * (a stack of ops with AB_EV_* bits pending on each) and one eventfd that
 * is written only when the inbox turns non-empty, so a burst of submits,
 * cancels and pool completions wakes the engine once.  Only the engine
 * thread touches the event_base, so libevent needs no locks of its own. */
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "ab-internal.h"

/* Timers above this many seconds (68 years) wait until cancelled. */
#define AB__TIMER_MAX 2147483647.0
/* How long the engine may look at its inbox for the next post after a
 * burst, when spinning pays (spin.c), and how long it may keep taking lone
 * posts before it goes back to libevent. */
#define AB__SPIN_NS 50000u
#define AB__TURN_NS 1000000u
/* Sink notifications held back in one pass over the inbox (more are sent
 * at once). */
#define AB__HELD_NOTIFY 16
#if defined(__x86_64__) || defined(__i386__)
#define AB__CPU_RELAX() __builtin_ia32_pause()
#else
#define AB__CPU_RELAX() __asm__ __volatile__("" ::: "memory")
#endif

enum park_state { PARK_NONE, PARK_ASKED, PARK_PARKED };

static const ab_op_type call_type; /* engine calls, below */

static struct engine {
    pthread_mutex_t start_mu; /* start/stop against each other */
    int running;
    /* Submits may post without start_mu: cleared (under start_mu) by a
     * stop before it looks at in_flight, so that a submit either sees it
     * cleared and waits for the stop, or the stop sees the submit. */
    atomic_int accepting;
    pthread_t thread;
    struct event_base *base;
    atomic_int wake_fd; /* set once per process (and again in a fork child) */
    struct event wake_ev;
    ab_op *inbox; /* lock-free stack */
    /* Ops to resume after the callbacks of this loop turn (ab__soon), each
     * with a reference: engine thread only, run by soon_ev.  An array
     * rather than a link in every op: few ops ever need it. */
    ab_op **soon;
    int nsoon, soon_cap;
    struct event soon_ev;
    atomic_int awake; /* the engine looks at the inbox: posters need not wake it */
    /* A deferred post (ab_submit_deferred) found the engine asleep and left
     * its wake to ab_engine_flush: the next immediate post or flush pays. */
    atomic_int wake_owed;
    atomic_int stop_asked;

    /* Engine thread only: sinks that went non-empty during a pass over the
     * inbox, notified once the pass is done, so that a burst of outcomes
     * wakes its loop once, with the whole burst ready (and, on one CPU,
     * the woken loop does not preempt the engine in the middle of it). */
    int in_pass, nheld, nlast;
    ab_sink *held[AB__HELD_NOTIFY];
    /* The sinks notified by the last pass (until a call may retire one). */
    ab_sink *last[AB__HELD_NOTIFY];
    /* Whether spinning for the next post pays (spin.c). */
    ab__spinner spinner;

    /* fork: the engine parks outside libevent while another thread forks */
    pthread_mutex_t park_mu;
    pthread_cond_t park_cv;
    enum park_state park;
    atomic_int park_asked;
    pid_t tid; /* the engine thread's, for ab_thread_wait_gone */
} E = {
    .start_mu = PTHREAD_MUTEX_INITIALIZER,
    .wake_fd = -1,
    .park_mu = PTHREAD_MUTEX_INITIALIZER,
    .park_cv = PTHREAD_COND_INITIALIZER,
};

/* Counters grouped by the thread that writes them, a cache line each, so
 * that the loop thread and the engine do not bounce one line per op. */
static struct {
    _Alignas(64) atomic_uint_fast64_t submitted, in_flight, largest_batch; /* owners */
    _Alignas(64) atomic_uint_fast64_t completed, cancelled, sink_wakeups;  /* engine */
    atomic_uint_fast64_t spins, spins_paid;                                /* engine */
    _Alignas(64) atomic_uint_fast64_t engine_wakeups;                     /* posters */
} S;

static atomic_uint generation;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
/* Work ops finishing on a pool thread, which notifies their sinks itself:
 * an engine call waits until none is under way (run_call), so that what a
 * call retires or closes (a sink, the fd a notify writes) is never touched
 * by one of them. */
static atomic_int foreign_finishes;

struct event_base *ab__engine_base(void) { return E.base; }
unsigned ab_fork_generation(void) { return atomic_load(&generation); }

int
ab__on_engine_thread(void)
{
    return __atomic_load_n(&E.running, __ATOMIC_ACQUIRE) && pthread_equal(pthread_self(), E.thread);
}

/* Engine thread: what op waits for now (owners read it: ab_op_waiting). */
static void
set_wait(ab_op *op, enum ab__wait wait)
{
    __atomic_store_n(&op->wait, (unsigned char)wait, __ATOMIC_RELAXED);
}

void ab__set_wait(ab_op *op, enum ab__wait wait) { set_wait(op, wait); }

void
ab_op_waiting(const ab_op *op, ab_waiting *out)
{
    static const ab_waiting_kind kinds[] = {
        [AB__WAIT_NONE] = AB_WAITING_NOTHING, [AB__WAIT_EVENT] = AB_WAITING_FD,
        [AB__WAIT_TIMER] = AB_WAITING_TIMER,  [AB__WAIT_WORK] = AB_WAITING_WORK,
        [AB__WAIT_PYTHON] = AB_WAITING_PYTHON, [AB__WAIT_CANCEL] = AB_WAITING_CANCEL,
        [AB__WAIT_SIGNAL] = AB_WAITING_SIGNAL, [AB__WAIT_FDS] = AB_WAITING_FDS,
        [AB__WAIT_DEMAND] = AB_WAITING_DEMAND,
    };
    unsigned wait = __atomic_load_n(&op->wait, __ATOMIC_RELAXED);
    out->kind = wait < sizeof(kinds) / sizeof(kinds[0]) ? kinds[wait] : AB_WAITING_NOTHING;
    out->fd = out->kind == AB_WAITING_FD ? __atomic_load_n(&op->wait_fd, __ATOMIC_RELAXED) : -1;
    out->events = out->kind == AB_WAITING_FD
                      ? __atomic_load_n(&op->wait_events, __ATOMIC_RELAXED)
                      : 0;
}

/* ---- stats --------------------------------------------------------------- */

void
ab_stats_get(ab_stats *out)
{
    out->submitted = atomic_load(&S.submitted);
    out->completed = atomic_load(&S.completed);
    out->cancelled = atomic_load(&S.cancelled);
    out->in_flight = atomic_load(&S.in_flight);
    out->engine_wakeups = atomic_load(&S.engine_wakeups);
    out->sink_wakeups = atomic_load(&S.sink_wakeups);
    out->largest_batch = atomic_load(&S.largest_batch);
    out->engine_spins = atomic_load(&S.spins);
    out->engine_spins_paid = atomic_load(&S.spins_paid);
    ab__pool_stats(out);
    out->op_memory_kept = (uint64_t)ab__opmem_kept();
}

void
ab_stats_batch(uint64_t n)
{
    uint_fast64_t seen = atomic_load_explicit(&S.largest_batch, memory_order_relaxed);
    while (n > seen && !atomic_compare_exchange_weak(&S.largest_batch, &seen, n))
        ;
}

void
ab_op_collect(ab_op *op)
{
    atomic_fetch_sub_explicit(&S.in_flight, 1, memory_order_relaxed);
    ab_op_release(op);
}

void
ab_op_collect_held(ab_op *op)
{
    atomic_fetch_sub_explicit(&S.in_flight, 1, memory_order_relaxed);
    /* A count of 2 is the caller's two references: nobody else may take
     * one, so it stays 2 until this store.  A locked decrement would stall
     * on the line the engine wrote last (perf: 1.5% of the loop thread). */
    if (atomic_load_explicit(&op->refs, memory_order_acquire) == 2)
        atomic_store_explicit(&op->refs, 1, memory_order_relaxed);
    else
        atomic_fetch_sub_explicit(&op->refs, 1, memory_order_acq_rel);
}

/* ---- finishing: outcome to the sink -------------------------------------- */

/* An op is on its sink at most once: messages sent while it is there ride
 * along (the owner takes them all with ab_sink_msgs). */
void
ab__sink_send(ab_op *op, unsigned msg)
{
    if (__atomic_fetch_or(&op->sink_msgs, (unsigned char)msg, __ATOMIC_SEQ_CST) != 0)
        return;
    ab_sink *sink = op->sink;
    ab_op *old = __atomic_load_n(&sink->head, __ATOMIC_RELAXED);
    do {
        op->sink_next = old;
    } while (!__atomic_compare_exchange_n(&sink->head, &old, op, 1,
                                          __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
    if (old == NULL) {
        atomic_fetch_add_explicit(&S.sink_wakeups, 1, memory_order_relaxed);
        if (ab__on_engine_thread() && E.in_pass && E.nheld < AB__HELD_NOTIFY)
            E.held[E.nheld++] = sink;
        else
            sink->notify(sink);
    }
}

/* Engine thread: send the notifications held back in this pass.  Before
 * anything that may retire a sink (an engine call), and at its end. */
static void
notify_held(void)
{
    for (int i = 0; i < E.nheld; i++) {
        E.held[i]->notify(E.held[i]);
        E.last[i] = E.held[i];
    }
    E.nlast = E.nheld;
    E.nheld = 0;
}

/* Engine thread: whether the owners took everything the last pass gave
 * them (then they wait for the engine, rather than run a burst). */
static int
last_taken(void)
{
    for (int i = 0; i < E.nlast; i++)
        if (__atomic_load_n(&E.last[i]->head, __ATOMIC_RELAXED) != NULL)
            return 0;
    return 1;
}

static void fds_free(ab_op *op);

static void
finish(ab_op *op)
{
    op->finished = 1;
    set_wait(op, AB__WAIT_NONE);
    if (op->submitted != 1)
        ; /* the engine's own ops (ab_engine_call, ab__engine_own): not counted */
    else if (op->error == -ECANCELED)
        atomic_fetch_add_explicit(&S.cancelled, 1, memory_order_relaxed);
    else
        atomic_fetch_add_explicit(&S.completed, 1, memory_order_relaxed);
    fds_free(op); /* first: cleanup may close its fds */
    ab__op_finish_cleanup(op);
    if (op->sink != NULL) {
        ab__sink_send(op, AB_MSG_FINISHED);
    } else {
        if (op->submitted == AB__ENGINE_OWNED)
            atomic_fetch_sub(&S.in_flight, 1);
        ab_op_release(op); /* engine-owned: nobody waits for it */
    }
}

/* A pool thread: a work op's one step, finished here, its outcome handed
 * to the sink without the engine. */
void
ab__work_op_run(ab_op *op)
{
    /* Counted from before the op can reach its sink: an engine call that
     * sees 0 comes before this thread looks at the sink (see run_call). */
    atomic_fetch_add(&foreign_finishes, 1);
    op->started = 1;
    op->event = AB_EV_START;
    if (atomic_load(&op->cancel_asked)) { /* cancelled before it ran */
        op->cancelled = 1;
        ab_fail(op, -ECANCELED);
    } else {
        if (op->type->step(op) != AB_DONE)
            ab_fail_msg(op, AB_ESTATE, "%s: a work op's step must finish, not suspend",
                        op->type->name);
        if (atomic_load(&op->cancel_asked)) { /* interrupted while it ran */
            op->cancelled = 1;
            free(op->error_message);
            op->error_message = NULL;
            ab_fail(op, -ECANCELED);
        }
    }
    finish(op);
    atomic_fetch_sub(&foreign_finishes, 1);
}

static void
resume(ab_op *op, unsigned why)
{
    op->event = why;
    op->soon_why = 0; /* a soon entry for the wait that ends here is stale */
    if (op->timer_armed) {
        ab__timer_remove(op);
        op->timer_armed = 0;
    }
    if (op->wait == AB__WAIT_DEMAND)
        atomic_store(&op->extra->demand_waiting, 0); /* a stream: extra exists */
    set_wait(op, AB__WAIT_NONE);
    if (op->type->step(op) == AB_DONE) {
        finish(op);
        return;
    }
    if (op->wait == AB__WAIT_NONE) { /* suspended on nothing: a bug in the step */
        ab_fail_msg(op, AB_ESTATE, "%s: step suspended without awaiting", op->type->name);
        finish(op);
    }
}

static void
on_cancel(ab_op *op)
{
    if (op->finished || op->cancelled)
        return;
    op->cancelled = 1;
    switch (op->wait) {
    case AB__WAIT_EVENT:
        event_free(op->ev);
        op->ev = NULL;
        resume(op, AB_EV_CANCEL);
        break;
    case AB__WAIT_TIMER:
        ab__timer_remove(op);
        /* fallthrough */
    case AB__WAIT_CANCEL:
    case AB__WAIT_NONE:
    case AB__WAIT_SIGNAL: /* resume() removes their timers */
    case AB__WAIT_FDS:
    case AB__WAIT_DEMAND:
        resume(op, AB_EV_CANCEL);
        break;
    case AB__WAIT_WORK:   /* the pool function still uses the state */
    case AB__WAIT_PYTHON: /* the owner cancels the Python side and answers */
        break;
    }
}

static void
dispatch(ab_op *op, unsigned ev)
{
    if (ev & AB_EV_START) {
        op->started = 1;
        if (ev & AB_EV_CANCEL) { /* cancelled before it ever ran */
            op->cancelled = 1;
            ab_fail(op, -ECANCELED);
            finish(op);
            return;
        }
        resume(op, AB_EV_START);
    }
    if ((ev & AB_EV_CANCEL) && op->started)
        on_cancel(op);
    if (ev & AB_EV_SIGNAL) {
        if (op->wait == AB__WAIT_SIGNAL)
            resume(op, AB_EV_SIGNAL);
        else if (!op->finished)
            op->signal_kept = 1; /* for the next ab_await_signal (or before START) */
    }
    if ((ev & AB_EV_WORK) && op->wait == AB__WAIT_WORK) {
        if (op->work_skipped) {
            /* Skipped for a cancel whose own post may still be on its way:
             * the step must see it cancelled now. */
            op->cancelled = 1;
            resume(op, AB_EV_CANCEL);
        } else {
            /* Interrupted while it ran: told so beside AB_EV_WORK. */
            resume(op, AB_EV_WORK |
                           (op->cancelled && !op->work_after_cancel ? AB_EV_CANCEL : 0));
        }
    }
    if ((ev & AB_EV_PYTHON) && op->wait == AB__WAIT_PYTHON) {
        if (op->python_skipped)
            op->cancelled = 1; /* as for skipped work */
        resume(op, op->python_skipped ? AB_EV_CANCEL
                   : AB_EV_PYTHON | (op->cancelled && !op->python_after_cancel ? AB_EV_CANCEL
                                                                               : 0));
    }
    if ((ev & AB_EV_DEMAND) && op->wait == AB__WAIT_DEMAND)
        resume(op, AB_EV_DEMAND);
}

/* ---- soon: resume after this turn's callbacks ------------------------------ */

void
ab__soon(ab_op *op, unsigned why)
{
    op->soon_why |= (unsigned short)why;
    if (op->soon_queued)
        return;
    if (E.nsoon == E.soon_cap) {
        int cap = E.soon_cap ? E.soon_cap * 2 : 64;
        ab_op **v = realloc(E.soon, sizeof(*v) * (size_t)cap);
        if (v == NULL) { /* resume now rather than never */
            op->soon_why = 0;
            resume(op, why);
            return;
        }
        E.soon = v;
        E.soon_cap = cap;
    }
    op->soon_queued = 1;
    /* The list's reference: a cancel may finish the op, and its owner free
     * it, before soon_ev runs. */
    atomic_fetch_add_explicit(&op->refs, 1, memory_order_relaxed);
    E.soon[E.nsoon++] = op;
    event_active(&E.soon_ev, EV_READ, 1);
}

static void
on_soon(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    /* Resumes may add entries: those run at the next activation. */
    int n = E.nsoon;
    for (int i = 0; i < n; i++) {
        ab_op *op = E.soon[i];
        op->soon_queued = 0;
        unsigned why = op->soon_why;
        op->soon_why = 0;
        if (why != 0 && !op->finished && op->wait != AB__WAIT_NONE)
            resume(op, why);
        ab_op_release(op);
    }
    memmove(E.soon, E.soon + n, sizeof(*E.soon) * (size_t)(E.nsoon - n));
    E.nsoon -= n;
    if (E.nsoon > 0)
        event_active(&E.soon_ev, EV_READ, 1);
}

/* ---- the inbox ------------------------------------------------------------ */

static void
wake_engine(void)
{
    uint64_t one = 1;
    int fd = atomic_load_explicit(&E.wake_fd, memory_order_acquire);
    atomic_fetch_add_explicit(&S.engine_wakeups, 1, memory_order_relaxed);
    while (fd >= 0 && write(fd, &one, sizeof(one)) < 0 && errno == EINTR)
        ;
}

/* A wake that a deferred post left to its poster's flush: paid by the next
 * immediate post or flush, whichever comes first. */
static void
pay_owed_wake(void)
{
    if (atomic_load_explicit(&E.wake_owed, memory_order_relaxed) &&
        atomic_exchange(&E.wake_owed, 0))
        wake_engine();
}

/* Post bits to op.  Returns 1 if the engine sleeps and, `defer` being set,
 * was not woken: the caller owes ab_engine_flush. */
static int
post(ab_op *op, unsigned bits, int defer)
{
    unsigned old = atomic_fetch_or(&op->pending, bits | AB__QUEUED);
    if (old & AB__QUEUED) {
        /* already on the inbox: the engine will see the new bits */
        if (!defer)
            pay_owed_wake();
        return 0;
    }
    /* An op waiting for its start, its pool function or its Python await
     * cannot finish, so cannot be collected and freed, before the engine
     * has taken this entry: the engine's own reference covers it.  A
     * cancel can be posted after the op finished, and the owner may free
     * it once its outcome is collected: that entry holds a reference. */
    if (bits & AB__POST_REFS) {
        atomic_fetch_add_explicit(&op->refs, 1, memory_order_relaxed);
        atomic_fetch_or(&op->pending, AB__HOLDS_REF);
    }
    ab_op *head = __atomic_load_n(&E.inbox, __ATOMIC_RELAXED);
    do {
        op->inbox_next = head;
    } while (!__atomic_compare_exchange_n(&E.inbox, &head, op, 1, __ATOMIC_SEQ_CST,
                                          __ATOMIC_RELAXED));
    /* Both seq_cst: either the engine's last look at the inbox (after it
     * cleared `awake`) sees this op, or this load sees awake == 0. */
    if (head == NULL && !atomic_load(&E.awake)) {
        if (defer) {
            atomic_store(&E.wake_owed, 1);
            return 1;
        }
        wake_engine();
    } else if (!defer) {
        pay_owed_wake();
    }
    return 0;
}

void
ab__engine_post(ab_op *op, unsigned bits)
{
    post(op, bits, 0);
}

void
ab_engine_flush(void)
{
    pay_owed_wake();
}

static void
park_here(void)
{
    pthread_mutex_lock(&E.park_mu);
    E.park = PARK_PARKED;
    pthread_cond_broadcast(&E.park_cv);
    while (E.park == PARK_PARKED)
        pthread_cond_wait(&E.park_cv, &E.park_mu);
    pthread_mutex_unlock(&E.park_mu);
}

/* Take the inbox, oldest first, and dispatch it; 0 if it was empty. */
static int
drain_inbox(void)
{
    /* Look before taking: while the engine polls, a plain load keeps the
     * inbox's cache line shared, where an exchange would pull it away
     * from the posting thread on every turn. */
    if (__atomic_load_n(&E.inbox, __ATOMIC_SEQ_CST) == NULL)
        return 0;
    /* Whatever a deferred post owed is taken with the inbox (a post after
     * the exchange owes again). */
    if (atomic_load_explicit(&E.wake_owed, memory_order_relaxed))
        atomic_store(&E.wake_owed, 0);
    ab_op *lifo = __atomic_exchange_n(&E.inbox, NULL, __ATOMIC_SEQ_CST), *fifo = NULL;
    if (lifo == NULL)
        return 0;
    E.in_pass = 1;
    while (lifo != NULL) {
        ab_op *next = lifo->inbox_next;
        lifo->inbox_next = fifo;
        fifo = lifo;
        lifo = next;
    }
    while (fifo != NULL) {
        /* Read the link before clearing the bits: once they are clear a
         * poster may push the op again and rewrite it. */
        ab_op *op = fifo, *next = op->inbox_next;
        unsigned ev = atomic_exchange(&op->pending, 0);
        if (op->type == &call_type) {
            notify_held(); /* a call may retire a sink */
            E.nlast = 0;
        }
        dispatch(op, ev & ~(AB__QUEUED | AB__HOLDS_REF));
        /* The owner cleared its data before letting go (ab_op_release), so a
         * last release here runs no Python. */
        if (ev & AB__HOLDS_REF)
            ab_op_release(op);
        fifo = next;
    }
    E.in_pass = 0;
    notify_held();
    return 1;
}

static void
on_wake(evutil_socket_t fd, short what, void *arg)
{
    uint64_t n;
    (void)what;
    (void)arg;
    /* Read the counter before taking the inbox: a post after the read
     * writes again, so no wake-up is lost. */
    while (read(fd, &n, sizeof(n)) < 0 && errno == EINTR)
        ;
    if (atomic_load(&E.park_asked))
        park_here();
    if (atomic_load(&E.stop_asked)) {
        drain_inbox(); /* retires and late cancels still get their answer */
        event_base_loopbreak(E.base);
        return;
    }
    ab__spin_woken(&E.spinner, AB__SPIN_NS);
    drain_inbox();
    /* A loop posts a burst (every task its iteration resumed) and wakes the
     * engine once at its end (ab_engine_flush).  Between bursts, or when
     * its tasks await one op at a time, the next post comes soon after
     * the loop took its outcomes: where spinning pays (a CPU is idle, and
     * recent spins caught posts: spin.c), look for it with `awake` set,
     * for as long as recent posts took to come (spin.c's window, at most
     * AB__SPIN_NS), and take it without a wake-up.  Keep doing so while
     * each post comes after its owner took what the last pass gave it (one
     * op at a time).  A post while the last outcomes are still untaken is
     * a burst under way: sleep, its flush wakes the engine once for the
     * rest; taking posts one by one as they come would only spend a CPU
     * beside the loop that makes them.  Timers wait at most AB__SPIN_NS. */
    if (!ab__spin_begin(&E.spinner)) {
        ab__spin_sleep(&E.spinner);
        return;
    }
    atomic_fetch_add_explicit(&S.spins, 1, memory_order_relaxed);
    atomic_store(&E.awake, 1);
    int paid = 0;
    uint64_t now = ab__now_ns(), turn_end = now + AB__TURN_NS, spin_start = now;
    uint64_t window = ab__spin_window(&E.spinner, AB__SPIN_NS);
    for (uint64_t until = now + window; (now = ab__now_ns()) < until;) {
        /* Back to libevent now and then, so timers and fds never starve
         * under a steady stream of lone posts. */
        if (now >= turn_end || atomic_load(&E.park_asked) || atomic_load(&E.stop_asked))
            break;
        if (__atomic_load_n(&E.inbox, __ATOMIC_RELAXED) != NULL) {
            int lone = last_taken();
            ab__spin_caught(&E.spinner, now - spin_start, AB__SPIN_NS);
            drain_inbox();
            paid = 1;
            if (!lone)
                break;
            spin_start = ab__now_ns();
            until = spin_start + ab__spin_window(&E.spinner, AB__SPIN_NS);
            continue;
        }
        for (int i = 0; i < 16; i++)
            AB__CPU_RELAX();
    }
    atomic_store(&E.awake, 0);
    if (paid)
        atomic_fetch_add_explicit(&S.spins_paid, 1, memory_order_relaxed);
    ab__spin_end(&E.spinner, paid);
    drain_inbox(); /* a post that saw `awake` set */
    ab__spin_sleep(&E.spinner);
}

/* Engine-owned ops (no sink, never counted): a function to run on the
 * engine thread, after everything posted before it. */
struct engine_call {
    void (*fn)(void *arg);
    void *arg;
    ab_sink *sink; /* ab_sink_retire's: fn is NULL, free_fn below */
    void (*free_fn)(ab_sink *sink);
};

static void
run_call(struct engine_call *c)
{
    /* A work op's worker may be notifying a sink right now (a few
     * instructions: a write, or a lock to queue for the courier). */
    while (atomic_load(&foreign_finishes) != 0)
        sched_yield();
    if (c->fn != NULL)
        c->fn(c->arg);
    else
        c->free_fn(c->sink);
}

static int
call_step(ab_op *op)
{
    run_call(ab_op_state(op));
    return ab_return_none(op);
}

static const ab_op_type call_type = {
    .name = "engine_call",
    .state_size = sizeof(struct engine_call),
    .step = call_step,
};

/* After the engine thread is gone with nothing in flight: what is still on
 * the inbox (cancels of collected ops, calls that raced with the stop) will
 * never be dispatched.  Calls run here; the others lose the inbox's
 * reference. */
static void
drop_inbox(void)
{
    ab_op *op = __atomic_exchange_n(&E.inbox, NULL, __ATOMIC_SEQ_CST);
    while (op != NULL) {
        ab_op *next = op->inbox_next;
        /* A signal for an op not yet submitted is kept for its start. */
        unsigned ev = atomic_fetch_and(&op->pending, AB_EV_SIGNAL);
        if (ev & AB__HOLDS_REF)
            ab_op_release(op);
        if (op->type == &call_type && !op->finished) {
            call_step(op);
            op->finished = 1;
            ab_op_release(op); /* the engine-owned reference: frees it */
        }
        op = next;
    }
}

/* ---- start, stop, fork ------------------------------------------------------ */

static void
silent_log(int severity, const char *msg)
{
    /* libevent reports failed epoll_ctl calls here; the op gets the errno. */
    (void)severity;
    (void)msg;
}

void
ab_thread_wait_gone(pid_t tid)
{
    if (tid <= 0)
        return;
    /* Until the kernel releases the thread, its tid still names a task of
     * this process (tgkill with no signal: 0, then ESRCH). */
    struct timespec pause = {0, 20000}; /* 20 us */
    for (int i = 0; i < 5000 && syscall(SYS_tgkill, getpid(), tid, 0) == 0; i++)
        nanosleep(&pause, NULL);
}

static void *
engine_main(void *arg)
{
    (void)arg;
    pthread_setname_np(pthread_self(), "ab-engine");
    E.tid = gettid(); /* read by the joiner after pthread_join */
    event_base_loop(E.base, EVLOOP_NO_EXIT_ON_EMPTY);
    return NULL;
}

static void on_timer_due(ab_op *op);
static void atfork_prepare(void);
static void atfork_parent(void);
static void atfork_child(void);

static void
register_atfork(void)
{
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

/* A base with the wake event and the timer heap; start_mu held. */
static int
new_base_locked(void)
{
    /* Precise timers: the default coarse clock ticks every 4 ms here, and
     * a timer must never fire early. */
    struct event_config *cfg = event_config_new();
    if (cfg == NULL)
        return -ENOMEM;
    event_config_set_flag(cfg, EVENT_BASE_FLAG_PRECISE_TIMER);
    E.base = event_base_new_with_config(cfg);
    event_config_free(cfg);
    if (E.base == NULL)
        return -ENOMEM;
    event_assign(&E.wake_ev, E.base, E.wake_fd, EV_READ | EV_PERSIST, on_wake, NULL);
    event_assign(&E.soon_ev, E.base, -1, 0, on_soon, NULL);
    if (ab__timers_start(E.base, on_timer_due) < 0 || event_add(&E.wake_ev, NULL) < 0) {
        ab__timers_stop();
        event_base_free(E.base);
        E.base = NULL;
        return -EIO;
    }
    return 0;
}

/* start_mu held, the engine thread joined, nothing in flight: free the
 * base, and what is left on the inbox. */
static void
free_base_locked(void)
{
    if (E.base == NULL)
        return;
    event_del(&E.wake_ev);
    ab__dns_free(); /* its evdns bases live on E.base */
    event_del(&E.soon_ev);
    free(E.soon);
    E.soon = NULL;
    E.nsoon = E.soon_cap = 0;
    ab__timers_stop();
    event_base_free(E.base);
    E.base = NULL;
    drop_inbox();
}

static int
start_locked(void)
{
    sigset_t all, old;
    int rc, made_base = 0;

    event_set_log_callback(silent_log);
    /* The wake fd outlives stops: a pool thread may still post to it. */
    if (E.wake_fd < 0) {
        int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (fd < 0)
            return -errno;
        atomic_store_explicit(&E.wake_fd, fd, memory_order_release);
    }
    /* A base kept by a stop with ops in flight resumes them. */
    if (E.base == NULL) {
        if ((rc = new_base_locked()) < 0)
            return rc;
        made_base = 1;
    }
    atomic_store(&E.stop_asked, 0);
    /* Signals belong to the threads that asked for them, not to the engine. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    rc = -pthread_create(&E.thread, NULL, engine_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc < 0) {
        if (made_base)
            free_base_locked();
        return rc;
    }
    __atomic_store_n(&E.running, 1, __ATOMIC_RELEASE);
    atomic_store(&E.accepting, 1);
    ab__pool_resume();
    /* Posts that raced with a stop, or came while it was stopped. */
    if (__atomic_load_n(&E.inbox, __ATOMIC_ACQUIRE) != NULL)
        wake_engine();
    return 0;
}

int
ab_engine_start(void)
{
    int rc = 0;
    if (atomic_load(&E.accepting))
        return 0; /* the common case, without the lock */
    pthread_once(&atfork_once, register_atfork);
    pthread_mutex_lock(&E.start_mu);
    if (!E.running)
        rc = start_locked();
    pthread_mutex_unlock(&E.start_mu);
    return rc;
}

/* start_mu held, the engine running, not called from it: join it.  Its
 * last turn answers what was posted before the stop. */
static void
stop_locked(void)
{
    atomic_store(&E.accepting, 0);
    atomic_store(&E.stop_asked, 1);
    wake_engine();
    pthread_join(E.thread, NULL);
    ab_thread_wait_gone(E.tid);
    __atomic_store_n(&E.running, 0, __ATOMIC_RELEASE);
}

void
ab_engine_stop(void)
{
    pthread_mutex_lock(&E.start_mu);
    if (E.running && !ab__on_engine_thread())
        stop_locked();
    /* Ops still in flight keep the base, their waits and what was posted
     * to them: a start resumes them.  The pool stops under start_mu too: a
     * start after it must find only workers of its own. */
    int idle = atomic_load(&S.in_flight) == 0;
    if (!E.running && idle)
        free_base_locked();
    ab__pool_stop(idle);
    pthread_mutex_unlock(&E.start_mu);
}

int
ab_engine_stop_if_idle(void)
{
    pthread_mutex_lock(&E.start_mu);
    /* Dekker with ab_submit, which counts in_flight before it looks at
     * `accepting`: either it sees the flag cleared and waits for start_mu,
     * or this sees its op. */
    atomic_store(&E.accepting, 0);
    if (atomic_load(&S.in_flight) != 0 || ab__on_engine_thread()) {
        if (E.running)
            atomic_store(&E.accepting, 1);
        pthread_mutex_unlock(&E.start_mu);
        return 0;
    }
    if (E.running)
        stop_locked();
    free_base_locked();
    ab__pool_stop(1);
    pthread_mutex_unlock(&E.start_mu);
    return 1;
}

void
ab_engine_abandon(void)
{
    pthread_mutex_lock(&E.start_mu);
    if (E.running && !ab__on_engine_thread())
        stop_locked();
    if (!E.running) {
        /* Leaked with the ops whose waits it holds: nothing may run them. */
        E.base = NULL;
        E.soon = NULL; /* leaked with the base */
        E.nsoon = E.soon_cap = 0;
        ab__timers_forget();
        ab__dns_forget();
        __atomic_store_n(&E.inbox, NULL, __ATOMIC_RELEASE);
        atomic_store(&S.in_flight, 0);
        ab__pool_forget();
    }
    pthread_mutex_unlock(&E.start_mu);
}

static void
atfork_prepare(void)
{
    pthread_mutex_lock(&E.start_mu);
    if (E.running && !ab__on_engine_thread()) {
        pthread_mutex_lock(&E.park_mu);
        E.park = PARK_ASKED;
        atomic_store(&E.park_asked, 1);
        uint64_t one = 1;
        while (write(E.wake_fd, &one, sizeof(one)) < 0 && errno == EINTR)
            ;
        while (E.park != PARK_PARKED)
            pthread_cond_wait(&E.park_cv, &E.park_mu);
        pthread_mutex_unlock(&E.park_mu);
    }
    ab__pool_atfork_prepare();
}

static void
atfork_parent(void)
{
    ab__pool_atfork_parent();
    if (E.running) {
        pthread_mutex_lock(&E.park_mu);
        atomic_store(&E.park_asked, 0);
        E.park = PARK_NONE;
        pthread_cond_broadcast(&E.park_cv);
        pthread_mutex_unlock(&E.park_mu);
    }
    pthread_mutex_unlock(&E.start_mu);
}

/* The child has no engine thread, and the base's epoll instance is shared
 * with the parent: touching it would remove the parent's registrations.
 * Abandon the base and its ops; the next submit starts a fresh engine. */
static void
atfork_child(void)
{
    ab__pool_atfork_child();
    /* A worker that was finishing a work op is not in the child. */
    atomic_store(&foreign_finishes, 0);
    atomic_fetch_add(&generation, 1);
    pthread_mutex_init(&E.park_mu, NULL);
    pthread_cond_init(&E.park_cv, NULL);
    E.park = PARK_NONE;
    atomic_store(&E.park_asked, 0);
    __atomic_store_n(&E.running, 0, __ATOMIC_RELEASE);
    atomic_store(&E.accepting, 0);
    E.base = NULL;
    E.soon = NULL;
    E.nsoon = E.soon_cap = 0;
    ab__timers_forget();
    ab__dns_forget();
    E.wake_fd = -1; /* the inherited copy stays open: a stale post may hit it */
    __atomic_store_n(&E.inbox, NULL, __ATOMIC_RELEASE);
    pthread_mutex_init(&E.start_mu, NULL);
}

/* ---- the owner's side ------------------------------------------------------- */

static int
submit(ab_op *op, ab_sink *sink, int *wake_owed)
{
    if (op->submitted)
        return AB_ESTATE;
    if (op->type->step == NULL)
        return -EINVAL;
    /* Counted before the engine is looked at: see ab_engine_stop_if_idle. */
    atomic_fetch_add(&S.in_flight, 1);
    int rc = ab_engine_start();
    if (rc < 0) {
        atomic_fetch_sub(&S.in_flight, 1);
        return rc;
    }
    op->submitted = 1;
    op->sink = sink;
    __atomic_store_n(&op->generation, ab_fork_generation(), __ATOMIC_RELAXED);
    atomic_fetch_add_explicit(&op->refs, 1, memory_order_relaxed);
    if (AB__WORK_OP(op)) {
        /* Straight to its pool: the engine never sees it. */
        op->work_blocking = (op->type->flags & AB_TYPE_BLOCKING) != 0;
        set_wait(op, AB__WAIT_WORK);
        if ((rc = ab__pool_submit(op)) < 0) {
            set_wait(op, AB__WAIT_NONE);
            atomic_fetch_sub_explicit(&op->refs, 1, memory_order_relaxed);
            op->sink = NULL;
            op->submitted = 0;
            atomic_fetch_sub(&S.in_flight, 1);
            return rc;
        }
        atomic_fetch_add_explicit(&S.submitted, 1, memory_order_relaxed);
        return 0;
    }
    atomic_fetch_add_explicit(&S.submitted, 1, memory_order_relaxed);
    if (post(op, AB_EV_START, wake_owed != NULL))
        *wake_owed = 1;
    return 0;
}

int
ab_submit(ab_op *op, ab_sink *sink)
{
    return submit(op, sink, NULL);
}

int
ab_submit_deferred(ab_op *op, ab_sink *sink, int *wake_owed)
{
    return submit(op, sink, wake_owed);
}

void
ab__engine_own(ab_op *op)
{
    op->submitted = AB__ENGINE_OWNED;
    atomic_fetch_add(&S.in_flight, 1);
    ab__engine_post(op, AB_EV_START);
}

void
ab_cancel(ab_op *op)
{
    if (!op->submitted || __atomic_load_n(&op->generation, __ATOMIC_RELAXED) != ab_fork_generation())
        return;
    if (atomic_exchange(&op->cancel_asked, AB__CANCEL_ASKED))
        return;
    if (AB__WORK_OP(op))
        return; /* its worker looks at cancel_asked */
    ab__engine_post(op, AB_EV_CANCEL);
}

void
ab_python_done(ab_op *op, int failed)
{
    op->python_failed = failed != 0;
    op->python_skipped = 0;
    ab__engine_post(op, AB_EV_PYTHON);
}

void
ab_python_skipped(ab_op *op)
{
    op->python_failed = 1;
    op->python_skipped = 1;
    ab__engine_post(op, AB_EV_PYTHON);
}

void
ab_op_signal(ab_op *op)
{
    /* An op of the parent, in a fork child: it can never resume here. */
    if (__atomic_load_n(&op->generation, __ATOMIC_RELAXED) != ab_fork_generation())
        return;
    if (AB__WORK_OP(op))
        return; /* it never waits for one */
    ab__engine_post(op, AB_EV_SIGNAL);
}

/* Run c on the engine thread after what was posted before it, or here at
 * once if the engine is not running (then nothing else runs there). */
static void
post_call(const struct engine_call *c)
{
    /* Under start_mu: a stop running now either sees this post in its
     * last drain or has already stopped the engine. */
    pthread_mutex_lock(&E.start_mu);
    ab_op *op = E.running ? ab_op_new(&call_type) : NULL;
    if (op != NULL) {
        *(struct engine_call *)ab_op_state(op) = *c;
        /* Engine-owned: no sink; the engine frees it when done. */
        op->generation = ab_fork_generation();
        ab__engine_post(op, AB_EV_START);
    }
    pthread_mutex_unlock(&E.start_mu);
    if (op == NULL) {
        struct engine_call copy = *c;
        run_call(&copy);
    }
}

void
ab_engine_call(void (*fn)(void *arg), void *arg)
{
    struct engine_call c = {.fn = fn, .arg = arg};
    post_call(&c);
}

void
ab_sink_retire(ab_sink *sink, void (*free_fn)(ab_sink *))
{
    struct engine_call c = {.sink = sink, .free_fn = free_fn};
    post_call(&c);
}

/* ---- awaits, on the engine thread -------------------------------------------- */

static void
on_event(evutil_socket_t fd, short what, void *arg)
{
    ab_op *op = arg;
    unsigned why = 0;
    (void)fd;
    if (what & EV_TIMEOUT)
        why |= AB_EV_TIMER;
    if (what & EV_READ)
        why |= AB_EV_READ;
    if (what & EV_WRITE)
        why |= AB_EV_WRITE;
    event_free(op->ev); /* one-shot, done: the step may arm another */
    op->ev = NULL;
    resume(op, why);
}

static void
on_timer_due(ab_op *op)
{
    /* timers.c took it off the heap; fds seen ready this turn ride along. */
    op->timer_armed = 0;
    resume(op, AB_EV_TIMER | (op->soon_why & AB_EV_FDS));
}

static struct timeval
to_timeval(double seconds)
{
    struct timeval tv;
    tv.tv_sec = (time_t)seconds;
    /* Round up: a timeout may fire late, never early. */
    tv.tv_usec = (suseconds_t)ceil((seconds - (double)tv.tv_sec) * 1e6);
    if (tv.tv_usec >= 1000000) {
        tv.tv_sec++;
        tv.tv_usec = 0;
    }
    return tv;
}

int
ab_await_timer(ab_op *op, double seconds)
{
    if (AB__WORK_OP(op))
        return AB_ESTATE; /* a work op's step runs on a pool thread */
    if (isnan(seconds))
        return -EINVAL;
    if (seconds > AB__TIMER_MAX)
        return ab_await_cancel(op);
    if (seconds < 0)
        seconds = 0;
    int rc = ab__timer_add(op, ab__now_ns() + (uint64_t)ceil(seconds * 1e9));
    if (rc == 0)
        set_wait(op, AB__WAIT_TIMER);
    return rc;
}

int
ab_await_fd(ab_op *op, int fd, unsigned events, double timeout)
{
    if (AB__WORK_OP(op))
        return AB_ESTATE; /* a work op's step runs on a pool thread */
    short what = 0;
    if (fd < 0)
        return -EBADF;
    if (isnan(timeout))
        return -EINVAL;
    if (events & AB_EV_READ)
        what |= EV_READ;
    if (events & AB_EV_WRITE)
        what |= EV_WRITE;
    if (what == 0)
        return -EINVAL;
    if (fcntl(fd, F_GETFD) < 0)
        return -errno;
    int use_timeout = timeout >= 0 && timeout <= AB__TIMER_MAX;
    struct timeval tv = to_timeval(use_timeout ? timeout : 0);
    /* libevent's cached time is from the start of this loop turn. */
    event_base_update_cache_time(E.base);
    op->ev = event_new(E.base, fd, what, on_event, op);
    if (op->ev == NULL)
        return -ENOMEM;
    errno = 0;
    if (event_add(op->ev, use_timeout ? &tv : NULL) < 0) {
        int err = errno > 0 ? -errno : -EIO;
        event_free(op->ev);
        op->ev = NULL;
        return err;
    }
    __atomic_store_n(&op->wait_fd, fd, __ATOMIC_RELAXED);
    __atomic_store_n(&op->wait_events, (unsigned char)(events & (AB_EV_READ | AB_EV_WRITE)),
                     __ATOMIC_RELAXED);
    set_wait(op, AB__WAIT_EVENT);
    return 0;
}

int
ab_await_cancel(ab_op *op)
{
    if (AB__WORK_OP(op))
        return AB_ESTATE; /* a work op's step runs on a pool thread */
    set_wait(op, AB__WAIT_CANCEL);
    if (op->cancelled) /* a cancel comes once: it came already */
        ab__soon(op, AB_EV_CANCEL);
    return 0;
}

static int
await_pool(ab_op *op, ab_work_fn fn, int blocking)
{
    if (AB__WORK_OP(op))
        return AB_ESTATE; /* a work op's step runs on a pool thread */
    op->work = fn;
    op->work_blocking = (unsigned char)blocking;
    /* Armed after the cancel: never interrupted by it (read by the pool
     * thread, after the queue's lock orders it). */
    op->work_after_cancel = op->cancelled;
    op->work_skipped = 0;
    int rc = ab__pool_submit(op);
    if (rc == 0)
        set_wait(op, AB__WAIT_WORK);
    return rc;
}

int ab_await_work(ab_op *op, ab_work_fn fn) { return await_pool(op, fn, 0); }
int ab_await_blocking(ab_op *op, ab_work_fn fn) { return await_pool(op, fn, 1); }

int
ab_work_cancelled(const ab_op *op)
{
    return !op->work_after_cancel && atomic_load(&((ab_op *)op)->cancel_asked) != 0;
}

/* A timeout for a signal or fd-set wait, through the timer heap. */
static int
arm_timeout(ab_op *op, double timeout)
{
    if (isnan(timeout))
        return -EINVAL;
    if (timeout < 0 || timeout > AB__TIMER_MAX)
        return 0;
    int rc = ab__timer_add(op, ab__now_ns() + (uint64_t)ceil(timeout * 1e9));
    if (rc == 0)
        op->timer_armed = 1;
    return rc;
}

int
ab_await_signal(ab_op *op, double timeout)
{
    if (AB__WORK_OP(op))
        return AB_ESTATE; /* a work op's step runs on a pool thread */
    if (isnan(timeout))
        return -EINVAL;
    if (op->signal_kept) {
        op->signal_kept = 0;
        set_wait(op, AB__WAIT_SIGNAL);
        ab__soon(op, AB_EV_SIGNAL);
        return 0;
    }
    int rc = arm_timeout(op, timeout);
    if (rc == 0)
        set_wait(op, AB__WAIT_SIGNAL);
    return rc;
}

/* ---- fd sets ------------------------------------------------------------------- */

static void
on_fd(evutil_socket_t fd, short what, void *arg)
{
    struct ab__fd *e = arg;
    ab_op *op = e->op;
    (void)fd;
    if (op->wait != AB__WAIT_FDS) {
        /* Level-triggered: the next ab_await_fds sees it again.  Until
         * then it must not fire every turn. */
        event_del(&e->ev);
        e->added = 0;
        return;
    }
    e->ready |= ((what & EV_READ) ? AB_EV_READ : 0) | ((what & EV_WRITE) ? AB_EV_WRITE : 0);
    /* One resume for every fd ready in this turn. */
    ab__soon(op, AB_EV_FDS);
}

static int
fds_find(struct ab__fdset *set, int fd)
{
    for (int i = 0; set != NULL && i < set->n; i++)
        if (set->v[i]->fd == fd)
            return i;
    return -1;
}

int
ab_fds_watch(ab_op *op, int fd, unsigned events)
{
    if (AB__WORK_OP(op))
        return AB_ESTATE; /* a work op's step runs on a pool thread */
    if (fd < 0)
        return -EBADF;
    if (events & ~(unsigned)(AB_EV_READ | AB_EV_WRITE))
        return -EINVAL;
    struct ab__fdset *set = op->extra != NULL ? &op->extra->fds : NULL;
    int i = fds_find(set, fd);
    if (events == 0) {
        if (i < 0)
            return 0;
        struct ab__fd *e = set->v[i];
        if (e->added)
            event_del(&e->ev);
        free(e);
        memmove(&set->v[i], &set->v[i + 1], sizeof(set->v[0]) * (size_t)(set->n - i - 1));
        set->n--;
        if (set->cursor > i)
            set->cursor--;
        return 0;
    }
    if (i >= 0) {
        struct ab__fd *e = set->v[i];
        if (e->want != events) {
            if (e->added)
                event_del(&e->ev); /* registered again by the next wait */
            e->added = 0;
            e->want = events;
        }
        return 0;
    }
    if (fcntl(fd, F_GETFD) < 0)
        return -errno;
    if (set == NULL) {
        if (ab__extra(op) == NULL)
            return -ENOMEM;
        set = &op->extra->fds;
    }
    if (set->n == set->cap) {
        int cap = set->cap ? set->cap * 2 : 8;
        struct ab__fd **v = realloc(set->v, sizeof(*v) * (size_t)cap);
        if (v == NULL)
            return -ENOMEM;
        set->v = v;
        set->cap = cap;
    }
    struct ab__fd *e = calloc(1, sizeof(*e));
    if (e == NULL)
        return -ENOMEM;
    e->fd = fd;
    e->want = events;
    e->op = op;
    set->v[set->n++] = e;
    return 0;
}

int
ab_await_fds(ab_op *op, double timeout)
{
    if (AB__WORK_OP(op))
        return AB_ESTATE; /* a work op's step runs on a pool thread */
    struct ab__fdset *set = op->extra != NULL ? &op->extra->fds : NULL;
    if (isnan(timeout))
        return -EINVAL;
    for (int i = 0; set != NULL && i < set->n; i++) {
        struct ab__fd *e = set->v[i];
        e->ready = 0;
        if (e->added)
            continue;
        short what = (short)(EV_PERSIST | ((e->want & AB_EV_READ) ? EV_READ : 0) |
                             ((e->want & AB_EV_WRITE) ? EV_WRITE : 0));
        event_assign(&e->ev, E.base, e->fd, what, on_fd, e);
        errno = 0;
        if (event_add(&e->ev, NULL) < 0)
            return errno > 0 ? -errno : -EIO;
        e->added = 1;
    }
    if (set != NULL)
        set->cursor = 0;
    event_base_update_cache_time(E.base);
    int rc = arm_timeout(op, timeout);
    if (rc == 0)
        set_wait(op, AB__WAIT_FDS);
    return rc;
}

int
ab_fds_next(ab_op *op, int *fd, unsigned *events)
{
    struct ab__fdset *set = op->extra != NULL ? &op->extra->fds : NULL;
    while (set != NULL && set->cursor < set->n) {
        struct ab__fd *e = set->v[set->cursor++];
        if (e->ready) {
            *fd = e->fd;
            *events = e->ready;
            e->ready = 0;
            return 1;
        }
    }
    return 0;
}

/* After cleanup, on the engine thread (its events are on the base). */
static void
fds_free(ab_op *op)
{
    if (op->extra == NULL)
        return;
    struct ab__fdset *set = &op->extra->fds;
    for (int i = 0; i < set->n; i++) {
        if (set->v[i]->added)
            event_del(&set->v[i]->ev);
        free(set->v[i]);
    }
    free(set->v);
    memset(set, 0, sizeof(*set));
}

int
ab_await_python(ab_op *op, int slot)
{
    if (AB__WORK_OP(op))
        return AB_ESTATE; /* a work op's step runs on a pool thread */
    if (op->sink == NULL)
        return AB_ESTATE;
    op->python_slot = slot;
    op->python_failed = 0;
    op->python_after_cancel = op->cancelled;
    set_wait(op, AB__WAIT_PYTHON);
    ab__sink_send(op, AB_MSG_PYTHON);
    return 0;
}
