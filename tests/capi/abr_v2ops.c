/* abr_v2ops.c: op types for the tests of C API version 2, built against
 * the released version-2 headers (tests/capi/v2_include) as a third-party
 * extension is (tests/conftest.py).
 *
 *   broken(kind)            a type whose to_python or raise_error breaks the
 *                           contract in one of several ways
 *   python_after_cancel(fn) waits for a cancel, then awaits fn() (armed
 *                           after the cancel: it must run while the loop runs)
 *   blocking_after_cancel() waits for a cancel, then runs a blocking call
 *   ints(n, max_buffered, fail=False, pause=0.0)
 *                           a stream of 0..n-1, pausing `pause` seconds
 *                           every 100 items, failing at the end if asked
 *   kinds(obj)              a stream of one item of each kind
 *   signal_later(delay, v)  completed by a thread of its own after delay
 *   counters()              what the engine side observed (dict)
 */
#include "asyncio_bridge.h"

#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

static atomic_long cleanups, produced, teardowns, custom_freed, last_event;

static void
count_cleanup(ab_op *op)
{
    (void)op;
    atomic_fetch_add(&cleanups, 1);
}

/* ---- broken callbacks ------------------------------------------------------------ */

struct broken_state {
    int kind;
};

static int
broken_step(ab_op *op)
{
    struct broken_state *s = ab_op_state(op);
    return s->kind < 3 ? ab_return_custom(op) : ab_fail(op, AB_EUSER);
}

static PyObject *
broken_to_python(ab_op *op)
{
    switch (((struct broken_state *)ab_op_state(op))->kind) {
    case 0:
        return NULL; /* no exception set */
    case 1:
        PyErr_SetNone(PyExc_StopIteration);
        return NULL;
    default:
        PyErr_SetString(PyExc_ValueError, "set, yet a result returned");
        return PyLong_FromLong(1);
    }
}

static PyObject *
broken_raise_error(ab_op *op, int err)
{
    (void)err;
    switch (((struct broken_state *)ab_op_state(op))->kind) {
    case 3:
        return NULL; /* nothing set */
    case 4:
        PyErr_SetString(PyExc_StopIteration, "stop");
        return NULL;
    case 5:
        PyErr_SetNone(PyExc_StopAsyncIteration);
        return NULL;
    case 6:
#if PY_VERSION_HEX < 0x030C0000
        /* An "exception" that is not one. */
        PyErr_Restore(Py_NewRef((PyObject *)&PyLong_Type), PyLong_FromLong(7), NULL);
#else
        /* 3.12+ keeps one exception object and crashes on one that is not
         * an exception, wherever it is fetched; the public calls refuse to
         * set one (a SystemError of CPython's own). */
        PyErr_SetObject((PyObject *)&PyLong_Type, Py_None);
#endif
        return NULL;
    default: {
        /* The right way: a long message, kept whole. */
        char msg[1001];
        memset(msg, 'x', 1000);
        msg[1000] = '\0';
        PyErr_SetString(PyExc_ValueError, msg);
        return NULL;
    }
    }
}

static const ab_op_type broken_type = {
    .name = "broken",
    .state_size = sizeof(struct broken_state),
    .step = broken_step,
    .to_python = broken_to_python,
    .raise_error = broken_raise_error,
};

static PyObject *
py_broken(PyObject *module, PyObject *arg)
{
    (void)module;
    int kind = (int)PyLong_AsLong(arg);
    if (kind == -1 && PyErr_Occurred())
        return NULL;
    ab_op *op = ab_op_new(&broken_type);
    if (op == NULL)
        return PyErr_NoMemory();
    ((struct broken_state *)ab_op_state(op))->kind = kind;
    return abpy_wrap(op);
}

/* ---- waits armed after a cancel ----------------------------------------------------- */

static int
python_after_cancel_step(ab_op *op)
{
    AB_BEGIN(op);
    AB_AWAIT_OR_CANCEL(op, ab_await_cancel(op));
    AB_AWAIT_OR_CANCEL(op, ab_await_python(op, 0));
    atomic_store(&last_event, (long)ab_op_event(op));
    return ab_fail(op, -ECANCELED);
    AB_END(op);
}

static const ab_op_type python_after_cancel_type = {
    .name = "python_after_cancel",
    .flags = AB_TYPE_AWAITS_PYTHON,
    .step = python_after_cancel_step,
    .cleanup = count_cleanup,
};

