/* abr_testops: ops that only the reliability suite needs, written on the
 * public C API alone (asyncio_bridge.h through the capsule), as a
 * third-party extension writes them.  Built at test time by conftest.py.
 *
 *   fail_with(code)   finishes at once with the error code `code`, whatever
 *                     it is (unknown library codes, positive values, user
 *                     codes without raise_error)
 *   call_python(fn)   awaits fn() on the op's loop (ab_await_python) and
 *                     returns its outcome: the path of a Python callback
 *                     that raises or never finishes
 *   on_pool(seconds)  a function on the worker pool that sleeps that long
 *   settled(value)    an op made with its result (abpy_wrap_settled):
 *                     yields once, returns value; settled(None) fails with
 *                     ECONNREFUSED
 */
#include "asyncio_bridge.h"

#include <errno.h>
#include <limits.h>
#include <time.h>

struct fail_state {
    int code;
};

static int
fail_step(ab_op *op)
{
    struct fail_state *s = ab_op_state(op);
    return ab_fail(op, s->code);
}

static const ab_op_type fail_type = {
    .name = "fail_with",
    .state_size = sizeof(struct fail_state),
    .step = fail_step,
};

static PyObject *
py_fail_with(PyObject *module, PyObject *arg)
{
    (void)module;
    long code = PyLong_AsLong(arg);
    if (code == -1 && PyErr_Occurred())
        return NULL;
    if (code < INT_MIN || code > INT_MAX)
        return PyErr_Format(PyExc_OverflowError, "code out of int range: %ld", code);
    ab_op *op = ab_op_new(&fail_type);
    if (op == NULL)
        return PyErr_NoMemory();
    ((struct fail_state *)ab_op_state(op))->code = (int)code;
    return abpy_wrap(op);
}

struct python_state {
    int slot;
};

static int
python_step(ab_op *op)
{
    struct python_state *s = ab_op_state(op);
    AB_BEGIN(op);
    AB_AWAIT(op, ab_await_python(op, s->slot));
    if (ab_op_python_failed(op))
        return ab_fail(op, AB_EPYTHON);
    return ab_return_python(op);
    AB_END(op);
}

static const ab_op_type python_type = {
    .name = "call_python",
    .state_size = sizeof(struct python_state),
    .flags = AB_TYPE_AWAITS_PYTHON,
    .step = python_step,
};

static PyObject *
py_call_python(PyObject *module, PyObject *fn)
{
    (void)module;
    ab_op *op = ab_op_new(&python_type);
    if (op == NULL)
        return PyErr_NoMemory();
    int slot = abpy_keep(op, fn);
    if (slot < 0) {
        ab_op_release(op);
        return NULL;
    }
    ((struct python_state *)ab_op_state(op))->slot = slot;
    return abpy_wrap(op);
}

struct pool_state {
    double seconds;
};

static void
pool_sleep(ab_op *op)
{
    struct pool_state *s = ab_op_state(op);
    struct timespec ts = {(time_t)s->seconds,
                          (long)((s->seconds - (double)(time_t)s->seconds) * 1e9)};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

static int
pool_step(ab_op *op)
{
    AB_BEGIN(op);
    AB_AWAIT(op, ab_await_work(op, pool_sleep));
    return ab_return_none(op);
    AB_END(op);
}

static const ab_op_type pool_type = {
    .name = "on_pool",
    .state_size = sizeof(struct pool_state),
    .step = pool_step,
};

static PyObject *
py_on_pool(PyObject *module, PyObject *arg)
{
    (void)module;
    double seconds = abpy_seconds(arg, "seconds", 0);
    if (seconds < -1.5)
        return NULL;
    ab_op *op = ab_op_new(&pool_type);
    if (op == NULL)
        return PyErr_NoMemory();
    ((struct pool_state *)ab_op_state(op))->seconds = seconds;
    return abpy_wrap(op);
}

static const ab_op_type settled_type = {
    .name = "settled",
    .step = fail_step, /* never runs: a settled op is not submitted */
};

static PyObject *
py_settled(PyObject *module, PyObject *value)
{
    (void)module;
    ab_op *op = ab_op_new(&settled_type);
    if (op == NULL)
        return PyErr_NoMemory();
    if (value == Py_None) {
        ab_fail_msg(op, -ECONNREFUSED, "settled(None) fails");
    } else {
        int slot = abpy_keep(op, value);
        if (slot < 0) {
            ab_op_release(op);
            return NULL;
        }
        ab_return_kept(op, slot);
    }
    return abpy_wrap_settled(op);
}

static PyMethodDef methods[] = {
    {"fail_with", py_fail_with, METH_O, "fail_with(code): an op that fails with code."},
    {"call_python", py_call_python, METH_O, "call_python(fn): an op awaiting fn()."},
    {"on_pool", py_on_pool, METH_O, "on_pool(seconds): a pool function that sleeps."},
    {"settled", py_settled, METH_O, "settled(value): an op made with its outcome."},
    {NULL, NULL, 0, NULL},
};

static int
exec_module(PyObject *m)
{
    (void)m;
    return AsyncioBridge_Import();
}

static PyModuleDef_Slot slots[] = {{Py_mod_exec, exec_module}, {0, NULL}};

static PyModuleDef def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "abr_testops",
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit_abr_testops(void)
{
    return PyModuleDef_Init(&def);
}
