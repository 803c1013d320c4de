/* ext.c: bridge_example._ext, native ops written on asyncio_bridge's public
 * C API alone (asyncio_bridge.h, found through get_include()).
 *
 *   fetch(host, port, payload, nbytes, timeout)  a socket state machine
 *   compress(data, level=6)                      zlib on the worker pool (a
 *                                                work op: no engine hop)
 *   retry(fn, attempts, delay)                   awaits a Python coroutine
 *   resolve(host, port=None, timeout=None)       getaddrinfo_a: completed by
 *                                                a thread glibc creates
 *   sdk_call(delay, value)                       completed by a thread of
 *                                                this module (a vendor SDK)
 *   read_lines(fd, max_buffered=64)              a stream: one item per line,
 *                                                with backpressure
 *
 * Each op has the same three parts: a state struct (zeroed, allocated with
 * the op), a step function that the engine thread resumes, and a Python
 * function that checks the arguments, fills the state and returns
 * abpy_wrap(op), the awaitable (abpy_wrap_stream(op, n) for a stream). */
#include "asyncio_bridge.h" /* first: it includes Python.h (and _GNU_SOURCE) */

#include <arpa/inet.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

/* Test hooks: what the ops below hold, so that a test can tell that every
 * reference given to a foreign thread came back and every op was freed.
 * "live" counts ops made and not yet freed (their dispose has not run). */
static struct {
    atomic_long resolve_live;
    atomic_long resolve_callbacks;   /* glibc's callbacks that ran */
    atomic_long resolve_unreleased;  /* references held for a callback */
    atomic_long gai_canceled, gai_notcanceled, gai_alldone; /* gai_cancel's answers */
    atomic_long sdk_live;
    atomic_long lines_live;
    atomic_long lines_emitted; /* items read_lines yielded, all streams */
} counters;

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
};

/* A work op (AB_TYPE_WORK): this step runs once, on a worker pool thread,
 * without the GIL, so it touches only C data.  The op goes from the loop to
 * the worker and its outcome from the worker back to the loop, without a
 * hop through the engine thread. */
static int
compress_step(ab_op *op)
{
    struct compress_state *s = ab_op_state(op);
    uLongf len = compressBound((uLong)s->len);
    Bytef *out = malloc(len ? len : 1);
    if (out == NULL)
        return ab_fail(op, -ENOMEM);
    int zrc = compress2(out, &len, s->data, (uLong)s->len, s->level);
    int rc = zrc == Z_OK ? ab_return_bytes(op, out, len) /* copies */
                         : ab_fail_msg(op, zrc == Z_MEM_ERROR ? -ENOMEM : -EIO, "zlib: %s",
                                       zError(zrc));
    free(out);
    return rc;
}

