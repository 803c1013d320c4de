/* op.c: the Op type, a coroutine-like object around an ab_op.
 *
 * Lazy like a coroutine: the first send() submits the native op and yields
 * an asyncio Future; the bridge's drain() resolves that Future on the loop
 * thread, and the next send() returns its result.  throw() and close()
 * (how a Task delivers cancellation) cancel the native op. */
#include "ext.h"

#include <structmember.h>

static ab_state *
state_of(OpObject *self)
{
    return PyType_GetModuleState(Py_TYPE(self));
}

/* ---- the Python side of an ab_op: kept objects and pinned buffers ------- */

/* Borrowed: the Op for `op`, made on first use.  Until abpy_wrap hands it
 * out, the native op owns it (phase OP_UNWRAPPED); NULL with an exception. */
static OpObject *
op_object_for(ab_op *op)
{
    OpObject *self = ab_op_owner_data(op);
    if (self != NULL)
        return self;
    if (ab_global_state == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "asyncio_bridge is not initialised");
        return NULL;
    }
    self = PyObject_GC_New(OpObject, ab_global_state->op_type);
    if (self == NULL)
        return NULL;
    self->op = op;
    self->phase = OP_UNWRAPPED;
    self->future = self->context = self->task = self->outcome = NULL;
    self->bridge = NULL;
    self->kept = NULL;
    self->views = NULL;
    self->nkept = self->nviews = 0;
    self->prev = self->next = NULL;
    self->weakreflist = NULL;
    ab_op_set_owner_data(op, self);
    PyObject_GC_Track(self);
    return self;
}

int
abpy_keep(ab_op *op, PyObject *obj)
{
    OpObject *self = op_object_for(op);
    if (self == NULL)
        return -1;
    PyObject **kept = PyMem_Realloc(self->kept, sizeof(*kept) * (self->nkept + 1));
    if (kept == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->kept = kept;
    kept[self->nkept] = Py_NewRef(obj);
    return self->nkept++;
}

PyObject *
abpy_kept(ab_op *op, int slot)
{
    OpObject *self = ab_op_owner_data(op);
    if (self == NULL || slot < 0 || slot >= self->nkept)
        return NULL;
    return self->kept[slot];
}

Py_buffer *
abpy_keep_buffer(ab_op *op, PyObject *obj, int flags)
{
    OpObject *self = op_object_for(op);
    if (self == NULL)
        return NULL;
    Py_buffer **views = PyMem_Realloc(self->views, sizeof(*views) * (self->nviews + 1));
    if (views == NULL)
        return (Py_buffer *)PyErr_NoMemory();
    self->views = views;
    Py_buffer *view = PyMem_Malloc(sizeof(*view));
    if (view == NULL)
        return (Py_buffer *)PyErr_NoMemory();
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        PyMem_Free(view);
        return NULL;
    }
    views[self->nviews++] = view;
    return view;
}

PyObject *
abpy_python_outcome(ab_op *op)
{
    OpObject *self = ab_op_owner_data(op);
    return self == NULL ? NULL : self->outcome;
}

PyObject *
abpy_wrap(ab_op *op)
{
    OpObject *self = op_object_for(op);
    if (self == NULL) {
        ab_op_release(op);
        return NULL;
    }
    if (self->phase != OP_UNWRAPPED) {
        PyErr_SetString(PyExc_RuntimeError, "abpy_wrap: op is already wrapped");
        ab_op_release(op);
        return NULL;
    }
    /* The caller's reference to op becomes the Op's; the native op's
     * reference to the Op becomes the caller's. */
    self->phase = OP_INIT;
    return (PyObject *)self;
}

/* Release hook: the native op is being freed.  Only an op never wrapped
 * still owns its Op object here. */
static void
release_hook(ab_op *op)
{
    OpObject *self = ab_op_owner_data(op);
    if (self == NULL)
        return;
    ab_op_set_owner_data(op, NULL);
    if (self->phase == OP_UNWRAPPED) {
        self->op = NULL;
        self->phase = OP_DONE;
        Py_DECREF(self);
    }
}

