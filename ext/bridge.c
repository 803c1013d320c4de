/* bridge.c: one bridge per asyncio loop, and the courier thread.
 *
 * The engine pushes finished ops onto a bridge's sink and, once per burst,
 * notifies it: by writing the bridge's eventfd, which the loop watches with
 * add_reader (the engine never needs the GIL), or by handing the bridge to
 * the courier, a native thread that takes the GIL and calls
 * loop.call_soon_threadsafe(drain) (so a stalled GIL never stalls the
 * engine's timers).  drain() runs on the loop thread and resolves every
 * finished op in one pass.
 *
 * The courier also notices loops closed or dropped with ops in flight: it
 * cancels those ops and releases them as they come back, resolving nothing
 * on the closed loop. */
#include "ext.h"

#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define POLL_NS 250000000L /* how often the courier looks for closed loops */

static struct courier {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t thread;
    int started, stop;
    bridge_native *wake_list;
    atomic_int busy_bridges; /* bridges with ops in flight: poll while > 0 */
    BridgeObject *all;       /* every live bridge (GIL) */
} C = {
    .mu = PTHREAD_MUTEX_INITIALIZER,
    .cv = PTHREAD_COND_INITIALIZER,
};

static pthread_once_t courier_atfork_once = PTHREAD_ONCE_INIT;

/* ---- notify: engine thread, never the GIL --------------------------------- */

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
notify_reader(ab_sink *sink)
{
    bridge_native *n = sink->user;
    uint64_t one = 1;
    if (atomic_load(&n->dead)) {
        courier_enqueue(n);
        return;
    }
    while (write(n->efd, &one, sizeof(one)) < 0 && errno == EINTR)
        ;
}

/* n is freed once neither its bridge (through the engine's retire, after
 * the last notify) nor the courier's list holds it.  Any thread. */
static void
native_unref(bridge_native *n)
{
    if (atomic_fetch_sub(&n->refs, 1) != 1)
        return;
    if (n->efd >= 0 && n->close_efd)
        close(n->efd);
    free(n);
}

/* Runs on the engine thread once no notify can touch n any more. */
static void
native_free(ab_sink *sink)
{
    native_unref(sink->user);
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
    if (b->in_flight++ == 0 && atomic_fetch_add(&C.busy_bridges, 1) == 0) {
        /* The courier may sleep without a timeout while nothing is in
         * flight: it has closed loops to look for again. */
        pthread_mutex_lock(&C.mu);
        pthread_cond_signal(&C.cv);
        pthread_mutex_unlock(&C.mu);
    }
}

void
ab_bridge_untrack(BridgeObject *b, OpPy *op)
{
    op->prev->next = op->next;
    op->next->prev = op->prev;
    op->prev = op->next = NULL;
    if (--b->in_flight == 0)
        atomic_fetch_sub(&C.busy_bridges, 1);
}

/* ---- registry ------------------------------------------------------------------ */

/* The module state; NULL during finalization, when the GC may clear the
 * type (and its module reference) before the bridges. */
static ab_state *
bstate(BridgeObject *b)
{
    (void)b;
    return ab_global_state;
}

static PyObject *
loop_key(PyObject *loop)
{
    return PyLong_FromVoidPtr(loop);
}

/* Forget the bridge: out of the list; its native part goes to the engine
 * to be freed.  The caller drops the registry entry.  May free b. */
static void
unregister(BridgeObject *b)
{
    ab_state *st = bstate(b);
    if (st != NULL && st->last_bridge == b) {
        st->last_bridge = NULL;
        st->last_loop = NULL;
    }
    if (b->all_prev != NULL || C.all == b) {
        if (b->all_prev != NULL)
            b->all_prev->all_next = b->all_next;
        else
            C.all = b->all_next;
        if (b->all_next != NULL)
            b->all_next->all_prev = b->all_prev;
        b->all_prev = b->all_next = NULL;
    }
    bridge_native *n = b->native;
    b->native = NULL;
    if (n != NULL) {
        n->obj = NULL;
        if (b->generation == ab_fork_generation()) {
            ab_sink_retire(&n->sink, native_free);
        } else {
            /* Inherited across fork: its eventfd may still be registered
             * with the loop's selector, shared with the parent; leave it
             * open.  No engine of this process ever notifies it. */
            n->close_efd = 0;
            native_unref(n);
        }
    }
    Py_CLEAR(b->drain);
    Py_CLEAR(b->loop_ref); /* may hold the last reference to b */
}

