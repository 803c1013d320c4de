/* op.c: the Op type, a coroutine-like object around an ab_op.
 *
 * Lazy like a coroutine: the first send() submits the native op and yields
 * an asyncio Future; the bridge's drain() resolves that Future on the loop
 * thread, and the next send() returns its result.  throw() and close()
 * (how a Task delivers cancellation) cancel the native op. */
#include "ext.h"

#include <frameobject.h>
#include <limits.h>
#include <structmember.h>

/* ---- the Python side of an ab_op: kept objects and pinned buffers ------- */

/* Borrowed: the op's Python side, in the op's owner area (never NULL). */
static OpPy *
py_of(ab_op *op)
{
    OpPy *py = ab_op_owner(op);
    py->op = op;
    return py;
}

int
abpy_keep(ab_op *op, PyObject *obj)
{
    OpPy *py = py_of(op);
    PyObject **kept = PyMem_Realloc(py->kept, sizeof(*kept) * (py->nkept + 1));
    if (kept == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    py->kept = kept;
    kept[py->nkept] = Py_NewRef(obj);
    return py->nkept++;
}

PyObject *
abpy_kept(ab_op *op, int slot)
{
    OpPy *py = ab_op_owner(op);
    if (slot < 0 || slot >= py->nkept)
        return NULL;
    return py->kept[slot];
}

Py_buffer *
abpy_keep_buffer(ab_op *op, PyObject *obj, int flags)
{
    OpPy *py = py_of(op);
    if (py->nviews == USHRT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "abpy_keep_buffer: too many buffers for one op");
        return NULL;
    }
    Py_buffer **views = PyMem_Realloc(py->views, sizeof(*views) * (py->nviews + 1));
    if (views == NULL)
        return (Py_buffer *)PyErr_NoMemory();
    py->views = views;
    Py_buffer *view = PyMem_Malloc(sizeof(*view));
    if (view == NULL)
        return (Py_buffer *)PyErr_NoMemory();
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        PyMem_Free(view);
        return NULL;
    }
    views[py->nviews++] = view;
    return view;
}

PyObject *
abpy_python_outcome(ab_op *op)
{
    return ((OpPy *)ab_op_owner(op))->outcome;
}

/* New reference: cr_origin as a coroutine made here would have it (the
 * innermost `depth` frames of the caller, as (filename, lineno, name)),
 * or None when origin tracking is off; NULL with an exception set. */
static PyObject *
make_origin(void)
{
    /* sys.get_coroutine_origin_tracking_depth(), read where CPython keeps
     * it (a Python call here cost 125 instructions of every op). */
    int depth = PyThreadState_Get()->coroutine_origin_tracking_depth;
    if (depth <= 0)
        return Py_NewRef(Py_None);
    PyObject *frames = PyList_New(0);
    PyFrameObject *f = PyEval_GetFrame();
    Py_XINCREF(f);
    for (int i = 0; f != NULL && i < depth && frames != NULL; i++) {
        PyCodeObject *code = PyFrame_GetCode(f);
        PyObject *entry = Py_BuildValue("(OiO)", code->co_filename, PyFrame_GetLineNumber(f),
                                        code->co_name);
        Py_DECREF(code);
        if (entry == NULL || PyList_Append(frames, entry) < 0)
            Py_CLEAR(frames);
        Py_XDECREF(entry);
        PyFrameObject *back = PyFrame_GetBack(f);
        Py_DECREF(f);
        f = back;
    }
    Py_XDECREF(f);
    if (frames == NULL)
        return NULL;
    PyObject *origin = PyList_AsTuple(frames);
    Py_DECREF(frames);
    return origin;
}

static PyObject *
wrap(ab_op *op, int settled)
{
    OpPy *py = py_of(op);
    ab_state *st = ab_global_state;
    if (st == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "asyncio_bridge is not initialised");
        ab_op_release(op);
        return NULL;
    }
    if (py->face != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "abpy_wrap: op is already wrapped");
        ab_op_release(op);
        return NULL;
    }
    PyObject *origin = make_origin();
    if (origin == NULL) {
        ab_op_release(op);
        return NULL;
    }
    OpObject *self = PyObject_GC_New(OpObject, st->op_type);
    if (self == NULL) {
        Py_DECREF(origin);
        ab_op_release(op);
        return NULL;
    }
    self->op = op; /* the caller's reference */
    self->py = py;
    self->phase = OP_INIT;
    self->settled = (char)settled;
    self->running = 0;
    self->origin = origin == Py_None ? NULL : origin;
    if (origin == Py_None)
        Py_DECREF(origin);
    self->frame = NULL;
    self->weakreflist = NULL;
    py->face = (PyObject *)self;
    py->is_stream = 0;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

PyObject *
abpy_wrap(ab_op *op)
{
    return wrap(op, 0);
}

PyObject *
abpy_wrap_settled(ab_op *op)
{
    return wrap(op, 1);
}

/* Drop what the Python side holds; GIL.  Only when no native code uses
 * the op any more (never submitted, or collected). */
static void
py_clear(OpPy *py)
{
    Py_CLEAR(py->iter);
    Py_CLEAR(py->future);
    Py_CLEAR(py->context);
    Py_CLEAR(py->task);
    Py_CLEAR(py->outcome);
    for (int i = 0; i < py->nkept; i++)
        Py_CLEAR(py->kept[i]);
    for (int i = 0; i < py->nviews; i++) {
        PyBuffer_Release(py->views[i]);
        PyMem_Free(py->views[i]);
    }
    py->nviews = 0;
    PyMem_Free(py->views);
    py->views = NULL;
}

