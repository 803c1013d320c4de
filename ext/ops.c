/* ops.c: the built-in ops, written on the public C API alone
 * (asyncio_bridge.h), exactly as a third-party extension writes its own. */
#include "ext.h"

#include <math.h>

/* ---- helpers of the public API ------------------------------------------------ */

int
abpy_fd(PyObject *obj)
{
    int fd = PyObject_AsFileDescriptor(obj);
    if (fd < 0 && PyErr_ExceptionMatches(PyExc_OverflowError)) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "file descriptor out of range: %R", obj);
    }
    return fd;
}

double
abpy_seconds(PyObject *obj, const char *what, int allow_none)
{
    double v;
    if (obj == Py_None && allow_none)
        return -1.0;
    if (PyFloat_Check(obj)) {
        v = PyFloat_AS_DOUBLE(obj);
    } else if (PyLong_Check(obj)) {
        v = PyLong_AsDouble(obj); /* OverflowError beyond a double, as asyncio */
        if (v == -1.0 && PyErr_Occurred())
            return -2.0;
    } else {
        /* asyncio computes loop.time() + delay: take what a float adds to. */
        PyObject *zero = PyFloat_FromDouble(0.0);
        PyObject *sum = zero != NULL ? PyNumber_Add(zero, obj) : NULL;
        Py_XDECREF(zero);
        if (sum == NULL || !PyFloat_Check(sum)) {
            if (sum == NULL && !PyErr_ExceptionMatches(PyExc_TypeError))
                return -2.0;
            Py_XDECREF(sum);
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s must be a real number%s, not %.100s", what,
                         allow_none ? " or None" : "", Py_TYPE(obj)->tp_name);
            return -2.0;
        }
        v = PyFloat_AS_DOUBLE(sum);
        Py_DECREF(sum);
    }
    if (isnan(v)) {
        PyErr_Format(PyExc_ValueError, "%s must not be NaN", what);
        return -2.0;
    }
    return v < 0 ? 0.0 : v;
}

/* ---- sleep(delay, result=None) ------------------------------------------------- */

struct sleep_state {
    double delay;
    int result; /* kept slot, or -1 for None */
};

/* The result: what the caller passed, or None. */
static int
sleep_outcome(ab_op *op)
{
    struct sleep_state *s = ab_op_state(op);
    return s->result >= 0 ? ab_return_kept(op, s->result) : ab_return_none(op);
}

static int
sleep_step(ab_op *op)
{
    struct sleep_state *s = ab_op_state(op);
    AB_BEGIN(op);
    AB_AWAIT(op, ab_await_timer(op, s->delay));
    return sleep_outcome(op);
    AB_END(op);
}

static const ab_op_type sleep_type = {
    .name = "sleep",
    .state_size = sizeof(struct sleep_state),
    .step = sleep_step,
};

/* A new op of `type` (the caller's reference) keeping `value` (unless
 * None) in the state's int at `slot_offset`; NULL with an exception. */
static ab_op *
new_keeping(const ab_op_type *type, PyObject *value, size_t slot_offset)
{
    ab_op *op = ab_op_new(type);
    if (op == NULL)
        return (ab_op *)PyErr_NoMemory();
    int *slot = (int *)((char *)ab_op_state(op) + slot_offset);
    *slot = -1;
    if (value != Py_None && (*slot = abpy_keep(op, value)) < 0) {
        ab_op_release(op);
        return NULL;
    }
    return op;
}

/* New reference: new_keeping's op, wrapped; NULL with an exception. */
static PyObject *
op_keeping(const ab_op_type *type, PyObject *value, size_t slot_offset, ab_op **out)
{
    ab_op *op = new_keeping(type, value, slot_offset);
    if (op == NULL)
        return NULL;
    *out = op;
    return abpy_wrap(op);
}

/* 1 if delay <= 0 (compared as asyncio.sleep compares it), 0 if not, -1
 * with an exception set. */
static int
no_delay(PyObject *delay)
{
    if (PyFloat_CheckExact(delay))
        return PyFloat_AS_DOUBLE(delay) <= 0.0;
    PyObject *zero = PyLong_FromLong(0);
    if (zero == NULL)
        return -1;
    int le = PyObject_RichCompareBool(delay, zero, Py_LE);
    Py_DECREF(zero);
    return le;
}

static PyObject *
py_sleep(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"delay", "result", NULL};
    PyObject *delay, *result = Py_None;
    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|O:sleep", kwlist, &delay, &result))
        return NULL;
    int now = no_delay(delay);
    if (now < 0)
        return NULL;
    double seconds = now ? 0.0 : abpy_seconds(delay, "delay", 0);
    if (seconds < -1.5)
        return NULL;
    ab_op *op = new_keeping(&sleep_type, result, offsetof(struct sleep_state, result));
    if (op == NULL)
        return NULL;
    if (now) { /* one loop iteration and no engine, as asyncio.sleep(0) */
        sleep_outcome(op);
        return abpy_wrap_settled(op);
    }
    ((struct sleep_state *)ab_op_state(op))->delay = seconds;
    return abpy_wrap(op);
}

