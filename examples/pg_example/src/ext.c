/* ext.c: pg_example._ext, PostgreSQL through libpq's non-blocking API,
 * written on asyncio_bridge's public C API alone.
 *
 *   connect(conninfo, timeout=None)      -> Connection
 *   Connection.query(sql, timeout=None)  -> rows: a list of tuples of str/None
 *   Connection.close()
 *
 * Each returns an asyncio_bridge Op whose step runs on the engine thread
 * and drives libpq's non-blocking calls (PQconnectPoll, PQflush,
 * PQconsumeInput, PQgetResult), resumed by ab_await_fd on PQsocket.  The
 * two calls that block run on the blocking pool: PQconnectStart (it may
 * resolve a host name) and PQcancel (it opens a connection of its own).
 *
 * A query that is cancelled or times out is stopped on the server: PQcancel,
 * then what the server still sends is read and dropped, so that the
 * connection can run the next query. */
#include "asyncio_bridge.h" /* first: it includes Python.h */

#include <ctype.h>
#include <libpq-fe.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <structmember.h>
#include <time.h>

/* Error codes of our own (below AB_EUSER), raised by pg_raise_error. */
enum {
    PG_EFAILED = AB_EUSER - 1, /* PgError with the message and SQLSTATE in op_common */
    PG_EBUSY = AB_EUSER - 2,   /* RuntimeError: another operation uses the connection */
};

/* After a cancelled query, how long to wait for the server to finish it
 * before asking again, and how often to ask before closing the
 * connection (the cancel can reach the server before the query does). */
#define CANCEL_GRACE_SECONDS 1.0
#define CANCEL_ATTEMPTS 3

/* PGconns opened and not yet finished; a test hook. */
static atomic_long open_connections;

/* ==== time ================================================================= */

static double
now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* A deadline `seconds` from now, or -1.0 (none) for seconds < 0. */
static double
deadline_after(double seconds)
{
    return seconds < 0 ? -1.0 : now_seconds() + seconds;
}

/* The timeout to arm for a deadline: -1.0 (none), else >= 0. */
static double
seconds_until(double deadline)
{
    if (deadline < 0)
        return -1.0;
    double left = deadline - now_seconds();
    return left > 0 ? left : 0.0;
}

/* ==== sessions: a PGconn shared by a Connection and its ops ================= */

/* Freed with its last reference, on whichever thread drops it: the
 * Connection object holds one and every op that uses it another, so that
 * a Connection dropped while a query runs closes after the query. */
struct session {
    atomic_int refs;
    PGconn *pg; /* non-blocking; NULL once closed */
    /* Engine thread only. */
    ab_op *active; /* the op that uses pg, or NULL */
    ab_op *next;   /* waits for a cancelled `active` to finish; retained */
};

enum { SESSION_ENTERED = 0, SESSION_WAIT = 1 };

/* Any thread, no Python. */
static void
pg_finish(PGconn *pg)
{
    if (pg != NULL) {
        PQfinish(pg);
        atomic_fetch_sub(&open_connections, 1);
    }
}

/* A session that owns pg, with one reference (the caller's); NULL when out
 * of memory, and then pg is still the caller's. */
static struct session *
session_new(PGconn *pg)
{
    struct session *sess = calloc(1, sizeof(*sess));
    if (sess == NULL)
        return NULL;
    atomic_init(&sess->refs, 1);
    sess->pg = pg;
    return sess;
}

static void
session_retain(struct session *sess)
{
    atomic_fetch_add_explicit(&sess->refs, 1, memory_order_relaxed);
}

/* Any thread; NULL is ignored.  The last reference closes the connection
 * (PQfinish only queues a Terminate message on the non-blocking socket). */
static void
session_release(struct session *sess)
{
    if (sess != NULL && atomic_fetch_sub_explicit(&sess->refs, 1, memory_order_acq_rel) == 1) {
        pg_finish(sess->pg);
        free(sess);
    }
}

/* Engine thread, by the op that uses the connection. */
static void
session_close(struct session *sess)
{
    pg_finish(sess->pg);
    sess->pg = NULL;
}

/* Engine thread: make op the connection's user.  Returns SESSION_ENTERED;
 * SESSION_WAIT while a cancelled query still stops on the server (op is
 * then `next`, and ab_op_signal wakes it when that query is done); or
 * PG_EBUSY when an operation whose awaiter still waits uses it, or another
 * op waits already.  Cancellation is the engine's to see: a cancel posted
 * before a later op's start reaches its op first, so a query started
 * right after its predecessor was cancelled waits instead of failing. */