static void
py_free(OpPy *py)
{
    py_clear(py);
    PyMem_Free(py->kept);
    py->kept = NULL;
    py->nkept = 0;
    py->op = NULL; /* nothing left for the release hook */
}

/* The owner side lets go of the Python side once neither the Op object
 * nor the engine (in flight) needs it, whatever references the engine's
 * inbox still holds: the engine may drop the native op's last reference,
 * and must find no Python there. */
static void
py_maybe_free(OpPy *py)
{
    if (py->face == NULL && py->bridge == NULL)
        py_free(py);
}

void ab_op_py_clear(OpPy *py) { py_clear(py); }
void ab_op_py_release(OpPy *py) { py_maybe_free(py); }

/* Release hook: for an op never wrapped, whose creator released it (GIL
 * held, never submitted); wrapped ops have no owner data left here. */
static void
release_hook(ab_op *op)
{
    OpPy *py = ab_op_owner(op);
    if (py->op == NULL)
        return;
    if (PyGILState_Check()) {
        py_free(py);
        return;
    }
    /* The last reference went on a thread without the GIL (a library's
     * callback thread, after its creator failed to wrap the op). */
#if PY_VERSION_HEX >= 0x030D0000
    int finalizing = Py_IsFinalizing();
#else
    int finalizing = _Py_IsFinalizing();
#endif
    if (!Py_IsInitialized() || finalizing)
        return; /* leaked: Python cannot run here any more */
    PyGILState_STATE g = PyGILState_Ensure();
    py_free(py);
    PyGILState_Release(g);
}

/* ---- results --------------------------------------------------------------- */

/* A type's callback returned NULL: new reference to the exception it set,
 * or a SystemError naming the type and the callback if what it set cannot
 * be raised from an await (nothing, a non-exception, StopIteration or
 * StopAsyncIteration, which a Future refuses and a coroutine may not
 * raise).  Never NULL unless memory runs out. */
PyObject *
ab_callback_exception(const char *type_name, const char *callback)
{
    PyObject *exc = ab_err_take();
    const char *what = NULL;
    if (exc == NULL)
        what = "returned NULL without setting an exception";
    else if (!PyExceptionInstance_Check(exc))
        what = "set an exception that is not a BaseException instance";
    else if (PyErr_GivenExceptionMatches(exc, PyExc_StopIteration) ||
             PyErr_GivenExceptionMatches(exc, PyExc_StopAsyncIteration))
        what = "raised StopIteration or StopAsyncIteration, which an await cannot pass on";
    if (what == NULL)
        return exc;
    PyErr_Format(PyExc_SystemError, "%s: its %s callback %s", type_name, callback, what);
    PyObject *err = ab_err_take();
    if (err != NULL && exc != NULL && PyExceptionInstance_Check(exc))
        PyException_SetCause(err, Py_NewRef(exc));
    Py_XDECREF(exc);
    return err;
}

/* The outcome of a type's to_python-like callback: r itself, or NULL with
 * the exception set that the awaiter should see. */
PyObject *
ab_checked_result(PyObject *r, const char *type_name, const char *callback)
{
    if (r != NULL && !PyErr_Occurred())
        return r;
    if (r != NULL) { /* a result with an exception set: a broken callback */
        Py_DECREF(r);
        PyObject *set = ab_err_take();
        PyErr_Format(PyExc_SystemError, "%s: its %s callback returned a result with an "
                     "exception set", type_name, callback);
        if (set != NULL) {
            PyObject *err = ab_err_take();
            PyException_SetCause(err, set);
            ab_err_raise(err);
        }
        return NULL;
    }
    ab_err_raise(ab_callback_exception(type_name, callback));
    return NULL;
}

/* New reference: the result of a successfully finished op. */
static PyObject *
result_object(OpPy *py)
{
    ab_op *op = py->op;
    size_t len;
    const char *data;
    switch (ab_op_result_kind(op)) {
    case AB_RESULT_NONE:
        Py_RETURN_NONE;
    case AB_RESULT_INT:
        return PyLong_FromLongLong(ab_op_result_int(op));
    case AB_RESULT_FLOAT:
        return PyFloat_FromDouble(ab_op_result_float(op));
    case AB_RESULT_BYTES:
        data = ab_op_result_data(op, &len);
        return PyBytes_FromStringAndSize(data, (Py_ssize_t)len);
    case AB_RESULT_STR:
        data = ab_op_result_data(op, &len);
        return PyUnicode_DecodeUTF8(data, (Py_ssize_t)len, "strict");
    case AB_RESULT_KEPT: {
        int slot = *(const int *)ab_op_result_data(op, &len);
        PyObject *obj = abpy_kept(op, slot);
        if (obj == NULL)
            PyErr_Format(PyExc_RuntimeError, "%s: returned empty slot %d",
                         ab_op_type_of(op)->name, slot);
        return Py_XNewRef(obj);
    }
    case AB_RESULT_PYTHON:
        if (py->outcome == NULL)
            Py_RETURN_NONE;
        return Py_NewRef(py->outcome);
    case AB_RESULT_CUSTOM:
        if (ab_op_type_of(op)->to_python == NULL) {
            PyErr_Format(PyExc_RuntimeError, "%s: custom result without to_python",
                         ab_op_type_of(op)->name);
            return NULL;
        }
        return ab_checked_result(ab_op_type_of(op)->to_python(op), ab_op_type_of(op)->name,
                                 "to_python");
    }
    PyErr_SetString(PyExc_RuntimeError, "unknown result kind");
    return NULL;
}

