/* ext.c: bridge_example._ext, three native ops written on asyncio_bridge's
 * public C API alone (asyncio_bridge.h, found through get_include()).
 *
 *   fetch(host, port, payload, nbytes, timeout)  a socket state machine
 *   compress(data, level=6)                      zlib on the worker pool
 *   retry(fn, attempts, delay)                   awaits a Python coroutine
 *
 * Each op has the same three parts: a state struct (zeroed, allocated with
 * the op), a step function that the engine thread resumes, and a Python
 * function that checks the arguments, fills the state and returns
 * abpy_wrap(op), the awaitable. */
#include "asyncio_bridge.h" /* first: it includes Python.h */

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <zlib.h>

/* ==== fetch ================================================================ */

#define FETCH_FIRST_CHUNK 65536

struct fetch_state {
    struct sockaddr_storage addr;
    socklen_t addrlen;
    char peer[INET6_ADDRSTRLEN + 8]; /* "host:port", for messages */
    const char *payload;             /* pinned with abpy_keep_buffer */
    size_t payload_len, sent;
    char *buf; /* what was read; freed by cleanup */
    size_t nbytes, got, cap;
    double timeout; /* per step; < 0: none */
    int fd;         /* -1 until the step opens it; closed by cleanup */
};

/* Sockets opened by fetch and not yet closed; a test hook. */
static atomic_long open_sockets;

static int
would_block(int err)
{
    return err == EAGAIN || err == EWOULDBLOCK || err == EINTR;
}

/* 0 when connected, 1 when in progress, or a negative errno. */
static int
fetch_connect(struct fetch_state *s)
{
    s->fd = socket(s->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s->fd < 0)
        return -errno;
    atomic_fetch_add(&open_sockets, 1);
    if (connect(s->fd, (struct sockaddr *)&s->addr, s->addrlen) == 0)
        return 0;
    return errno == EINPROGRESS ? 1 : -errno;
}

/* The outcome of a non-blocking connect: 0 or a negative errno. */
static int
socket_error(int fd)
{
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        return -errno;
    return -err;
}

/* Room for one more read, doubling up to nbytes: 0 or -ENOMEM. */
static int
fetch_grow(struct fetch_state *s)
{
    size_t cap = s->cap ? s->cap * 2 : FETCH_FIRST_CHUNK;
    if (cap > s->nbytes)
        cap = s->nbytes;
    char *buf = realloc(s->buf, cap);
    if (buf == NULL)
        return -ENOMEM;
    s->buf = buf;
    s->cap = cap;
    return 0;
}

static int
fetch_timed_out(ab_op *op, const char *what)
{
    struct fetch_state *s = ab_op_state(op);
    return ab_fail_msg(op, -ETIMEDOUT, "%s %s timed out after %g s", what, s->peer,
                       s->timeout);
}

/* Engine thread.  Locals do not survive an AB_AWAIT: progress lives in s. */
static int
fetch_step(ab_op *op)
{
    struct fetch_state *s = ab_op_state(op);
    int rc = 0;
    ssize_t n = 0;
    AB_BEGIN(op);

    rc = fetch_connect(s);
    if (rc < 0)
        return ab_fail_msg(op, rc, "connect to %s: %s", s->peer, strerror(-rc));
    if (rc == 1) {
        AB_AWAIT(op, ab_await_fd(op, s->fd, AB_EV_WRITE, s->timeout));
        if (!(ab_op_event(op) & AB_EV_WRITE))
            return fetch_timed_out(op, "connect to");
        if ((rc = socket_error(s->fd)) < 0)
            return ab_fail_msg(op, rc, "connect to %s: %s", s->peer, strerror(-rc));
    }

    while (s->sent < s->payload_len) {
        n = send(s->fd, s->payload + s->sent, s->payload_len - s->sent, MSG_NOSIGNAL);
        if (n >= 0) {
            s->sent += (size_t)n;
            continue;
        }
        if (!would_block(rc = errno))
            return ab_fail_msg(op, -rc, "send to %s: %s", s->peer, strerror(rc));
        AB_AWAIT(op, ab_await_fd(op, s->fd, AB_EV_WRITE, s->timeout));
        if (!(ab_op_event(op) & AB_EV_WRITE))
            return fetch_timed_out(op, "send to");
    }

    while (s->got < s->nbytes) {
        if (s->got == s->cap && fetch_grow(s) < 0)
            return ab_fail(op, -ENOMEM);
        n = recv(s->fd, s->buf + s->got, s->cap - s->got, 0);
        if (n > 0) {
            s->got += (size_t)n;
            continue;
        }
        if (n == 0)
            break; /* EOF */
        if (!would_block(rc = errno))
            return ab_fail_msg(op, -rc, "recv from %s: %s", s->peer, strerror(rc));
        AB_AWAIT(op, ab_await_fd(op, s->fd, AB_EV_READ, s->timeout));
        if (!(ab_op_event(op) & AB_EV_READ))
            return fetch_timed_out(op, "read from");
    }
    return ab_return_bytes(op, s->buf, s->got);
    AB_END(op);
}