static const ab_op_type compress_type = {
    .name = "bridge_example.compress",
    .state_size = sizeof(struct compress_state),
    .flags = AB_TYPE_WORK,
    .step = compress_step,
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

/* ==== resolve ============================================================== */

/* glibc's getaddrinfo_a runs the lookup on a thread of its own and, with
 * SIGEV_THREAD, calls resolve_notified on yet another thread it creates.
 * The step retains the op for that callback and waits for its signal.
 *
 * Who owns what:
 *   - s->host, s->port, s->hints and s->req are read and written by glibc
 *     until the lookup ends, which may be after the op finished (a cancel
 *     that came while the lookup ran).  They live in the state, and the
 *     callback's reference keeps the state.
 *   - The callback's reference is dropped by the callback, or by the step
 *     when gai_cancel dequeued the lookup before it ran (EAI_CANCELED):
 *     then glibc never calls back.
 *   - s->req.ar_result is written by glibc before it calls back, read by
 *     to_python on the loop thread (after cleanup) and freed by dispose,
 *     when the op is freed: after the callback's release, whichever path
 *     the op took. */

/* The op's own error code: the lookup failed with s->gai_rc, raised as
 * socket.gaierror by resolve_raise. */
enum { RESOLVE_EGAI = AB_EUSER - 1 };

struct resolve_state {
    char host[NI_MAXHOST];
    char port[NI_MAXSERV];
    struct addrinfo hints;
    struct gaicb req;
    double timeout; /* < 0: none */
    int gai_rc;     /* why the lookup failed, for resolve_raise */
};

/* Drop the reference that was taken for the callback. */
static void
resolve_unref(ab_op *op)
{
    atomic_fetch_sub(&counters.resolve_unreleased, 1);
    ab_op_release(op); /* may free the op, on this thread */
}

/* A thread glibc creates once the lookup ended: the outcome is in
 * s->req.  No Python here, and no state but what glibc wrote. */
static void
resolve_notified(union sigval value)
{
    ab_op *op = value.sival_ptr;
    atomic_fetch_add(&counters.resolve_callbacks, 1);
    ab_op_signal(op); /* glibc's writes happen before it: the step sees them */
    resolve_unref(op);
}

/* Engine thread: start the lookup, with a reference to op for its
 * callback.  0, or a gai error code. */
static int
resolve_start(ab_op *op, struct resolve_state *s)
{
    struct gaicb *list[1] = {&s->req};
    struct sigevent notify;
    int rc;
    memset(&notify, 0, sizeof(notify));
    notify.sigev_notify = SIGEV_THREAD;
    notify.sigev_notify_function = resolve_notified;
    notify.sigev_value.sival_ptr = op; /* glibc copies the sigevent */
    ab_op_retain(op);
    atomic_fetch_add(&counters.resolve_unreleased, 1);
    /* Takes glibc's request lock for a moment; never waits for a lookup. */
    rc = getaddrinfo_a(GAI_NOWAIT, list, 1, &notify);
    /* EAI_SYSTEM: glibc could queue nothing, and then notifies at once
     * (getaddrinfo_a.c, total == 0): the callback comes and releases.
     * EAI_AGAIN: the lookup was queued, but glibc had no memory for the
     * notification, so it runs and never calls back.  If it runs now it
     * will write into s->req: the reference stays, and the op leaks rather
     * than being freed under glibc's feet. */
    if (rc != 0 && rc != EAI_SYSTEM && gai_cancel(&s->req) != EAI_NOTCANCELED)
        resolve_unref(op);
    return rc;
}

/* Engine thread: the step gives up on a lookup (cancelled, timed out).
 * glibc (2.36 at least) never frees its bookkeeping for a lookup that
 * gai_cancel dequeues (the sigevent's notification list, about 150 bytes):
 * a bounded cost per cancel, cheaper than leaving dead lookups queued ahead
 * of live ones while DNS is slow. */
static void
resolve_abandon(ab_op *op, struct resolve_state *s)
{
    switch (gai_cancel(&s->req)) {
    case EAI_CANCELED: /* dequeued before it ran: glibc never calls back */
        atomic_fetch_add(&counters.gai_canceled, 1);
        resolve_unref(op);
        break;
    case EAI_NOTCANCELED: /* running: the callback comes later and releases */
        atomic_fetch_add(&counters.gai_notcanceled, 1);
        break;
    default: /* EAI_ALLDONE: the callback came or is on its way */
        atomic_fetch_add(&counters.gai_alldone, 1);
        break;
    }
}

static int
resolve_failed(ab_op *op, int gai_rc)
{
    struct resolve_state *s = ab_op_state(op);
    s->gai_rc = gai_rc;
    return ab_fail_msg(op, RESOLVE_EGAI, "%s", gai_strerror(gai_rc));
}

/* Engine thread. */
static int
resolve_step(ab_op *op)
{
    struct resolve_state *s = ab_op_state(op);
    int rc = 0;
    AB_BEGIN(op);
    if ((rc = resolve_start(op, s)) != 0)
        return resolve_failed(op, rc);
    AB_AWAIT_OR_CANCEL(op, ab_await_signal(op, s->timeout));
    if (ab_op_cancelled(op) || !(ab_op_event(op) & AB_EV_SIGNAL)) {
        resolve_abandon(op, s);
        if (ab_op_cancelled(op))
            return ab_fail(op, -ECANCELED);
        return ab_fail_msg(op, -ETIMEDOUT, "resolving %s timed out after %g s", s->host,
                           s->timeout);
    }
    if ((rc = gai_error(&s->req)) != 0)
        return resolve_failed(op, rc);
    return ab_return_custom(op); /* resolve_to_python reads s->req.ar_result */
    AB_END(op);
}

/* Loop thread, GIL: sets socket.gaierror(code, message), as
 * socket.getaddrinfo raises it, and returns NULL. */
static PyObject *
resolve_raise(ab_op *op, int err)
{
    struct resolve_state *s = ab_op_state(op);
    PyObject *socket_module, *gaierror, *args;
    (void)err; /* RESOLVE_EGAI, the only code of this type */
    if ((socket_module = PyImport_ImportModule("socket")) == NULL)
        return NULL;
    gaierror = PyObject_GetAttrString(socket_module, "gaierror");
    Py_DECREF(socket_module);
    if (gaierror == NULL)
        return NULL;
    args = Py_BuildValue("(is)", s->gai_rc, gai_strerror(s->gai_rc));
    if (args != NULL) {
        PyErr_SetObject(gaierror, args);
        Py_DECREF(args);
    }
    Py_DECREF(gaierror);
    return NULL;
}

/* The port of an AF_INET or AF_INET6 address, in host order. */
static int
sockaddr_port(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET)
        return ntohs(((const struct sockaddr_in *)sa)->sin_port);
    if (sa->sa_family == AF_INET6)
        return ntohs(((const struct sockaddr_in6 *)sa)->sin6_port);
    return 0;
}

