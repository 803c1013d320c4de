/* ext.h: private to the extension: module state and the types. */
#ifndef AB_EXT_H
#define AB_EXT_H

#define ASYNCIO_BRIDGE_INTERNAL
#include "asyncio_bridge.h"

#include <stdatomic.h>

typedef struct BridgeObject BridgeObject;

typedef enum { OP_INIT, OP_WAITING, OP_DONE } op_phase;

typedef struct OpObject OpObject;

/* What an ab_op keeps on the Python side (its owner data): the objects and
 * buffers it was given, its Future, the Python awaitable it runs.  Owned by
 * the native op and freed with it (release hook, GIL held), so that a pool
 * function never sees a buffer released while it runs, whatever becomes of
 * the Op object.  While the op is in flight its bridge shows these
 * references to the GC, and the loop owns the bridge: as with a loop's
 * pending timers, an awaiting task is never collected under a running op
 * while its loop lives, and a loop nobody references is collected with
 * them.  Otherwise the Op object shows them to the GC. */
typedef struct OpPy {
    ab_op *op;              /* NULL until used, and once released */
    /* Borrowed: the Op object, or the Stream object of a stream op
     * (is_stream); NULL once it is gone.  One field for both keeps the
     * owner area, allocated with every op, at 104 bytes. */
    PyObject *face;
    BridgeObject *bridge;   /* while in flight (strong) */
    PyObject *future;
    PyObject *iter;         /* the Future's own iterator, awaited */
    PyObject *context;      /* contextvars context of the first send */
    PyObject *task;         /* the Python awaitable run for ab_await_python */
    PyObject *outcome;      /* its result or exception */
    PyObject **kept;
    Py_buffer **views;
    int nkept;
    unsigned short nviews;  /* at most USHRT_MAX pinned buffers per op */
    unsigned char exit_op;  /* started while the interpreter exits */
    unsigned char is_stream; /* face is a Stream */
    struct OpPy *prev, *next; /* the bridge's list of ops in flight */
} OpPy;

/* The Python face of an ab_op: a coroutine-like object. */
struct OpObject {
    PyObject_HEAD
    ab_op *op;              /* our reference to the native op */
    OpPy *py;
    op_phase phase;
    char settled;           /* outcome set before it was wrapped: never submitted */
    char running;           /* in send/throw/close: cr_running */
    PyObject *origin;       /* cr_origin, when origin tracking was on */
    PyObject *frame;        /* cr_frame, made when first asked for */
    PyObject *weakreflist;
};

typedef enum { DELIVERY_AUTO, DELIVERY_CST, DELIVERY_READER } delivery_kind;

/* Per-loop bridge.  The native part (sink, eventfd) is separate so that
 * the engine may still notify it after the Python object is gone. */
typedef struct bridge_native {
    ab_sink sink;
    int efd;             /* add_reader delivery: the eventfd; else -1 */
    atomic_int dead;     /* the loop closed or let go: nothing is resolved */
    atomic_int queued;   /* on the courier's list */
    atomic_int refs;     /* the bridge's, the courier list's, an fd close's */
    struct bridge_native *courier_next;
    BridgeObject *obj;   /* borrowed; cleared when the object goes */
} bridge_native;

/* The loop owns its bridge through an anchor: the add_reader callback, or
 * an attribute of the loop with call_soon_threadsafe delivery.  When the
 * loop lets go of it (close() drops its readers, or the loop is freed) the
 * bridge learns at once that its loop is gone; and since the bridge shows
 * its in-flight ops' Futures to the GC, a loop nobody references is
 * collected with them, as with asyncio's own timers. */
typedef struct {
    PyObject_HEAD
    BridgeObject *bridge; /* strong */
} AnchorObject;

