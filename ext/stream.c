/* stream.c: the Stream type, the async iterator around a stream op.
 *
 * The native op emits items (ab_yield_*); drain() hands each burst to the
 * Stream, which keeps the native items in a list and turns one into a
 * Python object only when __anext__ takes it.  __anext__ returns a small
 * awaitable (StreamNext) that, with an item buffered, returns it on its
 * first send: no Future, no loop iteration, no engine.  With none buffered
 * it awaits a Future that drain() resolves when items (or the end) come.
 * The Future only wakes the waiter; the item stays in the list until a
 * send takes it, so a cancelled __anext__ loses nothing.
 *
 * The op starts on the first __anext__, on the running loop's bridge, like
 * an Op on its first send.  aclose() and dropping the Stream cancel it. */
#include "ext.h"

#include <structmember.h>

typedef enum {
    ST_INIT,     /* not submitted */
    ST_RUNNING,  /* in flight */
    ST_FINISHED, /* the op ended (successfully or not): buffered items, then the end */
    ST_CLOSED,   /* aclose() or the op was lost: nothing more is read */
} stream_state;

typedef struct StreamObject {
    PyObject_HEAD
    ab_op *op; /* our reference */
    OpPy *py;
    int max_buffered;
    stream_state state;
    ab_item *head, *tail; /* delivered, not yet taken */
    PyObject *waiter;     /* the pending __anext__'s Future */
    PyObject *closer;     /* aclose()'s Future, resolved when the op ended */
    PyObject *end_error;  /* the op was lost (loop closed, fork): raised once drained */
    PyObject *weakreflist;
} StreamObject;

typedef enum { NEXT_ITEM, NEXT_CLOSE, NEXT_ENTER } next_kind;

typedef struct {
    PyObject_HEAD
    StreamObject *stream; /* strong */
    PyObject *fut;        /* the Future this send awaits */
    PyObject *iter;       /* its iterator */
    next_kind kind;
    char done;
} StreamNextObject;

/* ---- items ----------------------------------------------------------------- */

static void
free_items(StreamObject *s)
{
    while (s->head != NULL) {
        ab_item *next = ab_item_next(s->head);
        ab_item_free(s->head);
        s->head = next;
    }
    s->tail = NULL;
}

/* New reference: the Python object for an item (which the caller frees),
 * or NULL with the exception that __anext__ raises. */
static PyObject *
item_object(StreamObject *s, ab_item *item)
{
    size_t len;
    const char *data;
    const char *name = ab_op_type_of(s->op)->name;
    switch (ab_item_kind(item)) {
    case AB_RESULT_INT:
        return PyLong_FromLongLong(ab_item_int(item));
    case AB_RESULT_FLOAT:
        return PyFloat_FromDouble(ab_item_float(item));
    case AB_RESULT_BYTES:
        data = ab_item_data(item, &len);
        return PyBytes_FromStringAndSize(data, (Py_ssize_t)len);
    case AB_RESULT_STR:
        data = ab_item_data(item, &len);
        return PyUnicode_DecodeUTF8(data, (Py_ssize_t)len, "strict");
    case AB_RESULT_KEPT: {
        PyObject *obj = abpy_kept(s->op, ab_item_slot(item));
        if (obj == NULL)
            PyErr_Format(PyExc_RuntimeError, "%s: yielded empty slot %d", name,
                         ab_item_slot(item));
        return Py_XNewRef(obj);
    }
    case AB_RESULT_CUSTOM:
        return ab_checked_result(ab_item_custom(item), name, "item to_python");
    default:
        break;
    }
    PyErr_Format(PyExc_SystemError, "%s: unknown item kind", name);
    return NULL;
}

/* Resolve a Future with None unless it is done; errors are reported, since
 * drain() must go on with the next op. */
