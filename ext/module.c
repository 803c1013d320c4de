/* module.c: asyncio_bridge._ext, its state, configuration and stats. */
#include "ext.h"

ab_state *ab_global_state;

static ab_state *
mstate(PyObject *module)
{
    return PyModule_GetState(module);
}

/* The budget in seconds, as a number of nanoseconds; -1 with an exception
 * set if it is not a finite number >= 0. */
static int64_t
budget_ns(PyObject *obj)
{
    if (!PyFloat_Check(obj) && !PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "drain_budget must be a number of seconds, not %.100s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    double v = PyFloat_AsDouble(obj);
    if (v == -1.0 && PyErr_Occurred())
        return -1;
    if (!(v >= 0.0 && v <= 60.0)) {
        PyErr_Format(PyExc_ValueError, "drain_budget must be between 0 and 60 seconds, not %R",
                     obj);
        return -1;
    }
    return (int64_t)(v * 1e9);
}

/* A thread count argument: 1..1024, 0 if None, -1 with an exception. */
static int
thread_count(PyObject *obj, const char *what)
{
    if (obj == Py_None)
        return 0;
    if (!PyLong_Check(obj) || PyBool_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", what,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    int overflow;
    long n = PyLong_AsLongAndOverflow(obj, &overflow);
    if (n == -1 && PyErr_Occurred())
        return -1;
    if (overflow || n < 1 || n > 1024) {
        PyErr_Format(PyExc_ValueError, "%s must be between 1 and 1024, not %R", what, obj);
        return -1;
    }
    return (int)n;
}

static PyObject *
py_configure(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"delivery", "workers", "drain_budget", "blocking_workers", NULL};
    static const char *names[] = {"auto", "call_soon_threadsafe", "add_reader"};
    PyObject *delivery = Py_None, *workers = Py_None, *budget = Py_None, *blocking = Py_None;
    ab_state *st = mstate(module);
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$OOOO:configure", kwlist, &delivery,
                                     &workers, &budget, &blocking))
        return NULL;
    int64_t ns = budget != Py_None ? budget_ns(budget) : 0;
    if (ns < 0)
        return NULL;
    int nworkers = thread_count(workers, "workers");
    if (nworkers < 0)
        return NULL;
    int nblocking = thread_count(blocking, "blocking_workers");
    if (nblocking < 0)
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
    if (nworkers > 0) {
        int rc = ab_pool_configure(nworkers);
        if (rc < 0)
            return abpy_raise(rc, "cannot resize the worker pool");
    }
    if (nblocking > 0) {
        int rc = ab_blocking_configure(nblocking);
        if (rc < 0)
            return abpy_raise(rc, "cannot resize the blocking pool");
    }
    if (budget != Py_None)
        st->drain_budget_ns = (uint64_t)ns;
    return Py_BuildValue("{s:s,s:i,s:d,s:i}", "delivery", names[st->delivery], "workers",
                         ab_pool_size(), "drain_budget", (double)st->drain_budget_ns / 1e9,
                         "blocking_workers", ab_blocking_size());
}

static PyObject *
py_stats(PyObject *module, PyObject *unused)
{
    ab_stats s;
    (void)module;
    (void)unused;
    ab_stats_get(&s);
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "submitted",
                         (unsigned long long)s.submitted, "completed",
                         (unsigned long long)s.completed, "cancelled",
                         (unsigned long long)s.cancelled, "in_flight",
                         (unsigned long long)s.in_flight, "wakeups",
                         (unsigned long long)s.sink_wakeups, "engine_wakeups",
                         (unsigned long long)s.engine_wakeups, "largest_batch",
                         (unsigned long long)s.largest_batch, "engine_spins",
                         (unsigned long long)s.engine_spins, "engine_spins_paid",
                         (unsigned long long)s.engine_spins_paid, "pool_queued",
                         (unsigned long long)s.pool_queued, "pool_threads",
                         (unsigned long long)s.pool_threads, "blocking_queued",
                         (unsigned long long)s.blocking_queued, "blocking_threads",
                         (unsigned long long)s.blocking_threads, "op_memory_kept",
                         (unsigned long long)s.op_memory_kept);
}

/* The owning interpreter ends: nothing of it may be touched again, and
 * another interpreter may take the library over.  The threads are
 * stopped. */