static PyObject *
py_python_after_cancel(PyObject *module, PyObject *fn)
{
    (void)module;
    ab_op *op = ab_op_new(&python_after_cancel_type);
    if (op == NULL)
        return PyErr_NoMemory();
    if (abpy_keep(op, fn) < 0) {
        ab_op_release(op);
        return NULL;
    }
    return abpy_wrap(op);
}

static void
teardown(ab_op *op)
{
    (void)op;
    struct timespec ts = {0, 20 * 1000 * 1000};
    nanosleep(&ts, NULL); /* a blocking call, as PQcancel */
    atomic_fetch_add(&teardowns, 1);
}

static int
blocking_after_cancel_step(ab_op *op)
{
    AB_BEGIN(op);
    AB_AWAIT_OR_CANCEL(op, ab_await_cancel(op));
    AB_AWAIT_OR_CANCEL(op, ab_await_blocking(op, teardown));
    atomic_store(&last_event, (long)ab_op_event(op));
    return ab_fail(op, -ECANCELED);
    AB_END(op);
}

static const ab_op_type blocking_after_cancel_type = {
    .name = "blocking_after_cancel",
    .step = blocking_after_cancel_step,
};

static PyObject *
py_blocking_after_cancel(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    ab_op *op = ab_op_new(&blocking_after_cancel_type);
    return op != NULL ? abpy_wrap(op) : PyErr_NoMemory();
}

/* ---- streams ------------------------------------------------------------------------ */

struct ints_state {
    long n, i;
    int fail;
    double pause;
};

static int
ints_step(ab_op *op)
{
    struct ints_state *s = ab_op_state(op);
    AB_BEGIN(op);
    while (s->i < s->n) {
        if (ab_stream_room(op) <= 0) {
            AB_AWAIT(op, ab_await_demand(op));
            continue;
        }
        if (s->pause > 0 && s->i > 0 && s->i % 100 == 0) {
            AB_AWAIT(op, ab_await_timer(op, s->pause));
        }
        int rc = ab_yield_int(op, s->i);
        if (rc < 0)
            return ab_fail(op, rc);
        s->i++;
        atomic_fetch_add(&produced, 1);
    }
    if (s->fail)
        return ab_fail_msg(op, -EIO, "ints: failed after %ld items", s->n);
    return ab_return_int(op, 12345); /* ignored: a stream's end has no value */
    AB_END(op);
}

static const ab_op_type ints_type = {
    .name = "ints",
    .state_size = sizeof(struct ints_state),
    .step = ints_step,
    .cleanup = count_cleanup,
};

static PyObject *
py_ints(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"n", "max_buffered", "fail", "pause", NULL};
    long n;
    Py_ssize_t max_buffered = 64;
    int fail = 0;
    double pause = 0.0;
    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "l|npd", kwlist, &n, &max_buffered, &fail,
                                     &pause))
        return NULL;
    ab_op *op = ab_op_new(&ints_type);
    if (op == NULL)
        return PyErr_NoMemory();
    struct ints_state *s = ab_op_state(op);
    s->n = n;
    s->fail = fail;
    s->pause = pause;
    return abpy_wrap_stream(op, max_buffered);
}

static PyObject *
custom_to_python(void *data)
{
    long v = (long)(intptr_t)data;
    if (v < 0) {
        PyErr_SetString(PyExc_ValueError, "custom item refused");
        return NULL;
    }
    return Py_BuildValue("(sl)", "custom", v);
}

static void
custom_free(void *data)
{
    (void)data;
    atomic_fetch_add(&custom_freed, 1);
}

static int
kinds_step(ab_op *op)
{
    int rc = 0;
    if (rc == 0)
        rc = ab_yield_int(op, -5);
    if (rc == 0)
        rc = ab_yield_float(op, 2.5);
    if (rc == 0)
        rc = ab_yield_bytes(op, "b\0y", 3);
    if (rc == 0)
        rc = ab_yield_str(op, "\xc3\xa9t\xc3\xa9", 5);
    if (rc == 0)
        rc = ab_yield_kept(op, 0);
    if (rc == 0)
        rc = ab_yield_custom(op, custom_to_python, (void *)(intptr_t)9, custom_free);
    if (rc == 0)
        rc = ab_yield_custom(op, custom_to_python, (void *)(intptr_t)-1, custom_free);
    if (rc == 0)
        rc = ab_yield_int(op, 99);
    return rc < 0 ? ab_fail(op, rc) : ab_return_none(op);
}

static const ab_op_type kinds_type = {
    .name = "kinds",
    .step = kinds_step,
    .cleanup = count_cleanup,
};