static int
session_enter(struct session *sess, ab_op *op)
{
    if (sess->active == NULL)
        sess->active = op;
    if (sess->active == op)
        return SESSION_ENTERED;
    if (!ab_op_cancelled(sess->active) || (sess->next != NULL && sess->next != op))
        return PG_EBUSY;
    if (sess->next == NULL) {
        ab_op_retain(op); /* for the signal that session_leave sends */
        sess->next = op;
    }
    return SESSION_WAIT;
}

/* Engine thread, from the cleanup of an op that called session_enter: give
 * up the place it holds or waits for; the op waiting next gets the
 * connection. */
static void
session_leave(struct session *sess, ab_op *op)
{
    ab_op *next = sess->next;
    if (next == op) {
        sess->next = NULL;
        ab_op_release(op);
        return;
    }
    if (sess->active != op)
        return;
    sess->active = next;
    sess->next = NULL;
    if (next != NULL) {
        ab_op_signal(next);
        ab_op_release(next);
    }
}

/* ==== errors =============================================================== */

/* The first member of every op's state, so that the op types share
 * pg_raise_error and the error's text outlives cleanup (it is read on the
 * loop thread after the op finished). */
struct op_common {
    int module;       /* kept slot: this module, for PgError and Connection */
    int failed;       /* an error was kept */
    char sqlstate[6]; /* the server's SQLSTATE, or "" */
    char *message;    /* its whole text (malloc'd; NULL if out of memory); freed by dispose */
};

/* Keep an error in full: ab_fail_msg would cut a server's message, which
 * can be kilobytes long, at 200 bytes.  sqlstate may be NULL. */
static void
keep_error(struct op_common *c, const char *message, const char *sqlstate)
{
    size_t len = strlen(message);
    while (len > 0 && isspace((unsigned char)message[len - 1]))
        len--; /* libpq ends its messages with a newline */
    free(c->message);
    c->message = malloc(len + 1);
    if (c->message != NULL) {
        memcpy(c->message, message, len);
        c->message[len] = '\0';
    }
    snprintf(c->sqlstate, sizeof(c->sqlstate), "%s", sqlstate != NULL ? sqlstate : "");
    c->failed = 1;
}

/* Fail op with PgError(message, sqlstate).  Returns AB_DONE. */
static int
fail_pg(ab_op *op, const char *message, const char *sqlstate)
{
    keep_error(ab_op_state(op), message, sqlstate);
    return ab_fail(op, PG_EFAILED);
}

/* Borrowed: the state of the module kept with op.  Owner thread. */
static struct module_state *
state_of(ab_op *op)
{
    struct op_common *c = ab_op_state(op);
    return PyModule_GetState(abpy_kept(op, c->module));
}

static void
common_dispose(ab_op *op)
{
    struct op_common *c = ab_op_state(op);
    free(c->message);
    c->message = NULL;
}

/* ==== the module's state and PgError ======================================= */

struct module_state {
    PyTypeObject *connection_type;
    PyObject *pg_error;
};

typedef struct {
    PyObject_HEAD
    struct session *sess; /* one reference; NULL only if its creation failed */
} ConnectionObject;

typedef struct {
    PyBaseExceptionObject base;
    PyObject *message;  /* str */
    PyObject *sqlstate; /* str or None */
} PgErrorObject;

/* PgError(message, sqlstate=None): args is (message,), so that str(exc) is
 * the message. */
static int
pg_error_init(PgErrorObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"message", "sqlstate", NULL};
    PyObject *message, *sqlstate = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "U|O:PgError", kwlist, &message, &sqlstate))
        return -1;
    if (sqlstate != Py_None && !PyUnicode_Check(sqlstate)) {
        PyErr_Format(PyExc_TypeError, "sqlstate must be str or None, not %.100s",
                     Py_TYPE(sqlstate)->tp_name);
        return -1;
    }
    PyObject *base_args = PyTuple_Pack(1, message);
    if (base_args == NULL)
        return -1;
    int rc = ((PyTypeObject *)PyExc_Exception)->tp_init((PyObject *)self, base_args, NULL);
    Py_DECREF(base_args);
    if (rc < 0)
        return -1;
    Py_XSETREF(self->message, Py_NewRef(message));
    Py_XSETREF(self->sqlstate, Py_NewRef(sqlstate));
    return 0;
}