/* ---- results --------------------------------------------------------------- */

/* New reference: the result of a successfully finished op. */
static PyObject *
result_object(OpObject *self)
{
    ab_op *op = self->op;
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
        if (self->outcome == NULL)
            Py_RETURN_NONE;
        return Py_NewRef(self->outcome);
    case AB_RESULT_CUSTOM:
        if (ab_op_type_of(op)->to_python == NULL) {
            PyErr_Format(PyExc_RuntimeError, "%s: custom result without to_python",
                         ab_op_type_of(op)->name);
            return NULL;
        }
        return ab_op_type_of(op)->to_python(op);
    }
    PyErr_SetString(PyExc_RuntimeError, "unknown result kind");
    return NULL;
}

/* New reference: the exception for a failed op. */
static PyObject *
error_object(OpObject *self, ab_state *st)
{
    ab_op *op = self->op;
    int err = ab_op_error(op);
    const ab_op_type *type = ab_op_type_of(op);
    if (err == AB_EPYTHON && self->outcome != NULL && PyExceptionInstance_Check(self->outcome))
        return Py_NewRef(self->outcome);
    if (err <= AB_EUSER && type->raise_error != NULL) {
        PyObject *exc;
        type->raise_error(op, err);
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_RuntimeError, "%s: raise_error set no exception", type->name);
        exc = ab_err_take();
        return exc;
    }
    return abpy_exception_for(st, err, ab_op_error_message(op));
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

static int
settle_future(OpObject *self, ab_state *st)
{
    PyObject *fut = self->future;
    int done = future_done(st, fut);
    if (done != 0)
        return done < 0 ? -1 : 0; /* cancelled meanwhile: never set_result */
    int err = ab_op_error(self->op);
    if (err == -ECANCELED)
        return call_method_void(fut, st->str_cancel, NULL);
    PyObject *value = err == 0 ? result_object(self) : NULL;
    int rc;
    if (value != NULL) {
        rc = call_method_void(fut, st->str_set_result, value);
        Py_DECREF(value);
        return rc;
    }
    PyObject *exc = err == 0 ? ab_err_take() : error_object(self, st);
    if (exc == NULL)
        return -1;
    rc = call_method_void(fut, st->str_set_exception, exc);
    Py_DECREF(exc);
    return rc;
}

/* drain(), for an op whose AB_MSG_FINISHED arrived: resolve its Future
 * unless cancelled, drop the engine's reference and the bridge's.  Returns
 * -1 with an exception if the Future refused (the op is released anyway). */
int
ab_op_resolve(OpObject *self, ab_state *st)
{
    int rc = self->future != NULL ? settle_future(self, st) : 0;
    ab_op_forget(self);
    return rc;
}

/* The op is finished, or its engine is gone: untrack it and drop the
 * engine's reference and the bridge's. */
void
ab_op_forget(OpObject *self)
{
    BridgeObject *b = self->bridge;
    if (b == NULL)
        return;
    self->bridge = NULL;
    ab_bridge_untrack(b, self);
    ab_op_collect(self->op);
    Py_DECREF(b);
    Py_DECREF(self); /* the bridge's reference, taken at submit */
}

/* ---- awaiting a Python awaitable for the state machine ------------------- */

static void
python_finished(OpObject *self, PyObject *outcome, int failed)
{
    Py_XSETREF(self->outcome, outcome);
    ab_python_done(self->op, failed);
}

PyObject *
ab_python_done_cb(PyObject *module, PyObject *task)
{
    /* module is the Op (see ab_op_run_python); task the finished task. */
    OpObject *self = (OpObject *)module;
    ab_state *st = state_of(self);
    PyObject *outcome;
    int failed = 1;
    Py_CLEAR(self->task);
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
    python_finished(self, outcome, failed);
    Py_RETURN_NONE;
}