static PyObject *
py_kinds(PyObject *module, PyObject *obj)
{
    (void)module;
    ab_op *op = ab_op_new(&kinds_type);
    if (op == NULL)
        return PyErr_NoMemory();
    if (abpy_keep(op, obj) < 0) {
        ab_op_release(op);
        return NULL;
    }
    return abpy_wrap_stream(op, 64);
}

/* A stream that awaits Python between items: 1, then whether fn() raised
 * (0 or 1), then 3. */
static int
ints_python_step(ab_op *op)
{
    AB_BEGIN(op);
    if (ab_yield_int(op, 1) < 0)
        return ab_fail(op, -ECANCELED);
    AB_AWAIT(op, ab_await_python(op, 0));
    if (ab_yield_int(op, ab_op_python_failed(op)) < 0 || ab_yield_int(op, 3) < 0)
        return ab_fail(op, -ECANCELED);
    return ab_return_none(op);
    AB_END(op);
}

static const ab_op_type ints_python_type = {
    .name = "ints_python",
    .flags = AB_TYPE_AWAITS_PYTHON,
    .step = ints_python_step,
    .cleanup = count_cleanup,
};

static PyObject *
py_ints_python(PyObject *module, PyObject *fn)
{
    (void)module;
    ab_op *op = ab_op_new(&ints_python_type);
    if (op == NULL)
        return PyErr_NoMemory();
    if (abpy_keep(op, fn) < 0) {
        ab_op_release(op);
        return NULL;
    }
    return abpy_wrap_stream(op, 8);
}

/* ---- woken by a thread of its own ------------------------------------------------------ */

struct later_state {
    double delay;
    long value;
    atomic_long result;
};

static void *
later_thread(void *arg)
{
    ab_op *op = arg;
    struct later_state *s = ab_op_state(op);
    struct timespec ts = {(time_t)s->delay, (long)((s->delay - (double)(time_t)s->delay) * 1e9)};
    nanosleep(&ts, NULL);
    atomic_store(&s->result, s->value);
    ab_op_signal(op);
    ab_op_release(op);
    return NULL;
}

static int
later_step(ab_op *op)
{
    struct later_state *s = ab_op_state(op);
    pthread_t t;
    AB_BEGIN(op);
    ab_op_retain(op); /* the thread's */
    if (pthread_create(&t, NULL, later_thread, op) != 0) {
        ab_op_release(op);
        return ab_fail(op, -EAGAIN);
    }
    pthread_detach(t);
    AB_AWAIT(op, ab_await_signal(op, -1));
    return ab_return_int(op, atomic_load(&s->result));
    AB_END(op);
}

static const ab_op_type later_type = {
    .name = "signal_later",
    .state_size = sizeof(struct later_state),
    .step = later_step,
    .cleanup = count_cleanup,
};

static PyObject *
py_signal_later(PyObject *module, PyObject *args)
{
    double delay;
    long value;
    (void)module;
    if (!PyArg_ParseTuple(args, "dl", &delay, &value))
        return NULL;
    ab_op *op = ab_op_new(&later_type);
    if (op == NULL)
        return PyErr_NoMemory();
    struct later_state *s = ab_op_state(op);
    s->delay = delay;
    s->value = value;
    return abpy_wrap(op);
}

static PyObject *
py_counters(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return Py_BuildValue("{s:l,s:l,s:l,s:l,s:l}", "cleanups", atomic_load(&cleanups),
                         "produced", atomic_load(&produced), "teardowns",
                         atomic_load(&teardowns), "custom_freed", atomic_load(&custom_freed),
                         "last_event", atomic_load(&last_event));
}

static PyMethodDef methods[] = {
    {"broken", py_broken, METH_O, NULL},
    {"python_after_cancel", py_python_after_cancel, METH_O, NULL},
    {"blocking_after_cancel", py_blocking_after_cancel, METH_NOARGS, NULL},
    {"ints", (PyCFunction)(void (*)(void))py_ints, METH_VARARGS | METH_KEYWORDS, NULL},
    {"kinds", py_kinds, METH_O, NULL},
    {"ints_python", py_ints_python, METH_O, NULL},
    {"signal_later", py_signal_later, METH_VARARGS, NULL},
    {"counters", py_counters, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static int
exec_module(PyObject *module)
{
    (void)module;
    return AsyncioBridge_Import();
}

static PyModuleDef_Slot slots[] = {{Py_mod_exec, exec_module}, {0, NULL}};

static PyModuleDef def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "abr_v2ops",
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit_abr_v2ops(void)
{
    return PyModuleDef_Init(&def);
}