/* Remove the registry entry for the loop if it still names b. */
static void
drop_registry_entry(BridgeObject *b, PyObject *key)
{
    ab_state *st = bstate(b);
    PyObject *cur = PyDict_GetItemWithError(st->bridges, key);
    if (cur == (PyObject *)b && PyDict_DelItem(st->bridges, key) < 0)
        PyErr_Clear();
}

/* ---- a closed or vanished loop --------------------------------------------- */

/* Courier or loop thread, GIL: take what the engine returned and release
 * it without resolving anything. */
static void
drain_dead(BridgeObject *b)
{
    if (b->native == NULL)
        return;
    ab_op *op = ab_sink_take(&b->native->sink);
    while (op != NULL) {
        int msg;
        ab_op *next = ab_sink_next(op, &msg);
        OpPy *py = ab_op_owner(op);
        if (msg == AB_MSG_FINISHED)
            ab_op_forget(py);
        else
            ab_op_run_python(py, bstate(b)); /* answers "cancelled" */
        op = next;
    }
}

/* The loop is closed or gone: cancel every op in flight.  Their outcomes
 * come back through the courier and are only released. */
static void
kill_bridge(BridgeObject *b)
{
    ab_state *st = bstate(b);
    if (b->native == NULL || atomic_exchange(&b->native->dead, 1))
        return;
    if (st->last_bridge == b) {
        st->last_bridge = NULL;
        st->last_loop = NULL;
    }
    for (OpPy *py = b->ops.next; py != &b->ops; py = py->next)
        ab_op_abort(py, st);
    drain_dead(b);
}

static int
loop_is_closed(BridgeObject *b)
{
    PyObject *loop = b->loop_ref ? PyWeakref_GetObject(b->loop_ref) : Py_None;
    if (loop == Py_None)
        return 1;
    PyObject *r = PyObject_CallMethodNoArgs(loop, bstate(b)->str_is_closed);
    if (r == NULL) {
        PyErr_Clear();
        return 0;
    }
    int closed = PyObject_IsTrue(r);
    Py_DECREF(r);
    return closed > 0;
}

/* Courier, GIL: kill the bridges whose loop closed with ops in flight,
 * and let go of dead ones once their ops are all back. */
static void
poll_one(BridgeObject *b)
{
    /* Every call into Python (is_closed, releasing ops) may collect the
     * loop, whose weakref callback unregisters b: look again after each. */
    if (b->native == NULL)
        return;
    if (!atomic_load(&b->native->dead) && b->in_flight > 0 && loop_is_closed(b))
        kill_bridge(b);
    if (b->native == NULL || !atomic_load(&b->native->dead))
        return;
    drain_dead(b);
    if (b->native == NULL || b->in_flight > 0)
        return;
    PyObject *loop = b->loop_ref ? PyWeakref_GetObject(b->loop_ref) : Py_None;
    if (loop != Py_None) {
        PyObject *key = loop_key(loop);
        if (key != NULL)
            drop_registry_entry(b, key);
        Py_XDECREF(key);
        PyErr_Clear();
    }
    unregister(b);
}

static void
poll_bridges(void)
{
    /* A snapshot: releasing ops runs arbitrary code that may drop bridges. */
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
    if (atomic_load(&b->native->dead)) {
        drain_dead(b);
        return;
    }
    /* The loop through the weak reference: a bridge never keeps its loop
     * alive (a bound call_soon_threadsafe would). */
    PyObject *loop = PyWeakref_GetObject(b->loop_ref);
    if (loop == Py_None) {
        kill_bridge(b);
        return;
    }
    Py_INCREF(b);
    Py_INCREF(loop);
    PyObject *r = PyObject_CallMethodOneArg(loop, bstate(b)->str_call_soon_threadsafe, b->drain);
    Py_DECREF(loop);
    if (r != NULL) {
        Py_DECREF(r);
        Py_DECREF(b);
        return;
    }
    /* call_soon_threadsafe refuses only a closed loop; closing is final. */
    PyObject *exc = ab_err_take();
    if (PyErr_GivenExceptionMatches(exc, PyExc_RuntimeError) && loop_is_closed(b)) {
        Py_DECREF(exc);
        kill_bridge(b);
    } else {
        ab_err_raise(exc);
        PyErr_WriteUnraisable((PyObject *)b);
    }
    Py_DECREF(b);
}

