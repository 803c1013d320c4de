/* errors.c: the one place where native error codes become exceptions. */
#include "ext.h"

/* New reference: the exception instance for err, or NULL with an exception
 * set if even that could not be made. */
PyObject *
abpy_exception_for(ab_state *st, int err, const char *message)
{
    const char *text = message != NULL ? message : ab_strerror(err);
    switch (err) {
    case -ECANCELED:
        return PyObject_CallFunction(st->cancelled_error, "s", text);
    case AB_EFORKED:
        return PyObject_CallFunction(st->fork_error, "s", text);
    case AB_EPYTHON:
    case AB_ESHUTDOWN:
    case AB_ESTATE:
        return PyObject_CallFunction(PyExc_RuntimeError, "s", text);
    }
    if (err < 0 && err > -4096)
        /* OSError picks the subclass: TimeoutError for ETIMEDOUT, ... */
        return PyObject_CallFunction(PyExc_OSError, "is", -err, text);
    if (message == NULL)
        text = err <= AB_EUSER ? "op failed with its own error code" : "unknown error code";
    PyObject *msg = PyUnicode_FromFormat("%s (native error code %d)", text, err);
    if (msg == NULL)
        return NULL;
    PyObject *exc = PyObject_CallOneArg(PyExc_RuntimeError, msg);
    Py_DECREF(msg);
    return exc;
}

PyObject *
abpy_raise(int err, const char *message)
{
    ab_state *st = ab_global_state;
    PyObject *exc;
    if (st == NULL) {
        PyErr_SetString(PyExc_RuntimeError, ab_strerror(err));
        return NULL;
    }
    exc = abpy_exception_for(st, err, message);
    if (exc != NULL)
        ab_err_raise(exc);
    return NULL;
}