static int
pg_error_traverse(PgErrorObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->message);
    Py_VISIT(self->sqlstate);
    return ((PyTypeObject *)PyExc_Exception)->tp_traverse((PyObject *)self, visit, arg);
}

static int
pg_error_clear(PgErrorObject *self)
{
    Py_CLEAR(self->message);
    Py_CLEAR(self->sqlstate);
    return ((PyTypeObject *)PyExc_Exception)->tp_clear((PyObject *)self);
}

static void
pg_error_dealloc(PgErrorObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    pg_error_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyMemberDef pg_error_members[] = {
    {"message", T_OBJECT, offsetof(PgErrorObject, message), READONLY,
     "the whole error text, as libpq reports it"},
    {"sqlstate", T_OBJECT, offsetof(PgErrorObject, sqlstate), READONLY,
     "the five-character SQLSTATE code, or None for errors of the client (libpq)"},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot pg_error_slots[] = {
    {Py_tp_doc, "PgError(message, sqlstate=None): an error reported by PostgreSQL or libpq."},
    {Py_tp_init, pg_error_init},
    {Py_tp_traverse, pg_error_traverse},
    {Py_tp_clear, pg_error_clear},
    {Py_tp_dealloc, pg_error_dealloc},
    {Py_tp_members, pg_error_members},
    {0, NULL},
};

static PyType_Spec pg_error_spec = {
    .name = "pg_example.PgError",
    .basicsize = sizeof(PgErrorObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC |
             Py_TPFLAGS_IMMUTABLETYPE,
    .slots = pg_error_slots,
};

/* raise_error of every op type, on the loop thread with the GIL: sets the
 * exception and returns NULL. */
static PyObject *
pg_raise_error(ab_op *op, int err)
{
    struct op_common *c = ab_op_state(op);
    if (err == PG_EBUSY) {
        const char *message = ab_op_error_message(op);
        PyErr_SetString(PyExc_RuntimeError, message != NULL ? message : "connection busy");
        return NULL;
    }
    const char *text = c->message != NULL ? c->message : "(no memory for the error's message)";
    PyObject *message = PyUnicode_DecodeUTF8(text, (Py_ssize_t)strlen(text), "replace");
    PyObject *sqlstate = c->sqlstate[0] != '\0' ? PyUnicode_FromString(c->sqlstate)
                                                : Py_NewRef(Py_None);
    PyObject *exc = NULL;
    if (message != NULL && sqlstate != NULL)
        exc = PyObject_CallFunctionObjArgs(state_of(op)->pg_error, message, sqlstate, NULL);
    Py_XDECREF(message);
    Py_XDECREF(sqlstate);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* ==== ops: what they share ================================================= */

/* A new op of `type`, whose state starts with op_common, keeping module:
 * our reference, or NULL with an exception set.  Zeroed state means
 * "nothing to free" to every cleanup below, so failing here is safe. */
static ab_op *
op_new_kept(const ab_op_type *type, PyObject *module)
{
    if (module == NULL)
        return NULL;
    ab_op *op = ab_op_new(type);
    if (op == NULL)
        return (ab_op *)PyErr_NoMemory();
    struct op_common *c = ab_op_state(op);
    if ((c->module = abpy_keep(op, module)) < 0) {
        ab_op_release(op);
        return NULL;
    }
    return op;
}

/* Borrowed UTF-8 of str (valid while str lives), or NULL with ValueError
 * for a NUL inside, which libpq's C strings cannot carry. */
static const char *
c_string(PyObject *str, const char *what)
{
    Py_ssize_t len;
    const char *utf8 = PyUnicode_AsUTF8AndSize(str, &len);
    if (utf8 != NULL && strlen(utf8) != (size_t)len) {
        PyErr_Format(PyExc_ValueError, "%s must not contain NUL characters", what);
        return NULL;
    }
    return utf8;
}

/* Notices (RAISE NOTICE, "table does not exist, skipping") are dropped
 * rather than printed on stderr, libpq's default. */
static void
drop_notice(void *arg, const char *message)
{
    (void)arg;
    (void)message;
}

/* ==== connect ============================================================== */

struct connect_state {
    struct op_common common;
    const char *conninfo; /* UTF-8 of the kept str */
    double timeout, deadline;
    PGconn *pg; /* ours until to_python moves it into a Connection */
    PostgresPollingStatusType poll;
    int connected;
};

/* The blocking pool: PQconnectStartParams resolves the first host's name
 * (a numeric address or a socket folder needs no lookup). */
static void
connect_start(ab_op *op)
{
    struct connect_state *s = ab_op_state(op);
    /* Later keywords override what conninfo (expanded as dbname) says:
     * text always arrives as UTF-8. */
    static const char *const keywords[] = {"dbname", "client_encoding", NULL};
    const char *values[] = {s->conninfo, "UTF8", NULL};
    s->pg = PQconnectStartParams(keywords, values, 1);
    if (s->pg != NULL) {
        atomic_fetch_add(&open_connections, 1);
        PQsetNoticeProcessor(s->pg, drop_notice, NULL);
    }
}

/* Engine thread.  libpq says which way to wait after each PQconnectPoll;
 * before the first, as if it had said "writing". */
static int
connect_step(ab_op *op)
{
    struct connect_state *s = ab_op_state(op);
    AB_BEGIN(op);
    s->deadline = deadline_after(s->timeout);
    AB_AWAIT(op, ab_await_blocking(op, connect_start));
    if (s->pg == NULL)
        return ab_fail(op, -ENOMEM);
    s->poll = PQstatus(s->pg) == CONNECTION_BAD ? PGRES_POLLING_FAILED : PGRES_POLLING_WRITING;
    while (s->poll != PGRES_POLLING_OK) {
        if (s->poll == PGRES_POLLING_FAILED)
            return fail_pg(op, PQerrorMessage(s->pg), NULL);
        /* PQsocket may change between polls (the next host, a retry
         * without SSL): ask each time. */
        AB_AWAIT(op, ab_await_fd(op, PQsocket(s->pg),
                                 s->poll == PGRES_POLLING_READING ? AB_EV_READ : AB_EV_WRITE,
                                 seconds_until(s->deadline)));
        if (ab_op_event(op) & AB_EV_TIMER)
            return ab_fail_msg(op, -ETIMEDOUT, "connect timed out after %g s", s->timeout);
        s->poll = PQconnectPoll(s->pg);
    }
    /* Queries send with PQflush's non-blocking contract. */
    if (PQsetnonblocking(s->pg, 1) != 0)
        return fail_pg(op, PQerrorMessage(s->pg), NULL);
    s->connected = 1;
    return ab_return_custom(op);
    AB_END(op);
}

/* Exactly once, after the last step (or on the thread that drops an op
 * never awaited): a connection that never got made is closed here. */
static void
connect_cleanup(ab_op *op)
{
    struct connect_state *s = ab_op_state(op);
    if (!s->connected) {
        pg_finish(s->pg);
        s->pg = NULL;
    }
}

/* Loop thread, after cleanup, only if the awaiter still waits: a new
 * reference to a Connection that takes the PGconn over. */
static PyObject *
connect_to_python(ab_op *op)
{
    struct connect_state *s = ab_op_state(op);
    PyTypeObject *tp = state_of(op)->connection_type;
    ConnectionObject *conn = (ConnectionObject *)tp->tp_alloc(tp, 0);
    if (conn == NULL)
        return NULL;
    if ((conn->sess = session_new(s->pg)) == NULL) {
        Py_DECREF(conn);
        return PyErr_NoMemory();
    }
    s->pg = NULL;
    return (PyObject *)conn;
}

/* When the op is freed: a connection made for an awaiter that was
 * cancelled meanwhile (to_python never ran) is closed here. */
static void
connect_dispose(ab_op *op)
{
    struct connect_state *s = ab_op_state(op);
    pg_finish(s->pg);
    s->pg = NULL;
    common_dispose(op);
}

static const ab_op_type connect_type = {
    .name = "pg_example.connect",
    .state_size = sizeof(struct connect_state),
    .step = connect_step,
    .cleanup = connect_cleanup,
    .to_python = connect_to_python,
    .raise_error = pg_raise_error,
    .dispose = connect_dispose,
};

/* connect(conninfo, timeout=None): a new reference to the Op, or NULL with
 * an exception set. */
static PyObject *
py_connect(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"conninfo", "timeout", NULL};
    PyObject *conninfo, *timeout = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "U|O:connect", kwlist, &conninfo, &timeout))
        return NULL;
    const char *utf8 = c_string(conninfo, "conninfo");
    double seconds = abpy_seconds(timeout, "timeout", 1);
    if (utf8 == NULL || seconds < -1.5)
        return NULL;
    ab_op *op = op_new_kept(&connect_type, module);
    if (op == NULL)
        return NULL;
    if (abpy_keep(op, conninfo) < 0) { /* the pool reads utf8 */
        ab_op_release(op);
        return NULL;
    }
    struct connect_state *s = ab_op_state(op);
    s->conninfo = utf8;
    s->timeout = seconds;
    return abpy_wrap(op);
}

/* ==== query ================================================================ */

struct query_state {
    struct op_common common;
    struct session *sess;     /* a reference, dropped by cleanup */
    const char *sql;          /* UTF-8 of the kept str */
    double timeout, deadline; /* < 0: none */
    int entered;              /* session_enter ran: cleanup must leave */
    int sock;
    int stop;      /* cancelled or timed out: stop the query on the server */
    int timed_out; /* the deadline passed (else the awaiter cancelled) */
    PGresult *result; /* the last result; to_python reads it, dispose clears it */
    /* Stopping a query. */
    PGcancel *cancel; /* freed by cleanup */
    int cancel_ran, cancels_sent, drain;
    unsigned drain_events;
    double grace; /* deadline of the current cancel attempt */
};

enum { COLLECT_DONE, COLLECT_MORE, COLLECT_BROKEN, COLLECT_COPY };
enum { DRAIN_DONE, DRAIN_WAIT, DRAIN_FAILED };

static int
is_copy(ExecStatusType status)
{
    return status == PGRES_COPY_IN || status == PGRES_COPY_OUT || status == PGRES_COPY_BOTH;
}

/* Read what arrived and take every complete result: the last one that
 * succeeded is the query's (several statements give several), the first
 * error is kept.  COLLECT_MORE when the server has more to send,
 * COLLECT_DONE after the last result, COLLECT_BROKEN when reading failed
 * on a live connection, COLLECT_COPY for COPY, which this example does not
 * speak.  A lost connection is not busy: PQgetResult then returns at once
 * what the server said last (e.g. FATAL 57P01 from pg_terminate_backend,
 * with its SQLSTATE) and libpq's own "server closed the connection". */
static int
query_collect(ab_op *op, PGconn *pg)
{
    struct query_state *s = ab_op_state(op);
    if (!PQconsumeInput(pg) && PQstatus(pg) != CONNECTION_BAD)
        return COLLECT_BROKEN;
    while (!PQisBusy(pg)) {
        PGresult *res = PQgetResult(pg);
        if (res == NULL)
            return COLLECT_DONE;
        ExecStatusType status = PQresultStatus(res);
        if (status == PGRES_TUPLES_OK || status == PGRES_COMMAND_OK ||
            status == PGRES_EMPTY_QUERY) {
            PQclear(s->result);
            s->result = res;
            continue;
        }
        if (is_copy(status)) {
            PQclear(res);
            return COLLECT_COPY;
        }
        if (!s->common.failed)
            keep_error(&s->common, PQresultErrorMessage(res),
                       PQresultErrorField(res, PG_DIAG_SQLSTATE));
        PQclear(res);
    }
    return COLLECT_MORE;
}

/* How the query ends once collected.  Returns AB_DONE. */
static int
query_outcome(ab_op *op, PGconn *pg, int collected)
{
    struct query_state *s = ab_op_state(op);
    if (collected == COLLECT_BROKEN)
        return fail_pg(op, PQerrorMessage(pg), NULL);
    if (collected == COLLECT_COPY) {
        session_close(s->sess); /* mid-COPY: no other query could run */
        return fail_pg(op, "COPY is not supported by pg_example; the connection was closed",
                       "0A000");
    }
    if (s->common.failed)
        return ab_fail(op, PG_EFAILED);
    if (PQstatus(pg) == CONNECTION_BAD) /* lost with no error result to say so */
        return fail_pg(op, PQerrorMessage(pg), NULL);
    return ab_return_custom(op);
}

/* After a resume: whether the query must stop (cancelled, or the deadline
 * passed), remembered in the state. */
static int
query_interrupted(ab_op *op)
{
    struct query_state *s = ab_op_state(op);
    unsigned ev = ab_op_event(op);
    if (ev & AB_EV_CANCEL)
        s->stop = 1;
    else if (ev & AB_EV_TIMER)
        s->stop = s->timed_out = 1;
    return s->stop;
}

/* The blocking pool: PQcancel connects to the server, sends the request
 * and waits for the server to close that connection. */
static void
cancel_work(ab_op *op)
{
    struct query_state *s = ab_op_state(op);
    char errbuf[256];
    PQcancel(s->cancel, errbuf, sizeof(errbuf)); /* a failure: the next attempt, or closing */
    s->cancel_ran = 1;
}

/* Flush what is unsent and drop the results that arrived: DRAIN_DONE after
 * the last one, DRAIN_WAIT with the events to wait for, DRAIN_FAILED when
 * the connection failed or went into COPY. */
static int
drain_some(PGconn *pg, unsigned *events)
{
    int unsent = PQflush(pg);
    if (unsent < 0 || !PQconsumeInput(pg))
        return DRAIN_FAILED;
    while (!PQisBusy(pg)) {
        PGresult *res = PQgetResult(pg);
        if (res == NULL)
            return DRAIN_DONE;
        int copy = is_copy(PQresultStatus(res));
        PQclear(res);
        if (copy)
            return DRAIN_FAILED;
    }
    *events = unsent ? AB_EV_READ | AB_EV_WRITE : AB_EV_READ;
    return DRAIN_WAIT;
}

static int
query_timed_out(ab_op *op, const char *how)
{
    struct query_state *s = ab_op_state(op);
    return ab_fail_msg(op, -ETIMEDOUT, "query timed out after %g s%s", s->timeout, how);
}

/* Engine thread.  Locals do not survive an AB_AWAIT: pg is read again from
 * the session at each resume (only the op that entered changes it). */
static int
query_step(ab_op *op)
{
    struct query_state *s = ab_op_state(op);
    PGconn *pg = s->sess->pg;
    int rc = 0;
    AB_BEGIN(op);
    s->deadline = deadline_after(s->timeout);
    s->entered = 1;
    while ((rc = session_enter(s->sess, op)) == SESSION_WAIT) {
        AB_AWAIT(op, ab_await_signal(op, seconds_until(s->deadline)));
        if (ab_op_event(op) & AB_EV_TIMER)
            return query_timed_out(op, " waiting for a cancelled query to stop");
    }
    if (rc < 0)
        return ab_fail_msg(op, rc,
                           "another operation is in progress on this connection; "
                           "one query at a time: await it (or cancel it) first");
    pg = s->sess->pg;
    if (pg == NULL)
        return fail_pg(op, "the connection is closed", "08003");
    if (!PQsendQuery(pg, s->sql))
        return fail_pg(op, PQerrorMessage(pg), NULL);
    s->sock = PQsocket(pg);

    /* Non-blocking: what the socket did not take waits in libpq.  While it
     * does, the server may answer (a notice, an error): read it as well. */
    while (!s->stop && (rc = PQflush(pg)) != 0) {
        if (rc < 0)
            return fail_pg(op, PQerrorMessage(pg), NULL);
        AB_AWAIT_OR_CANCEL(op, ab_await_fd(op, s->sock, AB_EV_READ | AB_EV_WRITE,
                                           seconds_until(s->deadline)));
        if (!query_interrupted(op) && (ab_op_event(op) & AB_EV_READ) && !PQconsumeInput(pg))
            return fail_pg(op, PQerrorMessage(pg), NULL);
    }
    while (!s->stop) {
        rc = query_collect(op, pg);
        if (rc != COLLECT_MORE)
            return query_outcome(op, pg, rc);
        AB_AWAIT_OR_CANCEL(op, ab_await_fd(op, s->sock, AB_EV_READ, seconds_until(s->deadline)));
        query_interrupted(op);
    }

    /* Cancelled or timed out: ask the server to stop the query, then read
     * what it still sends, so that the connection can run the next one.
     * Waits armed after the cancel run normally (ab.h); a cancel that
     * comes during a timeout's teardown interrupts one wait, which is
     * armed again.  A cancel that reaches the server before the query
     * does stops nothing: ask again after a grace period, and close the
     * connection if the query still runs. */
    s->cancel = PQgetCancel(pg);
    s->drain = DRAIN_FAILED;
    while (s->cancel != NULL && s->cancels_sent < CANCEL_ATTEMPTS) {
        s->cancel_ran = 0;
        while (!s->cancel_ran)
            AB_AWAIT_OR_CANCEL(op, ab_await_blocking(op, cancel_work));
        s->cancels_sent++;
        s->grace = deadline_after(CANCEL_GRACE_SECONDS);
        while ((s->drain = drain_some(pg, &s->drain_events)) == DRAIN_WAIT) {
            AB_AWAIT_OR_CANCEL(op, ab_await_fd(op, s->sock, s->drain_events,
                                               seconds_until(s->grace)));
            if (ab_op_event(op) & AB_EV_TIMER)
                break;
        }
        if (s->drain != DRAIN_WAIT)
            break;
    }
    if (s->drain != DRAIN_DONE) {
        session_close(s->sess);
        if (s->timed_out)
            return query_timed_out(op, " and did not stop; the connection was closed");
    }
    if (s->timed_out)
        return query_timed_out(op, "; it was cancelled on the server");
    return ab_fail(op, -ECANCELED);
    AB_END(op);
}

/* Exactly once, after the last step (or on the thread that drops an op
 * never awaited: then `entered` is 0 and the engine's fields are not
 * touched). */
static void
query_cleanup(ab_op *op)
{
    struct query_state *s = ab_op_state(op);
    if (s->entered)
        session_leave(s->sess, op);
    if (s->cancel != NULL) {
        PQfreeCancel(s->cancel);
        s->cancel = NULL;
    }
    session_release(s->sess);
    s->sess = NULL;
}

/* Loop thread, after cleanup: a new reference to the rows, a list of
 * tuples of str (text format, UTF-8) or None (NULL), or NULL with an
 * exception set. */
static PyObject *
query_to_python(ab_op *op)
{
    struct query_state *s = ab_op_state(op);
    int nrows = s->result != NULL ? PQntuples(s->result) : 0;
    int ncols = s->result != NULL ? PQnfields(s->result) : 0;
    PyObject *rows = PyList_New(nrows);
    for (int i = 0; rows != NULL && i < nrows; i++) {
        PyObject *row = PyTuple_New(ncols);
        for (int j = 0; row != NULL && j < ncols; j++) {
            PyObject *value = PQgetisnull(s->result, i, j)
                                  ? Py_NewRef(Py_None)
                                  : PyUnicode_DecodeUTF8(PQgetvalue(s->result, i, j),
                                                         PQgetlength(s->result, i, j), NULL);
            if (value == NULL)
                Py_CLEAR(row);
            else
                PyTuple_SET_ITEM(row, j, value); /* steals value */
        }
        if (row == NULL)
            Py_CLEAR(rows);
        else
            PyList_SET_ITEM(rows, i, row); /* steals row */
    }
    return rows;
}

static void
query_dispose(ab_op *op)
{
    struct query_state *s = ab_op_state(op);
    PQclear(s->result);
    s->result = NULL;
    common_dispose(op);
}

static const ab_op_type query_type = {
    .name = "pg_example.Connection.query",
    .state_size = sizeof(struct query_state),
    .step = query_step,
    .cleanup = query_cleanup,
    .to_python = query_to_python,
    .raise_error = pg_raise_error,
    .dispose = query_dispose,
};

/* ==== close ================================================================ */

struct close_state {
    struct op_common common;
    struct session *sess; /* a reference, dropped by cleanup */
    int entered;
};

/* Engine thread: close once a cancelled query stopped; at once if none
 * runs; nothing to do if closed already. */
static int
close_step(ab_op *op)
{
    struct close_state *s = ab_op_state(op);
    int rc = 0;
    AB_BEGIN(op);
    s->entered = 1;
    while ((rc = session_enter(s->sess, op)) == SESSION_WAIT)
        AB_AWAIT(op, ab_await_signal(op, -1));
    if (rc < 0)
        return ab_fail_msg(op, rc,
                           "close() while another operation is in progress on this "
                           "connection: await it (or cancel it) first");
    session_close(s->sess);
    return ab_return_none(op);
    AB_END(op);
}

static void
close_cleanup(ab_op *op)
{
    struct close_state *s = ab_op_state(op);
    if (s->entered)
        session_leave(s->sess, op);
    session_release(s->sess);
    s->sess = NULL;
}

static const ab_op_type close_type = {
    .name = "pg_example.Connection.close",
    .state_size = sizeof(struct close_state),
    .step = close_step,
    .cleanup = close_cleanup,
    .raise_error = pg_raise_error,
    .dispose = common_dispose,
};

/* ==== Connection =========================================================== */

/* Connection.query(sql, timeout=None): a new reference to the Op, or NULL
 * with an exception set.  The op holds a session reference of its own. */
static PyObject *
connection_query(ConnectionObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"sql", "timeout", NULL};
    PyObject *sql, *timeout = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "U|O:query", kwlist, &sql, &timeout))
        return NULL;
    const char *utf8 = c_string(sql, "sql");
    double seconds = abpy_seconds(timeout, "timeout", 1);
    if (utf8 == NULL || seconds < -1.5)
        return NULL;
    ab_op *op = op_new_kept(&query_type, PyType_GetModule(Py_TYPE(self)));
    if (op == NULL)
        return NULL;
    if (abpy_keep(op, sql) < 0) { /* the step reads utf8 */
        ab_op_release(op);
        return NULL;
    }
    struct query_state *s = ab_op_state(op);
    session_retain(self->sess);
    s->sess = self->sess;
    s->sql = utf8;
    s->timeout = seconds;
    return abpy_wrap(op);
}