/* ---- the courier thread ------------------------------------------------------------- */

static void
add_ns(struct timespec *ts, long ns)
{
    ts->tv_nsec += ns;
    while (ts->tv_nsec >= 1000000000L) {
        ts->tv_nsec -= 1000000000L;
        ts->tv_sec++;
    }
}

static void *
courier_main(void *arg)
{
    (void)arg;
    pthread_setname_np(pthread_self(), "ab-courier");
    PyGILState_STATE g = PyGILState_Ensure();
    PyThreadState *ts = PyEval_SaveThread();
    struct timespec next_poll;
    clock_gettime(CLOCK_MONOTONIC, &next_poll);
    add_ns(&next_poll, POLL_NS);
    pthread_mutex_lock(&C.mu);
    for (;;) {
        int poll = 0;
        while (!C.stop && C.wake_list == NULL) {
            if (atomic_load(&C.busy_bridges) == 0) {
                pthread_cond_wait(&C.cv, &C.mu);
                continue;
            }
            if (pthread_cond_timedwait(&C.cv, &C.mu, &next_poll) == ETIMEDOUT) {
                poll = 1;
                break;
            }
        }
        if (C.stop)
            break;
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec > next_poll.tv_sec ||
            (now.tv_sec == next_poll.tv_sec && now.tv_nsec >= next_poll.tv_nsec))
            poll = 1;
        bridge_native *list = C.wake_list;
        C.wake_list = NULL;
        pthread_mutex_unlock(&C.mu);

        PyEval_RestoreThread(ts);
        while (list != NULL) {
            bridge_native *n = list;
            list = n->courier_next;
            atomic_store(&n->queued, 0);
            if (n->obj != NULL)
                wake_bridge(n->obj);
            native_unref(n);
        }
        if (poll) {
            poll_bridges();
            next_poll = now;
            add_ns(&next_poll, POLL_NS);
        }
        ts = PyEval_SaveThread();
        pthread_mutex_lock(&C.mu);
    }
    pthread_mutex_unlock(&C.mu);
    PyEval_RestoreThread(ts);
    PyGILState_Release(g);
    return NULL;
}

/* No courier in the child; the parent's wake list is the parent's. */
static void
courier_atfork_child(void)
{
    pthread_mutex_init(&C.mu, NULL);
    pthread_cond_init(&C.cv, NULL);
    C.started = 0;
    C.stop = 0;
    C.wake_list = NULL;
}

static void
courier_register_atfork(void)
{
    pthread_atfork(NULL, NULL, courier_atfork_child);
}

static int
courier_start(void)
{
    pthread_once(&courier_atfork_once, courier_register_atfork);
    if (C.started)
        return 0;
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&C.cv, &attr);
    pthread_condattr_destroy(&attr);
    C.stop = 0;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(&C.thread, NULL, courier_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    C.started = 1;
    return 0;
}

/* Stop and join the courier; the caller holds the GIL, which is released
 * while joining. */
int
ab_courier_stop(void)
{
    if (!C.started)
        return 0;
    pthread_mutex_lock(&C.mu);
    C.stop = 1;
    pthread_cond_signal(&C.cv);
    pthread_mutex_unlock(&C.mu);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(C.thread, NULL);
    Py_END_ALLOW_THREADS
    C.started = 0;
    return 0;
}

/* ---- making a bridge --------------------------------------------------------------- */

static PyObject *
loop_gone(PyObject *self, PyObject *ref)
{
    /* weakref callback; self is the bridge */
    BridgeObject *b = (BridgeObject *)self;
    (void)ref;
    if (b->native != NULL)
        kill_bridge(b);
    if (b->in_flight == 0) {
        Py_INCREF(b);
        ab_state *st = bstate(b);
        /* The dict key is the dead loop's address: find b by value. */
        PyObject *key, *value;
        Py_ssize_t pos = 0;
        while (PyDict_Next(st->bridges, &pos, &key, &value)) {
            if (value == self) {
                Py_INCREF(key);
                drop_registry_entry(b, key);
                Py_DECREF(key);
                break;
            }
        }
        unregister(b);
        Py_DECREF(b);
    }
    Py_RETURN_NONE;
}