static void
wake(ab_state *st, PyObject **futp)
{
    PyObject *fut = *futp;
    if (fut == NULL)
        return;
    *futp = NULL;
    PyObject *done = PyObject_CallMethodNoArgs(fut, st->str_done);
    int is_done = done != NULL ? PyObject_IsTrue(done) : -1;
    Py_XDECREF(done);
    if (is_done == 0) {
        PyObject *r = PyObject_CallMethodOneArg(fut, st->str_set_result, Py_None);
        Py_XDECREF(r);
        is_done = r != NULL ? 1 : -1;
    }
    if (is_done < 0)
        PyErr_WriteUnraisable(fut);
    Py_DECREF(fut);
}

void
ab_stream_items(OpPy *py, ab_state *st)
{
    StreamObject *s = ab_py_stream(py);
    ab_item *items = ab_op_take_items(py->op);
    if (items == NULL)
        return;
    if (s == NULL || s->state == ST_CLOSED) { /* nobody reads them */
        while (items != NULL) {
            ab_item *next = ab_item_next(items);
            ab_item_free(items);
            items = next;
        }
        return;
    }
    if (s->tail != NULL)
        ab_item_set_next(s->tail, items);
    else
        s->head = items;
    ab_item *last = items;
    while (ab_item_next(last) != NULL)
        last = ab_item_next(last);
    s->tail = last;
    wake(st, &s->waiter);
}

/* The op ended (its outcome is in the op), or was lost with `error`
 * (stolen; NULL when it ended normally). */
static void
stream_ended(StreamObject *s, ab_state *st, PyObject *error, int lost)
{
    if (s->state == ST_RUNNING)
        s->state = ST_FINISHED;
    if (error != NULL && s->end_error == NULL && s->state == ST_FINISHED)
        s->end_error = error;
    else
        Py_XDECREF(error);
    if (st != NULL && !lost) {
        wake(st, &s->waiter);
        wake(st, &s->closer);
    } else {
        /* Lost: the Futures belong to a closed loop or to the parent of a
         * fork, where nothing may be resolved. */
        Py_CLEAR(s->waiter);
        Py_CLEAR(s->closer);
    }
}

void
ab_stream_finished(OpPy *py, ab_state *st)
{
    if (ab_py_stream(py) != NULL)
        stream_ended(ab_py_stream(py), st, NULL, 0);
}

/* ab_op_forget, for a stream op that did not finish through drain(): its
 * loop closed, or it was in flight at a fork. */
void
ab_stream_lost(OpPy *py, ab_state *st)
{
    StreamObject *s = ab_py_stream(py);
    if (s == NULL)
        return;
    PyObject *err = NULL;
    if (s->state == ST_RUNNING && st != NULL) {
        if (ab_op_generation(py->op) != ab_fork_generation())
            err = abpy_exception_for(st, AB_EFORKED,
                                     "asyncio_bridge: this stream was in flight when the "
                                     "process forked; it cannot go on in the child");
        else
            err = PyObject_CallFunction(PyExc_RuntimeError, "s",
                                        "the stream's event loop was closed before it ended");
        if (err == NULL)
            PyErr_Clear();
    }
    stream_ended(s, st, err, 1);
}

/* ---- starting ------------------------------------------------------------------ */

static PyObject *
running_bridge_loop(StreamObject *s, ab_state *st, BridgeObject **bp)
{
    PyObject *loop = NULL;
    BridgeObject *b = ab_bridge_for_running_loop(st, &loop);
    if (b == NULL)
        return NULL;
    if (s->py->bridge != NULL && s->py->bridge != b) {
        Py_DECREF(loop);
        PyErr_SetString(PyExc_RuntimeError,
                        "this stream belongs to another event loop than the running one");
        return NULL;
    }
    *bp = b;
    return loop;
}