struct BridgeObject {
    PyObject_HEAD
    bridge_native *native;
    PyObject *loop_ref;  /* weakref to the loop */
    PyObject *key;       /* its registry key, id(loop) */
    AnchorObject *anchor; /* borrowed; NULL once the loop let go */
    /* The loop's create_future() is asyncio's or uvloop's own: make the
     * Futures directly, as Future(loop=loop), and skip a call per op.
     * {"loop": loop}, the keywords of that call, holds the loop only while
     * ops are in flight (whose Futures hold it anyway), else None: the
     * bridge never keeps its loop alive, and a burst pays no dict update
     * per op.  future_kw_loop: it holds the loop now. */
    PyObject *future_kw;
    char future_kw_loop;
    delivery_kind delivery;
    unsigned generation; /* fork generation it was made in */
    Py_ssize_t in_flight;
    OpPy ops;            /* list head (only prev/next used) */
    /* Taken from the sink, not yet delivered: a drain pass stops after its
     * time budget, or at a KeyboardInterrupt, and the next one goes on. */
    ab_op *backlog;
    /* A submit of this loop's left the engine's wake to the loop's next
     * iteration: a flush callback is scheduled (ab_bridge_owe_wake). */
    int flush_queued;
    /* This loop submitted since its last delivery: the burst has begun,
     * and later submits of it leave the engine's wake to the flush. */
    int submitted_since_drain;
    struct BridgeObject *all_prev, *all_next; /* every bridge */
    PyObject *weakreflist;
};

typedef struct {
    PyTypeObject *op_type;
    PyTypeObject *bridge_type;
    PyObject *fork_error;
    PyObject *bridges;        /* {id(loop): Bridge} */
    PyObject *get_running_loop;
    PyObject *cancelled_error;
    PyObject *invalid_state_error;
    PyObject *future_type;        /* asyncio.Future */
    PyObject *ensure_future;      /* asyncio.ensure_future */
    PyObject *base_create_future; /* asyncio.BaseEventLoop.create_future */
    PyObject *kw_loop;            /* ("loop",) */
    PyObject *str_loop;           /* "loop" */
    PyObject *empty_tuple;        /* () */
    PyObject *str_holder_key;     /* see running_loop() in bridge.c */
    PyTypeObject *holder_type;    /* borrowed: CPython's, lives forever */
    unsigned holder_generation;
    PyObject *str_create_future, *str_set_result, *str_set_exception, *str_done,
        *str_cancel, *str_result, *str_call_soon_threadsafe, *str_drain,
        *str_is_closed, *str_create_task, *str_add_done_callback, *str_exception,
        *str_cancelled, *str_call_soon;
    PyObject *str_call_exception_handler, *str_anchor_attr;
    PyObject *warn_unawaited;      /* warnings._warn_unawaited_coroutine */
    PyObject *frame_globals;       /* globals of the ops' synthetic frames */
    PyObject *codes;               /* {ab_op_type address: code object} */
    PyObject *rooted;              /* {key: anchor} for loops that cannot hold one */
    PyTypeObject *anchor_type;
    PyTypeObject *stream_type, *stream_next_type;
    PyObject *last_loop;      /* borrowed cache of the last lookup */
    BridgeObject *last_bridge;
    delivery_kind delivery;
    uint64_t drain_budget_ns; /* how long one drain pass may run */
    PyInterpreterState *interp;
    /* atexit ran: the threads are stopped.  Ops started afterwards on the
     * thread that ran it work (and stop the threads again when they are
     * done); on any other thread they wait for ever, as the interpreter is
     * ending under them. */
    int exiting;
    unsigned long exit_thread;
    Py_ssize_t exit_ops;     /* ops started while exiting, still in flight */
} ab_state;

extern PyModuleDef ab_module_def;
/* The module state, for code without a module object at hand (the
 * courier thread, the capsule functions).  Set at exec, one interpreter. */
extern ab_state *ab_global_state;

/* The current exception, normalized, with its traceback attached (new
 * reference, or NULL if none; the error indicator is cleared), and its
 * inverse (steals; NULL sets nothing). */
static inline PyObject *
ab_err_take(void)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (type == NULL)
        return NULL;
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL)
        PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
}