/* New reference: the exception for a failed op. */
static PyObject *
error_object(OpPy *py, ab_state *st)
{
    ab_op *op = py->op;
    int err = ab_op_error(op);
    const ab_op_type *type = ab_op_type_of(op);
    if (err == AB_EPYTHON && py->outcome != NULL && PyExceptionInstance_Check(py->outcome))
        return Py_NewRef(py->outcome);
    if (err <= AB_EUSER && type->raise_error != NULL) {
        PyObject *r = type->raise_error(op, err);
        Py_XDECREF(r); /* it should return NULL; a value is ignored */
        return ab_callback_exception(type->name, "raise_error");
    }
    return abpy_exception_for(st, err, ab_op_error_message(op));
}

PyObject *
ab_op_error_exception(OpPy *py, ab_state *st)
{
    return error_object(py, st);
}

static int
call_method_void(PyObject *obj, PyObject *name, PyObject *arg)
{
    PyObject *r = arg ? PyObject_CallMethodOneArg(obj, name, arg)
                      : PyObject_CallMethodNoArgs(obj, name);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* 1 if the future is done, 0 if not, -1 with an exception. */
static int
future_done(ab_state *st, PyObject *fut)
{
    PyObject *r = PyObject_CallMethodNoArgs(fut, st->str_done);
    if (r == NULL)
        return -1;
    int done = PyObject_IsTrue(r);
    Py_DECREF(r);
    return done;
}

/* fut.set_result(value) or set_exception(exc), unless the Future was
 * cancelled meanwhile (decided here, on the loop thread, where nothing can
 * change it between the look and the call). */
/* For error paths: whether fut is done, with any exception kept. */
static int
future_is_done(ab_state *st, PyObject *fut)
{
    PyObject *exc = ab_err_take();
    int done = future_done(st, fut) > 0;
    PyErr_Clear();
    ab_err_raise(exc);
    return done;
}

static int
settle_call(ab_state *st, PyObject *fut, PyObject *method, PyObject *arg)
{
    if (call_method_void(fut, method, arg) == 0)
        return 0;
    if (!PyErr_ExceptionMatches(st->invalid_state_error))
        return -1;
    PyErr_Clear(); /* cancelled: never set a result on it */
    return 0;
}

static int
settle_future(OpPy *py, ab_state *st)
{
    PyObject *fut = py->future;
    int err = ab_op_error(py->op);
    /* Cancelled, or nobody can await it any more (the Op is gone, closed,
     * or thrown into): an outcome set now would only be "never retrieved". */
    if (err == -ECANCELED || ab_py_op(py) == NULL || ab_py_op(py)->phase == OP_DONE) {
        int done = future_done(st, fut);
        if (done != 0)
            return done < 0 ? -1 : 0;
        return call_method_void(fut, st->str_cancel, NULL);
    }
    PyObject *value = err == 0 ? result_object(py) : NULL;
    int rc;
    if (value != NULL) {
        rc = settle_call(st, fut, st->str_set_result, value);
        Py_DECREF(value);
        return rc;
    }
    PyObject *exc = err == 0 ? ab_err_take() : error_object(py, st);
    if (exc == NULL)
        return -1;
    rc = settle_call(st, fut, st->str_set_exception, exc);
    Py_DECREF(exc);
    if (rc < 0) {
        /* The Future refused the exception: the awaiter gets that refusal
         * rather than waiting for ever. */
        PyObject *why = ab_err_take();
        if (why != NULL && PyErr_GivenExceptionMatches(why, PyExc_Exception) &&
            !PyErr_GivenExceptionMatches(why, PyExc_StopIteration))
            rc = settle_call(st, fut, st->str_set_exception, why);
        else
            rc = call_method_void(fut, st->str_cancel, NULL);
        Py_XDECREF(why);
    }
    return rc;
}

/* drain(), for an op whose AB_MSG_FINISHED arrived: resolve its Future
 * unless cancelled, then collect it.  Returns -1 with an exception if the
 * Future refused (the op is collected anyway).  py may be freed. */
int
ab_op_resolve(OpPy *py, ab_state *st)
{
    int rc = py->future != NULL ? settle_future(py, st) : 0;
    if (py->is_stream)
        ab_stream_finished(py, st);
    ab_op_forget(py);
    return rc;
}

/* The op is finished, or its engine is gone: untrack it and drop the
 * engine's reference.  py may be freed. */
void
ab_op_forget(OpPy *py)
{
    BridgeObject *b = py->bridge;
    if (b == NULL)
        return;
    ab_bridge_untrack(b, py);
    py->bridge = NULL;
    if (py->is_stream)
        ab_stream_lost(py, ab_global_state);
    if (py->exit_op && ab_global_state != NULL) {
        py->exit_op = 0;
        ab_global_state->exit_ops--;
    }
    ab_op *op = py->op;
    /* An Op or Stream object holds a reference until its dealloc. */
    int held = py->face != NULL;
    py_maybe_free(py);
    if (held)
        ab_op_collect_held(op);
    else
        ab_op_collect(op);
    Py_DECREF(b);
}

/* ---- awaiting a Python awaitable for the state machine ------------------- */

static void
python_finished(OpPy *py, PyObject *outcome, int failed)
{
    Py_XSETREF(py->outcome, outcome);
    ab_python_done(py->op, failed);
}

/* The awaitable cannot run any more (its loop is closed or gone, or
 * nothing awaits the op): the step resumes with AB_EV_CANCEL. */
static void
python_skipped(OpPy *py, ab_state *st)
{
    /* Without the module (finalization) the answer needs no object. */
    Py_XSETREF(py->outcome, st != NULL ? PyObject_CallNoArgs(st->cancelled_error) : NULL);
    PyErr_Clear();
    ab_python_skipped(py->op);
}

/* Done callback of the inner task; self is the Op (or Stream) object,
 * which the callback keeps alive until then. */
static PyObject *
python_done_cb(PyObject *self, PyObject *task)
{
    ab_state *st = PyType_GetModuleState(Py_TYPE(self));
    OpPy *py = Py_TYPE(self) == st->stream_type ? ab_stream_py(self) : ((OpObject *)self)->py;
    PyObject *outcome;
    int failed = 1;
    Py_CLEAR(py->task);
    PyObject *cancelled = PyObject_CallMethodNoArgs(task, st->str_cancelled);
    if (cancelled == NULL)
        return NULL;
    int is_cancelled = PyObject_IsTrue(cancelled);
    Py_DECREF(cancelled);
    if (is_cancelled) {
        outcome = PyObject_CallNoArgs(st->cancelled_error);
    } else {
        outcome = PyObject_CallMethodNoArgs(task, st->str_exception);
        if (outcome == Py_None) {
            Py_DECREF(outcome);
            outcome = PyObject_CallMethodNoArgs(task, st->str_result);
            failed = 0;
        }
    }
    if (outcome == NULL) {
        outcome = ab_err_take();
        failed = 1;
    }
    python_finished(py, outcome, failed);
    Py_RETURN_NONE;
}

static PyMethodDef python_done_def = {"_python_done", python_done_cb, METH_O, NULL};

/* New reference: the task running callable() in the op's context. */
static PyObject *
start_python(OpPy *py, ab_state *st, PyObject *callable)
{
    PyObject *loop = PyWeakref_GetObject(py->bridge->loop_ref), *task = NULL;
    if (loop == Py_None) {
        PyErr_SetString(PyExc_RuntimeError, "the event loop is gone");
        return NULL;
    }
    if (py->context != NULL && PyContext_Enter(py->context) < 0)
        return NULL;
    PyObject *coro = PyObject_CallNoArgs(callable);
    if (py->context != NULL)
        PyContext_Exit(py->context);
    if (coro == NULL)
        return NULL;
    if (PyCoro_CheckExact(coro)) {
        PyObject *create_task = PyObject_GetAttr(loop, st->str_create_task);
        PyObject *kw = py->context != NULL ? Py_BuildValue("{s:O}", "context", py->context)
                                           : PyDict_New();
        if (create_task != NULL && kw != NULL)
            task = PyObject_VectorcallDict(create_task, &coro, 1, kw);
        Py_XDECREF(create_task);
        Py_XDECREF(kw);
    } else { /* a Future or another awaitable: asyncio.ensure_future(aw, loop=loop) */
        PyObject *args[2] = {coro, loop};
        task = PyObject_Vectorcall(st->ensure_future, args, 1, st->kw_loop);
    }
    if (task == NULL) {
        /* not scheduled: close it rather than leave it "never awaited" */
        PyObject *exc = ab_err_take();
        PyObject *r = PyObject_CallMethod(coro, "close", NULL);
        Py_XDECREF(r);
        PyErr_Clear();
        ab_err_raise(exc);
    }
    Py_DECREF(coro);
    return task;
}

/* drain(), for AB_MSG_PYTHON: call the kept callable in the op's context
 * and run what it returns as a task on this loop.  Any failure to start,
 * or an op nobody awaits any more, becomes the outcome, so the state
 * machine always resumes. */
void
ab_op_run_python(OpPy *py, ab_state *st)
{
    PyObject *callable = abpy_kept(py->op, ab_op_python_slot(py->op)), *task, *cb;
    /* Armed after a cancel, it runs as any wait does (a teardown may need
     * it), as long as its loop runs and the Op it reports to lives. */
    if (py->face == NULL || py->bridge == NULL || py->bridge->native == NULL ||
        atomic_load(&py->bridge->native->dead)) {
        python_skipped(py, st);
        return;
    }
    if (callable == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "ab_await_python: empty slot");
        goto fail;
    }
    task = start_python(py, st, callable);
    if (task == NULL)
        goto fail;
    cb = PyCFunction_New(&python_done_def, py->face);
    if (cb == NULL || call_method_void(task, st->str_add_done_callback, cb) < 0) {
        PyObject *exc = ab_err_take();
        PyObject *r = PyObject_CallMethodNoArgs(task, st->str_cancel);
        Py_XDECREF(r);
        PyErr_Clear();
        Py_XDECREF(cb);
        Py_DECREF(task);
        ab_err_raise(exc);
        goto fail;
    }
    Py_DECREF(cb);
    Py_XSETREF(py->task, task);
    return;
fail:
    python_finished(py, ab_err_take(), 1);
}