/* 0, or -1 with an exception: submit the op to the running loop. */
static int
stream_start(StreamObject *s, ab_state *st, BridgeObject *b)
{
    OpPy *py = s->py;
    if (st->exiting && PyThread_get_thread_ident() != st->exit_thread)
        return 0; /* as an Op's pending_forever: nothing resolves it */
    if (st->exiting && ab_courier_ensure() < 0)
        return -1;
    int rc = ab_submit(s->op, &b->native->sink);
    if (rc < 0) {
        abpy_raise(rc, "cannot start the engine");
        return -1;
    }
    py->bridge = (BridgeObject *)Py_NewRef(b);
    ab_bridge_track(b, py);
    s->state = ST_RUNNING;
    return 0;
}

/* New reference: a Future of the running loop, awaited by its iterator
 * (*iter, new reference) after its first step (*first, new reference). */
static PyObject *
new_waiter(StreamObject *s, ab_state *st, PyObject **iter, PyObject **first)
{
    BridgeObject *b = NULL;
    PyObject *loop = running_bridge_loop(s, st, &b);
    if (loop == NULL)
        return NULL;
    if (s->state == ST_INIT && stream_start(s, st, b) < 0) {
        Py_DECREF(loop);
        return NULL;
    }
    PyObject *fut = ab_bridge_new_future(b, st, loop);
    Py_DECREF(loop);
    if (fut != NULL && ab_future_first_wait(fut, iter, first) < 0)
        Py_CLEAR(fut);
    return fut;
}

/* ---- StreamNext: what __anext__, aclose() and __aenter__ return ------------- */

static void
close_native(StreamObject *s)
{
    if (s->state == ST_RUNNING && s->py->bridge != NULL)
        ab_cancel(s->op);
    if (s->state != ST_FINISHED || s->end_error == NULL)
        free_items(s);
    s->state = ST_CLOSED;
}

/* One attempt to finish: PYGEN_RETURN/ERROR, or PYGEN_NEXT to wait. */
static PySendResult
next_try(StreamNextObject *n, ab_state *st, PyObject **presult)
{
    StreamObject *s = n->stream;
    if (n->kind == NEXT_ENTER) {
        *presult = Py_NewRef(s);
        return PYGEN_RETURN;
    }
    if (n->kind == NEXT_CLOSE) {
        if (s->state == ST_INIT) {
            s->state = ST_CLOSED;
            *presult = Py_NewRef(Py_None);
            return PYGEN_RETURN;
        }
        int running = s->state == ST_RUNNING;
        if (s->waiter != NULL) {
            PyErr_SetString(PyExc_RuntimeError,
                            "aclose(): an __anext__ of this stream is still pending");
            return PYGEN_ERROR;
        }
        if (!running || s->py->bridge == NULL) {
            close_native(s);
            *presult = Py_NewRef(Py_None);
            return PYGEN_RETURN;
        }
        close_native(s); /* state CLOSED; the op comes back cancelled */
        return PYGEN_NEXT;
    }
    if (s->head != NULL) {
        ab_item *item = s->head;
        s->head = ab_item_next(item);
        if (s->head == NULL)
            s->tail = NULL;
        PyObject *obj = item_object(s, item);
        ab_item_free(item);
        if (s->state == ST_RUNNING)
            ab_stream_consumed(s->op, 1);
        *presult = obj;
        return obj != NULL ? PYGEN_RETURN : PYGEN_ERROR;
    }
    switch (s->state) {
    case ST_CLOSED:
        PyErr_SetNone(PyExc_StopAsyncIteration);
        return PYGEN_ERROR;
    case ST_FINISHED: {
        s->state = ST_CLOSED;
        if (s->end_error != NULL) {
            PyObject *e = s->end_error;
            s->end_error = NULL;
            ab_err_raise(e);
            return PYGEN_ERROR;
        }
        int err = ab_op_error(s->op);
        if (err == 0) {
            PyErr_SetNone(PyExc_StopAsyncIteration);
            return PYGEN_ERROR;
        }
        ab_err_raise(ab_op_error_exception(s->py, st));
        return PYGEN_ERROR;
    }
    default:
        if (s->waiter != NULL) {
            PyErr_SetString(PyExc_RuntimeError,
                            "anext(): another __anext__ of this stream is already pending");
            return PYGEN_ERROR;
        }
        return PYGEN_NEXT;
    }
}