static inline void
ab_err_raise(PyObject *exc)
{
    if (exc == NULL)
        return;
    PyObject *tb = PyException_GetTraceback(exc);
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, tb);
}

/* op.c */
void ab_op_install_release_hook(void);
extern PyType_Spec ab_op_spec;
int ab_op_resolve(OpPy *py, ab_state *st);
void ab_op_forget(OpPy *py);
void ab_op_abort(OpPy *py, ab_state *st);
void ab_op_run_python(OpPy *py, ab_state *st);
PyObject *ab_callback_exception(const char *type_name, const char *callback);
int ab_future_first_wait(PyObject *fut, PyObject **iter, PyObject **presult);
PyObject *ab_bridge_new_future(BridgeObject *b, ab_state *st, PyObject *loop);
PyObject *ab_result_of_send(PySendResult r, PyObject *value);
PyObject *ab_checked_result(PyObject *r, const char *type_name, const char *callback);

/* Borrowed: the op's Op object, or NULL (none, gone, or a stream). */
static inline OpObject *
ab_py_op(OpPy *py)
{
    return py->is_stream ? NULL : (OpObject *)py->face;
}

/* Borrowed: the op's Stream object, or NULL. */
static inline struct StreamObject *
ab_py_stream(OpPy *py)
{
    return py->is_stream ? (struct StreamObject *)py->face : NULL;
}

/* stream.c */
extern PyType_Spec ab_stream_spec, ab_stream_next_spec;
/* drain(), for an op with AB_MSG_ITEMS: hand its items to its stream, or
 * free them if nobody reads them any more. */
void ab_stream_items(OpPy *py, ab_state *st);
/* drain(), for a stream op's AB_MSG_FINISHED (then ab_op_forget). */
void ab_stream_finished(OpPy *py, ab_state *st);
/* ab_op_forget, for a stream op: wake its waiters; if it did not finish
 * through drain(), it was lost (loop closed, fork). */
void ab_stream_lost(OpPy *py, ab_state *st);
/* The OpPy of a Stream object. */
OpPy *ab_stream_py(PyObject *stream);
/* op.c, for streams: the exception of a failed op (new reference). */
PyObject *ab_op_error_exception(OpPy *py, ab_state *st);
/* Drop the Python side's objects (not in flight); and let go of it once
 * nothing (Op, Stream, bridge) uses it. */
void ab_op_py_clear(OpPy *py);
void ab_op_py_release(OpPy *py);

/* bridge.c */
extern PyType_Spec ab_bridge_spec, ab_anchor_spec;
BridgeObject *ab_bridge_for_running_loop(ab_state *st, PyObject **loop_out);
void ab_bridge_track(BridgeObject *b, OpPy *py);
void ab_bridge_owe_wake(BridgeObject *b, ab_state *st, PyObject *loop);
void ab_bridge_untrack(BridgeObject *b, OpPy *py);
void ab_bridge_drop_loop(BridgeObject *b);
void ab_courier_set_interpreter(PyInterpreterState *interp);
/* GIL held: 0, or -1 with an exception set. */
int ab_courier_ensure(void);
/* GIL held (released while joining). */
void ab_courier_stop(void);
int ab_courier_running(void);
/* With no loop open and nothing in flight, stop the courier, the engine
 * and the pool now (before a fork); GIL held. */
void ab_threads_stop_if_idle(void);
void ab_exit_quiesce(ab_state *st);
void ab_bridges_after_fork(ab_state *st);
void ab_bridges_abandon(void);
PyObject *ab_bridge_of_loop(ab_state *st, PyObject *loop);

/* errors.c */
PyObject *abpy_exception_for(ab_state *st, int err, const char *message);

/* ops.c */
extern PyMethodDef ab_ops_methods[];

/* resolve.c */
extern PyMethodDef ab_resolve_methods[];

/* capi.c */
PyObject *ab_capi_capsule(int v1);

#endif