/* ---- nop(value=None) ---------------------------------------------------------------- */

struct nop_state {
    int value;
};

static int
nop_step(ab_op *op)
{
    struct nop_state *s = ab_op_state(op);
    return s->value >= 0 ? ab_return_kept(op, s->value) : ab_return_none(op);
}

static const ab_op_type nop_type = {
    .name = "nop",
    .state_size = sizeof(struct nop_state),
    .step = nop_step,
};

static PyObject *
py_nop(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *value = Py_None;
    ab_op *op;
    (void)module;
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0) {
        if (nargs > 0 || PyTuple_GET_SIZE(kwnames) != 1 ||
            PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "value") != 0) {
            PyErr_SetString(PyExc_TypeError, "nop() takes one optional argument, value");
            return NULL;
        }
        value = args[0];
    } else if (nargs > 1) {
        PyErr_Format(PyExc_TypeError, "nop() takes at most 1 argument (%zd given)", nargs);
        return NULL;
    } else if (nargs == 1) {
        value = args[0];
    }
    return op_keeping(&nop_type, value, offsetof(struct nop_state, value), &op);
}

/* ---- wait_readable(fd, timeout=None), wait_writable(fd, timeout=None) ---------------- */

struct fd_state {
    int fd;
    unsigned events;
    double timeout; /* < 0: none */
};

static int
fd_step(ab_op *op)
{
    struct fd_state *s = ab_op_state(op);
    AB_BEGIN(op);
    AB_AWAIT(op, ab_await_fd(op, s->fd, s->events, s->timeout));
    if (ab_op_event(op) & s->events)
        return ab_return_none(op);
    return ab_fail_msg(op, -ETIMEDOUT, "fd %d not %s within %g s", s->fd,
                       s->events == AB_EV_READ ? "readable" : "writable", s->timeout);
    AB_END(op);
}

static const ab_op_type wait_readable_type = {
    .name = "wait_readable",
    .state_size = sizeof(struct fd_state),
    .step = fd_step,
};

static const ab_op_type wait_writable_type = {
    .name = "wait_writable",
    .state_size = sizeof(struct fd_state),
    .step = fd_step,
};

static PyObject *
fd_op(const ab_op_type *type, unsigned events, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"fd", "timeout", NULL};
    PyObject *fdobj, *timeout = Py_None;
    char fmt[40];
    snprintf(fmt, sizeof(fmt), "O|O:%s", type->name);
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, fmt, kwlist, &fdobj, &timeout))
        return NULL;
    int fd = abpy_fd(fdobj);
    if (fd < 0)
        return NULL;
    double seconds = abpy_seconds(timeout, "timeout", 1);
    if (seconds < -1.5)
        return NULL;
    ab_op *op = ab_op_new(type);
    if (op == NULL)
        return PyErr_NoMemory();
    struct fd_state *s = ab_op_state(op);
    s->fd = fd;
    s->events = events;
    s->timeout = seconds;
    return abpy_wrap(op);
}

static PyObject *
py_wait_readable(PyObject *module, PyObject *args, PyObject *kwargs)
{
    (void)module;
    return fd_op(&wait_readable_type, AB_EV_READ, args, kwargs);
}

static PyObject *
py_wait_writable(PyObject *module, PyObject *args, PyObject *kwargs)
{
    (void)module;
    return fd_op(&wait_writable_type, AB_EV_WRITE, args, kwargs);
}

PyMethodDef ab_ops_methods[] = {
    {"sleep", (PyCFunction)(void (*)(void))py_sleep, METH_VARARGS | METH_KEYWORDS,
     "sleep(delay, result=None): a native timer; returns result after delay seconds "
     "(delay <= 0 yields to the loop once, as asyncio.sleep(0))."},
    {"nop", (PyCFunction)(void (*)(void))py_nop, METH_FASTCALL | METH_KEYWORDS,
     "nop(value=None): completes at once on the engine thread and returns value."},
    {"wait_readable", (PyCFunction)(void (*)(void))py_wait_readable,
     METH_VARARGS | METH_KEYWORDS,
     "wait_readable(fd, timeout=None): wait until fd is readable; TimeoutError on timeout."},
    {"wait_writable", (PyCFunction)(void (*)(void))py_wait_writable,
     METH_VARARGS | METH_KEYWORDS,
     "wait_writable(fd, timeout=None): wait until fd is writable; TimeoutError on timeout."},
    {NULL, NULL, 0, NULL},
};