static PySendResult
next_send(StreamNextObject *n, PyObject *arg, PyObject **presult)
{
    ab_state *st = PyType_GetModuleState(Py_TYPE(n));
    StreamObject *s = n->stream;
    *presult = NULL;
    if (n->done) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited __anext__()/aclose()");
        return PYGEN_ERROR;
    }
    if (n->iter != NULL) { /* resumed: was the Future resolved? */
        PySendResult r = PyIter_Send(n->iter, arg, presult);
        if (r == PYGEN_NEXT)
            return r; /* sent before it was done: wait on */
        Py_XDECREF(*presult);
        *presult = NULL;
        Py_CLEAR(n->iter);
        Py_CLEAR(n->fut);
        if (r == PYGEN_ERROR) {
            n->done = 1;
            return r;
        }
    } else if (arg != Py_None) {
        PyErr_SetString(PyExc_TypeError, "can't send non-None value to a just-started coroutine");
        return PYGEN_ERROR;
    }
    PySendResult r = next_try(n, st, presult);
    if (r != PYGEN_NEXT) {
        n->done = 1;
        return r;
    }
    PyObject *iter = NULL, *first = NULL;
    PyObject *fut = new_waiter(s, st, &iter, &first);
    if (fut == NULL) {
        n->done = 1;
        return PYGEN_ERROR;
    }
    n->fut = fut;
    n->iter = iter;
    if (n->kind == NEXT_CLOSE)
        Py_XSETREF(s->closer, Py_NewRef(fut));
    else
        Py_XSETREF(s->waiter, Py_NewRef(fut));
    *presult = first;
    return PYGEN_NEXT;
}

/* The awaiter stopped waiting: the Future goes, the items stay. */
static void
next_abandon(StreamNextObject *n)
{
    StreamObject *s = n->stream;
    if (n->fut != NULL && s->waiter == n->fut)
        Py_CLEAR(s->waiter);
    Py_CLEAR(n->iter);
    Py_CLEAR(n->fut);
    n->done = 1;
}

static PyObject *
next_send_meth(StreamNextObject *n, PyObject *arg)
{
    PyObject *value;
    PySendResult r = next_send(n, arg, &value);
    return ab_result_of_send(r, value);
}

static PyObject *
next_iternext(StreamNextObject *n)
{
    return next_send_meth(n, Py_None);
}

static PyObject *
next_throw(StreamNextObject *n, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 3) {
        PyErr_Format(PyExc_TypeError, "throw expected 1 to 3 arguments, got %zd", nargs);
        return NULL;
    }
    PyObject *typ = args[0], *val = nargs > 1 ? args[1] : NULL;
    next_abandon(n);
    if (PyExceptionInstance_Check(typ))
        PyErr_SetObject((PyObject *)Py_TYPE(typ), typ);
    else if (PyExceptionClass_Check(typ))
        PyErr_SetObject(typ, val != NULL ? val : Py_None);
    else
        PyErr_SetString(PyExc_TypeError, "exceptions must derive from BaseException");
    return NULL;
}

static PyObject *
next_close(StreamNextObject *n, PyObject *unused)
{
    (void)unused;
    next_abandon(n);
    Py_RETURN_NONE;
}

static PyObject *
next_await(StreamNextObject *n)
{
    return Py_NewRef(n);
}

static int
next_traverse(StreamNextObject *n, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(n));
    Py_VISIT(n->stream);
    Py_VISIT(n->fut);
    Py_VISIT(n->iter);
    return 0;
}

