/* asyncio_bridge.h: write native ops that Python's asyncio awaits.
 *
 * Include this header (its folder is asyncio_bridge.get_include()), call
 * AsyncioBridge_Import() once in your module's init, then define op types
 * whose step functions run on asyncio_bridge's engine thread.  Your module
 * shares the one engine and needs neither libevent nor a thread of its own.
 * docs/c-api.md walks through a complete op.
 *
 * Two families of calls:
 *   ab_*    engine side (ab.h): inside a step, on the engine thread; they
 *           never touch Python objects and never need the GIL.
 *   abpy_*  Python side: with the GIL, when you build an op from Python
 *           arguments or turn its outcome into Python objects.
 */
#ifndef ASYNCIO_BRIDGE_H
#define ASYNCIO_BRIDGE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#ifndef ASYNCIO_BRIDGE_INTERNAL
#define AB_NO_OWNER_API /* only what the capsule's table provides */
#endif
#include "ab.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Version 2 added waking from any thread, fd sets, the blocking pool and
 * streams; version 3, name lookups (ab_await_dns).  Each table is the
 * last one's with calls appended: a module built for version N runs with
 * any asyncio_bridge that provides N or later.  The capsule keeps the name
 * it got in version 2, whose modules accept any later version; modules
 * built against the version-1 header import "asyncio_bridge._ext._C_API",
 * which keeps saying version 1 for them. */
#define ASYNCIO_BRIDGE_CAPI_VERSION 3
#define ASYNCIO_BRIDGE_CAPSULE "asyncio_bridge._ext._C_API_v2"

/* ---- Python side (GIL held) ------------------------------------------------ */

/* Keep a Python object alive (and visible to the GC) until the op is
 * freed; returns its slot (>= 0), or -1 with an exception set. */
int abpy_keep(ab_op *op, PyObject *obj);
/* Borrowed reference to a kept object; NULL if the slot is empty. */
PyObject *abpy_kept(ab_op *op, int slot);
/* Pin a buffer (PyObject_GetBuffer with flags) until the op is freed, so
 * that pool functions may read or write it whatever Python does meanwhile.
 * Returns the view (owned by the op), or NULL with an exception set. */
Py_buffer *abpy_keep_buffer(ab_op *op, PyObject *obj, int flags);
/* The awaitable Python object for `op`: a new reference, or NULL with an
 * exception set.  Steals the caller's reference to `op` in both cases. */
PyObject *abpy_wrap(ab_op *op);
/* abpy_wrap for an op whose outcome is known when it is made (a zero
 * delay, a numeric address, a cache hit): its creator sets it with
 * ab_return_* or ab_fail* before wrapping, outside any step.  The op never
 * goes to the engine: awaiting it yields to the event loop once, as
 * asyncio.sleep(0) does, then returns that outcome (or raises it). */
PyObject *abpy_wrap_settled(ab_op *op);
/* The async iterator for a stream op (one that emits items with
 * ab_yield_*): `async for`, __anext__, aclose() and `async with` work on
 * it; its consumer buffers at most max_buffered items (>= 1) before the
 * producer's ab_await_demand waits.  A new reference, or NULL with an
 * exception set; steals the caller's reference to `op` in both cases. */
PyObject *abpy_wrap_stream(ab_op *op, Py_ssize_t max_buffered);
/* Borrowed: the result (or, after a failure, the exception) of the last
 * Python awaitable the op awaited; NULL if none. */
PyObject *abpy_python_outcome(ab_op *op);
/* Set the exception for an error code (a negative errno or an AB_E* code)
 * with an optional message; always returns NULL.  The one place where
 * asyncio_bridge turns native errors into Python exceptions. */
PyObject *abpy_raise(int err, const char *message);
/* A file descriptor from an int or an object with fileno(); -1 with an
 * exception set (TypeError, ValueError for negative fds). */
