/* bridge.c: one bridge per asyncio loop, and the courier thread.
 *
 * The engine pushes finished ops onto a bridge's sink and, once per burst,
 * notifies it: by writing the bridge's eventfd, which the loop watches with
 * add_reader (the engine never needs the GIL), or by handing the bridge to
 * the courier, a native thread that takes the GIL and calls
 * loop.call_soon_threadsafe(anchor) (so a stalled GIL never stalls the
 * engine's timers).  The drain runs on the loop thread and resolves the
 * finished ops, within a time budget per pass.
 *
 * The loop owns its bridge through an anchor (ext.h): close() or the loop's
 * end frees the anchor, and the bridge lets go at once: its ops in flight
 * are cancelled and released as they come back, resolving nothing, and its
 * eventfd is closed.  The courier polls is_closed() only where no anchor
 * tells (call_soon_threadsafe delivery: the attribute outlives close()),
 * and stops the engine and itself once no loop is open and nothing is in
 * flight.  Nothing on an op's path wakes the courier: with one op at a
 * time, two wake-ups of another thread per op cost a third of its
 * latency. */
#include "ext.h"

#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#define POLL_NS 250000000L /* how often the courier looks for closed loops */
#define IDLE_NS 500000000L /* threads stop this long after the last loop let go */

enum courier_state {
    COURIER_OFF,
    COURIER_ON,
    COURIER_LEFT, /* its thread returned by itself: join it */
};

static struct courier {
    pthread_mutex_t mu; /* everything below but ctl_mu */
    pthread_cond_t cv;
    /* Starts and stops of the thread against each other.  Always taken
     * with the GIL released: a stop joins a courier that may need it. */
    pthread_mutex_t ctl_mu;
    pthread_t thread;
    enum courier_state state;
    pid_t tid; /* the courier thread's, for ab_thread_wait_gone */
    int stop;
    bridge_native *wake_list;
    atomic_int watched;      /* open bridges whose close only a poll finds */
    atomic_int open_bridges; /* bridges whose loop has not let go */
    PyInterpreterState *interp;
    BridgeObject *all; /* every registered bridge (GIL) */
} C = {
    .mu = PTHREAD_MUTEX_INITIALIZER,
    .ctl_mu = PTHREAD_MUTEX_INITIALIZER,
};

static pthread_once_t courier_once = PTHREAD_ONCE_INIT;

static PyObject *bridge_deliver(BridgeObject *b);

/* ---- notify: engine thread or a work op's worker, never the GIL ------------ */

static void
courier_enqueue(bridge_native *n)
{
    if (atomic_exchange(&n->queued, 1))
        return;
    atomic_fetch_add(&n->refs, 1); /* the courier's list holds n */
    pthread_mutex_lock(&C.mu);
    n->courier_next = C.wake_list;
    C.wake_list = n;
    pthread_cond_signal(&C.cv);
    pthread_mutex_unlock(&C.mu);
}

static void
notify_courier(ab_sink *sink)
{
    courier_enqueue(sink->user);
}

static void
write_efd(int fd)
{
    uint64_t one = 1;
    while (write(fd, &one, sizeof(one)) < 0 && errno == EINTR)
        ;
}

static void
notify_reader(ab_sink *sink)
{
    bridge_native *n = sink->user;
    if (atomic_load(&n->dead))
        courier_enqueue(n); /* drained by the courier, resolving nothing */
    else
        write_efd(n->efd);
}

/* n is freed once neither its bridge (through the engine's retire, after
 * the last notify), the courier's list nor an fd close holds it.  Any
 * thread. */
static void
native_unref(bridge_native *n)
{
    if (atomic_fetch_sub(&n->refs, 1) != 1)
        return;
    if (n->efd >= 0)
        close(n->efd);
    free(n);
}

/* Runs on the engine thread once no notify can touch n any more (the engine
 * call waits for work ops' workers: engine.c's run_call). */
static void
native_free(ab_sink *sink)
{
    native_unref(sink->user);
}

/* Engine thread (ab_engine_call), after `dead` was set: no notify writes
 * the fd any more, and the loop let go of it. */
static void
close_efd(void *arg)
{
    bridge_native *n = arg;
    if (n->efd >= 0) {
        close(n->efd);
        n->efd = -1;
    }
    native_unref(n);
}

/* ---- the bridge's list of ops in flight -------------------------------------- */

void
ab_bridge_track(BridgeObject *b, OpPy *op)
{
    OpPy *head = &b->ops;
    op->next = head->next;
    op->prev = head;
    head->next->prev = op;
    head->next = op;
    b->in_flight++;
}

void
ab_bridge_untrack(BridgeObject *b, OpPy *op)
{
    op->prev->next = op->next;
    op->next->prev = op->prev;
    op->prev = op->next = NULL;
    if (--b->in_flight == 0)
        ab_bridge_drop_loop(b);
}

/* GIL: the Future keywords let go of the loop (ext.h).  Cannot fail. */
void
ab_bridge_drop_loop(BridgeObject *b)
{
    if (!b->future_kw_loop)
        return;
    b->future_kw_loop = 0;
    ab_state *st = ab_global_state; /* NULL during finalization */
    /* Called with an exception set too (a failed delivery): kept. */
    PyObject *exc = PyErr_Occurred() ? ab_err_take() : NULL;
    /* Replacing an existing key's value allocates nothing. */
    if (st == NULL || PyDict_SetItem(b->future_kw, st->str_loop, Py_None) < 0) {
        PyErr_Clear();
        PyDict_Clear(b->future_kw);
    }
    if (exc != NULL)
        ab_err_raise(exc);
}

/* ---- registry: {id(loop): the bridge's address}, borrowed ---------------------- */

/* The module state; NULL during finalization, when the GC may clear the
 * module before the bridges. */
static ab_state *
bstate(BridgeObject *b)
{
    (void)b;
    return ab_global_state;
}

/* Borrowed: the bridge registered for key, or NULL (with an exception set
 * only on failure). */
static BridgeObject *
registry_get(ab_state *st, PyObject *key)
{
    PyObject *addr = PyDict_GetItemWithError(st->bridges, key);
    return addr != NULL ? PyLong_AsVoidPtr(addr) : NULL;
}