/* ---- the coroutine protocol ------------------------------------------------ */

/* The awaiter stopped awaiting: cancel the native op and its Python await. */
static void
stop_native(OpObject *self, ab_state *st)
{
    OpPy *py = self->py;
    if (self->phase == OP_WAITING && py->bridge != NULL) {
        ab_cancel(self->op);
        if (py->task != NULL && st != NULL) {
            PyObject *r = PyObject_CallMethodNoArgs(py->task, st->str_cancel);
            if (r == NULL)
                PyErr_WriteUnraisable((PyObject *)self);
            Py_XDECREF(r);
        }
    }
    self->phase = OP_DONE;
}

/* The op's loop is closed or gone: cancel the native op and answer a
 * pending Python await at once, since its task will never run. */
void
ab_op_abort(OpPy *py, ab_state *st)
{
    if (ab_py_op(py) != NULL)
        ab_py_op(py)->phase = OP_DONE;
    ab_cancel(py->op);
    if (py->task != NULL) {
        Py_CLEAR(py->task);
        python_skipped(py, st);
    }
}

/* Await fut through its own iterator, as `await fut` does: the first step
 * marks it blocking and yields it (*presult, new reference); resuming the
 * iterator (*iter, new reference) later returns its result or raises, with
 * no method calls.  0, or -1 with an exception set. */