int abpy_fd(PyObject *obj);
/* Seconds from a number, accepted as asyncio accepts a delay (what a
 * float can be added to: int, float, Fraction, numpy's numbers; not
 * Decimal), or from None when allow_none (then returns -1.0).  Negative
 * values count as 0.  Returns -2.0 with an exception set: TypeError for a
 * wrong type, OverflowError for an int too large for a float, ValueError
 * for NaN; `what` names the argument in the message. */
double abpy_seconds(PyObject *obj, const char *what, int allow_none);

/* ---- the function table behind the capsule ---------------------------------- */

typedef struct AsyncioBridge_CAPI {
    int version;
    size_t size; /* sizeof(AsyncioBridge_CAPI) of the library */
    /* ab.h */
    const char *(*strerror)(int err);
    ab_op *(*op_new)(const ab_op_type *type);
    void (*op_release)(ab_op *op);
    void *(*op_state)(ab_op *op);
    int *(*op_pc)(ab_op *op);
    unsigned (*op_event)(const ab_op *op);
    int (*op_cancelled)(const ab_op *op);
    int (*op_error)(const ab_op *op);
    const char *(*op_error_message)(const ab_op *op);
    int (*op_python_failed)(const ab_op *op);
    int (*return_none)(ab_op *op);
    int (*return_int)(ab_op *op, int64_t v);
    int (*return_float)(ab_op *op, double v);
    int (*return_bytes)(ab_op *op, const void *data, size_t len);
    int (*return_str)(ab_op *op, const char *utf8, size_t len);
    int (*return_kept)(ab_op *op, int slot);
    int (*return_python)(ab_op *op);
    int (*return_custom)(ab_op *op);
    int (*fail)(ab_op *op, int err);
    int (*fail_msg)(ab_op *op, int err, const char *fmt, ...);
    int (*await_timer)(ab_op *op, double seconds);
    int (*await_fd)(ab_op *op, int fd, unsigned events, double timeout);
    int (*await_work)(ab_op *op, ab_work_fn fn);
    int (*await_python)(ab_op *op, int slot);
    int (*await_cancel)(ab_op *op);
    const ab_op_type *(*op_type_of)(const ab_op *op);
    /* asyncio_bridge.h */
    int (*py_keep)(ab_op *op, PyObject *obj);
    PyObject *(*py_kept)(ab_op *op, int slot);
    Py_buffer *(*py_keep_buffer)(ab_op *op, PyObject *obj, int flags);
    PyObject *(*py_wrap)(ab_op *op);
    PyObject *(*py_python_outcome)(ab_op *op);
    PyObject *(*py_raise)(int err, const char *message);
    int (*py_fd)(PyObject *obj);
    double (*py_seconds)(PyObject *obj, const char *what, int allow_none);
    /* Added after the first release: check `size` before using these when
     * an extension may meet an older asyncio_bridge. */
    PyObject *(*py_wrap_settled)(ab_op *op);
    /* Version 2. */
    void (*op_retain)(ab_op *op);
    void (*op_signal)(ab_op *op);
    int (*await_signal)(ab_op *op, double timeout);
    int (*fds_watch)(ab_op *op, int fd, unsigned events);
    int (*await_fds)(ab_op *op, double timeout);
    int (*fds_next)(ab_op *op, int *fd, unsigned *events);
    int (*await_blocking)(ab_op *op, ab_work_fn fn);
    int (*work_cancelled)(const ab_op *op);
    int (*yield_int)(ab_op *op, int64_t v);
    int (*yield_float)(ab_op *op, double v);
    int (*yield_bytes)(ab_op *op, const void *data, size_t len);
    int (*yield_str)(ab_op *op, const char *utf8, size_t len);
    int (*yield_kept)(ab_op *op, int slot);
    int (*yield_custom)(ab_op *op, PyObject *(*to_python)(void *data), void *data,
                        void (*free_data)(void *data));
    int (*stream_room)(const ab_op *op);
    int (*await_demand)(ab_op *op);
    PyObject *(*py_wrap_stream)(ab_op *op, Py_ssize_t max_buffered);
    /* Version 3. */
    int (*await_dns)(ab_op *op, ab_dns_wait *w, int kind, const char *host, const char *serv,
                     int family, int socktype, int protocol, int flags);
    const ab_dns_answer *(*dns_result)(const ab_dns_wait *w);
    void (*dns_wait_done)(ab_dns_wait *w);
    void (*dns_answer_release)(ab_dns_answer *a);
    int (*dns_answer_error)(const ab_dns_answer *a, int *sys_errno);
    int (*dns_answer_count)(const ab_dns_answer *a, int family);
    const unsigned char *(*dns_answer_addr)(const ab_dns_answer *a, int family, int i);
    uint32_t (*dns_answer_ttl)(const ab_dns_answer *a);
    const struct addrinfo *(*dns_answer_addrinfo)(const ab_dns_answer *a);
} AsyncioBridge_CAPI;