/* Loop thread, GIL, after cleanup: [(family, address, port), ...] in
 * glibc's order; a new reference, or NULL with an exception set. */
static PyObject *
resolve_to_python(ab_op *op)
{
    struct resolve_state *s = ab_op_state(op);
    const struct addrinfo *ai;
    char host[NI_MAXHOST];
    PyObject *list, *item;
    int rc;
    if ((list = PyList_New(0)) == NULL)
        return NULL;
    for (ai = s->req.ar_result; ai != NULL; ai = ai->ai_next) {
        /* Numeric: formats the address, asks no server. */
        rc = getnameinfo(ai->ai_addr, ai->ai_addrlen, host, sizeof(host), NULL, 0,
                         NI_NUMERICHOST);
        if (rc != 0) {
            Py_DECREF(list);
            s->gai_rc = rc;
            return resolve_raise(op, RESOLVE_EGAI);
        }
        item = Py_BuildValue("(isi)", ai->ai_family, host, sockaddr_port(ai->ai_addr));
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(item);
    }
    return list;
}

/* Once, when the op is freed: the callback has released its reference
 * (or never had one) and to_python, if it ran, is done. */
static void
resolve_dispose(ab_op *op)
{
    struct resolve_state *s = ab_op_state(op);
    if (s->req.ar_result != NULL)
        freeaddrinfo(s->req.ar_result);
    s->req.ar_result = NULL;
    atomic_fetch_sub(&counters.resolve_live, 1);
}

static const ab_op_type resolve_type = {
    .name = "bridge_example.resolve",
    .state_size = sizeof(struct resolve_state),
    .step = resolve_step,
    .to_python = resolve_to_python,
    .raise_error = resolve_raise,
    .dispose = resolve_dispose,
};

static PyObject *
py_resolve(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"host", "port", "timeout", NULL};
    const char *host, *port = NULL;
    PyObject *timeout = Py_None;
    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "s|zO:resolve", kwlist, &host, &port,
                                     &timeout))
        return NULL;
    if (strlen(host) >= NI_MAXHOST)
        return PyErr_Format(PyExc_ValueError, "host is longer than %d bytes", NI_MAXHOST - 1);
    if (port != NULL && strlen(port) >= NI_MAXSERV)
        return PyErr_Format(PyExc_ValueError, "port is longer than %d bytes", NI_MAXSERV - 1);
    double seconds = abpy_seconds(timeout, "timeout", 1);
    if (seconds < -1.5)
        return NULL;

    ab_op *op = ab_op_new(&resolve_type);
    if (op == NULL)
        return PyErr_NoMemory();
    atomic_fetch_add(&counters.resolve_live, 1);
    struct resolve_state *s = ab_op_state(op);
    strcpy(s->host, host); /* lengths checked above */
    s->req.ar_name = s->host;
    if (port != NULL) {
        strcpy(s->port, port);
        s->req.ar_service = s->port;
    }
    s->hints.ai_family = AF_UNSPEC;
    s->hints.ai_socktype = SOCK_STREAM; /* one entry per address, not per socket type */
    s->req.ar_request = &s->hints;
    s->timeout = seconds;
    return abpy_wrap(op);
}

/* ==== sdk_call ============================================================= */