int
ab_future_first_wait(PyObject *fut, PyObject **iter, PyObject **presult)
{
    PyAsyncMethods *am = Py_TYPE(fut)->tp_as_async;
    if (am == NULL || am->am_await == NULL) {
        PyErr_Format(PyExc_TypeError, "create_future() returned a non-awaitable %.100s",
                     Py_TYPE(fut)->tp_name);
        return -1;
    }
    PyObject *it = am->am_await(fut);
    if (it == NULL)
        return -1;
    if (PyIter_Send(it, Py_None, presult) != PYGEN_NEXT) {
        Py_XDECREF(*presult);
        *presult = NULL;
        Py_DECREF(it);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "create_future() returned a finished Future");
        return -1;
    }
    *iter = it;
    return 0;
}

static int
first_wait(OpPy *py, PyObject *fut, PyObject **presult)
{
    return ab_future_first_wait(fut, &py->iter, presult);
}

/* New reference: a Future of b's loop (running now); NULL with an
 * exception set.  A direct Future is called with the bridge's own dict of
 * keywords, loop=loop (ext.h): a call by keyword names would build a dict
 * for every op, and Future() without its loop looks the running loop up
 * again (and calls getpid() on 3.11). */
PyObject *
ab_bridge_new_future(BridgeObject *b, ab_state *st, PyObject *loop)
{
    PyObject *kw = b->future_kw;
    if (kw == NULL)
        return PyObject_CallMethodNoArgs(loop, st->str_create_future);
    if (!b->future_kw_loop) {
        if (PyDict_SetItem(kw, st->str_loop, loop) < 0)
            return NULL;
        b->future_kw_loop = 1;
    }
    PyObject *fut = PyObject_Call(st->future_type, st->empty_tuple, kw);
    /* Ops in flight keep it there until the last one is untracked; if
     * none is, this one may never be. */
    if (b->in_flight == 0)
        ab_bridge_drop_loop(b);
    return fut;
}

/* The interpreter is exiting and this is not the thread that runs the
 * atexit handlers (a loop in a daemon thread still runs): the op waits on
 * a Future nothing resolves, as everything in flight does now, rather
 * than raise into that thread or start threads under finalization. */
static PySendResult
pending_forever(OpObject *self, ab_state *st, PyObject **presult)
{
    PyObject *loop = PyObject_CallNoArgs(st->get_running_loop);
    if (loop == NULL)
        return PYGEN_ERROR;
    PyObject *fut = PyObject_CallMethodNoArgs(loop, st->str_create_future);
    Py_DECREF(loop);
    if (fut == NULL || first_wait(self->py, fut, presult) < 0) {
        Py_XDECREF(fut);
        return PYGEN_ERROR;
    }
    self->py->future = fut;
    self->phase = OP_WAITING;
    return PYGEN_NEXT;
}

static PySendResult
op_start(OpObject *self, ab_state *st, PyObject **presult)
{
    OpPy *py = self->py;
    PyObject *loop = NULL, *fut = NULL;
    self->phase = OP_DONE; /* unless it starts */
    if (ab_global_state != st) {
        PyErr_SetString(PyExc_RuntimeError,
                        "asyncio_bridge: this interpreter has ended its use of the library");
        return PYGEN_ERROR;
    }
    int exiting = st->exiting;
    if (exiting && PyThread_get_thread_ident() != st->exit_thread)
        return pending_forever(self, st, presult);
    /* An atexit handler that runs after ours: the threads start again, and
     * ab_exit_quiesce stops them once its ops are done. */
    if (exiting && ab_courier_ensure() < 0)
        return PYGEN_ERROR;
    BridgeObject *b = ab_bridge_for_running_loop(st, &loop);
    if (b == NULL)
        return PYGEN_ERROR;
    fut = ab_bridge_new_future(b, st, loop);
    if (fut == NULL) {
        Py_DECREF(loop);
        return PYGEN_ERROR;
    }
    if ((ab_op_type_of(self->op)->flags & AB_TYPE_AWAITS_PYTHON) &&
        (py->context = PyContext_CopyCurrent()) == NULL)
        goto fail;
    if (first_wait(py, fut, presult) < 0)
        goto fail;
    /* A burst of submits from this loop wakes the engine once, from the
     * loop's next iteration; during the interpreter's exit, at once. */
    int wake_owed = 0;
    int rc = exiting ? ab_submit(self->op, &b->native->sink)
                     : ab_submit_deferred(self->op, &b->native->sink, &wake_owed);
    if (rc < 0) {
        abpy_raise(rc, "cannot start the engine");
        Py_CLEAR(*presult);
        Py_CLEAR(py->iter);
        goto fail;
    }
    py->future = fut;
    py->bridge = (BridgeObject *)Py_NewRef(b);
    ab_bridge_track(b, py);
    if (exiting) {
        py->exit_op = 1;
        st->exit_ops++;
    }
    self->phase = OP_WAITING;
    if (wake_owed)
        ab_bridge_owe_wake(b, st, loop);
    else
        b->submitted_since_drain = 1;
    Py_DECREF(loop);
    return PYGEN_NEXT;
fail:
    Py_XDECREF(loop);
    Py_DECREF(fut);
    return PYGEN_ERROR;
}