#ifndef ASYNCIO_BRIDGE_INTERNAL
/* Outside the library every call goes through the capsule's table, found
 * through one pointer.  By default it is static: use the API from one .c
 * file.  An extension of several files defines ASYNCIO_BRIDGE_API_SYMBOL to
 * a name of its own in all of them, and ASYNCIO_BRIDGE_API_DEFINE in the
 * one file that calls AsyncioBridge_Import(). */
#if defined(ASYNCIO_BRIDGE_API_SYMBOL)
#define AsyncioBridge_API ASYNCIO_BRIDGE_API_SYMBOL
#if defined(ASYNCIO_BRIDGE_API_DEFINE)
const AsyncioBridge_CAPI *AsyncioBridge_API;
#else
extern const AsyncioBridge_CAPI *AsyncioBridge_API;
#endif
#else
static const AsyncioBridge_CAPI *AsyncioBridge_API;
#endif

/* Call once from your module's init.  0 on success; -1 with ImportError
 * set if asyncio_bridge is missing or older than this header. */
static inline int
AsyncioBridge_Import(void)
{
    const AsyncioBridge_CAPI *api = (const AsyncioBridge_CAPI *)PyCapsule_Import(
        ASYNCIO_BRIDGE_CAPSULE, 0);
    if (api == NULL) {
        /* An asyncio_bridge older than version 2 has no such capsule. */
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ImportError,
                         "this module needs asyncio_bridge C API version %d or later; "
                         "the installed asyncio_bridge is older: upgrade it",
                         ASYNCIO_BRIDGE_CAPI_VERSION);
        }
        return -1;
    }
    if (api->version < ASYNCIO_BRIDGE_CAPI_VERSION || api->size < sizeof(*api)) {
        PyErr_Format(PyExc_ImportError,
                     "asyncio_bridge C API version mismatch: this module was built "
                     "for version %d, the installed asyncio_bridge provides %d; "
                     "upgrade asyncio_bridge",
                     ASYNCIO_BRIDGE_CAPI_VERSION, api->version);
        return -1;
    }
    AsyncioBridge_API = api;
    return 0;
}