static int
next_clear(StreamNextObject *n)
{
    if (n->stream != NULL && n->fut != NULL && n->stream->waiter == n->fut)
        Py_CLEAR(n->stream->waiter);
    Py_CLEAR(n->iter);
    Py_CLEAR(n->fut);
    Py_CLEAR(n->stream);
    return 0;
}

static void
next_dealloc(StreamNextObject *n)
{
    PyTypeObject *tp = Py_TYPE(n);
    PyObject_GC_UnTrack(n);
    next_clear(n);
    PyObject_GC_Del(n);
    Py_DECREF(tp);
}

static PyMethodDef next_methods[] = {
    {"send", (PyCFunction)next_send_meth, METH_O, "send(value), as coroutine.send."},
    {"throw", (PyCFunction)(void (*)(void))next_throw, METH_FASTCALL,
     "throw(exc): stop waiting (no item is lost) and raise exc."},
    {"close", (PyCFunction)next_close, METH_NOARGS, "close(): stop waiting."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot next_slots[] = {
    {Py_tp_doc, "The awaitable of a Stream's __anext__(), aclose() or __aenter__()."},
    {Py_tp_dealloc, next_dealloc},
    {Py_tp_traverse, next_traverse},
    {Py_tp_clear, next_clear},
    {Py_tp_iter, next_await},
    {Py_tp_iternext, next_iternext},
    {Py_tp_methods, next_methods},
    {Py_am_await, next_await},
    {Py_am_send, next_send},
    {0, NULL},
};

PyType_Spec ab_stream_next_spec = {
    .name = "asyncio_bridge.StreamNext",
    .basicsize = sizeof(StreamNextObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION |
             Py_TPFLAGS_IMMUTABLETYPE,
    .slots = next_slots,
};

static PyObject *
new_next(StreamObject *s, next_kind kind)
{
    ab_state *st = PyType_GetModuleState(Py_TYPE(s));
    StreamNextObject *n = PyObject_GC_New(StreamNextObject, st->stream_next_type);
    if (n == NULL)
        return NULL;
    n->stream = (StreamObject *)Py_NewRef(s);
    n->fut = NULL;
    n->iter = NULL;
    n->kind = kind;
    n->done = 0;
    PyObject_GC_Track(n);
    return (PyObject *)n;
}

/* ---- Stream ------------------------------------------------------------------- */

OpPy *
ab_stream_py(PyObject *stream)
{
    return ((StreamObject *)stream)->py;
}

PyObject *
abpy_wrap_stream(ab_op *op, Py_ssize_t max_buffered)
{
    ab_state *st = ab_global_state;
    OpPy *py = ab_op_owner(op);
    if (st == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "asyncio_bridge is not initialised");
        ab_op_release(op);
        return NULL;
    }
    if (max_buffered < 1 || max_buffered > (1 << 30)) {
        PyErr_Format(PyExc_ValueError, "max_buffered must be between 1 and 2**30, not %zd",
                     max_buffered);
        ab_op_release(op);
        return NULL;
    }
    if (py->face != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "abpy_wrap_stream: op is already wrapped");
        ab_op_release(op);
        return NULL;
    }
    StreamObject *s = PyObject_GC_New(StreamObject, st->stream_type);
    if (s == NULL) {
        ab_op_release(op);
        return NULL;
    }
    if (ab_op_set_stream(op, (int)max_buffered) < 0) {
        PyObject_GC_Del(s);
        ab_op_release(op);
        return PyErr_NoMemory();
    }
    py->op = op;
    py->face = (PyObject *)s;
    py->is_stream = 1;
    s->op = op; /* the caller's reference */
    s->py = py;
    s->max_buffered = (int)max_buffered;
    s->state = ST_INIT;
    s->head = s->tail = NULL;
    s->waiter = s->closer = s->end_error = NULL;
    s->weakreflist = NULL;
    PyObject_GC_Track(s);
    return (PyObject *)s;
}

static PyObject *
stream_aiter(StreamObject *s)
{
    return Py_NewRef(s);
}

static PyObject *
stream_anext(StreamObject *s)
{
    return new_next(s, NEXT_ITEM);
}

static PyObject *
stream_aclose(StreamObject *s, PyObject *unused)
{
    (void)unused;
    return new_next(s, NEXT_CLOSE);
}

static PyObject *
stream_aenter(StreamObject *s, PyObject *unused)
{
    (void)unused;
    return new_next(s, NEXT_ENTER);
}

static PyObject *
stream_aexit(StreamObject *s, PyObject *args)
{
    (void)args;
    return new_next(s, NEXT_CLOSE);
}

static PyObject *
stream_repr(StreamObject *s)
{
    static const char *names[] = {"not started", "running", "finished", "closed"};
    Py_ssize_t n = 0;
    for (ab_item *i = s->head; i != NULL; i = ab_item_next(i))
        n++;
    return PyUnicode_FromFormat("<asyncio_bridge.Stream %s %s, %zd buffered at %p>",
                                ab_op_type_of(s->op)->name, names[s->state], n, s);
}

static int
stream_traverse(StreamObject *s, visitproc visit, void *arg)
{
    OpPy *py = s->py;
    Py_VISIT(Py_TYPE(s));
    Py_VISIT(s->waiter);
    Py_VISIT(s->closer);
    Py_VISIT(s->end_error);
    if (py->bridge != NULL)
        return 0; /* in flight: the bridge shows them */
    for (int i = 0; i < py->nkept; i++)
        Py_VISIT(py->kept[i]);
    for (int i = 0; i < py->nviews; i++)
        Py_VISIT(py->views[i]->obj);
    return 0;
}

static int
stream_clear(StreamObject *s)
{
    Py_CLEAR(s->waiter);
    Py_CLEAR(s->closer);
    Py_CLEAR(s->end_error);
    if (s->py->bridge == NULL)
        ab_op_py_clear(s->py);
    return 0;
}

static void
stream_dealloc(StreamObject *s)
{
    PyTypeObject *tp = Py_TYPE(s);
    PyObject_GC_UnTrack(s);
    if (s->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)s);
    close_native(s); /* dropped: the op is cancelled, its items freed */
    Py_CLEAR(s->waiter);
    Py_CLEAR(s->closer);
    Py_CLEAR(s->end_error);
    s->py->face = NULL;
    ab_op_py_release(s->py);
    ab_op_release(s->op);
    PyObject_GC_Del(s);
    Py_DECREF(tp);
}