/* A settled op's outcome, after its one yield. */
static PySendResult
settled_outcome(OpObject *self, ab_state *st, PyObject **presult)
{
    self->phase = OP_DONE;
    if (ab_op_error(self->op) == 0) {
        *presult = result_object(self->py);
        return *presult != NULL ? PYGEN_RETURN : PYGEN_ERROR;
    }
    ab_err_raise(error_object(self->py, st));
    return PYGEN_ERROR;
}

static PySendResult
op_resume(OpObject *self, ab_state *st, PyObject **presult)
{
    OpPy *py = self->py;
    if (self->settled)
        return settled_outcome(self, st, presult);
    PySendResult r = PyIter_Send(py->iter, Py_None, presult);
    /* Sent again before the Future is done: as a coroutine awaiting it,
     * yield the Future again (the task reset its blocking flag) or fail
     * with "await wasn't used with future", which ends the op. */
    if (r == PYGEN_NEXT)
        return r;
    if (r == PYGEN_ERROR && !future_is_done(st, py->future)) {
        /* The native op comes back cancelled and cancels the Future. */
        PyObject *exc = ab_err_take();
        stop_native(self, st);
        Py_CLEAR(py->iter);
        ab_err_raise(exc);
        return r;
    }
    self->phase = OP_DONE;
    Py_CLEAR(py->iter);
    Py_CLEAR(py->future);
    return r;
}

static PySendResult
op_send_locked(OpObject *self, ab_state *st, PyObject *arg, PyObject **presult)
{
    switch (self->phase) {
    case OP_INIT:
        if (arg != Py_None) {
            PyErr_SetString(PyExc_TypeError,
                            "can't send non-None value to a just-started coroutine");
            return PYGEN_ERROR;
        }
        if (self->settled) { /* one loop iteration, as asyncio.sleep(0) */
            self->phase = OP_WAITING;
            *presult = Py_NewRef(Py_None);
            return PYGEN_NEXT;
        }
        return op_start(self, st, presult);
    case OP_WAITING:
        return op_resume(self, st, presult);
    default:
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
        return PYGEN_ERROR;
    }
}

/* 0, or -1 with ValueError if the op is running (a re-entrant call). */
static int
enter(OpObject *self)
{
    if (self->running) {
        PyErr_SetString(PyExc_ValueError, "coroutine already executing");
        return -1;
    }
    self->running = 1;
    return 0;
}

static PySendResult
op_am_send(OpObject *self, PyObject *arg, PyObject **presult)
{
    ab_state *st = PyType_GetModuleState(Py_TYPE(self));
    *presult = NULL;
    if (enter(self) < 0)
        return PYGEN_ERROR;
    PySendResult r = op_send_locked(self, st, arg, presult);
    self->running = 0;
    return r;
}

/* What send() returns for a PySendResult (steals value): the value
 * yielded, or NULL with StopIteration(value) or the exception set. */
PyObject *
ab_result_of_send(PySendResult r, PyObject *value)
{
    if (r == PYGEN_NEXT)
        return value;
    if (r == PYGEN_RETURN) {
        if (value == Py_None)
            PyErr_SetNone(PyExc_StopIteration);
        else {
            PyObject *exc = PyObject_CallOneArg(PyExc_StopIteration, value);
            if (exc != NULL) {
                PyErr_SetObject(PyExc_StopIteration, exc);
                Py_DECREF(exc);
            }
        }
        Py_DECREF(value);
    }
    return NULL;
}

static PyObject *
op_send(OpObject *self, PyObject *arg)
{
    PyObject *value;
    PySendResult r = op_am_send(self, arg, &value);
    return ab_result_of_send(r, value);
}

static PyObject *
op_iternext(OpObject *self)
{
    PyObject *value;
    PySendResult r = op_am_send(self, Py_None, &value);
    if (r == PYGEN_RETURN && value == Py_None) {
        Py_DECREF(value);
        return NULL; /* StopIteration without an object */
    }
    return ab_result_of_send(r, value);
}

/* New reference: the exception throw(typ, val, tb) raises, or NULL with
 * the TypeError for arguments that make none. */
static PyObject *
exception_to_throw(PyObject *typ, PyObject *val, PyObject *tb)
{
    if (tb == Py_None)
        tb = NULL;
    if (tb != NULL && !PyTraceBack_Check(tb)) {
        PyErr_SetString(PyExc_TypeError, "throw() third argument must be a traceback object");
        return NULL;
    }
    PyObject *exc;
    if (PyExceptionClass_Check(typ)) {
        if (val != NULL && PyObject_TypeCheck(val, (PyTypeObject *)typ))
            exc = Py_NewRef(val);
        else if (val == NULL || val == Py_None)
            exc = PyObject_CallNoArgs(typ);
        else
            exc = PyObject_CallOneArg(typ, val);
        if (exc == NULL)
            return NULL;
        if (!PyExceptionInstance_Check(exc)) {
            PyErr_Format(PyExc_TypeError, "calling %R should have returned an exception", typ);
            Py_DECREF(exc);
            return NULL;
        }
    } else if (PyExceptionInstance_Check(typ)) {
        if (val != NULL && val != Py_None) {
            PyErr_SetString(PyExc_TypeError, "instance exception may not have a separate value");
            return NULL;
        }
        exc = Py_NewRef(typ);
    } else {
        PyErr_Format(PyExc_TypeError,
                     "exceptions must be classes or instances deriving from BaseException, "
                     "not %s",
                     Py_TYPE(typ)->tp_name);
        return NULL;
    }
    if (tb != NULL)
        PyException_SetTraceback(exc, tb);
    return exc;
}

static PyObject *
op_throw(OpObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 3) {
        PyErr_Format(PyExc_TypeError, "throw expected 1 to 3 arguments, got %zd", nargs);
        return NULL;
    }