static PyMethodDef loop_gone_def = {"_loop_gone", loop_gone, METH_O, NULL};

static int
use_reader(BridgeObject *b, ab_state *st, PyObject *loop)
{
    int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (efd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    PyObject *r = PyObject_CallMethod(loop, "add_reader", "iO", efd, b->drain);
    if (r == NULL) {
        close(efd);
        return -1;
    }
    Py_DECREF(r);
    b->native->efd = efd;
    ab_sink_init(&b->native->sink, notify_reader, b->native);
    b->delivery = DELIVERY_READER;
    (void)st;
    return 0;
}

static int
use_courier(BridgeObject *b, ab_state *st, PyObject *loop)
{
    PyObject *cst = PyObject_GetAttr(loop, st->str_call_soon_threadsafe);
    if (cst == NULL)
        return -1;
    Py_DECREF(cst);
    ab_sink_init(&b->native->sink, notify_courier, b->native);
    b->delivery = DELIVERY_CST;
    return 0;
}

/* If the loop's create_future() is BaseEventLoop's, which only returns
 * Future(loop=self), make the Futures directly. */
static int
direct_futures(BridgeObject *b, ab_state *st, PyObject *loop)
{
    PyObject *impl = PyObject_GetAttr((PyObject *)Py_TYPE(loop), st->str_create_future);
    if (impl == NULL) {
        PyErr_Clear();
        return 0;
    }
    b->direct_futures = impl == st->base_create_future;
    Py_DECREF(impl);
    return 0;
}

static BridgeObject *
bridge_new(ab_state *st, PyObject *loop)
{
    BridgeObject *b = PyObject_GC_New(BridgeObject, st->bridge_type);
    if (b == NULL)
        return NULL;
    b->native = calloc(1, sizeof(*b->native));
    b->loop_ref = b->drain = NULL;
    b->direct_futures = 0;
    b->in_flight = 0;
    b->ops.prev = b->ops.next = &b->ops;
    b->all_prev = b->all_next = NULL;
    b->weakreflist = NULL;
    b->generation = ab_fork_generation();
    PyObject_GC_Track(b);
    if (b->native == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    b->native->efd = -1;
    b->native->close_efd = 1;
    atomic_init(&b->native->refs, 1); /* the bridge's, dropped by the engine's retire */
    b->native->obj = b;
    PyObject *cb = PyCFunction_New(&loop_gone_def, (PyObject *)b);
    if (cb == NULL)
        goto fail;
    b->loop_ref = PyWeakref_NewRef(loop, cb);
    Py_DECREF(cb);
    if (b->loop_ref == NULL)
        goto fail;
    b->drain = PyObject_GetAttr((PyObject *)b, st->str_drain);
    if (b->drain == NULL || courier_start() < 0)
        goto fail;
    int rc;
    if (st->delivery == DELIVERY_CST) {
        rc = use_courier(b, st, loop);
    } else {
        rc = use_reader(b, st, loop);
        if (rc < 0 && st->delivery == DELIVERY_AUTO &&
            (PyErr_ExceptionMatches(PyExc_NotImplementedError) ||
             PyErr_ExceptionMatches(PyExc_AttributeError))) {
            PyErr_Clear();
            rc = use_courier(b, st, loop);
        }
    }
    if (rc < 0 || direct_futures(b, st, loop) < 0)
        goto fail;
    b->all_next = C.all;
    if (C.all != NULL)
        C.all->all_prev = b;
    C.all = b;
    return b;
fail:
    if (b->native != NULL) {
        free(b->native);
        b->native = NULL;
    }
    Py_DECREF(b);
    return NULL;
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
    if (loop != NULL)
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
    BridgeObject *b = (BridgeObject *)PyDict_GetItemWithError(st->bridges, key);
    if (b == NULL && PyErr_Occurred())
        goto fail;
    if (b != NULL && (b->native == NULL || atomic_load(&b->native->dead) ||
                      b->generation != ab_fork_generation() ||
                      PyWeakref_GetObject(b->loop_ref) != loop))
        b = NULL; /* stale: a dead loop's address reused, or inherited */
    if (b == NULL) {
        b = bridge_new(st, loop);
        if (b == NULL)
            goto fail;
        int rc = PyDict_SetItem(st->bridges, key, (PyObject *)b);
        Py_DECREF(b); /* the registry holds it */
        if (rc < 0) {
            unregister(b);
            goto fail;
        }
    }
    Py_DECREF(key);
    st->last_loop = loop;
    st->last_bridge = b;
    *loop_out = loop;
    return b;
fail:
    Py_XDECREF(key);
    Py_DECREF(loop);
    return NULL;
}

/* ---- drain ---------------------------------------------------------------------------- */

static PyObject *
bridge_drain(BridgeObject *b, PyObject *unused)
{
    (void)unused;
    ab_state *st = bstate(b);
    if (b->native == NULL)
        Py_RETURN_NONE;
    if (atomic_load(&b->native->dead)) {
        drain_dead(b);
        Py_RETURN_NONE;
    }
    if (b->native->efd >= 0) {
        uint64_t n;
        while (read(b->native->efd, &n, sizeof(n)) < 0 && errno == EINTR)
            ;
    }
    Py_INCREF(b);
    uint64_t count = 0;
    ab_op *op = ab_sink_take(&b->native->sink);
    while (op != NULL) {
        int msg;
        ab_op *next = ab_sink_next(op, &msg);
        OpPy *py = ab_op_owner(op);
        if (msg == AB_MSG_FINISHED) {
            if (ab_op_resolve(py, st) < 0)
                PyErr_WriteUnraisable((PyObject *)b);
        } else {
            ab_op_run_python(py, st);
        }
        count++;
        op = next;
    }
    ab_stats_batch(count);
    Py_DECREF(b);
    Py_RETURN_NONE;
}

/* ---- fork and shutdown -------------------------------------------------------------------- */

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
        PyDict_Clear(st->bridges);
        unregister(b);
        Py_DECREF(b);
        b = next;
    }
}