/* Connection.close(): a new reference to the Op, or NULL with an
 * exception set. */
static PyObject *
connection_close(ConnectionObject *self, PyObject *unused)
{
    (void)unused;
    ab_op *op = op_new_kept(&close_type, PyType_GetModule(Py_TYPE(self)));
    if (op == NULL)
        return NULL;
    struct close_state *s = ab_op_state(op);
    session_retain(self->sess);
    s->sess = self->sess;
    return abpy_wrap(op);
}

/* Holds no Python object but its type, which traverse shows to the GC. */
static int
connection_traverse(ConnectionObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    return 0;
}

/* Closes the connection unless an op still uses it (then that op's
 * cleanup closes it). */
static void
connection_dealloc(ConnectionObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    session_release(self->sess);
    self->sess = NULL;
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyMethodDef connection_methods[] = {
    {"query", (PyCFunction)(void (*)(void))connection_query, METH_VARARGS | METH_KEYWORDS,
     "query(sql, timeout=None): run sql (one or more statements, simple query protocol); "
     "the rows of the last statement as tuples of str or None.  After timeout seconds the "
     "query is cancelled on the server and TimeoutError raised."},
    {"close", (PyCFunction)connection_close, METH_NOARGS,
     "close(): close the connection (after a cancelled query has stopped)."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot connection_slots[] = {
    {Py_tp_doc, "A PostgreSQL connection, made by pg_example.connect(); one query at a time."},
    {Py_tp_traverse, connection_traverse},
    {Py_tp_dealloc, connection_dealloc},
    {Py_tp_methods, connection_methods},
    {0, NULL},
};

static PyType_Spec connection_spec = {
    .name = "pg_example.Connection",
    .basicsize = sizeof(ConnectionObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION |
             Py_TPFLAGS_IMMUTABLETYPE,
    .slots = connection_slots,
};

/* ==== the module =========================================================== */

static PyObject *
py_open_connections(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return PyLong_FromLong(atomic_load(&open_connections));
}

static PyMethodDef module_methods[] = {
    {"connect", (PyCFunction)(void (*)(void))py_connect, METH_VARARGS | METH_KEYWORDS,
     "connect(conninfo, timeout=None): a Connection to the server conninfo names (a libpq "
     "connection string or URI); TimeoutError after timeout seconds."},
    {"open_connections", py_open_connections, METH_NOARGS,
     "open_connections(): libpq connections opened and not closed yet (a test hook)."},
    {NULL, NULL, 0, NULL},
};

static int
module_exec(PyObject *module)
{
    struct module_state *st = PyModule_GetState(module);
    /* ImportError if asyncio_bridge is missing or older than the header's
     * C API version; from here on every ab_* and abpy_* call goes through it. */
    if (AsyncioBridge_Import() < 0)
        return -1;
    st->pg_error = PyType_FromModuleAndSpec(module, &pg_error_spec, PyExc_Exception);
    if (st->pg_error == NULL || PyModule_AddObjectRef(module, "PgError", st->pg_error) < 0)
        return -1;
    st->connection_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &connection_spec, NULL);
    if (st->connection_type == NULL || PyModule_AddType(module, st->connection_type) < 0)
        return -1;
    return 0;
}

static int
module_traverse(PyObject *module, visitproc visit, void *arg)
{
    struct module_state *st = PyModule_GetState(module);
    Py_VISIT(st->connection_type);
    Py_VISIT(st->pg_error);
    return 0;
}

static int
module_clear(PyObject *module)
{
    struct module_state *st = PyModule_GetState(module);
    Py_CLEAR(st->connection_type);
    Py_CLEAR(st->pg_error);
    return 0;
}

static void
module_free(void *module)
{
    module_clear(module);
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pg_example._ext",
    .m_doc = "PostgreSQL through libpq's non-blocking API, on asyncio_bridge's C API.",
    .m_size = sizeof(struct module_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC
PyInit__ext(void)
{
    return PyModuleDef_Init(&module_def);
}
