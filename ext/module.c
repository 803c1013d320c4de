/* module.c: asyncio_bridge._ext, its state, configuration and stats. */
#include "ext.h"

ab_state *ab_global_state;

static ab_state *
mstate(PyObject *module)
{
    return PyModule_GetState(module);
}

static PyObject *
py_configure(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"delivery", "workers", NULL};
    static const char *names[] = {"auto", "call_soon_threadsafe", "add_reader"};
    PyObject *delivery = Py_None, *workers = Py_None;
    ab_state *st = mstate(module);
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$OO:configure", kwlist, &delivery,
                                     &workers))
        return NULL;
    if (delivery != Py_None) {
        if (!PyUnicode_Check(delivery)) {
            PyErr_Format(PyExc_TypeError, "delivery must be a str, not %.100s",
                         Py_TYPE(delivery)->tp_name);
            return NULL;
        }
        int found = -1;
        for (int i = 0; i < 3; i++)
            if (PyUnicode_CompareWithASCIIString(delivery, names[i]) == 0)
                found = i;
        if (found < 0) {
            PyErr_Format(PyExc_ValueError,
                         "delivery must be 'auto', 'call_soon_threadsafe' or "
                         "'add_reader', not %R",
                         delivery);
            return NULL;
        }
        st->delivery = (delivery_kind)found;
    }
    if (workers != Py_None) {
        if (!PyLong_Check(workers) || PyBool_Check(workers)) {
            PyErr_Format(PyExc_TypeError, "workers must be an int, not %.100s",
                         Py_TYPE(workers)->tp_name);
            return NULL;
        }
        int overflow;
        long n = PyLong_AsLongAndOverflow(workers, &overflow);
        if (n == -1 && PyErr_Occurred())
            return NULL;
        if (overflow || n < 1 || n > 1024) {
            PyErr_Format(PyExc_ValueError, "workers must be between 1 and 1024, not %R",
                         workers);
            return NULL;
        }
        int rc = ab_pool_configure((int)n);
        if (rc < 0)
            return abpy_raise(rc, "cannot resize the worker pool");
    }
    return Py_BuildValue("{s:s,s:i}", "delivery", names[st->delivery], "workers",
                         ab_pool_size());
}

static PyObject *
py_stats(PyObject *module, PyObject *unused)
{
    ab_stats s;
    (void)module;
    (void)unused;
    ab_stats_get(&s);
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "submitted",
                         (unsigned long long)s.submitted, "completed",
                         (unsigned long long)s.completed, "cancelled",
                         (unsigned long long)s.cancelled, "in_flight",
                         (unsigned long long)s.in_flight, "wakeups",
                         (unsigned long long)s.sink_wakeups, "engine_wakeups",
                         (unsigned long long)s.engine_wakeups, "largest_batch",
                         (unsigned long long)s.largest_batch);
}

static PyObject *
py_shutdown(PyObject *module, PyObject *unused)
{
    ab_state *st = mstate(module);
    (void)unused;
    if (st->shut_down)
        Py_RETURN_NONE;
    st->shut_down = 1;
    ab_courier_stop();
    Py_BEGIN_ALLOW_THREADS
    ab_engine_stop();
    Py_END_ALLOW_THREADS
    ab_bridges_shutdown(st);
    Py_RETURN_NONE;
}

static PyObject *
py_after_fork_child(PyObject *module, PyObject *unused)
{
    (void)unused;
    ab_bridges_after_fork(mstate(module));
    Py_RETURN_NONE;
}

static PyObject *
py_bridge_of(PyObject *module, PyObject *loop)
{
    return ab_bridge_of_loop(mstate(module), loop);
}

static PyMethodDef module_methods[] = {
    {"configure", (PyCFunction)(void (*)(void))py_configure, METH_VARARGS | METH_KEYWORDS,
     "configure(*, delivery=None, workers=None) -> dict of the settings in force."},
    {"stats", py_stats, METH_NOARGS, "stats() -> dict of counters."},
    {"_shutdown", py_shutdown, METH_NOARGS, "Stop the engine (atexit)."},
    {"_after_fork_child", py_after_fork_child, METH_NOARGS, "os.register_at_fork hook."},
    {"_bridge_of", py_bridge_of, METH_O, "The bridge of a loop, or None."},
    {NULL, NULL, 0, NULL},
};

static PyObject *
import_attr(const char *module, const char *name)
{
    PyObject *m = PyImport_ImportModule(module);
    if (m == NULL)
        return NULL;
    PyObject *attr = PyObject_GetAttrString(m, name);
    Py_DECREF(m);
    return attr;
}

#define INTERN(field, text)                                                   \
    if ((st->field = PyUnicode_InternFromString(text)) == NULL)               \
        return -1;