static PyMethodDef stream_methods[] = {
    {"aclose", (PyCFunction)stream_aclose, METH_NOARGS,
     "aclose(): cancel the native op and wait until it ended; buffered items are dropped."},
    {"__aenter__", (PyCFunction)stream_aenter, METH_NOARGS, "async with: the stream itself."},
    {"__aexit__", (PyCFunction)stream_aexit, METH_VARARGS, "async with: aclose()."},
    {"__class_getitem__", Py_GenericAlias, METH_O | METH_CLASS,
     "Stream[T]: a stream of T items."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef stream_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(StreamObject, weakreflist), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot stream_slots[] = {
    {Py_tp_doc, "A native stream: an async iterator over the items a native op emits."},
    {Py_tp_dealloc, stream_dealloc},
    {Py_tp_traverse, stream_traverse},
    {Py_tp_clear, stream_clear},
    {Py_tp_repr, stream_repr},
    {Py_tp_methods, stream_methods},
    {Py_tp_members, stream_members},
    {Py_am_aiter, stream_aiter},
    {Py_am_anext, stream_anext},
    {0, NULL},
};

PyType_Spec ab_stream_spec = {
    .name = "asyncio_bridge.Stream",
    .basicsize = sizeof(StreamObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION |
             Py_TPFLAGS_IMMUTABLETYPE,
    .slots = stream_slots,
};