#if PY_VERSION_HEX >= 0x030C0000
    if (nargs > 1 && PyErr_WarnEx(PyExc_DeprecationWarning,
                                  "the (type, exc, tb) signature of throw() is deprecated, "
                                  "use the single-arg signature instead.",
                                  1) < 0)
        return NULL;
#endif
    if (self->phase == OP_DONE) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
        return NULL;
    }
    if (enter(self) < 0)
        return NULL;
    stop_native(self, PyType_GetModuleState(Py_TYPE(self)));
    PyObject *exc = exception_to_throw(args[0], nargs > 1 ? args[1] : NULL,
                                       nargs > 2 ? args[2] : NULL);
    ab_err_raise(exc);
    self->running = 0;
    return NULL;
}

static PyObject *
op_close(OpObject *self, PyObject *unused)
{
    (void)unused;
    if (enter(self) < 0)
        return NULL;
    stop_native(self, PyType_GetModuleState(Py_TYPE(self)));
    self->running = 0;
    Py_RETURN_NONE;
}

static PyObject *
op_await(OpObject *self)
{
    if (self->phase == OP_WAITING) {
        PyErr_SetString(PyExc_RuntimeError, "coroutine is being awaited already");
        return NULL;
    }
    if (self->phase == OP_DONE) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
        return NULL;
    }
    return Py_NewRef(self);
}

/* ---- introspection, as a coroutine's ----------------------------------------- */

static PyObject *
op_get_name(OpObject *self, void *closure)
{
    (void)closure;
    return PyUnicode_FromString(ab_op_type_of(self->op)->name);
}

/* New reference: the code object shown for ops of this type (one per
 * type, made on first use), or NULL with an exception set. */
static PyObject *
op_code(OpObject *self)
{
    ab_state *st = PyType_GetModuleState(Py_TYPE(self));
    const ab_op_type *type = ab_op_type_of(self->op);
    PyObject *key = PyLong_FromVoidPtr((void *)type);
    if (key == NULL)
        return NULL;
    PyObject *code = PyDict_GetItemWithError(st->codes, key);
    if (code != NULL || PyErr_Occurred()) {
        Py_DECREF(key);
        return Py_XNewRef(code);
    }
    code = (PyObject *)PyCode_NewEmpty("<asyncio_bridge>", type->name, 1);
    if (code != NULL && PyDict_SetItem(st->codes, key, code) < 0)
        Py_CLEAR(code);
    Py_DECREF(key);
    return code;
}

static PyObject *
op_get_cr_code(OpObject *self, void *closure)
{
    (void)closure;
    return op_code(self);
}

/* A frame that names the op, so that Task.get_stack(), print_stack() and
 * monitors show where a task waits; None once it is done. */
static PyObject *
op_get_cr_frame(OpObject *self, void *closure)
{
    (void)closure;
    if (self->phase == OP_DONE)
        Py_RETURN_NONE;
    if (self->frame == NULL) {
        ab_state *st = PyType_GetModuleState(Py_TYPE(self));
        PyObject *code = op_code(self);
        if (code == NULL)
            return NULL;
        self->frame = (PyObject *)PyFrame_New(PyThreadState_Get(), (PyCodeObject *)code,
                                              st->frame_globals, NULL);
        Py_DECREF(code);
        if (self->frame == NULL)
            return NULL;
    }
    return Py_NewRef(self->frame);
}

static PyObject *
op_get_cr_running(OpObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->running);
}

static PyObject *
op_get_cr_suspended(OpObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->phase == OP_WAITING && !self->running);
}

static PyObject *
op_get_cr_await(OpObject *self, void *closure)
{
    (void)closure;
    PyObject *fut = self->phase == OP_WAITING ? self->py->future : NULL;
    return Py_NewRef(fut != NULL ? fut : Py_None);
}

static PyObject *
op_get_cr_origin(OpObject *self, void *closure)
{
    (void)closure;
    return Py_NewRef(self->origin != NULL ? self->origin : Py_None);
}

/* What a waiting op waits for, in words. */
static PyObject *
waiting_for(OpObject *self)
{
    OpPy *py = self->py;
    ab_waiting w;
    if (self->settled)
        return PyUnicode_FromString("yielding once, its result ready");
    if (py->bridge == NULL)
        return PyUnicode_FromString("waiting for its result");
    ab_op_waiting(self->op, &w);
    switch (w.kind) {
    case AB_WAITING_TIMER:
        return PyUnicode_FromString("waiting for a timer");
    case AB_WAITING_FD:
        return PyUnicode_FromFormat("waiting for fd %d to be %s", w.fd,
                                    w.events == AB_EV_READ    ? "readable"
                                    : w.events == AB_EV_WRITE ? "writable"
                                                              : "readable or writable");
    case AB_WAITING_WORK:
        return PyUnicode_FromString("waiting for a function on the worker pool");
    case AB_WAITING_PYTHON:
        if (py->task != NULL)
            return PyUnicode_FromFormat("waiting for %R", py->task);
        return PyUnicode_FromString("waiting for a Python awaitable");
    case AB_WAITING_CANCEL:
        return PyUnicode_FromString("waiting until cancelled");
    case AB_WAITING_SIGNAL:
        return PyUnicode_FromString("waiting for a signal from another thread");
    case AB_WAITING_FDS:
        return PyUnicode_FromString("waiting for a set of fds");
    case AB_WAITING_DEMAND:
        return PyUnicode_FromString("waiting for its consumer");
    case AB_WAITING_NOTHING:
        break;
    }
    return PyUnicode_FromString("waiting for the engine");
}