static void
release_ownership(void)
{
    ab_global_state = NULL;
    ab_engine_abandon();
    ab_bridges_abandon();
}

/* atexit: no native thread may call into Python once finalization starts.
 * Ops in flight pause (ab_engine_stop): never resolved unless an atexit
 * handler that runs later starts ops of its own, which starts the threads
 * again (and ab_exit_quiesce stops them once those are done). */
static PyObject *
py_shutdown(PyObject *module, PyObject *unused)
{
    ab_state *st = mstate(module);
    (void)unused;
    st->exiting = 1;
    st->exit_thread = PyThread_get_thread_ident();
    ab_courier_stop();
    Py_BEGIN_ALLOW_THREADS
    ab_engine_stop();
    Py_END_ALLOW_THREADS
    if (st->interp != PyInterpreterState_Main() && ab_global_state == st)
        release_ownership();
    Py_RETURN_NONE;
}

static PyObject *
py_before_fork(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    ab_threads_stop_if_idle();
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
     "configure(*, delivery=None, workers=None, drain_budget=None) -> dict of the settings "
     "in force."},
    {"stats", py_stats, METH_NOARGS, "stats() -> dict of counters."},
    {"_shutdown", py_shutdown, METH_NOARGS, "Stop the engine (atexit)."},
    {"_before_fork", py_before_fork, METH_NOARGS,
     "os.register_at_fork hook: an idle library leaves no thread to fork."},
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

/* Objects the module keeps: visited and cleared in one list. */
#define AB_STATE_OBJECTS(X)                                                   \
    X(op_type) X(bridge_type) X(anchor_type) X(stream_type) X(stream_next_type) X(fork_error) X(bridges) X(rooted) \
    X(get_running_loop) X(cancelled_error) X(invalid_state_error) X(future_type) \
    X(ensure_future) X(base_create_future) X(warn_unawaited)                  \
    X(frame_globals) X(codes) X(kw_loop) X(str_create_future) X(str_set_result) \
    X(str_set_exception) X(str_done) X(str_cancel) X(str_cancelled) X(str_result) \
    X(str_exception) X(str_call_soon_threadsafe) X(str_call_soon) X(str_drain) X(str_is_closed) \
    X(str_create_task) X(str_add_done_callback) X(str_holder_key)             \
    X(str_call_exception_handler) X(str_anchor_attr) X(str_loop) X(empty_tuple)

static int
add_types(PyObject *module, ab_state *st)
{
    st->op_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &ab_op_spec, NULL);
    st->bridge_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &ab_bridge_spec, NULL);
    st->anchor_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &ab_anchor_spec, NULL);
    st->stream_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &ab_stream_spec, NULL);
    st->stream_next_type =
        (PyTypeObject *)PyType_FromModuleAndSpec(module, &ab_stream_next_spec, NULL);
    if (st->op_type == NULL || st->bridge_type == NULL || st->anchor_type == NULL ||
        st->stream_type == NULL || st->stream_next_type == NULL)
        return -1;
    if (PyModule_AddType(module, st->op_type) < 0 ||
        PyModule_AddType(module, st->stream_type) < 0 ||
        PyModule_AddType(module, st->bridge_type) < 0)
        return -1;
    st->fork_error = PyErr_NewExceptionWithDoc(
        "asyncio_bridge.ForkError",
        "An operation was in flight when the process forked; it cannot finish in the child.",
        PyExc_RuntimeError, NULL);
    if (st->fork_error == NULL || PyModule_AddObjectRef(module, "ForkError", st->fork_error) < 0)
        return -1;
    return 0;
}

static int
import_names(ab_state *st)
{
    if ((st->get_running_loop = import_attr("asyncio", "get_running_loop")) == NULL ||
        (st->cancelled_error = import_attr("asyncio", "CancelledError")) == NULL ||
        (st->invalid_state_error = import_attr("asyncio", "InvalidStateError")) == NULL ||
        (st->future_type = import_attr("asyncio", "Future")) == NULL ||
        (st->ensure_future = import_attr("asyncio", "ensure_future")) == NULL ||
        (st->warn_unawaited = import_attr("warnings", "_warn_unawaited_coroutine")) == NULL)
        return -1;
    PyObject *base_loop = import_attr("asyncio", "BaseEventLoop");
    if (base_loop == NULL)
        return -1;
    st->base_create_future = PyObject_GetAttrString(base_loop, "create_future");
    Py_DECREF(base_loop);
    return st->base_create_future != NULL ? 0 : -1;
}