/* A stand-in for a vendor SDK that completes requests on a thread of its
 * own: one thread, started by the first request, takes requests from a
 * FIFO queue one at a time, works on each for its delay (a sleep that it
 * cannot cut short, as a real SDK call), then writes the result into the
 * op's state and calls ab_op_signal and ab_op_release.
 *
 * The queue holds a reference to each op in it; whoever takes the request
 * out drops it: the thread after completing it, or the step when a cancel
 * finds it still queued.  A request the thread runs when its op is
 * cancelled is let finish; its result is dropped.
 *
 * The thread is joined when the last module object is freed (at
 * interpreter exit, after asyncio_bridge stopped its engine and abandoned
 * the ops in flight): requests still queued then are abandoned with them,
 * their references never dropped, as the engine leaks its ops in flight at
 * exit rather than run their code for an interpreter that is going away.
 * In a fork child the thread is gone: the child forgets the queue (the
 * parent's ops fail there with asyncio_bridge.ForkError, and their
 * references are leaked in the child) and starts a thread of its own on
 * its first request. */

enum { SDK_QUEUED = 1, SDK_RUNNING, SDK_DONE };

#define SDK_MAX_DELAY 3600 /* seconds */

struct sdk_state {
    double delay;
    int64_t value;
    ab_op *op; /* for the thread's ab_op_signal and ab_op_release */
    /* Guarded by sdk.lock. */
    struct sdk_state *prev, *next; /* the queue, while SDK_QUEUED */
    int phase;                     /* 0 until queued, then SDK_* */
    int abandoned;                 /* cancelled while it ran: drop the result */
    int64_t result;
};

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake; /* a request arrived, or stop; CLOCK_MONOTONIC */
    struct sdk_state *head, *tail;
    pthread_t thread;
    int running;  /* the thread exists */
    int stopping; /* the last module object went: the thread leaves */
    int users;    /* module objects alive */
    /* Test hooks. */
    int busy; /* the thread runs a request */
    long queued, removed, dropped, completed;
} sdk = {.lock = PTHREAD_MUTEX_INITIALIZER};

static void
sdk_init_wake(void)
{
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&sdk.wake, &attr);
    pthread_condattr_destroy(&attr);
}

/* The child of a fork, which has no SDK thread.  No prepare handler locks
 * sdk.lock around the fork: asyncio_bridge's own prepare handler waits for
 * the engine thread to park, and that thread may be waiting for sdk.lock
 * in sdk_submit.  So the child makes a new lock rather than trust the
 * copy, and drops a queue that may have been half updated. */
static void
sdk_atfork_child(void)
{
    pthread_mutex_init(&sdk.lock, NULL);
    sdk_init_wake();
    sdk.head = sdk.tail = NULL;
    sdk.running = sdk.stopping = sdk.busy = 0;
    sdk.queued = 0;
}

static pthread_once_t sdk_once = PTHREAD_ONCE_INIT;

static void
sdk_init(void)
{
    sdk_init_wake();
    pthread_atfork(NULL, NULL, sdk_atfork_child);
}

/* Lock held. */
static void
sdk_push(struct sdk_state *r)
{
    r->prev = sdk.tail;
    r->next = NULL;
    if (sdk.tail != NULL)
        sdk.tail->next = r;
    else
        sdk.head = r;
    sdk.tail = r;
    sdk.queued++;
}

/* Lock held. */
static void
sdk_unlink(struct sdk_state *r)
{
    if (r->prev != NULL)
        r->prev->next = r->next;
    else
        sdk.head = r->next;
    if (r->next != NULL)
        r->next->prev = r->prev;
    else
        sdk.tail = r->prev;
    r->prev = r->next = NULL;
    sdk.queued--;
}

/* Lock held (released while it waits): the vendor's work on one request.
 * 0, or -1 when the thread must stop. */
static int
sdk_work_locked(double seconds)
{
    struct timespec until;
    if (seconds <= 0)
        return sdk.stopping ? -1 : 0;
    clock_gettime(CLOCK_MONOTONIC, &until);
    until.tv_sec += (time_t)seconds;
    until.tv_nsec += (long)((seconds - (double)(time_t)seconds) * 1e9);
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    while (!sdk.stopping)
        if (pthread_cond_timedwait(&sdk.wake, &sdk.lock, &until) == ETIMEDOUT)
            return 0;
    return -1;
}