#define ab_strerror (*AsyncioBridge_API->strerror)
#define ab_op_new (*AsyncioBridge_API->op_new)
#define ab_op_release (*AsyncioBridge_API->op_release)
#define ab_op_state (*AsyncioBridge_API->op_state)
#define ab_op_pc (*AsyncioBridge_API->op_pc)
#define ab_op_event (*AsyncioBridge_API->op_event)
#define ab_op_cancelled (*AsyncioBridge_API->op_cancelled)
#define ab_op_error (*AsyncioBridge_API->op_error)
#define ab_op_error_message (*AsyncioBridge_API->op_error_message)
#define ab_op_python_failed (*AsyncioBridge_API->op_python_failed)
#define ab_return_none (*AsyncioBridge_API->return_none)
#define ab_return_int (*AsyncioBridge_API->return_int)
#define ab_return_float (*AsyncioBridge_API->return_float)
#define ab_return_bytes (*AsyncioBridge_API->return_bytes)
#define ab_return_str (*AsyncioBridge_API->return_str)
#define ab_return_kept (*AsyncioBridge_API->return_kept)
#define ab_return_python (*AsyncioBridge_API->return_python)
#define ab_return_custom (*AsyncioBridge_API->return_custom)
#define ab_fail (*AsyncioBridge_API->fail)
#define ab_fail_msg (*AsyncioBridge_API->fail_msg)
#define ab_await_timer (*AsyncioBridge_API->await_timer)
#define ab_await_fd (*AsyncioBridge_API->await_fd)
#define ab_await_work (*AsyncioBridge_API->await_work)
#define ab_await_python (*AsyncioBridge_API->await_python)
#define ab_await_cancel (*AsyncioBridge_API->await_cancel)
#define ab_op_type_of (*AsyncioBridge_API->op_type_of)
#define abpy_keep (*AsyncioBridge_API->py_keep)
#define abpy_kept (*AsyncioBridge_API->py_kept)
#define abpy_keep_buffer (*AsyncioBridge_API->py_keep_buffer)
#define abpy_wrap (*AsyncioBridge_API->py_wrap)
#define abpy_python_outcome (*AsyncioBridge_API->py_python_outcome)
#define abpy_raise (*AsyncioBridge_API->py_raise)
#define abpy_fd (*AsyncioBridge_API->py_fd)
#define abpy_seconds (*AsyncioBridge_API->py_seconds)
#define abpy_wrap_settled (*AsyncioBridge_API->py_wrap_settled)
#define ab_op_retain (*AsyncioBridge_API->op_retain)
#define ab_op_signal (*AsyncioBridge_API->op_signal)
#define ab_await_signal (*AsyncioBridge_API->await_signal)
#define ab_fds_watch (*AsyncioBridge_API->fds_watch)
#define ab_await_fds (*AsyncioBridge_API->await_fds)
#define ab_fds_next (*AsyncioBridge_API->fds_next)
#define ab_await_blocking (*AsyncioBridge_API->await_blocking)
#define ab_work_cancelled (*AsyncioBridge_API->work_cancelled)
#define ab_yield_int (*AsyncioBridge_API->yield_int)
#define ab_yield_float (*AsyncioBridge_API->yield_float)
#define ab_yield_bytes (*AsyncioBridge_API->yield_bytes)
#define ab_yield_str (*AsyncioBridge_API->yield_str)
#define ab_yield_kept (*AsyncioBridge_API->yield_kept)
#define ab_yield_custom (*AsyncioBridge_API->yield_custom)
#define ab_stream_room (*AsyncioBridge_API->stream_room)
#define ab_await_demand (*AsyncioBridge_API->await_demand)
#define abpy_wrap_stream (*AsyncioBridge_API->py_wrap_stream)
#define ab_await_dns (*AsyncioBridge_API->await_dns)
#define ab_dns_result (*AsyncioBridge_API->dns_result)
#define ab_dns_wait_done (*AsyncioBridge_API->dns_wait_done)
#define ab_dns_answer_release (*AsyncioBridge_API->dns_answer_release)
#define ab_dns_answer_error (*AsyncioBridge_API->dns_answer_error)
#define ab_dns_answer_count (*AsyncioBridge_API->dns_answer_count)
#define ab_dns_answer_addr (*AsyncioBridge_API->dns_answer_addr)
#define ab_dns_answer_ttl (*AsyncioBridge_API->dns_answer_ttl)
#define ab_dns_answer_addrinfo (*AsyncioBridge_API->dns_answer_addrinfo)
#endif /* ASYNCIO_BRIDGE_INTERNAL */

#ifdef __cplusplus
}
#endif
#endif