static int
registry_set(ab_state *st, BridgeObject *b)
{
    PyObject *addr = PyLong_FromVoidPtr(b);
    if (addr == NULL)
        return -1;
    int rc = PyDict_SetItem(st->bridges, b->key, addr);
    Py_DECREF(addr);
    return rc;
}

/* Remove b's entry if it still names b (a newer bridge of the same loop
 * address may have replaced it). */
static void
registry_drop(ab_state *st, BridgeObject *b)
{
    PyObject *exc = ab_err_take();
    if (registry_get(st, b->key) == b)
        PyDict_DelItem(st->bridges, b->key);
    PyErr_Clear();
    ab_err_raise(exc);
}

/* ---- the loop lets go ------------------------------------------------------------ */

/* Mark the bridge dead, once: nothing more is resolved through it.
 * Returns 1 if this call did it. */
static int
set_dead(BridgeObject *b)
{
    if (b->native == NULL || atomic_exchange(&b->native->dead, 1))
        return 0;
    ab_state *st = bstate(b);
    if (st != NULL && st->last_bridge == b) {
        st->last_bridge = NULL;
        st->last_loop = NULL;
    }
    pthread_mutex_lock(&C.mu);
    atomic_fetch_sub(&C.open_bridges, 1);
    if (b->delivery == DELIVERY_CST)
        atomic_fetch_sub(&C.watched, 1);
    pthread_cond_signal(&C.cv); /* maybe idle now */
    pthread_mutex_unlock(&C.mu);
    return 1;
}

/* GIL: 1 if the engine returned ops to b that are not handled yet (then
 * they are in the backlog), else 0. */
static int
fill_backlog(BridgeObject *b)
{
    if (b->native != NULL && b->backlog == NULL)
        b->backlog = ab_sink_take(&b->native->sink);
    return b->backlog != NULL;
}

/* GIL, after fill_backlog: the backlog's first op, and its messages
 * (AB_MSG_* bits; from then on the engine may queue the op again).
 *
 * Each op comes back in a cache line the engine thread wrote last, and the
 * loop's first touch of it is a locked exchange: a miss that stalls the
 * loop thread for a transfer between cores (ab_sink_msgs was 2.8% of the
 * loop thread's samples on uvloop).  So the next op's line is asked for,
 * for writing, while this one is resolved. */
static ab_op *
pop_backlog(BridgeObject *b, unsigned *msgs)
{
    ab_op *op = b->backlog, *next = ab_sink_next(op);
    b->backlog = next;
    if (next != NULL)
        __builtin_prefetch(next, 1);
    *msgs = ab_sink_msgs(op);
    return op;
}

/* Owner thread or courier, GIL: take what the engine returned and release
 * it without resolving anything. */
static void
drain_dead(BridgeObject *b)
{
    ab_state *st = bstate(b);
    Py_INCREF(b); /* forgetting an op drops a reference to b */
    while (fill_backlog(b)) {
        unsigned msgs;
        ab_op *op = pop_backlog(b, &msgs);
        OpPy *py = ab_op_owner(op);
        if (msgs & AB_MSG_ITEMS)
            ab_stream_items(py, st); /* dropped: nobody reads them */
        if (msgs & AB_MSG_FINISHED)
            ab_op_forget(py);
        else if (msgs & AB_MSG_PYTHON)
            ab_op_run_python(py, st); /* answers "skipped" */
    }
    Py_DECREF(b);
}

/* The loop let go of b (closed, gone, or our reader removed): cancel every
 * op in flight (they come back through the courier and are only
 * released), and close the eventfd.  GIL; any thread. */
static void
let_go(BridgeObject *b)
{
    ab_state *st = bstate(b);
    if (!set_dead(b))
        return;
    Py_INCREF(b);
    PyObject *exc = ab_err_take();
    for (OpPy *py = b->ops.next; py != &b->ops; py = py->next)
        ab_op_abort(py, st);
    drain_dead(b);
    bridge_native *n = b->native;
    /* An inherited eventfd may still be registered with a selector shared
     * with the parent: the child leaves it open. */
    if (n != NULL && n->efd >= 0 && b->generation == ab_fork_generation()) {
        atomic_fetch_add(&n->refs, 1);
        ab_engine_call(close_efd, n);
    }
    PyObject *loop = b->loop_ref != NULL ? PyWeakref_GetObject(b->loop_ref) : Py_None;
    if (st != NULL && b->delivery == DELIVERY_CST && loop != Py_None && b->anchor != NULL) {
        /* A closed loop that is still referenced keeps nothing of ours. */
        Py_INCREF(loop);
        PyObject *held = PyObject_GetAttr(loop, st->str_anchor_attr);
        if (held == (PyObject *)b->anchor && PyObject_DelAttr(loop, st->str_anchor_attr) < 0)
            PyErr_Clear();
        Py_XDECREF(held);
        PyErr_Clear();
        Py_DECREF(loop);
    }
    if (st != NULL && st->rooted != NULL && b->key != NULL && PyDict_Contains(st->rooted, b->key) == 1 &&
        PyDict_DelItem(st->rooted, b->key) < 0)
        PyErr_Clear();
    PyErr_Clear();
    ab_err_raise(exc);
    Py_DECREF(b);
}

/* Forget the bridge: out of the list and the registry; its native part
 * goes to the engine to be freed.  At the end of the object, and in a fork
 * child. */
static void
unregister(BridgeObject *b)
{
    ab_state *st = bstate(b);
    set_dead(b);
    if (b->all_prev != NULL || C.all == b) {
        if (b->all_prev != NULL)
            b->all_prev->all_next = b->all_next;
        else
            C.all = b->all_next;
        if (b->all_next != NULL)
            b->all_next->all_prev = b->all_prev;
        b->all_prev = b->all_next = NULL;
    }
    if (st != NULL && b->key != NULL)
        registry_drop(st, b);
    bridge_native *n = b->native;
    b->native = NULL;
    b->backlog = NULL;
    if (n != NULL) {
        n->obj = NULL;
        if (b->generation == ab_fork_generation()) {
            ab_sink_retire(&n->sink, native_free);
        } else {
            n->efd = -1; /* inherited: see let_go */
            native_unref(n);
        }
    }
}

/* ---- polls, on the courier ----------------------------------------------------- */