/* The SDK thread.  It never takes the GIL. */
static void *
sdk_main(void *unused)
{
    struct sdk_state *r;
    ab_op *op;
    (void)unused;
    pthread_mutex_lock(&sdk.lock);
    for (;;) {
        while (sdk.head == NULL && !sdk.stopping)
            pthread_cond_wait(&sdk.wake, &sdk.lock);
        if (sdk.stopping)
            break;
        r = sdk.head;
        sdk_unlink(r);
        r->phase = SDK_RUNNING;
        sdk.busy = 1;
        if (sdk_work_locked(r->delay) < 0)
            break;
        r->result = r->value;
        r->phase = SDK_DONE;
        sdk.busy = 0;
        sdk.completed++;
        sdk.dropped += r->abandoned;
        op = r->op;
        pthread_mutex_unlock(&sdk.lock);
        ab_op_signal(op);  /* harmless if the step gave up on it */
        ab_op_release(op); /* the queue's reference; may free the op here */
        pthread_mutex_lock(&sdk.lock);
    }
    pthread_mutex_unlock(&sdk.lock);
    return NULL;
}

/* Lock held.  The thread starts with every signal blocked, so that
 * Python's handlers run on the threads Python expects.  0 or -errno. */
static int
sdk_start_locked(void)
{
    sigset_t all, old;
    int rc;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&sdk.thread, NULL, sdk_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0)
        return -rc;
    sdk.running = 1;
    return 0;
}

/* Engine thread: queue the request, the queue holding a reference to op,
 * and start the thread if needed.  The lock is only ever held for a few
 * instructions, so taking it here does not block the engine.  0, or a
 * negative error. */
static int
sdk_submit(ab_op *op, struct sdk_state *s)
{
    int rc = 0;
    pthread_mutex_lock(&sdk.lock);
    if (sdk.stopping)
        rc = AB_ESHUTDOWN;
    else if (!sdk.running)
        rc = sdk_start_locked();
    if (rc == 0) {
        ab_op_retain(op);
        s->phase = SDK_QUEUED;
        sdk_push(s);
        pthread_cond_signal(&sdk.wake);
    }
    pthread_mutex_unlock(&sdk.lock);
    return rc;
}

/* Engine thread: the step gives up on its request.  A queued one leaves
 * the queue and its reference is dropped here; a running one is marked,
 * and the thread drops its result (and the reference) when it is done. */
static void
sdk_withdraw(ab_op *op, struct sdk_state *s)
{
    int was_queued;
    pthread_mutex_lock(&sdk.lock);
    was_queued = s->phase == SDK_QUEUED;
    if (was_queued) {
        sdk_unlink(s);
        sdk.removed++;
    } else if (s->phase == SDK_RUNNING) {
        s->abandoned = 1;
    }
    pthread_mutex_unlock(&sdk.lock);
    if (was_queued)
        ab_op_release(op);
}

/* Engine thread. */
static int
sdk_step(ab_op *op)
{
    struct sdk_state *s = ab_op_state(op);
    int rc = 0;
    AB_BEGIN(op);
    if ((rc = sdk_submit(op, s)) < 0)
        return ab_fail(op, rc);
    AB_AWAIT_OR_CANCEL(op, ab_await_signal(op, -1));
    if (ab_op_cancelled(op)) {
        sdk_withdraw(op, s);
        return ab_fail(op, -ECANCELED);
    }
    return ab_return_int(op, s->result); /* written before the signal */
    AB_END(op);
}

static void
sdk_dispose(ab_op *op)
{
    (void)op;
    atomic_fetch_sub(&counters.sdk_live, 1);
}

static const ab_op_type sdk_type = {
    .name = "bridge_example.sdk_call",
    .state_size = sizeof(struct sdk_state),
    .step = sdk_step,
    .dispose = sdk_dispose,
};

static PyObject *
py_sdk_call(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"delay", "value", NULL};
    PyObject *delay;
    long long value;
    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OL:sdk_call", kwlist, &delay, &value))
        return NULL;
    double seconds = abpy_seconds(delay, "delay", 0);
    if (seconds < -1.5)
        return NULL;
    if (seconds > SDK_MAX_DELAY)
        /* PyErr_Format knows no %g (3.12+ raise SystemError for it). */
        return PyErr_Format(PyExc_ValueError, "delay must be at most %d s", SDK_MAX_DELAY);
    ab_op *op = ab_op_new(&sdk_type);
    if (op == NULL)
        return PyErr_NoMemory();
    atomic_fetch_add(&counters.sdk_live, 1);
    struct sdk_state *s = ab_op_state(op);
    s->delay = seconds;
    s->value = value;
    s->op = op;
    return abpy_wrap(op);
}