static PyMethodDef python_done_def = {"_python_done", (PyCFunction)ab_python_done_cb, METH_O,
                                      NULL};

/* drain(), for AB_MSG_PYTHON: call the kept callable in the op's context
 * and run what it returns as a task on this loop.  Any failure to start
 * becomes the outcome, so the state machine always resumes. */
PyObject *
ab_op_run_python(OpObject *self, ab_state *st)
{
    PyObject *callable = abpy_kept(self->op, ab_op_python_slot(self->op));
    PyObject *coro = NULL, *task = NULL, *cb = NULL, *loop = NULL;
    if (self->bridge == NULL || self->phase != OP_WAITING) {
        python_finished(self, PyObject_CallNoArgs(st->cancelled_error), 1);
        Py_RETURN_NONE;
    }
    if (callable == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "ab_await_python: empty slot");
        goto fail;
    }
    if (self->context != NULL && PyContext_Enter(self->context) < 0)
        goto fail;
    coro = PyObject_CallNoArgs(callable);
    if (self->context != NULL)
        PyContext_Exit(self->context);
    if (coro == NULL)
        goto fail;
    loop = PyWeakref_GetObject(self->bridge->loop_ref);
    if (loop == Py_None) {
        PyErr_SetString(PyExc_RuntimeError, "the event loop is gone");
        goto fail;
    }
    PyObject *args[2] = {loop, coro};
    PyObject *kw = self->context != NULL ? Py_BuildValue("{s:O}", "context", self->context)
                                         : NULL;
    PyObject *create_task = PyObject_GetAttr(loop, st->str_create_task);
    if (create_task == NULL) {
        Py_XDECREF(kw);
        goto fail;
    }
    task = PyObject_VectorcallDict(create_task, args + 1, 1, kw);
    Py_DECREF(create_task);
    Py_XDECREF(kw);
    if (task == NULL)
        goto fail;
    cb = PyCFunction_New(&python_done_def, (PyObject *)self);
    if (cb == NULL)
        goto fail;
    if (call_method_void(task, st->str_add_done_callback, cb) < 0)
        goto fail;
    Py_DECREF(cb);
    Py_DECREF(coro);
    Py_XSETREF(self->task, task);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(cb);
    Py_XDECREF(coro);
    if (task != NULL) { /* started but unwatched: stop it */
        PyObject *exc = ab_err_take();
        PyObject *r = PyObject_CallMethodNoArgs(task, st->str_cancel);
        Py_XDECREF(r);
        PyErr_Clear();
        ab_err_raise(exc);
        Py_DECREF(task);
    }
    python_finished(self, ab_err_take(), 1);
    Py_RETURN_NONE;
}

/* ---- the coroutine protocol ------------------------------------------------ */