static int
loop_is_closed(BridgeObject *b)
{
    PyObject *loop = b->loop_ref ? PyWeakref_GetObject(b->loop_ref) : Py_None;
    if (loop == Py_None)
        return 1;
    Py_INCREF(loop);
    PyObject *r = PyObject_CallMethodNoArgs(loop, bstate(b)->str_is_closed);
    Py_DECREF(loop);
    if (r == NULL) {
        PyErr_Clear();
        return 0;
    }
    int closed = PyObject_IsTrue(r);
    Py_DECREF(r);
    if (closed < 0)
        PyErr_Clear();
    return closed > 0;
}

static void
poll_one(BridgeObject *b)
{
    if (b->native == NULL)
        return;
    int dead = atomic_load(&b->native->dead);
    if (!dead && b->delivery == DELIVERY_CST && loop_is_closed(b))
        let_go(b);
    else if (dead)
        drain_dead(b);
}

static void
poll_bridges(void)
{
    /* A snapshot: polls run arbitrary code that may free bridges. */
    PyObject *all = PyList_New(0);
    if (all == NULL) {
        PyErr_Clear();
        return;
    }
    for (BridgeObject *b = C.all; b != NULL; b = b->all_next)
        if (PyList_Append(all, (PyObject *)b) < 0)
            PyErr_Clear();
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(all); i++)
        poll_one((BridgeObject *)PyList_GET_ITEM(all, i));
    Py_DECREF(all);
}

/* Courier, GIL: the engine has outcomes for this bridge. */
static void
wake_bridge(BridgeObject *b)
{
    if (b->native == NULL)
        return;
    if (atomic_load(&b->native->dead) || b->anchor == NULL) {
        drain_dead(b);
        return;
    }
    /* The loop through the weak reference: a bridge never keeps its loop
     * alive (a bound call_soon_threadsafe would). */
    PyObject *loop = PyWeakref_GetObject(b->loop_ref);
    if (loop == Py_None) {
        let_go(b);
        return;
    }
    Py_INCREF(b);
    Py_INCREF(loop);
    PyObject *r = PyObject_CallMethodOneArg(loop, bstate(b)->str_call_soon_threadsafe,
                                            (PyObject *)b->anchor);
    Py_DECREF(loop);
    if (r != NULL) {
        Py_DECREF(r);
    } else {
        /* call_soon_threadsafe refuses only a closed loop; closing is final. */
        PyObject *exc = ab_err_take();
        if (PyErr_GivenExceptionMatches(exc, PyExc_RuntimeError) && loop_is_closed(b)) {
            Py_DECREF(exc);
            let_go(b);
        } else {
            ab_err_raise(exc);
            PyErr_WriteUnraisable((PyObject *)b);
        }
    }
    Py_DECREF(b);
}

/* ---- the courier thread ------------------------------------------------------------- */

enum courier_job { JOB_STOP, JOB_WORK, JOB_POLL, JOB_DROP_TSTATE, JOB_LEAVE };

static void
add_ns(struct timespec *ts, long ns)
{
    ts->tv_nsec += ns;
    while (ts->tv_nsec >= 1000000000L) {
        ts->tv_nsec -= 1000000000L;
        ts->tv_sec++;
    }
}

static int
ts_reached(const struct timespec *now, const struct timespec *at)
{
    return now->tv_sec > at->tv_sec || (now->tv_sec == at->tv_sec && now->tv_nsec >= at->tv_nsec);
}

static int
nothing_in_flight(void)
{
    ab_stats s;
    ab_stats_get(&s);
    return s.in_flight == 0;
}

/* C.mu held: wait for the courier's next job.  It holds a thread state
 * only while it has loops to watch, so that when idle it can be stopped
 * (and leave) without the GIL. */
static enum courier_job
courier_next(int holds_tstate, struct timespec *next_poll, struct timespec *idle_since)
{
    for (;;) {
        if (C.stop)
            return JOB_STOP;
        if (C.wake_list != NULL)
            return JOB_WORK;
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (atomic_load(&C.watched) > 0) {
            idle_since->tv_sec = 0;
            if (ts_reached(&now, next_poll))
                return JOB_POLL;
            pthread_cond_timedwait(&C.cv, &C.mu, next_poll);
            continue;
        }
        if (holds_tstate)
            return JOB_DROP_TSTATE;
        if (atomic_load(&C.open_bridges) == 0 && nothing_in_flight()) {
            if (idle_since->tv_sec == 0)
                *idle_since = now;
            struct timespec until = *idle_since;
            add_ns(&until, IDLE_NS);
            if (ts_reached(&now, &until))
                return JOB_LEAVE;
            pthread_cond_timedwait(&C.cv, &C.mu, &until);
            continue;
        }
        idle_since->tv_sec = 0;
        pthread_cond_wait(&C.cv, &C.mu);
    }
}

/* Courier, GIL: the bridges it was handed, then maybe a poll. */
static void
courier_work(bridge_native *list, int poll)
{
    while (list != NULL) {
        bridge_native *n = list;
        list = n->courier_next;
        atomic_store(&n->queued, 0);
        if (n->obj != NULL)
            wake_bridge(n->obj);
        native_unref(n);
    }
    if (poll)
        poll_bridges();
}

static void
drop_tstate(PyThreadState *ts)
{
    PyEval_RestoreThread(ts);
    PyThreadState_Clear(ts);
    PyThreadState_DeleteCurrent();
}

