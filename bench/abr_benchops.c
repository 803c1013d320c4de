/* abr_benchops.c: ops for bench/capi_v2.py, built against the installed
 * headers as a third-party extension is.
 *
 *   sdk_signal()            completed by a thread of the extension's own (a
 *                           stand-in for a vendor SDK): retained for it,
 *                           woken with ab_op_signal
 *   sdk_eventfd()           the same thread, the workaround before C API
 *                           v2: an eventfd per op, written by the thread,
 *                           awaited with ab_await_fd, closed in cleanup
 *   lines(fd, max_buffered) a stream of the lines read from a pipe
 */
#include "asyncio_bridge.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

/* ---- the "SDK": one thread completing requests in the order they came ------ */

struct request {
    struct request *next;
    ab_op *op;      /* NULL for a Python request */
    int efd;        /* -1: signal the op */
    PyObject *set_result, *loop; /* a Python request: loop.call_soon_threadsafe */
};

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct request *head, *tail;
    int started;
} Q = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, NULL, 0};

static void *
sdk_main(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&Q.mu);
    for (;;) {
        while (Q.head == NULL)
            pthread_cond_wait(&Q.cv, &Q.mu);
        struct request *batch = Q.head;
        Q.head = Q.tail = NULL;
        pthread_mutex_unlock(&Q.mu);
        /* The way a careful extension calls back into asyncio from its own
         * thread: the GIL once per batch, call_soon_threadsafe per request. */
        PyGILState_STATE g = 0;
        int gil = 0;
        while (batch != NULL) {
            struct request *r = batch;
            batch = r->next;
            if (r->op == NULL) {
                if (!gil) {
                    g = PyGILState_Ensure();
                    gil = 1;
                }
                PyObject *res = PyObject_CallMethod(r->loop, "call_soon_threadsafe", "OO",
                                                    r->set_result, Py_None);
                if (res == NULL)
                    PyErr_WriteUnraisable(r->loop);
                Py_XDECREF(res);
                Py_DECREF(r->set_result);
                Py_DECREF(r->loop);
                free(r);
                continue;
            }
            if (r->efd >= 0) {
                uint64_t one = 1;
                while (write(r->efd, &one, sizeof(one)) < 0 && errno == EINTR)
                    ;
            } else {
                ab_op_signal(r->op);
            }
            ab_op_release(r->op);
            free(r);
        }
        if (gil)
            PyGILState_Release(g);
        pthread_mutex_lock(&Q.mu);
    }
    return NULL;
}

static int
enqueue(struct request *r)
{
    r->next = NULL;
    pthread_mutex_lock(&Q.mu);
    if (!Q.started) {
        pthread_t t;
        if (pthread_create(&t, NULL, sdk_main, NULL) != 0) {
            pthread_mutex_unlock(&Q.mu);
            return -EAGAIN;
        }
        pthread_detach(t);
        Q.started = 1;
    }
    if (Q.tail != NULL)
        Q.tail->next = r;
    else
        Q.head = r;
    Q.tail = r;
    pthread_cond_signal(&Q.cv);
    pthread_mutex_unlock(&Q.mu);
    return 0;
}

/* Engine thread: hand op to the SDK; 0 or a negative errno. */
static int
sdk_submit(ab_op *op, int efd)
{
    struct request *r = calloc(1, sizeof(*r));
    if (r == NULL)
        return -ENOMEM;
    ab_op_retain(op); /* the SDK's, released after it completed the request */
    r->op = op;
    r->efd = efd;
    int rc = enqueue(r);
    if (rc < 0) {
        ab_op_release(op);
        free(r);
    }
    return rc;
}

static int
signal_step(ab_op *op)
{
    AB_BEGIN(op);
    {
        int rc = sdk_submit(op, -1);
        if (rc < 0)
            return ab_fail(op, rc);
    }
    AB_AWAIT(op, ab_await_signal(op, -1));
    return ab_return_none(op);
    AB_END(op);
}

static const ab_op_type signal_type = {.name = "sdk_signal", .step = signal_step};

struct efd_state {
    int efd;
    int opened;
};

static int
eventfd_step(ab_op *op)
{
    struct efd_state *s = ab_op_state(op);
    AB_BEGIN(op);
    s->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (s->efd < 0)
        return ab_fail(op, -errno);
    s->opened = 1;
    {
        int rc = sdk_submit(op, s->efd);
        if (rc < 0)
            return ab_fail(op, rc);
    }
    AB_AWAIT(op, ab_await_fd(op, s->efd, AB_EV_READ, -1));
    return ab_return_none(op);
    AB_END(op);
}

/* The SDK may still write to the eventfd after a cancel: the workaround
 * kept it open until the SDK's reference went, in dispose. */