static void
stop_native(OpObject *self, ab_state *st)
{
    if (self->phase == OP_WAITING && self->bridge != NULL) {
        ab_cancel(self->op);
        if (self->task != NULL) {
            PyObject *r = PyObject_CallMethodNoArgs(self->task, st->str_cancel);
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
ab_op_abort(OpObject *self, ab_state *st)
{
    self->phase = OP_DONE;
    ab_cancel(self->op);
    if (self->task != NULL) {
        Py_CLEAR(self->task);
        python_finished(self, PyObject_CallNoArgs(st->cancelled_error), 1);
    }
}

static PySendResult
op_start(OpObject *self, ab_state *st, PyObject **presult)
{
    PyObject *loop = NULL, *fut = NULL;
    if (st->shut_down) {
        PyErr_SetString(PyExc_RuntimeError,
                        "asyncio_bridge is shut down (the interpreter is exiting)");
        goto fail;
    }
    BridgeObject *b = ab_bridge_for_running_loop(st, &loop);
    if (b == NULL)
        goto fail;
    fut = PyObject_CallMethodNoArgs(loop, st->str_create_future);
    Py_DECREF(loop);
    if (fut == NULL)
        goto fail;
    if (ab_op_type_of(self->op)->flags & AB_TYPE_AWAITS_PYTHON) {
        self->context = PyContext_CopyCurrent();
        if (self->context == NULL)
            goto fail;
    }
    if (PyObject_SetAttr(fut, st->str_blocking, Py_True) < 0)
        goto fail;
    int rc = ab_submit(self->op, &b->native->sink);
    if (rc < 0) {
        abpy_raise(rc, "cannot start the engine");
        goto fail;
    }
    self->future = Py_NewRef(fut);
    self->bridge = (BridgeObject *)Py_NewRef(b);
    Py_INCREF(self); /* the bridge's, dropped in ab_op_forget */
    ab_bridge_track(b, self);
    self->phase = OP_WAITING;
    *presult = fut;
    return PYGEN_NEXT;
fail:
    self->phase = OP_DONE;
    Py_XDECREF(fut);
    return PYGEN_ERROR;
}

static PySendResult
op_resume(OpObject *self, ab_state *st, PyObject **presult)
{
    PyObject *fut = self->future;
    int done = future_done(st, fut);
    if (done <= 0) {
        if (done == 0)
            PyErr_SetString(PyExc_RuntimeError,
                            "await wasn't used with future (an Op was resumed "
                            "before its result arrived)");
        stop_native(self, st);
        return PYGEN_ERROR;
    }
    self->phase = OP_DONE;
    self->future = NULL;
    *presult = PyObject_CallMethodNoArgs(fut, st->str_result);
    Py_DECREF(fut);
    return *presult == NULL ? PYGEN_ERROR : PYGEN_RETURN;
}

static PySendResult
op_am_send(OpObject *self, PyObject *arg, PyObject **presult)
{
    ab_state *st = state_of(self);
    *presult = NULL;
    switch (self->phase) {
    case OP_INIT:
        if (arg != Py_None) {
            PyErr_SetString(PyExc_TypeError,
                            "can't send non-None value to a just-started coroutine");
            return PYGEN_ERROR;
        }
        return op_start(self, st, presult);
    case OP_WAITING:
        return op_resume(self, st, presult);
    default:
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
        return PYGEN_ERROR;
    }
}

static PyObject *
result_of_send(PySendResult r, PyObject *value)
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
    return result_of_send(r, value);
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
    return result_of_send(r, value);
}

static PyObject *
op_throw(OpObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *typ, *val = NULL, *tb = NULL;
    if (nargs < 1 || nargs > 3) {
        PyErr_Format(PyExc_TypeError, "throw expected 1 to 3 arguments, got %zd", nargs);
        return NULL;
    }
    typ = args[0];
    if (nargs > 1)
        val = args[1];
    if (nargs > 2)
        tb = args[2];
    stop_native(self, state_of(self));
    Py_CLEAR(self->future);
    if (tb == Py_None)
        tb = NULL;
    if (tb != NULL && !PyTraceBack_Check(tb)) {
        PyErr_SetString(PyExc_TypeError, "throw() third argument must be a traceback object");
        return NULL;
    }
    if (PyExceptionClass_Check(typ)) {
        PyObject *exc = val != NULL && PyObject_TypeCheck(val, (PyTypeObject *)typ)
                            ? Py_NewRef(val)
                            : (val == NULL || val == Py_None ? PyObject_CallNoArgs(typ)
                                                             : PyObject_CallOneArg(typ, val));
        if (exc == NULL)
            return NULL;
        if (!PyExceptionInstance_Check(exc)) {
            PyErr_Format(PyExc_TypeError, "calling %R should have returned an exception", typ);
            Py_DECREF(exc);
            return NULL;
        }
        if (tb != NULL)
            PyException_SetTraceback(exc, tb);
        ab_err_raise(exc);
        return NULL;
    }
    if (PyExceptionInstance_Check(typ)) {
        if (val != NULL && val != Py_None) {
            PyErr_SetString(PyExc_TypeError, "instance exception may not have a separate value");
            return NULL;
        }
        if (tb != NULL)
            PyException_SetTraceback(typ, tb);
        ab_err_raise(Py_NewRef(typ));
        return NULL;
    }
    PyErr_Format(PyExc_TypeError,
                 "exceptions must be classes or instances deriving from BaseException, not %s",
                 Py_TYPE(typ)->tp_name);
    return NULL;
}

static PyObject *
op_close(OpObject *self, PyObject *unused)
{
    (void)unused;
    stop_native(self, state_of(self));
    Py_CLEAR(self->future);
    Py_RETURN_NONE;
}

static PyObject *
op_await(OpObject *self)
{
    return Py_NewRef(self);
}

static PyObject *
op_get_name(OpObject *self, void *closure)
{
    (void)closure;
    return PyUnicode_FromString(self->op ? ab_op_type_of(self->op)->name : "op");
}

static PyObject *
op_repr(OpObject *self)
{
    static const char *phases[] = {"unwrapped", "created", "running", "done"};
    return PyUnicode_FromFormat("<asyncio_bridge.Op %s %s at %p>",
                                self->op ? ab_op_type_of(self->op)->name : "?",
                                phases[self->phase], self);
}

/* ---- lifetime ------------------------------------------------------------------ */

static void
op_finalize(OpObject *self)
{
    if (self->phase != OP_INIT || self->op == NULL)
        return;
    PyObject *exc = ab_err_take();
    self->phase = OP_DONE;
    if (PyErr_WarnFormat(PyExc_RuntimeWarning, 1, "coroutine '%s' was never awaited",
                         ab_op_type_of(self->op)->name) < 0)
        PyErr_WriteUnraisable((PyObject *)self);
    ab_err_raise(exc);
}

static int
op_traverse(OpObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->future);
    Py_VISIT(self->context);
    Py_VISIT(self->task);
    Py_VISIT(self->outcome);
    for (int i = 0; i < self->nkept; i++)
        Py_VISIT(self->kept[i]);
    for (int i = 0; i < self->nviews; i++)
        Py_VISIT(self->views[i]->obj);
    return 0;
}

/* Safe only once the native side let go (the bridge's reference keeps an
 * op in flight alive), so pool functions never see a buffer released. */
static int
op_clear(OpObject *self)
{
    Py_CLEAR(self->future);
    Py_CLEAR(self->context);
    Py_CLEAR(self->task);
    Py_CLEAR(self->outcome);
    for (int i = 0; i < self->nkept; i++)
        Py_CLEAR(self->kept[i]);
    for (int i = 0; i < self->nviews; i++) {
        PyBuffer_Release(self->views[i]);
        PyMem_Free(self->views[i]);
    }
    self->nviews = 0;
    PyMem_Free(self->views);
    self->views = NULL;
    return 0;
}

static void
op_dealloc(OpObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0)
        return; /* resurrected */
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    op_clear(self);
    PyMem_Free(self->kept);
    if (self->op != NULL) {
        ab_op_set_owner_data(self->op, NULL);
        ab_op_release(self->op);
    }
    PyObject_GC_Del(self);
    Py_DECREF(tp);
}

static PyMethodDef op_methods[] = {
    {"send", (PyCFunction)op_send, METH_O, "send(value): resume the op, as coroutine.send."},
    {"throw", (PyCFunction)(void (*)(void))op_throw, METH_FASTCALL,
     "throw(exc): cancel the native op and raise exc in the awaiter."},
    {"close", (PyCFunction)op_close, METH_NOARGS, "close(): cancel the native op."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef op_getset[] = {
    {"__name__", (getter)op_get_name, NULL, "the op type's name", NULL},
    {"__qualname__", (getter)op_get_name, NULL, "the op type's name", NULL},
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
    ab_set_release_hook(release_hook);
}