/* The last module object is gone: stop the thread (see above). */
static void
sdk_stop(void)
{
    int join;
    pthread_mutex_lock(&sdk.lock);
    join = --sdk.users == 0 && sdk.running;
    if (join) {
        sdk.stopping = 1;
        pthread_cond_signal(&sdk.wake);
    }
    pthread_mutex_unlock(&sdk.lock);
    if (!join)
        return;
    /* Without the GIL: the thread may be freeing an op it released. */
    Py_BEGIN_ALLOW_THREADS
    pthread_join(sdk.thread, NULL);
    Py_END_ALLOW_THREADS
    pthread_mutex_lock(&sdk.lock);
    sdk.head = sdk.tail = NULL; /* abandoned, as explained above */
    sdk.running = sdk.stopping = sdk.busy = 0;
    sdk.queued = 0;
    pthread_mutex_unlock(&sdk.lock);
}

/* ==== read_lines =========================================================== */

/* A stream op: reads a non-blocking fd on the engine thread and emits each
 * line (newline included) as one bytes item.  It emits no more items than
 * the consumer has room for (ab_stream_room) and otherwise waits for
 * demand, and it reads no more while lines wait to be emitted: a slow
 * consumer leaves data in the pipe, so that the writer blocks.  At EOF it
 * emits the last line, unterminated, if there is one, and ends the
 * iteration.  A read error fails the op (OSError, raised after the items
 * emitted before it).  The fd is borrowed: the caller keeps it open until
 * the iteration is over (or aclose() returned) and closes it. */

#define LINES_CHUNK 65536    /* bytes per read() */
#define LINES_MAX (1 << 20)  /* a longer line fails the op with EMSGSIZE */

struct lines_state {
    int fd;
    char *buf; /* what was read; [start, len) not emitted yet; cleanup frees it */
    size_t start, len, cap;
    size_t scanned; /* [start, scanned) holds no newline */
    size_t line;    /* the length of the line lines_next found */
    int eof;
};

/* 1 with s->line set to the next line's length, 0 when no line is
 * complete, or -EMSGSIZE for a line longer than LINES_MAX. */
static int
lines_next(struct lines_state *s)
{
    const char *nl = NULL;
    if (s->scanned < s->len)
        nl = memchr(s->buf + s->scanned, '\n', s->len - s->scanned);
    if (nl != NULL) {
        s->line = (size_t)(nl - (s->buf + s->start)) + 1;
        return s->line > LINES_MAX ? -EMSGSIZE : 1;
    }
    s->scanned = s->len;
    if (s->len - s->start > LINES_MAX)
        return -EMSGSIZE;
    if (s->eof && s->len > s->start) {
        s->line = s->len - s->start;
        return 1;
    }
    return 0;
}

/* One read() after the bytes not yet emitted: > 0 bytes read, 0 at EOF, or
 * a negative errno (-EAGAIN: nothing to read now). */
static ssize_t
lines_fill(struct lines_state *s)
{
    ssize_t n;
    if (s->start > 0) {
        memmove(s->buf, s->buf + s->start, s->len - s->start);
        s->len -= s->start;
        s->scanned -= s->start;
        s->start = 0;
    }
    if (s->cap - s->len < LINES_CHUNK) {
        size_t cap = s->cap * 2 > s->len + LINES_CHUNK ? s->cap * 2 : s->len + LINES_CHUNK;
        char *buf = realloc(s->buf, cap);
        if (buf == NULL)
            return -ENOMEM;
        s->buf = buf;
        s->cap = cap;
    }
    do
        n = read(s->fd, s->buf + s->len, s->cap - s->len);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    s->eof = n == 0;
    s->len += (size_t)n;
    return n;
}

/* Engine thread.  One read per turn of the engine: the step waits for
 * readability between reads, so that a writer that never pauses cannot
 * keep the engine thread to itself. */