static void *
courier_main(void *arg)
{
    (void)arg;
    pthread_setname_np(pthread_self(), "ab-courier");
    C.tid = gettid(); /* read by the joiner after pthread_join */
    PyThreadState *ts = NULL;
    struct timespec next_poll, idle_since = {0, 0};
    clock_gettime(CLOCK_MONOTONIC, &next_poll);
    add_ns(&next_poll, POLL_NS);
    pthread_mutex_lock(&C.mu);
    for (;;) {
        enum courier_job job = courier_next(ts != NULL, &next_poll, &idle_since);
        if (job == JOB_STOP)
            break;
        if (job == JOB_LEAVE) {
            /* No loop is open, so none can submit without first starting
             * a courier (courier_open_bridge), which joins this thread. */
            C.state = COURIER_LEFT;
            pthread_mutex_unlock(&C.mu);
            ab_engine_stop_if_idle();
            return NULL;
        }
        pthread_mutex_unlock(&C.mu);
        if (job == JOB_DROP_TSTATE) {
            drop_tstate(ts);
            ts = NULL;
            pthread_mutex_lock(&C.mu);
            continue;
        }
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        int poll = ts_reached(&now, &next_poll);
        if (poll) {
            next_poll = now;
            add_ns(&next_poll, POLL_NS);
        }
        pthread_mutex_lock(&C.mu);
        bridge_native *list = C.wake_list;
        C.wake_list = NULL;
        pthread_mutex_unlock(&C.mu);
        if (ts == NULL)
            ts = PyThreadState_New(C.interp);
        if (ts != NULL) {
            PyEval_RestoreThread(ts);
            courier_work(list, poll);
            PyEval_SaveThread();
        }
        pthread_mutex_lock(&C.mu);
    }
    pthread_mutex_unlock(&C.mu);
    if (ts != NULL)
        drop_tstate(ts);
    return NULL;
}

static void
init_cv(void)
{
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&C.cv, &attr);
    pthread_condattr_destroy(&attr);
}

/* No courier in the child; the parent's wake list is the parent's. */
static void
courier_atfork_child(void)
{
    pthread_mutex_init(&C.mu, NULL);
    pthread_mutex_init(&C.ctl_mu, NULL);
    init_cv();
    C.state = COURIER_OFF;
    C.stop = 0;
    C.wake_list = NULL;
}

static void
courier_init(void)
{
    init_cv();
    pthread_atfork(NULL, NULL, courier_atfork_child);
}

/* GIL held; released while waiting for ctl_mu (see there). */
static void
ctl_lock(void)
{
    if (pthread_mutex_trylock(&C.ctl_mu) == 0)
        return;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&C.ctl_mu);
    Py_END_ALLOW_THREADS
}

/* ctl_mu held, GIL held: join a courier that left or was told to stop. */
static void
courier_join(void)
{
    Py_BEGIN_ALLOW_THREADS
    pthread_join(C.thread, NULL);
    ab_thread_wait_gone(C.tid);
    Py_END_ALLOW_THREADS
    pthread_mutex_lock(&C.mu);
    C.state = COURIER_OFF;
    C.stop = 0;
    pthread_mutex_unlock(&C.mu);
}

/* GIL held: make sure a courier runs; 0, or -1 with an exception set. */
static int
courier_start(void)
{
    ctl_lock();
    pthread_mutex_lock(&C.mu);
    enum courier_state state = C.state;
    int stopping = C.stop;
    pthread_mutex_unlock(&C.mu);
    if (state == COURIER_LEFT || (state == COURIER_ON && stopping)) {
        courier_join();
        state = COURIER_OFF;
    }
    int rc = 0;
    if (state == COURIER_OFF) {
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, &old);
        rc = pthread_create(&C.thread, NULL, courier_main, NULL);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (rc == 0) {
            pthread_mutex_lock(&C.mu);
            C.state = COURIER_ON;
            pthread_mutex_unlock(&C.mu);
        }
    }
    pthread_mutex_unlock(&C.ctl_mu);
    if (rc != 0) {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

/* GIL held: a courier must run; counted in C.mu so that one deciding to
 * leave (no loop open) cannot miss this bridge.  0 or -1 with an
 * exception set (the bridge is counted either way). */
static int
courier_open_bridge(BridgeObject *b)
{
    pthread_once(&courier_once, courier_init);
    pthread_mutex_lock(&C.mu);
    atomic_fetch_add(&C.open_bridges, 1);
    if (b->delivery == DELIVERY_CST)
        atomic_fetch_add(&C.watched, 1);
    pthread_cond_signal(&C.cv);
    pthread_mutex_unlock(&C.mu);
    return ab_courier_ensure();
}

int
ab_courier_ensure(void)
{
    pthread_once(&courier_once, courier_init);
    pthread_mutex_lock(&C.mu);
    int running = C.state == COURIER_ON && !C.stop;
    pthread_mutex_unlock(&C.mu);
    return running ? 0 : courier_start();
}

/* Stop and join the courier (only if nothing is open or in flight, when
 * only_if_idle); GIL held, released while joining.  1 if it is stopped. */
static int
courier_stop(int only_if_idle)
{
    pthread_once(&courier_once, courier_init);
    ctl_lock();
    pthread_mutex_lock(&C.mu);
    int idle = atomic_load(&C.open_bridges) == 0 && nothing_in_flight();
    enum courier_state state = C.state;
    int go = state != COURIER_OFF && (idle || !only_if_idle);
    if (go && state == COURIER_ON) {
        C.stop = 1;
        pthread_cond_signal(&C.cv);
    }
    pthread_mutex_unlock(&C.mu);
    if (go)
        courier_join();
    pthread_mutex_unlock(&C.ctl_mu);
    return go || state == COURIER_OFF;
}

void
ab_courier_stop(void)
{
    courier_stop(0);
}

int
ab_courier_running(void)
{
    pthread_mutex_lock(&C.mu);
    int on = C.state != COURIER_OFF;
    pthread_mutex_unlock(&C.mu);
    return on;
}

void
ab_threads_stop_if_idle(void)
{
    /* Closes that only a poll finds (call_soon_threadsafe delivery): look
     * now rather than at the courier's next poll. */
    if (atomic_load(&C.watched) > 0 && nothing_in_flight())
        poll_bridges();
    if (!courier_stop(1))
        return;
    Py_BEGIN_ALLOW_THREADS
    ab_engine_stop_if_idle();
    Py_END_ALLOW_THREADS
}

/* ---- the anchor ---------------------------------------------------------------------- */

static PyObject *
anchor_call(AnchorObject *a, PyObject *args, PyObject *kwargs)
{
    if (PyTuple_GET_SIZE(args) != 0 || (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0)) {
        PyErr_SetString(PyExc_TypeError, "Bridge.drain() takes no arguments");
        return NULL;
    }
    if (a->bridge == NULL)
        Py_RETURN_NONE;
    return bridge_deliver(a->bridge);
}

static int
anchor_traverse(AnchorObject *a, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(a));
    Py_VISIT(a->bridge);
    return 0;
}

/* Nothing: the GC breaks a loop's cycle elsewhere (the loop, a Future),
 * and the anchor lets go of its bridge only when the loop drops it. */