static PyObject *
op_repr(OpObject *self)
{
    const char *name = ab_op_type_of(self->op)->name;
    if (self->phase == OP_INIT)
        return PyUnicode_FromFormat("<asyncio_bridge.Op %s created at %p>", name, self);
    if (self->phase == OP_DONE)
        return PyUnicode_FromFormat("<asyncio_bridge.Op %s done at %p>", name, self);
    PyObject *what = waiting_for(self);
    if (what == NULL)
        return NULL;
    PyObject *r = PyUnicode_FromFormat("<asyncio_bridge.Op %s %U at %p>", name, what, self);
    Py_DECREF(what);
    return r;
}

/* ---- lifetime ------------------------------------------------------------------ */

/* "coroutine '...' was never awaited", by the function CPython uses for
 * coroutines: with cr_origin (asyncio debug mode) it says where the op
 * was created. */
static void
op_finalize(OpObject *self)
{
    if (self->phase != OP_INIT)
        return;
    PyObject *exc = ab_err_take();
    self->phase = OP_DONE;
    ab_state *st = ab_global_state;
    int warned = 0;
    if (st != NULL) {
        PyObject *r = PyObject_CallOneArg(st->warn_unawaited, (PyObject *)self);
        warned = r != NULL || PyErr_ExceptionMatches(PyExc_RuntimeWarning);
        Py_XDECREF(r);
    }
    if (PyErr_Occurred())
        PyErr_WriteUnraisable((PyObject *)self);
    /* As CPython for a coroutine: the plain warning if that failed (at
     * interpreter exit it cannot import what it needs). */
    if (!warned && PyErr_WarnFormat(PyExc_RuntimeWarning, 1, "coroutine '%s' was never awaited",
                                    ab_op_type_of(self->op)->name) < 0)
        PyErr_WriteUnraisable((PyObject *)self);
    ab_err_raise(exc);
}

static int
op_traverse(OpObject *self, visitproc visit, void *arg)
{
    OpPy *py = self->py;
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->origin);
    Py_VISIT(self->frame);
    if (py->bridge != NULL)
        return 0; /* in flight: the bridge shows them */
    Py_VISIT(py->iter);
    Py_VISIT(py->future);
    Py_VISIT(py->context);
    Py_VISIT(py->task);
    Py_VISIT(py->outcome);
    for (int i = 0; i < py->nkept; i++)
        Py_VISIT(py->kept[i]);
    for (int i = 0; i < py->nviews; i++)
        Py_VISIT(py->views[i]->obj);
    return 0;
}

static int
op_clear(OpObject *self)
{
    Py_CLEAR(self->origin);
    Py_CLEAR(self->frame);
    if (self->py->bridge == NULL)
        py_clear(self->py);
    return 0;
}

static void
op_dealloc(OpObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    /* Only a never-awaited op has anything to finalize (its warning). */
    if (self->phase == OP_INIT && PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0)
        return; /* resurrected */
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    stop_native(self, ab_global_state);
    Py_CLEAR(self->origin);
    Py_CLEAR(self->frame);
    self->py->face = NULL;
    py_maybe_free(self->py);
    ab_op_release(self->op);
    PyObject_GC_Del(self);
    Py_DECREF(tp);
}

static PyMethodDef op_methods[] = {
    {"send", (PyCFunction)op_send, METH_O, "send(value): resume the op, as coroutine.send."},
    {"throw", (PyCFunction)(void (*)(void))op_throw, METH_FASTCALL,
     "throw(exc): cancel the native op and raise exc in the awaiter."},
    {"close", (PyCFunction)op_close, METH_NOARGS, "close(): cancel the native op."},
    {"__class_getitem__", Py_GenericAlias, METH_O | METH_CLASS,
     "Op[T]: the type of an op whose result is a T."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef op_getset[] = {
    {"__name__", (getter)op_get_name, NULL, "the op type's name", NULL},
    {"__qualname__", (getter)op_get_name, NULL, "the op type's name", NULL},
    {"cr_await", (getter)op_get_cr_await, NULL, "the Future it waits on, or None", NULL},
    {"cr_code", (getter)op_get_cr_code, NULL, "a code object naming the op type", NULL},
    {"cr_frame", (getter)op_get_cr_frame, NULL,
     "a frame naming the op while it is not done, else None", NULL},
    {"cr_origin", (getter)op_get_cr_origin, NULL,
     "where it was created, with coroutine origin tracking on, else None", NULL},
    {"cr_running", (getter)op_get_cr_running, NULL, "True inside send, throw or close", NULL},
    {"cr_suspended", (getter)op_get_cr_suspended, NULL, "True while it waits", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef op_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(OpObject, weakreflist), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot op_slots[] = {
    {Py_tp_doc, "A native operation: await it like a coroutine."},
    {Py_tp_dealloc, op_dealloc},
    {Py_tp_finalize, op_finalize},
    {Py_tp_traverse, op_traverse},
    {Py_tp_clear, op_clear},
    {Py_tp_repr, op_repr},
    {Py_tp_iter, op_await},
    {Py_tp_iternext, op_iternext},
    {Py_tp_methods, op_methods},
    {Py_tp_getset, op_getset},
    {Py_tp_members, op_members},
    {Py_am_await, op_await},
    {Py_am_send, op_am_send},
    {0, NULL},
};

PyType_Spec ab_op_spec = {
    .name = "asyncio_bridge.Op",
    .basicsize = sizeof(OpObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION |
             Py_TPFLAGS_IMMUTABLETYPE,
    .slots = op_slots,
};

void
ab_op_install_release_hook(void)
{
    ab_set_owner_size(sizeof(OpPy));
    ab_set_release_hook(release_hook);
}