static int
lines_step(ab_op *op)
{
    struct lines_state *s = ab_op_state(op);
    ssize_t n = 0;
    int rc = 0;
    AB_BEGIN(op);
    for (;;) {
        n = lines_fill(s);
        if (n < 0 && n != -EAGAIN)
            return ab_fail_msg(op, (int)n, "read from fd %d: %s", s->fd, strerror((int)-n));
        while ((rc = lines_next(s)) == 1) {
            while (ab_stream_room(op) <= 0) {
                AB_AWAIT(op, ab_await_demand(op));
            }
            if ((rc = ab_yield_bytes(op, s->buf + s->start, s->line)) < 0)
                return ab_fail(op, rc);
            atomic_fetch_add(&counters.lines_emitted, 1);
            s->start += s->line;
            s->scanned = s->start;
        }
        if (rc < 0)
            return ab_fail_msg(op, rc, "fd %d: a line is longer than %d bytes", s->fd,
                               LINES_MAX);
        if (s->eof)
            return ab_return_none(op); /* ends the iteration after the last item */
        AB_AWAIT(op, ab_await_fd(op, s->fd, AB_EV_READ, -1));
    }
    AB_END(op);
}

static void
lines_cleanup(ab_op *op)
{
    struct lines_state *s = ab_op_state(op);
    free(s->buf);
    s->buf = NULL;
}

static void
lines_dispose(ab_op *op)
{
    (void)op;
    atomic_fetch_sub(&counters.lines_live, 1);
}

static const ab_op_type lines_type = {
    .name = "bridge_example.read_lines",
    .state_size = sizeof(struct lines_state),
    .step = lines_step,
    .cleanup = lines_cleanup,
    .dispose = lines_dispose,
};

static PyObject *
py_read_lines(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"fd", "max_buffered", NULL};
    PyObject *file;
    Py_ssize_t max_buffered = 64;
    int fd, flags;
    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|n:read_lines", kwlist, &file,
                                     &max_buffered))
        return NULL;
    if ((fd = abpy_fd(file)) < 0)
        return NULL;
    if (max_buffered < 1 || max_buffered > INT_MAX)
        return PyErr_Format(PyExc_ValueError, "max_buffered must be in 1..%d, not %zd",
                            INT_MAX, max_buffered);
    if ((flags = fcntl(fd, F_GETFL)) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (!(flags & O_NONBLOCK))
        return PyErr_Format(PyExc_ValueError,
                            "fd %d is blocking: read_lines reads on the engine thread, which "
                            "must never block (call os.set_blocking(fd, False))",
                            fd);
    ab_op *op = ab_op_new(&lines_type);
    if (op == NULL)
        return PyErr_NoMemory();
    atomic_fetch_add(&counters.lines_live, 1);
    struct lines_state *s = ab_op_state(op);
    s->fd = fd;
    return abpy_wrap_stream(op, max_buffered);
}

/* ==== the module =========================================================== */

static PyObject *
py_open_sockets(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return PyLong_FromLong(atomic_load(&open_sockets));
}

/* A new reference to a dict of the counters, or NULL with an exception. */
static PyObject *
py_counters(PyObject *module, PyObject *unused)
{
    long queued, removed, dropped, completed;
    int busy;
    (void)module;
    (void)unused;
    pthread_mutex_lock(&sdk.lock);
    queued = sdk.queued;
    removed = sdk.removed;
    dropped = sdk.dropped;
    completed = sdk.completed;
    busy = sdk.busy;
    pthread_mutex_unlock(&sdk.lock);
    return Py_BuildValue(
        "{s:l,s:l,s:l,s:l,s:l,s:l,s:l,s:l,s:l,s:l,s:l,s:i,s:l,s:l}",
        "resolve_live", atomic_load(&counters.resolve_live),
        "resolve_callbacks", atomic_load(&counters.resolve_callbacks),
        "resolve_unreleased", atomic_load(&counters.resolve_unreleased),
        "gai_canceled", atomic_load(&counters.gai_canceled),
        "gai_notcanceled", atomic_load(&counters.gai_notcanceled),
        "gai_alldone", atomic_load(&counters.gai_alldone),
        "sdk_live", atomic_load(&counters.sdk_live),
        "sdk_queued", queued,
        "sdk_removed", removed,
        "sdk_dropped", dropped,
        "sdk_completed", completed,
        "sdk_busy", busy,
        "lines_live", atomic_load(&counters.lines_live),
        "lines_emitted", atomic_load(&counters.lines_emitted));
}