static int
module_exec(PyObject *module)
{
    ab_state *st = mstate(module);
    /* One engine per process, owned by the first interpreter that imports
     * the module, until it ends; others get a clean ImportError. */
    if (ab_global_state != NULL) {
        PyErr_SetString(PyExc_ImportError,
                        "asyncio_bridge is already in use by another interpreter of this "
                        "process; it serves one interpreter at a time");
        return -1;
    }
#if PY_VERSION_HEX < 0x030C0000
    /* 3.11's _asyncio keeps process-wide state that a subinterpreter's
     * end leaves broken for the main interpreter, once ops that are not
     * native coroutines ran there. */
    if (PyInterpreterState_Get() != PyInterpreterState_Main()) {
        PyErr_SetString(PyExc_ImportError,
                        "asyncio_bridge runs only in the main interpreter on Python 3.11; "
                        "subinterpreters need Python 3.12 or later");
        return -1;
    }
#endif
    if (add_types(module, st) < 0 || import_names(st) < 0)
        return -1;
    if ((st->bridges = PyDict_New()) == NULL || (st->rooted = PyDict_New()) == NULL ||
        (st->codes = PyDict_New()) == NULL ||
        (st->frame_globals = Py_BuildValue("{s:s}", "__name__", "asyncio_bridge")) == NULL)
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
    INTERN(str_call_soon, "call_soon");
    INTERN(str_drain, "drain");
    INTERN(str_is_closed, "is_closed");
    INTERN(str_create_task, "create_task");
    INTERN(str_add_done_callback, "add_done_callback");
    INTERN(str_holder_key, "__asyncio_running_event_loop__");
    INTERN(str_call_exception_handler, "call_exception_handler");
    INTERN(str_anchor_attr, "_asyncio_bridge");
    INTERN(str_loop, "loop");
    if ((st->empty_tuple = PyTuple_New(0)) == NULL)
        return -1;
    if ((st->kw_loop = Py_BuildValue("(s)", "loop")) == NULL)
        return -1;
    st->delivery = DELIVERY_AUTO;
    st->drain_budget_ns = 2000000; /* 2 ms: see bench/README.md */
    PyObject *capsule = ab_capi_capsule(1);
    if (capsule == NULL || PyModule_AddObject(module, "_C_API", capsule) < 0) {
        Py_XDECREF(capsule);
        return -1;
    }
    capsule = ab_capi_capsule(0);
    if (capsule == NULL || PyModule_AddObject(module, "_C_API_v2", capsule) < 0) {
        Py_XDECREF(capsule);
        return -1;
    }
    if (PyModule_AddFunctions(module, ab_resolve_methods) < 0)
        return -1;
    if (PyModule_AddFunctions(module, ab_ops_methods) < 0)
        return -1;
    ab_op_install_release_hook();
    st->interp = PyInterpreterState_Get();
    ab_courier_set_interpreter(st->interp);
    ab_global_state = st;
    return 0;
}

static int
module_traverse(PyObject *module, visitproc visit, void *arg)
{
    ab_state *st = mstate(module);
#define AB__VISIT(field) Py_VISIT(st->field);
    AB_STATE_OBJECTS(AB__VISIT)
#undef AB__VISIT
    return 0;
}

static int
module_clear(PyObject *module)
{
    ab_state *st = mstate(module);
#define AB__CLEAR(field) Py_CLEAR(st->field);
    AB_STATE_OBJECTS(AB__CLEAR)
#undef AB__CLEAR
    return 0;
}

/* The module of the owning interpreter goes (atexit already stopped the
 * threads, and a subinterpreter released the library then). */
static void
module_free(PyObject *module)
{
    ab_state *st = mstate(module);
    module_clear(module);
    /* A courier started again by a late atexit handler may be waiting for
     * the GIL of an interpreter that ends: never join it here. */
    if (ab_global_state == st && !ab_courier_running())
        release_ownership();
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
    .m_free = (freefunc)module_free,
};

PyMODINIT_FUNC
PyInit__ext(void)
{
    return PyModuleDef_Init(&ab_module_def);
}