static void
eventfd_dispose(ab_op *op)
{
    struct efd_state *s = ab_op_state(op);
    if (s->opened)
        close(s->efd);
}

static const ab_op_type eventfd_type = {
    .name = "sdk_eventfd",
    .state_size = sizeof(struct efd_state),
    .step = eventfd_step,
    .dispose = eventfd_dispose,
};

static PyObject *
py_sdk_signal(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    ab_op *op = ab_op_new(&signal_type);
    return op != NULL ? abpy_wrap(op) : PyErr_NoMemory();
}

static PyObject *
py_sdk_eventfd(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    ab_op *op = ab_op_new(&eventfd_type);
    return op != NULL ? abpy_wrap(op) : PyErr_NoMemory();
}

/* ---- lines from a pipe ---------------------------------------------------------- */

struct lines_state {
    int fd;
    size_t len;  /* bytes in buf */
    size_t scan; /* where the next line starts */
    int eof;
    char buf[65536];
};

static int
lines_step(ab_op *op)
{
    struct lines_state *s = ab_op_state(op);
    AB_BEGIN(op);
    for (;;) {
        /* Emit the complete lines buffered, as far as the consumer has room. */
        while (s->scan < s->len) {
            char *nl = memchr(s->buf + s->scan, '\n', s->len - s->scan);
            if (nl == NULL)
                break;
            if (ab_stream_room(op) <= 0) {
                AB_AWAIT(op, ab_await_demand(op));
                continue;
            }
            size_t n = (size_t)(nl - (s->buf + s->scan)) + 1;
            int rc = ab_yield_bytes(op, s->buf + s->scan, n);
            if (rc < 0)
                return ab_fail(op, rc);
            s->scan += n;
        }
        memmove(s->buf, s->buf + s->scan, s->len - s->scan);
        s->len -= s->scan;
        s->scan = 0;
        if (s->eof) {
            if (s->len > 0 && ab_yield_bytes(op, s->buf, s->len) < 0)
                return ab_fail(op, -ENOMEM);
            return ab_return_none(op);
        }
        if (s->len == sizeof(s->buf))
            return ab_fail_msg(op, -E2BIG, "lines: a line longer than %zu bytes", sizeof(s->buf));
        {
            ssize_t got = read(s->fd, s->buf + s->len, sizeof(s->buf) - s->len);
            if (got > 0) {
                s->len += (size_t)got;
                continue;
            }
            if (got == 0) {
                s->eof = 1;
                continue;
            }
            if (errno != EAGAIN && errno != EINTR)
                return ab_fail(op, -errno);
        }
        AB_AWAIT(op, ab_await_fd(op, s->fd, AB_EV_READ, -1));
    }
    AB_END(op);
}

static const ab_op_type lines_type = {
    .name = "lines",
    .state_size = sizeof(struct lines_state),
    .step = lines_step,
};

static PyObject *
py_lines(PyObject *module, PyObject *args)
{
    int fd;
    Py_ssize_t max_buffered;
    (void)module;
    if (!PyArg_ParseTuple(args, "in", &fd, &max_buffered))
        return NULL;
    ab_op *op = ab_op_new(&lines_type);
    if (op == NULL)
        return PyErr_NoMemory();
    ((struct lines_state *)ab_op_state(op))->fd = fd;
    return abpy_wrap_stream(op, max_buffered);
}

/* sdk_threadsafe(loop, fut): the SDK thread resolves fut through
 * loop.call_soon_threadsafe(fut.set_result, None). */
static PyObject *
py_sdk_threadsafe(PyObject *module, PyObject *args)
{
    PyObject *loop, *fut;
    (void)module;
    if (!PyArg_ParseTuple(args, "OO", &loop, &fut))
        return NULL;
    struct request *r = calloc(1, sizeof(*r));
    if (r == NULL)
        return PyErr_NoMemory();
    r->efd = -1;
    if ((r->set_result = PyObject_GetAttrString(fut, "set_result")) == NULL) {
        free(r);
        return NULL;
    }
    r->loop = Py_NewRef(loop);
    if (enqueue(r) < 0) {
        Py_DECREF(r->set_result);
        Py_DECREF(r->loop);
        free(r);
        return PyErr_Format(PyExc_RuntimeError, "cannot start the SDK thread");
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"sdk_threadsafe", py_sdk_threadsafe, METH_VARARGS, NULL},
    {"sdk_signal", py_sdk_signal, METH_NOARGS, NULL},
    {"sdk_eventfd", py_sdk_eventfd, METH_NOARGS, NULL},
    {"lines", py_lines, METH_VARARGS, NULL},
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
    .m_name = "abr_benchops",
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit_abr_benchops(void)
{
    return PyModuleDef_Init(&def);
}