static int
module_exec(PyObject *module)
{
    ab_state *st = mstate(module);
    if (ab_global_state != NULL) {
        PyErr_SetString(PyExc_ImportError,
                        "asyncio_bridge._ext supports one interpreter per process");
        return -1;
    }
    st->op_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &ab_op_spec, NULL);
    st->bridge_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &ab_bridge_spec, NULL);
    if (st->op_type == NULL || st->bridge_type == NULL)
        return -1;
    if (PyModule_AddType(module, st->op_type) < 0 ||
        PyModule_AddType(module, st->bridge_type) < 0)
        return -1;
    st->fork_error = PyErr_NewExceptionWithDoc(
        "asyncio_bridge.ForkError",
        "An operation was in flight when the process forked; it cannot finish in the child.",
        PyExc_RuntimeError, NULL);
    if (st->fork_error == NULL || PyModule_AddObjectRef(module, "ForkError", st->fork_error) < 0)
        return -1;
    if ((st->bridges = PyDict_New()) == NULL)
        return -1;
    if ((st->get_running_loop = import_attr("asyncio", "get_running_loop")) == NULL ||
        (st->cancelled_error = import_attr("asyncio", "CancelledError")) == NULL ||
        (st->invalid_state_error = import_attr("asyncio", "InvalidStateError")) == NULL ||
        (st->future_type = import_attr("asyncio", "Future")) == NULL ||
        (st->ensure_future = import_attr("asyncio", "ensure_future")) == NULL)
        return -1;
    PyObject *base_loop = import_attr("asyncio", "BaseEventLoop");
    if (base_loop == NULL)
        return -1;
    st->base_create_future = PyObject_GetAttrString(base_loop, "create_future");
    Py_DECREF(base_loop);
    if (st->base_create_future == NULL)
        return -1;
    INTERN(str_create_future, "create_future");
    INTERN(str_set_result, "set_result");
    INTERN(str_set_exception, "set_exception");
    INTERN(str_done, "done");
    INTERN(str_cancel, "cancel");
    INTERN(str_cancelled, "cancelled");
    INTERN(str_result, "result");
    INTERN(str_exception, "exception");
    INTERN(str_call_soon_threadsafe, "call_soon_threadsafe");
    INTERN(str_drain, "drain");
    INTERN(str_is_closed, "is_closed");
    INTERN(str_create_task, "create_task");
    INTERN(str_add_done_callback, "add_done_callback");
    INTERN(str_holder_key, "__asyncio_running_event_loop__");
    if ((st->kw_loop = Py_BuildValue("(s)", "loop")) == NULL)
        return -1;
    st->delivery = DELIVERY_AUTO;
    PyObject *capsule = ab_capi_capsule();
    if (capsule == NULL || PyModule_AddObject(module, "_C_API", capsule) < 0) {
        Py_XDECREF(capsule);
        return -1;
    }
    if (PyModule_AddFunctions(module, ab_ops_methods) < 0)
        return -1;
    ab_op_install_release_hook();
    ab_global_state = st;
    return 0;
}

static int
module_traverse(PyObject *module, visitproc visit, void *arg)
{
    ab_state *st = mstate(module);
    Py_VISIT(st->op_type);
    Py_VISIT(st->bridge_type);
    Py_VISIT(st->fork_error);
    Py_VISIT(st->bridges);
    Py_VISIT(st->get_running_loop);
    Py_VISIT(st->cancelled_error);
    Py_VISIT(st->invalid_state_error);
    Py_VISIT(st->future_type);
    Py_VISIT(st->ensure_future);
    Py_VISIT(st->base_create_future);
    return 0;
}

static int
module_clear(PyObject *module)
{
    ab_state *st = mstate(module);
    if (ab_global_state == st)
        ab_global_state = NULL;
    Py_CLEAR(st->op_type);
    Py_CLEAR(st->bridge_type);
    Py_CLEAR(st->fork_error);
    Py_CLEAR(st->bridges);
    Py_CLEAR(st->get_running_loop);
    Py_CLEAR(st->cancelled_error);
    Py_CLEAR(st->invalid_state_error);
    Py_CLEAR(st->future_type);
    Py_CLEAR(st->ensure_future);
    Py_CLEAR(st->base_create_future);
    Py_CLEAR(st->kw_loop);
    Py_CLEAR(st->str_create_future);
    Py_CLEAR(st->str_set_result);
    Py_CLEAR(st->str_set_exception);
    Py_CLEAR(st->str_done);
    Py_CLEAR(st->str_cancel);
    Py_CLEAR(st->str_cancelled);
    Py_CLEAR(st->str_result);
    Py_CLEAR(st->str_exception);
    Py_CLEAR(st->str_call_soon_threadsafe);
    Py_CLEAR(st->str_drain);
    Py_CLEAR(st->str_is_closed);
    Py_CLEAR(st->str_create_task);
    Py_CLEAR(st->str_add_done_callback);
    Py_CLEAR(st->str_holder_key);
    return 0;
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

PyModuleDef ab_module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "asyncio_bridge._ext",
    .m_doc = "The native core of asyncio_bridge.",
    .m_size = sizeof(ab_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = (freefunc)module_clear,
};

PyMODINIT_FUNC
PyInit__ext(void)
{
    return PyModuleDef_Init(&ab_module_def);
}
