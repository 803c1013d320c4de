/* abr_v1ops.c: a module built against the version-1 headers (kept in
 * tests/capi/v1_include), to show that it imports and runs unchanged. */
#include "asyncio_bridge.h"

#if ASYNCIO_BRIDGE_CAPI_VERSION != 1
#error "abr_v1ops must be built against the version-1 header"
#endif

struct v1_state {
    double seconds;
    long n;
    int64_t sum;
};

static void
v1_sum(ab_op *op)
{
    struct v1_state *s = ab_op_state(op);
    for (long i = 1; i <= s->n; i++)
        s->sum += i;
}

static int
v1_step(ab_op *op)
{
    struct v1_state *s = ab_op_state(op);
    AB_BEGIN(op);
    AB_AWAIT(op, ab_await_timer(op, s->seconds));
    AB_AWAIT(op, ab_await_work(op, v1_sum));
    return ab_return_int(op, s->sum);
    AB_END(op);
}

static const ab_op_type v1_type = {
    .name = "v1_op",
    .state_size = sizeof(struct v1_state),
    .step = v1_step,
};

static PyObject *
py_v1_op(PyObject *module, PyObject *args)
{
    struct v1_state st = {0};
    (void)module;
    if (!PyArg_ParseTuple(args, "dl", &st.seconds, &st.n))
        return NULL;
    ab_op *op = ab_op_new(&v1_type);
    if (op == NULL)
        return PyErr_NoMemory();
    *(struct v1_state *)ab_op_state(op) = st;
    return abpy_wrap(op);
}

static PyObject *
py_v1_settled(PyObject *module, PyObject *arg)
{
    (void)module;
    long v = PyLong_AsLong(arg);
    if (v == -1 && PyErr_Occurred())
        return NULL;
    ab_op *op = ab_op_new(&v1_type);
    if (op == NULL)
        return PyErr_NoMemory();
    ab_return_int(op, v);
    return abpy_wrap_settled(op);
}

static PyObject *
py_v1_version(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return PyLong_FromLong(AsyncioBridge_API->version);
}

static PyMethodDef methods[] = {
    {"v1_op", py_v1_op, METH_VARARGS, "v1_op(seconds, n): sleep, then sum 1..n on the pool."},
    {"v1_settled", py_v1_settled, METH_O, "v1_settled(v): v, after one loop iteration."},
    {"version", py_v1_version, METH_NOARGS, "the version the capsule told this module"},
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
    .m_name = "abr_v1ops",
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit_abr_v1ops(void)
{
    return PyModuleDef_Init(&def);
}