#define KW (METH_VARARGS | METH_KEYWORDS)
#define FN(f) ((PyCFunction)(void (*)(void))(f))

static PyMethodDef methods[] = {
    {"fetch", FN(py_fetch), KW,
     "fetch(host, port, payload, nbytes, timeout=None): connect, send payload, read until "
     "nbytes or EOF; each step times out after timeout seconds."},
    {"compress", FN(py_compress), KW,
     "compress(data, level=6): zlib.compress(data, level) on asyncio_bridge's worker pool."},
    {"retry", FN(py_retry), KW,
     "retry(fn, attempts, delay): await fn() until it succeeds, up to attempts times, "
     "waiting delay seconds between tries; raises the last exception."},
    {"resolve", FN(py_resolve), KW,
     "resolve(host, port=None, timeout=None): getaddrinfo(host, port, type=SOCK_STREAM) "
     "without a thread of asyncio's: glibc's getaddrinfo_a looks it up and its callback, "
     "on a thread glibc creates, wakes the op.  Returns [(family, address, port), ...] "
     "with numeric addresses, in getaddrinfo's order.  Raises socket.gaierror as "
     "socket.getaddrinfo does, TimeoutError after timeout seconds.  host is passed to "
     "glibc as UTF-8 (no IDNA encoding)."},
    {"sdk_call", FN(py_sdk_call), KW,
     "sdk_call(delay, value): a request to a simulated vendor SDK whose one thread "
     "serves requests in order, each for delay seconds (0..3600), and completes it from "
     "that thread; returns value.  Cancelling a request that waits in the SDK's queue "
     "removes it; one the SDK works on is let finish and its result dropped."},
    {"read_lines", FN(py_read_lines), KW,
     "read_lines(fd, max_buffered=64): an async iterator over the lines of a "
     "non-blocking fd (an int or an object with fileno()), each a bytes object ending "
     "in b'\\n' except an unterminated last one.  At most max_buffered lines wait for "
     "the consumer; beyond that the fd is not read, so a writer blocks.  A read error "
     "raises OSError after the lines before it; a line longer than 1 MiB raises "
     "OSError(EMSGSIZE).  The fd is borrowed: keep it open until the iteration ended or "
     "aclose() returned, then close it yourself.  aclose(), or dropping the iterator, "
     "stops the native reader."},
    {"open_sockets", py_open_sockets, METH_NOARGS,
     "open_sockets(): sockets fetch opened and has not closed yet (a test hook)."},
    {"counters", py_counters, METH_NOARGS,
     "counters(): what the ops hold now and counts of what they did, as a dict (a test "
     "hook): resolve_live, sdk_live, lines_live (ops made and not yet freed); "
     "resolve_unreleased (references held for glibc's callbacks); resolve_callbacks; "
     "gai_canceled, gai_notcanceled, gai_alldone (gai_cancel's answers after a cancel or "
     "a timeout); sdk_queued, sdk_busy (the SDK's queue, its thread at work); "
     "sdk_removed (cancelled while queued), sdk_dropped (results of cancelled requests), "
     "sdk_completed; lines_emitted (lines read_lines yielded)."},
    {NULL, NULL, 0, NULL},
};

struct module_state {
    int counted; /* this module object counts among sdk.users */
};

static int
module_exec(PyObject *module)
{
    struct module_state *state = PyModule_GetState(module);
    /* ImportError if asyncio_bridge is missing or speaks another C API
     * version; from here on every ab_* and abpy_* call goes through it. */
    if (AsyncioBridge_Import() < 0)
        return -1;
    pthread_once(&sdk_once, sdk_init);
    pthread_mutex_lock(&sdk.lock);
    sdk.users++;
    pthread_mutex_unlock(&sdk.lock);
    state->counted = 1;
    return 0;
}

static void
module_free(void *module)
{
    struct module_state *state = PyModule_GetState(module);
    if (state != NULL && state->counted)
        sdk_stop();
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "bridge_example._ext",
    .m_doc = "Native ops on asyncio_bridge's C API: fetch, compress, retry, resolve, "
             "sdk_call and the stream read_lines.",
    .m_size = sizeof(struct module_state),
    .m_methods = methods,
    .m_slots = slots,
    .m_free = module_free,
};

PyMODINIT_FUNC
PyInit__ext(void)
{
    return PyModuleDef_Init(&module_def);
}