/* atexit, GIL: the engine is stopped.  Ops in flight are kept forever
 * (never freed, never resolved) so that nothing runs during finalization. */
void
ab_bridges_shutdown(ab_state *st)
{
    (void)st;
    for (BridgeObject *b = C.all; b != NULL; b = b->all_next) {
        if (b->in_flight > 0)
            Py_INCREF(b); /* deliberately leaked: see above */
        if (b->native != NULL)
            atomic_store(&b->native->dead, 1);
    }
}

/* ---- the type ---------------------------------------------------------------------------- */

static int
bridge_traverse(BridgeObject *b, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(b));
    Py_VISIT(b->loop_ref);
    Py_VISIT(b->drain);
    return 0;
}

static int
bridge_clear(BridgeObject *b)
{
    unregister(b);
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
    PyObject_GC_Del(b);
    Py_DECREF(tp);
}

static PyObject *
bridge_repr(BridgeObject *b)
{
    return PyUnicode_FromFormat("<asyncio_bridge.Bridge %s in_flight=%zd>",
                                b->delivery == DELIVERY_READER ? "add_reader"
                                                                : "call_soon_threadsafe",
                                b->in_flight);
}

static PyObject *
bridge_get_delivery(BridgeObject *b, void *closure)
{
    (void)closure;
    return PyUnicode_FromString(b->delivery == DELIVERY_READER ? "add_reader"
                                                                : "call_soon_threadsafe");
}

static PyObject *
bridge_get_in_flight(BridgeObject *b, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(b->in_flight);
}

static PyMethodDef bridge_methods[] = {
    {"drain", (PyCFunction)bridge_drain, METH_NOARGS,
     "drain(): resolve every finished op; runs on the loop thread."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef bridge_getset[] = {
    {"delivery", (getter)bridge_get_delivery, NULL, "the delivery path in use", NULL},
    {"in_flight", (getter)bridge_get_in_flight, NULL, "ops submitted and not released", NULL},
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
    PyObject *b = PyDict_GetItemWithError(st->bridges, key);
    Py_DECREF(key);
    if (b == NULL)
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    return Py_NewRef(b);
}