/* Exactly once: on the engine thread after the last step (success, error
 * or cancellation at any await), or, for an op never awaited, on the
 * thread that drops it (then fd is still -1). */
static void
fetch_cleanup(ab_op *op)
{
    struct fetch_state *s = ab_op_state(op);
    if (s->fd >= 0) {
        close(s->fd);
        s->fd = -1;
        atomic_fetch_sub(&open_sockets, 1);
    }
    free(s->buf);
    s->buf = NULL;
}

static const ab_op_type fetch_type = {
    .name = "bridge_example.fetch",
    .state_size = sizeof(struct fetch_state),
    .step = fetch_step,
    .cleanup = fetch_cleanup,
};

/* 0, or -1 with ValueError: host must be a numeric IPv4 or IPv6 address. */
static int
parse_address(struct fetch_state *s, const char *host, int port)
{
    struct sockaddr_in *in4 = (struct sockaddr_in *)&s->addr;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&s->addr;
    if (inet_pton(AF_INET, host, &in4->sin_addr) == 1) {
        in4->sin_family = AF_INET;
        in4->sin_port = htons((uint16_t)port);
        s->addrlen = sizeof(*in4);
        snprintf(s->peer, sizeof(s->peer), "%s:%d", host, port);
        return 0;
    }
    if (inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)port);
        s->addrlen = sizeof(*in6);
        snprintf(s->peer, sizeof(s->peer), "[%s]:%d", host, port);
        return 0;
    }
    PyErr_Format(PyExc_ValueError,
                 "host must be a numeric IPv4 or IPv6 address (no name lookup): %.100s", host);
    return -1;
}

static PyObject *
py_fetch(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"host", "port", "payload", "nbytes", "timeout", NULL};
    const char *host;
    int port;
    Py_ssize_t nbytes;
    PyObject *payload, *timeout = Py_None;
    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "siOn|O:fetch", kwlist, &host, &port,
                                     &payload, &nbytes, &timeout))
        return NULL;
    if (port < 0 || port > 65535)
        return PyErr_Format(PyExc_ValueError, "port must be in 0..65535, not %d", port);
    if (nbytes < 0)
        return PyErr_Format(PyExc_ValueError, "nbytes must be >= 0, not %zd", nbytes);
    double seconds = abpy_seconds(timeout, "timeout", 1);
    if (seconds < -1.5)
        return NULL;

    ab_op *op = ab_op_new(&fetch_type);
    if (op == NULL)
        return PyErr_NoMemory();
    struct fetch_state *s = ab_op_state(op);
    s->fd = -1; /* before anything can fail: cleanup reads it */
    s->nbytes = (size_t)nbytes;
    s->timeout = seconds;
    Py_buffer *view;
    if (parse_address(s, host, port) < 0 ||
        (view = abpy_keep_buffer(op, payload, PyBUF_SIMPLE)) == NULL) {
        ab_op_release(op);
        return NULL;
    }
    s->payload = view->buf;
    s->payload_len = (size_t)view->len;
    return abpy_wrap(op);
}

/* ==== compress ============================================================= */

struct compress_state {
    const Bytef *data; /* pinned with abpy_keep_buffer */
    size_t len;
    int level;
    int zrc;     /* compress2's return code */
    Bytef *out;  /* malloc'd by the pool function; freed by the step or cleanup */
    size_t out_len;
};

/* A pool thread, without the GIL: only C data. */
static void
compress_work(ab_op *op)
{
    struct compress_state *s = ab_op_state(op);
    uLongf len = compressBound((uLong)s->len);
    s->out = malloc(len ? len : 1);
    if (s->out == NULL) {
        s->zrc = Z_MEM_ERROR;
        return;
    }
    s->zrc = compress2(s->out, &len, s->data, (uLong)s->len, s->level);
    s->out_len = len;
}

static int
compress_step(ab_op *op)
{
    struct compress_state *s = ab_op_state(op);
    int rc = 0;
    AB_BEGIN(op);
    AB_AWAIT(op, ab_await_work(op, compress_work));
    if (s->zrc != Z_OK)
        return ab_fail_msg(op, s->zrc == Z_MEM_ERROR ? -ENOMEM : -EIO, "zlib: %s",
                           zError(s->zrc));
    rc = ab_return_bytes(op, s->out, s->out_len); /* copies */
    free(s->out);
    s->out = NULL;
    return rc;
    AB_END(op);
}