static int
anchor_clear(AnchorObject *a)
{
    (void)a;
    return 0;
}

static void
anchor_dealloc(AnchorObject *a)
{
    PyTypeObject *tp = Py_TYPE(a);
    PyObject_GC_UnTrack(a);
    BridgeObject *b = a->bridge;
    a->bridge = NULL;
    if (b != NULL) {
        if (b->anchor == a) {
            b->anchor = NULL;
            let_go(b);
        }
        Py_DECREF(b);
    }
    PyObject_GC_Del(a);
    Py_DECREF(tp);
}

static PyObject *
anchor_get_qualname(AnchorObject *a, void *closure)
{
    (void)a;
    (void)closure;
    return PyUnicode_FromString("Bridge.drain");
}

static PyObject *
anchor_repr(AnchorObject *a)
{
    if (a->bridge == NULL)
        return PyUnicode_FromString("<asyncio_bridge delivery (let go)>");
    return PyUnicode_FromFormat("<asyncio_bridge delivery for %R>", (PyObject *)a->bridge);
}

static PyGetSetDef anchor_getset[] = {
    {"__qualname__", (getter)anchor_get_qualname, NULL, "how asyncio names this callback", NULL},
    {"__name__", (getter)anchor_get_qualname, NULL, "how asyncio names this callback", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot anchor_slots[] = {
    {Py_tp_doc, "What a loop holds of its bridge: calling it delivers finished ops."},
    {Py_tp_dealloc, anchor_dealloc},
    {Py_tp_traverse, anchor_traverse},
    {Py_tp_clear, anchor_clear},
    {Py_tp_call, anchor_call},
    {Py_tp_repr, anchor_repr},
    {Py_tp_getset, anchor_getset},
    {0, NULL},
};

PyType_Spec ab_anchor_spec = {
    .name = "asyncio_bridge.BridgeAnchor",
    .basicsize = sizeof(AnchorObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION |
             Py_TPFLAGS_IMMUTABLETYPE,
    .slots = anchor_slots,
};

/* ---- making a bridge --------------------------------------------------------------- */

static PyObject *
loop_key(PyObject *loop)
{
    return PyLong_FromVoidPtr(loop);
}

static int
use_reader(BridgeObject *b, PyObject *loop)
{
    int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (efd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    PyObject *r = PyObject_CallMethod(loop, "add_reader", "iO", efd, (PyObject *)b->anchor);
    if (r == NULL) {
        close(efd);
        return -1;
    }
    Py_DECREF(r);
    b->native->efd = efd;
    ab_sink_init(&b->native->sink, notify_reader, b->native);
    b->delivery = DELIVERY_READER;
    return 0;
}

/* The loop holds the anchor as an attribute; a loop that takes none has it
 * kept in the module state until the courier finds the loop closed or gone
 * (its in-flight ops then keep the loop alive, as they did before). */
static int
use_courier(BridgeObject *b, ab_state *st, PyObject *loop)
{
    PyObject *cst = PyObject_GetAttr(loop, st->str_call_soon_threadsafe);
    if (cst == NULL)
        return -1;
    Py_DECREF(cst);
    if (PyObject_SetAttr(loop, st->str_anchor_attr, (PyObject *)b->anchor) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError) &&
            !PyErr_ExceptionMatches(PyExc_TypeError))
            return -1;
        PyErr_Clear();
        if (PyDict_SetItem(st->rooted, b->key, (PyObject *)b->anchor) < 0)
            return -1;
    }
    if (b->delivery != DELIVERY_CST) { /* auto, falling back: counted as a reader */
        pthread_mutex_lock(&C.mu);
        atomic_fetch_add(&C.watched, 1);
        b->delivery = DELIVERY_CST;
        pthread_mutex_unlock(&C.mu);
    }
    ab_sink_init(&b->native->sink, notify_courier, b->native);
    return 0;
}

/* 1 if impl is uvloop's Loop.create_future, which, like BaseEventLoop's,
 * only returns asyncio.Future(loop=self); 0 otherwise, with no exception.
 * uvloop is looked for only if it is imported already. */
static int
is_uvloop_create_future(ab_state *st, PyObject *impl)
{
    PyObject *name = PyUnicode_FromString("uvloop.loop");
    PyObject *mod = name != NULL ? PyImport_GetModule(name) : NULL;
    Py_XDECREF(name);
    PyObject *cls = mod != NULL ? PyObject_GetAttrString(mod, "Loop") : NULL;
    Py_XDECREF(mod);
    PyObject *uv = cls != NULL ? PyObject_GetAttr(cls, st->str_create_future) : NULL;
    Py_XDECREF(cls);
    PyErr_Clear();
    int same = uv != NULL && uv == impl;
    Py_XDECREF(uv);
    return same;
}

/* If the loop's create_future() is BaseEventLoop's or uvloop's, which
 * only return Future(loop=self), make the Futures directly. */
static void
check_direct_futures(BridgeObject *b, ab_state *st, PyObject *loop)
{
    PyObject *impl = PyObject_GetAttr((PyObject *)Py_TYPE(loop), st->str_create_future);
    if (impl == NULL) {
        PyErr_Clear();
        return;
    }
    int direct = impl == st->base_create_future || is_uvloop_create_future(st, impl);
    Py_DECREF(impl);
    if (!direct)
        return;
    /* Without it the bridge calls create_future(): slower, as right. */
    b->future_kw = PyDict_New();
    if (b->future_kw == NULL || PyDict_SetItem(b->future_kw, st->str_loop, Py_None) < 0) {
        Py_CLEAR(b->future_kw);
        PyErr_Clear();
    }
}

/* Attach b to its loop by the configured delivery. */
static int
attach(BridgeObject *b, ab_state *st, PyObject *loop)
{
    delivery_kind want = st->delivery;
    if (want == DELIVERY_CST)
        return use_courier(b, st, loop);
    if (use_reader(b, loop) == 0)
        return 0;
    if (want == DELIVERY_AUTO && (PyErr_ExceptionMatches(PyExc_NotImplementedError) ||
                                  PyErr_ExceptionMatches(PyExc_AttributeError))) {
        PyErr_Clear();
        return use_courier(b, st, loop);
    }
    return -1;
}

/* Borrowed: a new bridge for loop, owned by the loop through its anchor,
 * or NULL with an exception set. */
static BridgeObject *
bridge_new(ab_state *st, PyObject *loop)
{
    BridgeObject *b = PyObject_GC_New(BridgeObject, st->bridge_type);
    if (b == NULL)
        return NULL;
    b->native = calloc(1, sizeof(*b->native));
    b->loop_ref = b->key = NULL;
    b->anchor = NULL;
    b->future_kw = NULL;
    b->future_kw_loop = 0;
    b->delivery = st->delivery == DELIVERY_CST ? DELIVERY_CST : DELIVERY_READER;
    b->in_flight = 0;
    b->ops.prev = b->ops.next = &b->ops;
    b->backlog = NULL;
    b->flush_queued = 0;
    b->submitted_since_drain = 0;
    b->all_prev = b->all_next = NULL;
    b->weakreflist = NULL;
    b->generation = ab_fork_generation();
    PyObject_GC_Track(b);
    if (b->native == NULL) {
        PyErr_NoMemory();
        Py_DECREF(b);
        return NULL;
    }
    b->native->efd = -1;
    atomic_init(&b->native->refs, 1); /* the bridge's, dropped by the engine's retire */
    atomic_init(&b->native->dead, 1); /* until counted as open */
    b->native->obj = b;
    b->all_next = C.all;
    if (C.all != NULL)
        C.all->all_prev = b;
    C.all = b;
    if ((b->loop_ref = PyWeakref_NewRef(loop, NULL)) == NULL || (b->key = loop_key(loop)) == NULL) {
        Py_DECREF(b);
        return NULL;
    }
    AnchorObject *a = PyObject_GC_New(AnchorObject, st->anchor_type);
    if (a == NULL) {
        Py_DECREF(b);
        return NULL;
    }
    a->bridge = b; /* takes our reference: from here b lives as long as a */
    PyObject_GC_Track(a);
    b->anchor = a;
    atomic_store(&b->native->dead, 0);
    int rc = courier_open_bridge(b);
    if (rc == 0)
        rc = attach(b, st, loop);
    /* On success the loop (or st->rooted) holds the anchor: drop ours.  On
     * failure this frees the anchor, which lets go of the bridge. */
    Py_DECREF(a);
    if (rc < 0)
        return NULL;
    check_direct_futures(b, st, loop);
    return b;
}

/* ---- the running loop, without a getpid() per op --------------------------------
 *
 * CPython 3.11's asyncio.get_running_loop() checks the process id with a
 * getpid() system call on every call: 0.2 us here, a third of what an op
 * costs.  It finds the loop in a holder object kept in the thread state's
 * dict.  Once that holder is seen to hold exactly what get_running_loop()
 * returned, later calls read it directly; a fork (our own generation
 * counter) or any other Python, where the key does not exist, takes the
 * documented call. */

static PyObject *
holder_loop(PyObject *holder)
{
    return *(PyObject **)((char *)holder + sizeof(PyObject));
}

/* Borrowed: the running-loop holder of this thread, or NULL. */
static PyObject *
current_holder(ab_state *st)
{
    PyObject *d = PyThreadState_GetDict();
    if (d == NULL)
        return NULL;
    PyObject *h = PyDict_GetItemWithError(d, st->str_holder_key);
    if (h == NULL)
        PyErr_Clear();
    return h;
}

static void
learn_holder(ab_state *st, PyObject *loop)
{
    PyObject *h = current_holder(st);
    if (h != NULL && strcmp(Py_TYPE(h)->tp_name, "_RunningLoopHolder") == 0 &&
        Py_TYPE(h)->tp_basicsize >= (Py_ssize_t)(sizeof(PyObject) + sizeof(PyObject *)) &&
        holder_loop(h) == loop) {
        st->holder_type = Py_TYPE(h);
        st->holder_generation = ab_fork_generation();
    }
}

/* New reference: the running loop, or NULL with RuntimeError. */
static PyObject *
running_loop(ab_state *st)
{
    if (st->holder_type != NULL && st->holder_generation == ab_fork_generation()) {
        PyObject *h = current_holder(st);
        if (h != NULL && Py_TYPE(h) == st->holder_type && holder_loop(h) != Py_None)
            return Py_NewRef(holder_loop(h));
    }
    PyObject *loop = PyObject_CallNoArgs(st->get_running_loop);
    if (loop != NULL && PY_VERSION_HEX < 0x030C0000)
        learn_holder(st, loop);
    return loop;
}

/* Borrowed: the bridge for the running loop, made on first use; *loop_out
 * gets a new reference to the loop.  NULL with RuntimeError outside a
 * running loop. */
BridgeObject *
ab_bridge_for_running_loop(ab_state *st, PyObject **loop_out)
{
    PyObject *loop = running_loop(st);
    if (loop == NULL)
        return NULL;
    if (loop == st->last_loop && st->last_bridge != NULL) {
        *loop_out = loop;
        return st->last_bridge;
    }
    PyObject *key = loop_key(loop);
    if (key == NULL)
        goto fail;
    BridgeObject *b = registry_get(st, key);
    Py_DECREF(key);
    if (b == NULL && PyErr_Occurred())
        goto fail;
    if (b != NULL && (b->native == NULL || atomic_load(&b->native->dead) ||
                      b->generation != ab_fork_generation() ||
                      PyWeakref_GetObject(b->loop_ref) != loop))
        b = NULL; /* stale: a dead loop's address reused, or let go */
    if (b == NULL) {
        b = bridge_new(st, loop);
        if (b == NULL)
            goto fail;
        if (registry_set(st, b) < 0)
            goto fail; /* the loop holds it: it is only not found again */
    }
    st->last_loop = loop;
    st->last_bridge = b;
    *loop_out = loop;
    return b;
fail:
    Py_DECREF(loop);
    return NULL;
}

/* ---- the engine's wake, once per loop iteration ------------------------------------ */

static PyObject *
bridge_flush(PyObject *self, PyObject *unused)
{
    (void)unused;
    ((BridgeObject *)self)->flush_queued = 0;
    ab_engine_flush();
    Py_RETURN_NONE;
}

static PyMethodDef flush_def = {"_engine_flush", bridge_flush, METH_NOARGS, NULL};

/* The loop thread, GIL: a submit from this loop (ab_submit_deferred) left a
 * sleeping engine's wake to us.
 *
 * The first submit after a delivery wakes the engine at once: a lone op
 * (one awaited at a time) starts without delay, and so does the first of a
 * burst.  The rest of the burst (every task that the delivery resumed
 * submitting in turn) waits for the loop's next iteration, where a flush
 * wakes the engine once for all of them: one write and one wake-up per
 * burst rather than one per op that finds the engine asleep, and on one
 * CPU no switch to the engine in the middle of the loop's turn.  Cannot
 * fail: without a callback the engine is woken at once. */
void
ab_bridge_owe_wake(BridgeObject *b, ab_state *st, PyObject *loop)
{
    if (!b->submitted_since_drain) {
        b->submitted_since_drain = 1;
        ab_engine_flush();
        return;
    }
    if (b->flush_queued)
        return;
    PyObject *fn = PyCFunction_New(&flush_def, (PyObject *)b);
    PyObject *r = fn != NULL ? PyObject_CallMethodOneArg(loop, st->str_call_soon, fn) : NULL;
    Py_XDECREF(fn);
    if (r == NULL) {
        /* The op is submitted whatever call_soon says: wake the engine
         * now.  What call_soon raised is not the submit's failure; but a
         * signal handler's exception (Ctrl-C arriving inside call_soon's
         * Python code) must not be lost: KeyboardInterrupt is raised again
         * at the next check, anything else but an Exception is reported. */
        PyObject *exc = ab_err_take();
        if (PyErr_GivenExceptionMatches(exc, PyExc_KeyboardInterrupt)) {
            Py_DECREF(exc);
            PyErr_SetInterrupt();
        } else if (!PyErr_GivenExceptionMatches(exc, PyExc_Exception)) {
            ab_err_raise(exc);
            PyErr_WriteUnraisable(loop);
        } else {
            Py_DECREF(exc);
        }
        ab_engine_flush();
        return;
    }
    Py_DECREF(r);
    b->flush_queued = 1;
}

/* ---- drain ---------------------------------------------------------------------------- */

static uint64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The loop thread: make sure another drain pass runs for the backlog.  Only
 * native calls, which cannot raise. */
static void
redrain(BridgeObject *b)
{
    if (b->delivery == DELIVERY_READER)
        write_efd(b->native->efd);
    else
        courier_enqueue(b->native);
}

/* A delivery failed with exc (stolen): what asyncio does with an exception
 * that a callback raises.  Returns exc if it must propagate
 * (KeyboardInterrupt, SystemExit), else NULL after reporting it. */
static PyObject *
delivery_failed(BridgeObject *b, ab_state *st, PyObject *exc)
{
    if (PyErr_GivenExceptionMatches(exc, PyExc_KeyboardInterrupt) ||
        PyErr_GivenExceptionMatches(exc, PyExc_SystemExit))
        return exc;
    PyObject *loop = b->loop_ref != NULL ? PyWeakref_GetObject(b->loop_ref) : Py_None;
    PyObject *context = Py_BuildValue("{s:s,s:O}", "message", "Exception in callback Bridge.drain()",
                                      "exception", exc);
    PyObject *r = NULL;
    if (context != NULL && loop != Py_None) {
        Py_INCREF(loop);
        r = PyObject_CallMethodOneArg(loop, st->str_call_exception_handler, context);
        Py_DECREF(loop);
    }
    Py_XDECREF(context);
    if (r == NULL) {
        PyErr_Clear();
        ab_err_raise(exc);
        PyErr_WriteUnraisable((PyObject *)b);
    } else {
        Py_DECREF(r);
        Py_DECREF(exc);
    }
    return NULL;
}

/* The loop thread: resolve finished ops, the backlog first, until the
 * time budget is spent (then the next pass goes on).  New reference to
 * None, or NULL with KeyboardInterrupt or SystemExit set: that propagates
 * out of the loop as from any callback, and the next pass delivers the
 * rest. */
static PyObject *
bridge_deliver(BridgeObject *b)
{
    ab_state *st = bstate(b);
    if (b->native == NULL || st == NULL)
        Py_RETURN_NONE;
    if (atomic_load(&b->native->dead)) {
        drain_dead(b);
        Py_RETURN_NONE;
    }
    if (b->delivery == DELIVERY_READER) {
        uint64_t n;
        while (read(b->native->efd, &n, sizeof(n)) < 0 && errno == EINTR)
            ;
    }
    Py_INCREF(b);
    b->submitted_since_drain = 0;
    uint64_t count = 0, start = now_ns();
    PyObject *stop = NULL;
    while (b->native != NULL && !atomic_load(&b->native->dead) && fill_backlog(b)) {
        if ((count & 15) == 15 && now_ns() - start >= st->drain_budget_ns)
            break;
        /* A signal handler runs here rather than inside a set_result, whose
         * Future would be left done with its callbacks lost. */
        if (PyErr_CheckSignals() < 0 && (stop = delivery_failed(b, st, ab_err_take())) != NULL)
            break;
        unsigned msgs;
        ab_op *op = pop_backlog(b, &msgs);
        count++;
        OpPy *py = ab_op_owner(op);
        if (msgs & AB_MSG_ITEMS)
            ab_stream_items(py, st);
        if (msgs & AB_MSG_PYTHON)
            ab_op_run_python(py, st);
        else if ((msgs & AB_MSG_FINISHED) && ab_op_resolve(py, st) < 0 &&
                 (stop = delivery_failed(b, st, ab_err_take())) != NULL)
            break;
    }
    ab_stats_batch(count);
    if (b->native != NULL && !atomic_load(&b->native->dead) && b->backlog != NULL)
        redrain(b);
    if (st->exiting)
        ab_exit_quiesce(st);
    Py_DECREF(b);
    if (stop != NULL) {
        ab_err_raise(stop);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ---- fork and exit -------------------------------------------------------------------- */

/* In the child, GIL: ops in flight in the parent can never finish here.
 * Fail their Futures with ForkError and drop every inherited bridge. */
void
ab_bridges_after_fork(ab_state *st)
{
    BridgeObject *b = C.all;
    st->last_bridge = NULL;
    st->last_loop = NULL;
    while (b != NULL) {
        BridgeObject *next = b->all_next;
        Py_INCREF(b);
        b->backlog = NULL; /* finished in the parent: forgotten below */
        while (b->ops.next != &b->ops) {
            OpPy *py = b->ops.next;
            if (py->future != NULL) {
                PyObject *exc = abpy_exception_for(st, AB_EFORKED,
                                                   "asyncio_bridge: this operation was in "
                                                   "flight when the process forked; it "
                                                   "cannot complete in the child");
                PyObject *r = exc ? PyObject_CallMethodOneArg(py->future, st->str_set_exception,
                                                              exc)
                                  : NULL;
                Py_XDECREF(exc);
                Py_XDECREF(r);
                PyErr_Clear(); /* a Future of a loop this child cannot run */
            }
            ab_op_forget(py); /* the Op, if alive, resumes into the ForkError */
        }
        unregister(b);
        Py_DECREF(b);
        b = next;
    }
    PyDict_Clear(st->bridges);
    PyDict_Clear(st->rooted);
    atomic_store(&C.open_bridges, 0);
    atomic_store(&C.watched, 0);
}

/* The interpreter is exiting and ops started since atexit are done: stop
 * the threads again before finalization.  The exit thread, GIL. */
void
ab_exit_quiesce(ab_state *st)
{
    if (!st->exiting || st->exit_ops > 0 || PyThread_get_thread_ident() != st->exit_thread)
        return;
    ab_courier_stop();
    Py_BEGIN_ALLOW_THREADS
    ab_engine_stop();
    Py_END_ALLOW_THREADS
}

/* The owning interpreter ends: nothing of it may be touched again, and
 * another interpreter may take the library over. */
void
ab_bridges_abandon(void)
{
    for (BridgeObject *b = C.all; b != NULL; b = b->all_next)
        b->all_prev = NULL;
    C.all = NULL;
    atomic_store(&C.open_bridges, 0);
    atomic_store(&C.watched, 0);
}

void
ab_courier_set_interpreter(PyInterpreterState *interp)
{
    C.interp = interp;
}

/* ---- the type ---------------------------------------------------------------------------- */

/* The in-flight ops' references belong to the bridge (ext.h, OpPy); each
 * op's reference to the bridge too. */
static int
bridge_traverse(BridgeObject *b, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(b));
    Py_VISIT(b->loop_ref);
    Py_VISIT(b->future_kw);
    for (OpPy *py = b->ops.next; py != &b->ops; py = py->next) {
        Py_VISIT(py->bridge);
        Py_VISIT(py->iter);
        Py_VISIT(py->future);
        Py_VISIT(py->context);
        Py_VISIT(py->task);
        Py_VISIT(py->outcome);
        for (int i = 0; i < py->nkept; i++)
            Py_VISIT(py->kept[i]);
        for (int i = 0; i < py->nviews; i++)
            Py_VISIT(py->views[i]->obj);
    }
    return 0;
}

/* Nothing: what an op in flight holds stays until the engine answers (a
 * pool function may still read a kept buffer).  The GC breaks the cycle
 * elsewhere; the anchor's end then cancels the ops. */
static int
bridge_clear(BridgeObject *b)
{
    (void)b;
    return 0;
}

static void
bridge_dealloc(BridgeObject *b)
{
    PyTypeObject *tp = Py_TYPE(b);
    PyObject_GC_UnTrack(b);
    if (b->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)b);
    unregister(b);
    Py_CLEAR(b->loop_ref);
    Py_CLEAR(b->key);
    Py_CLEAR(b->future_kw);
    PyObject_GC_Del(b);
    Py_DECREF(tp);
}

static const char *
delivery_name(BridgeObject *b)
{
    return b->delivery == DELIVERY_READER ? "add_reader" : "call_soon_threadsafe";
}

static PyObject *
bridge_repr(BridgeObject *b)
{
    int dead = b->native == NULL || atomic_load(&b->native->dead);
    return PyUnicode_FromFormat("<asyncio_bridge.Bridge %s in_flight=%zd%s>", delivery_name(b),
                                b->in_flight, dead ? " let go" : "");
}

static PyObject *
bridge_get_delivery(BridgeObject *b, void *closure)
{
    (void)closure;
    return PyUnicode_FromString(delivery_name(b));
}

static PyObject *
bridge_get_in_flight(BridgeObject *b, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(b->in_flight);
}

static PyObject *
bridge_get_open(BridgeObject *b, void *closure)
{
    (void)closure;
    return PyBool_FromLong(b->native != NULL && !atomic_load(&b->native->dead));
}

static PyObject *
bridge_drain(BridgeObject *b, PyObject *unused)
{
    (void)unused;
    return bridge_deliver(b);
}

static PyMethodDef bridge_methods[] = {
    {"drain", (PyCFunction)bridge_drain, METH_NOARGS,
     "drain(): resolve finished ops (within the drain budget); runs on the loop thread."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef bridge_getset[] = {
    {"delivery", (getter)bridge_get_delivery, NULL, "the delivery path in use", NULL},
    {"in_flight", (getter)bridge_get_in_flight, NULL, "ops submitted and not released", NULL},
    {"open", (getter)bridge_get_open, NULL, "False once its loop let go (closed or gone)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot bridge_slots[] = {
    {Py_tp_doc, "The per-loop bridge between the engine and an asyncio loop."},
    {Py_tp_dealloc, bridge_dealloc},
    {Py_tp_traverse, bridge_traverse},
    {Py_tp_clear, bridge_clear},
    {Py_tp_repr, bridge_repr},
    {Py_tp_methods, bridge_methods},
    {Py_tp_getset, bridge_getset},
    {0, NULL},
};

PyType_Spec ab_bridge_spec = {
    .name = "asyncio_bridge.Bridge",
    .basicsize = sizeof(BridgeObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION |
             Py_TPFLAGS_IMMUTABLETYPE,
    .slots = bridge_slots,
};

PyObject *
ab_bridge_of_loop(ab_state *st, PyObject *loop)
{
    PyObject *key = loop_key(loop);
    if (key == NULL)
        return NULL;
    BridgeObject *b = registry_get(st, key);
    Py_DECREF(key);
    if (b == NULL)
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    if (PyWeakref_GetObject(b->loop_ref) != loop)
        Py_RETURN_NONE;
    return Py_NewRef(b);
}