/* Reached when cancellation struck after the pool function ran. */
static void
compress_cleanup(ab_op *op)
{
    struct compress_state *s = ab_op_state(op);
    free(s->out);
    s->out = NULL;
}

static const ab_op_type compress_type = {
    .name = "bridge_example.compress",
    .state_size = sizeof(struct compress_state),
    .step = compress_step,
    .cleanup = compress_cleanup,
};

static PyObject *
py_compress(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"data", "level", NULL};
    PyObject *data;
    int level = 6;
    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|i:compress", kwlist, &data, &level))
        return NULL;
    if (level < -1 || level > 9)
        return PyErr_Format(PyExc_ValueError, "level must be in -1..9, not %d", level);
    ab_op *op = ab_op_new(&compress_type);
    if (op == NULL)
        return PyErr_NoMemory();
    /* Pinned until the op is freed: the pool may read it after the caller
     * cancelled or dropped every reference of its own. */
    Py_buffer *view = abpy_keep_buffer(op, data, PyBUF_SIMPLE);
    if (view == NULL) {
        ab_op_release(op);
        return NULL;
    }
    struct compress_state *s = ab_op_state(op);
    s->data = view->buf;
    s->len = (size_t)view->len;
    s->level = level;
    return abpy_wrap(op);
}

/* ==== retry ================================================================ */

struct retry_state {
    int fn; /* kept slot of the async callable */
    int attempts, tried;
    double delay;
};

static int
retry_step(ab_op *op)
{
    struct retry_state *s = ab_op_state(op);
    AB_BEGIN(op);
    for (;;) {
        AB_AWAIT(op, ab_await_python(op, s->fn));
        if (!ab_op_python_failed(op))
            return ab_return_python(op); /* fn's result */
        if (++s->tried >= s->attempts)
            return ab_fail(op, AB_EPYTHON); /* raises fn's last exception */
        AB_AWAIT(op, ab_await_timer(op, s->delay));
    }
    AB_END(op);
}

static const ab_op_type retry_type = {
    .name = "bridge_example.retry",
    .state_size = sizeof(struct retry_state),
    .flags = AB_TYPE_AWAITS_PYTHON, /* capture the caller's contextvars */
    .step = retry_step,
};

static PyObject *
py_retry(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"fn", "attempts", "delay", NULL};
    PyObject *fn, *delay;
    int attempts;
    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OiO:retry", kwlist, &fn, &attempts,
                                     &delay))
        return NULL;
    if (!PyCallable_Check(fn))
        return PyErr_Format(PyExc_TypeError, "fn must be callable, not %.100s",
                            Py_TYPE(fn)->tp_name);
    if (attempts < 1)
        return PyErr_Format(PyExc_ValueError, "attempts must be >= 1, not %d", attempts);
    double seconds = abpy_seconds(delay, "delay", 0);
    if (seconds < -1.5)
        return NULL;
    ab_op *op = ab_op_new(&retry_type);
    if (op == NULL)
        return PyErr_NoMemory();
    struct retry_state *s = ab_op_state(op);
    s->attempts = attempts;
    s->delay = seconds;
    if ((s->fn = abpy_keep(op, fn)) < 0) {
        ab_op_release(op);
        return NULL;
    }
    return abpy_wrap(op);
}

/* ==== the module =========================================================== */

static PyObject *
py_open_sockets(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return PyLong_FromLong(atomic_load(&open_sockets));
}

static PyMethodDef methods[] = {
    {"fetch", (PyCFunction)(void (*)(void))py_fetch, METH_VARARGS | METH_KEYWORDS,
     "fetch(host, port, payload, nbytes, timeout=None): connect, send payload, read until "
     "nbytes or EOF; each step times out after timeout seconds."},
    {"compress", (PyCFunction)(void (*)(void))py_compress, METH_VARARGS | METH_KEYWORDS,
     "compress(data, level=6): zlib.compress(data, level) on asyncio_bridge's worker pool."},
    {"retry", (PyCFunction)(void (*)(void))py_retry, METH_VARARGS | METH_KEYWORDS,
     "retry(fn, attempts, delay): await fn() until it succeeds, up to attempts times, "
     "waiting delay seconds between tries; raises the last exception."},
    {"open_sockets", py_open_sockets, METH_NOARGS,
     "open_sockets(): sockets fetch opened and has not closed yet (a test hook)."},
    {NULL, NULL, 0, NULL},
};

static int
module_exec(PyObject *module)
{
    (void)module;
    /* ImportError if asyncio_bridge is missing or speaks another C API
     * version; from here on every ab_* and abpy_* call goes through it. */
    return AsyncioBridge_Import();
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "bridge_example._ext",
    .m_doc = "Native ops on asyncio_bridge's C API: fetch, compress, retry.",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit__ext(void)
{
    return PyModuleDef_Init(&module_def);
}
