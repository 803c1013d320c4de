/* ab.h: the native core of asyncio_bridge, with no Python in it.
 *
 * An op is a state machine that the engine thread resumes: on start, when a
 * timer fires, when an fd is ready, when a function it handed to the worker
 * pool returns, when a Python awaitable it asked for finishes, and on cancel.
 * A finished op is pushed onto its sink (one per asyncio loop), which wakes
 * its owner once per burst.
 *
 * Threads: "engine" is the one libevent thread; "owner" is whichever thread
 * owns the sink (for Python: the loop thread, holding the GIL); "any" is any
 * thread.  Errors are negative errno values or one of the AB_E* codes below.
 */
#ifndef AB_H
#define AB_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* PyObject, named without Python.h so that the engine can carry pointers to
 * Python objects it never dereferences. */
struct _object;

typedef struct ab_op ab_op;
typedef struct ab_sink ab_sink;

/* Library error codes, below every errno value.  X(name, code, message). */
#define AB_ERRNO_MAP(X)                                                       \
    X(FORKED, -30001, "operation was in flight when the process forked")     \
    X(PYTHON, -30002, "the awaited Python awaitable raised")                 \
    X(SHUTDOWN, -30003, "the engine was shut down")                          \
    X(STATE, -30004, "operation used in the wrong state")                    \
    X(USER, -30100, "first error code free for an op type's own errors")

enum {
#define AB__ERR_ENUM(name, code, msg) AB_E##name = (code),
    AB_ERRNO_MAP(AB__ERR_ENUM)
#undef AB__ERR_ENUM
};

/* Message for an error code (a library code or a negative errno); never NULL. */
const char *ab_strerror(int err);

/* What a step function returns. */
enum { AB_DONE = 0, AB_SUSPEND = 1 };

/* Why a step was resumed (ab_op_event), and fd readiness bits.
 *
 * Cancellation interrupts the wait that is armed when it arrives, and that
 * wait resumes with AB_EV_CANCEL among its bits: at once for timers, fds,
 * fd sets, signals, demand and ab_await_cancel; pool work not yet started
 * is skipped (AB_EV_CANCEL alone), pool work that runs is let finish
 * (AB_EV_WORK | AB_EV_CANCEL), and a Python awaitable is cancelled in
 * Python (AB_EV_PYTHON | AB_EV_CANCEL, ab_op_python_failed() true).
 * ab_op_cancelled is true from then on.
 * Every wait armed after the cancel runs
 * normally, so that a cancelled op can still tear down: a timer, an fd
 * wait, pool work (e.g. PQcancel on the blocking pool), a signal.  Only
 * what can no longer happen is skipped, and then the step resumes with
 * AB_EV_CANCEL alone: a Python awaitable once the op's loop is closed or
 * its Op object gone, a stream's demand once the stream is closed. */
enum {
    AB_EV_START = 1u << 0,
    AB_EV_TIMER = 1u << 1, /* timer fired, or fd wait timed out */
    AB_EV_READ = 1u << 2,
    AB_EV_WRITE = 1u << 3,
    AB_EV_WORK = 1u << 4,   /* pool function returned */
    AB_EV_PYTHON = 1u << 5, /* Python awaitable finished */
    AB_EV_CANCEL = 1u << 6,
    AB_EV_SIGNAL = 1u << 7, /* ab_op_signal arrived (ab_await_signal) */
    AB_EV_FDS = 1u << 8,    /* fds of the op's set are ready (ab_await_fds) */
    AB_EV_DEMAND = 1u << 9, /* the stream's consumer took items (ab_await_demand) */
};

/* Result kinds: what ab_op holds when it finishes successfully. */
typedef enum {
    AB_RESULT_NONE,
    AB_RESULT_INT,
    AB_RESULT_FLOAT,
    AB_RESULT_BYTES,  /* malloc'd copy, owned by the op */
    AB_RESULT_STR,    /* malloc'd UTF-8, owned by the op */
    AB_RESULT_KEPT,   /* a Python object kept with the op (index) */
    AB_RESULT_PYTHON, /* the outcome of the last awaited Python awaitable */
    AB_RESULT_CUSTOM, /* the type's to_python callback builds it */
} ab_result_kind;

typedef int (*ab_step_fn)(ab_op *op);
typedef void (*ab_work_fn)(ab_op *op);

/* An op type: static, shared by every op of that kind.  The Python-side
 * callbacks run on the owner thread with the GIL; they return a new
 * reference, or NULL with an exception set. */
/* ab_op_type.flags */
enum {
    /* The op may call ab_await_python: the caller's contextvars context is
     * captured when it starts, to run the Python awaitables in. */
    AB_TYPE_AWAITS_PYTHON = 1u << 0,
    /* A work op: its step is one call on a worker of the CPU pool, made
     * without the engine thread.  ab_submit queues the op on the pool
     * directly; a worker runs the step once (ab_op_event says AB_EV_START)
     * without the GIL, the step finishes the op there (ab_return_*,
     * ab_fail: it may not await; suspending fails the op with AB_ESTATE),
     * and the worker hands the outcome to the sink itself.  So a call of
     * CPU-heavy C goes loop -> worker -> loop, where a step that awaits
     * ab_await_work goes loop -> engine -> worker -> engine -> loop.  A
     * cancel before a worker took the op skips the step (the op fails with
     * -ECANCELED); a cancel while it runs turns ab_work_cancelled(op) to 1,
     * and the op fails with -ECANCELED whatever the step returned.
     * cleanup runs on the worker.  Not for streams.  C API version 4. */
    AB_TYPE_WORK = 1u << 1,
    /* As AB_TYPE_WORK, on the blocking pool (ab_await_blocking's). */
    AB_TYPE_BLOCKING = 1u << 2,
};

typedef struct ab_op_type {
    const char *name;  /* shown in repr() and in "was never awaited" */
    size_t state_size; /* bytes of zeroed state allocated with each op */
    unsigned flags;    /* AB_TYPE_* */
    ab_step_fn step;   /* engine thread (a work op's: a pool thread) */
    /* Exactly once per op, after its last step: on the engine thread (a
     * work op's worker) if the op was ever started, else on the thread that
     * drops it.  May be NULL. */
    void (*cleanup)(ab_op *op);
    /* For AB_RESULT_CUSTOM; may be NULL otherwise. */
    struct _object *(*to_python)(ab_op *op);
    /* For error codes <= AB_EUSER; NULL means a generic RuntimeError.  Sets
     * the exception and returns NULL. */
    struct _object *(*raise_error)(ab_op *op, int err);
    /* Exactly once, when the op is freed, after to_python (if it ran): free
     * what the state owns beyond cleanup, e.g. a result only to_python
     * reads.  Any thread; no Python.  May be NULL. */
    void (*dispose)(ab_op *op);
} ab_op_type;

/* ---- ops: creating, inspecting ---------------------------------------- */

/* A new op with zeroed state and one reference (the creator's), or NULL
 * when out of memory.  Any thread. */
ab_op *ab_op_new(const ab_op_type *type);
/* Take one more reference: the op's memory (its state included) stays
 * valid until the matching ab_op_release.  Any thread that holds a
 * reference already, or got the op from the caller of a step; e.g. a step
 * retains the op for a library callback that will call ab_op_signal. */
void ab_op_retain(ab_op *op);
/* Drop a reference; any thread.  The op is freed (after cleanup if it has
 * not run) when the last one goes, after the release hook
 * (ab_set_release_hook).  The engine drops its own references too, so the
 * owner clears the data the hook looks at before dropping its last
 * reference. */
void ab_op_release(ab_op *op);

const ab_op_type *ab_op_type_of(const ab_op *op);
void *ab_op_state(ab_op *op);
/* The resume point of the protothread macros. */
int *ab_op_pc(ab_op *op);
/* Why the current step runs (AB_EV_* bits); engine thread. */
unsigned ab_op_event(const ab_op *op);
int ab_op_cancelled(const ab_op *op);
/* After it finished: 0 on success, else the error code. */
int ab_op_error(const ab_op *op);
/* Optional message for the error, or NULL. */
const char *ab_op_error_message(const ab_op *op);

/* ---- inside a step: finishing ------------------------------------------ */
/* Each returns AB_DONE so that a step can `return ab_return_int(op, 3);`. */
int ab_return_none(ab_op *op);
int ab_return_int(ab_op *op, int64_t v);
int ab_return_float(ab_op *op, double v);
int ab_return_bytes(ab_op *op, const void *data, size_t len); /* copies */
int ab_return_str(ab_op *op, const char *utf8, size_t len);   /* copies */
int ab_return_kept(ab_op *op, int slot);
int ab_return_python(ab_op *op);
int ab_return_custom(ab_op *op);
int ab_fail(ab_op *op, int err);
/* ab_fail with a message (printf style, truncated to 200 bytes). */
int ab_fail_msg(ab_op *op, int err, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* ---- inside a step: suspending ----------------------------------------- */
/* Each arms one wait and returns 0, or a negative error (then nothing is
 * armed; AB_ESTATE in a work op's step, which cannot wait).  The step must
 * then return AB_SUSPEND; the AB_AWAIT macro does. */

/* A timer; seconds < 0 counts as 0, infinity or beyond the timer's range
 * waits until cancelled. */
int ab_await_timer(ab_op *op, double seconds);
/* fd readiness; events is AB_EV_READ and/or AB_EV_WRITE; timeout < 0 or
 * infinite means none.  On resume, ab_op_event tells READ/WRITE/TIMER. */
int ab_await_fd(ab_op *op, int fd, unsigned events, double timeout);
/* fn(op) runs on a worker pool thread, without the GIL; the step resumes
 * with AB_EV_WORK when it returns (even if cancelled meanwhile, so the
 * state stays valid while fn runs; fn may look at ab_work_cancelled).  A
 * cancel that comes before a worker took fn skips it: the step resumes
 * with AB_EV_CANCEL alone. */
int ab_await_work(ab_op *op, ab_work_fn fn);
/* Ask the owner to call the Python object kept in `slot` with no
 * arguments and await what it returns (a coroutine, a Future or any
 * awaitable), on the op's loop, in the contextvars context of the op's
 * first send (the type needs AB_TYPE_AWAITS_PYTHON); resumes with
 * AB_EV_PYTHON.  ab_op_python_failed() tells whether it raised. */
int ab_await_python(ab_op *op, int slot);
int ab_op_python_failed(const ab_op *op);
/* Wait for nothing: only cancellation resumes the op (at once if it was
 * cancelled already). */
int ab_await_cancel(ab_op *op);

/* ---- waking an op from any thread ---------------------------------------
 * For libraries that report completion on threads of their own (SDK
 * callbacks, getaddrinfo_a with SIGEV_THREAD, CUDA host functions): the
 * step retains the op for the callback, starts the library call and awaits
 * a signal; the callback writes its outcome into the state, calls
 * ab_op_signal and then ab_op_release.  What a thread wrote before
 * ab_op_signal is visible to the step that the signal resumes. */

/* Any thread holding a reference: wake the op's ab_await_signal.  A signal
 * that comes while the op does not wait for one is kept for its next
 * ab_await_signal, which then returns at once; several signals before the
 * op looks count as one.  Harmless once the op finished or was cancelled.
 * Signals from many threads in a burst wake the engine once. */
void ab_op_signal(ab_op *op);
/* Wait for ab_op_signal; timeout < 0 or infinite means none.  Resumes
 * with AB_EV_SIGNAL, or AB_EV_TIMER when the timeout came first (a signal
 * after that is kept for the next ab_await_signal). */
int ab_await_signal(ab_op *op, double timeout);

/* ---- many fds at once ---------------------------------------------------
 * Each op has a set of fds (empty at first) that ab_await_fds watches all
 * at once, for protocols with a changing set of sockets (c-ares' socket
 * callback, libcurl's CURLMOPT_SOCKETFUNCTION).  The set stays registered
 * with the kernel between waits: changing one fd costs one epoll_ctl, an
 * unchanged set costs nothing.  Engine thread (a step, or a callback the
 * library makes from inside one).  The set is freed when the op finishes,
 * before cleanup, so cleanup may close the fds. */

/* Watch fd for events (AB_EV_READ and/or AB_EV_WRITE), replacing what was
 * watched for it; events == 0 stops watching it (do that before the fd is
 * closed).  0, or -EBADF, -EINVAL, -ENOMEM. */
int ab_fds_watch(ab_op *op, int fd, unsigned events);
/* Wait until an fd of the set is ready or the timeout (< 0 or infinite:
 * none) passes.  Resumes with AB_EV_FDS when some are ready (read them with
 * ab_fds_next), else AB_EV_TIMER.  An empty set waits for the timeout. */
int ab_await_fds(ab_op *op, double timeout);
/* After an AB_EV_FDS resume: 1 with the next ready fd and its ready events
 * (AB_EV_READ, AB_EV_WRITE), or 0 when none is left. */
int ab_fds_next(ab_op *op, int *fd, unsigned *events);

/* ---- blocking calls and cancellation ------------------------------------
 * ab_await_work's pool is sized for computing (one thread per CPU, lower
 * priority).  Calls that mostly wait (a DNS lookup, a slow disk, a
 * library's blocking connect or PQcancel) go to a second pool, sized for
 * waiting, so that neither starves the other. */

/* As ab_await_work, on the blocking pool (threads start as calls wait for
 * one, up to its size: 64 unless configured). */
int ab_await_blocking(ab_op *op, ab_work_fn fn);
/* Inside a pool function (either pool): 1 if a cancel interrupted the wait
 * that runs it, so it may stop early; the step resumes with AB_EV_WORK |
 * AB_EV_CANCEL whatever fn did.  Work armed after the cancel is never
 * interrupted: this stays 0 for it. */
int ab_work_cancelled(const ab_op *op);

/* ---- streams: an op that emits many items -------------------------------
 * An op wrapped with abpy_wrap_stream is an async iterator in Python: each
 * ab_yield_* emits one item, delivered to the loop in batches (one wake-up
 * per burst); returning ends the iteration after every item emitted (its
 * value is ignored), failing raises at the __anext__ after the last item.
 * The consumer keeps at most max_buffered items; a producer that emits more
 * than ab_stream_room allows should AB_AWAIT(op, ab_await_demand(op)).
 * Engine thread, in a step.  Each returns 0, or -ENOMEM, -ECANCELED once
 * the stream was closed (nobody will read more), AB_ESTATE if the op is
 * not a stream. */
int ab_yield_int(ab_op *op, int64_t v);
int ab_yield_float(ab_op *op, double v);
int ab_yield_bytes(ab_op *op, const void *data, size_t len); /* copies */
int ab_yield_str(ab_op *op, const char *utf8, size_t len);   /* copies */
int ab_yield_kept(ab_op *op, int slot);
/* An item of your own: to_python(data) runs on the loop thread with the
 * GIL when the consumer takes it (a new reference, or NULL with an
 * exception set, which that __anext__ raises); free_data(data) runs once,
 * after to_python or when the item is dropped unread, on any thread and
 * without Python.  free_data may be NULL. */
int ab_yield_custom(ab_op *op, struct _object *(*to_python)(void *data), void *data,
                    void (*free_data)(void *data));
/* How many more items the consumer can buffer now (<= 0: full). */
int ab_stream_room(const ab_op *op);
/* Wait until the consumer has taken items: resumes with AB_EV_DEMAND when
 * at most half of max_buffered items wait, at once if that is so already.
 * After the stream was closed, resumes at once with AB_EV_CANCEL. */
int ab_await_demand(ab_op *op);

/* ---- protothread macros -------------------------------------------------
 * Straight-line state machines:
 *
 *   static int step(ab_op *op) {
 *       struct my_state *s = ab_op_state(op);
 *       AB_BEGIN(op);
 *       AB_AWAIT(op, ab_await_timer(op, s->delay));
 *       return ab_return_int(op, 42);
 *       AB_END(op);
 *   }
 *
 * Locals do not survive an AB_AWAIT: keep what must live in the state.  At
 * most one AB_AWAIT per source line, and never inside a switch statement of
 * your own (its case labels would belong to that switch).  If the await cannot be armed, the op
 * fails with that error; if the op is cancelled while suspended, it fails
 * with -ECANCELED at the resume point (use AB_AWAIT_OR_CANCEL to handle
 * cancellation yourself). */
#define AB_BEGIN(op) switch (*ab_op_pc(op)) { case 0:
#define AB__SUSPEND(op, call)                                                 \
    do {                                                                      \
        int ab__rc = (call);                                                  \
        if (ab__rc < 0)                                                       \
            return ab_fail((op), ab__rc);                                     \
        *ab_op_pc(op) = __LINE__;                                             \
        return AB_SUSPEND;                                                    \
        case __LINE__:;                                                       \
    } while (0)
#define AB_AWAIT(op, call)                                                    \
    do {                                                                      \
        AB__SUSPEND(op, call);                                                \
        if (ab_op_cancelled(op))                                              \
            return ab_fail((op), -ECANCELED);                                 \
    } while (0)
#define AB_AWAIT_OR_CANCEL(op, call) AB__SUSPEND(op, call)
#define AB_END(op)                                                            \
    }                                                                         \
    return ab_fail((op), AB_ESTATE)

/* ---- name lookups (version 3) ------------------------------------------------
 * An op awaits a lookup with ab_await_dns; lookups of one key in flight
 * share one query, which each waiter may leave alone (a cancel).  Two
 * resolvers: AB_DNS_EVDNS, libevent's DNS client on the engine thread
 * (host names only: A and/or AAAA for family AF_UNSPEC, AF_INET or
 * AF_INET6, no hosts file, configured from the resolv.conf that
 * asyncio_bridge.configure(resolv_conf=) names), and AB_DNS_SYSTEM, the
 * system's getaddrinfo on the blocking pool.  Which one a name needs (the
 * hosts file, nsswitch) is asyncio_bridge.getaddrinfo's policy: an op that
 * wants that whole policy awaits that Python op with ab_await_python. */
enum { AB_DNS_EVDNS = 0, AB_DNS_SYSTEM = 1 };

/* An answer: immutable, shared by the waiters of a query, reference
 * counted.  Any thread. */
typedef struct ab_dns_answer ab_dns_answer;

/* In the op's state; zeroed.  The resolver's bookkeeping. */
typedef struct ab_dns_wait {
    struct ab__dns_query *query; /* while waiting */
    struct ab_dns_wait *next, *prev;
    ab_op *op;
    ab_dns_answer *answer; /* owned: release it (ab_dns_answer_release) */
} ab_dns_wait;

/* Engine thread, in a step: join or start the lookup and wait for it.
 * The step resumes with AB_EV_SIGNAL once answered (ab_dns_result), or
 * with AB_EV_CANCEL.  The step (or cleanup) then calls ab_dns_wait_done
 * once.  evdns ignores serv, socktype, protocol and flags.  0, or -EINVAL
 * (a name evdns cannot ask for, a family it does not know), -ENOMEM. */
int ab_await_dns(ab_op *op, ab_dns_wait *w, int kind, const char *host, const char *serv,
                 int family, int socktype, int protocol, int flags);
/* The answer (borrowed from w), or NULL if none came. */
const ab_dns_answer *ab_dns_result(const ab_dns_wait *w);
/* Engine thread: stop waiting (a query nobody waits for runs on and its
 * answer is dropped).  Harmless once answered. */
void ab_dns_wait_done(ab_dns_wait *w);
void ab_dns_answer_release(ab_dns_answer *a);
/* 0 or an EAI_* code (with errno for EAI_SYSTEM in *sys_errno). */
int ab_dns_answer_error(const ab_dns_answer *a, int *sys_errno);
/* evdns answers: addresses of a family (AF_INET: 4 bytes, AF_INET6: 16),
 * in the server's order; their smallest TTL. */
int ab_dns_answer_count(const ab_dns_answer *a, int family);
const unsigned char *ab_dns_answer_addr(const ab_dns_answer *a, int family, int i);
uint32_t ab_dns_answer_ttl(const ab_dns_answer *a);
/* System answers: getaddrinfo's list (owned by the answer). */
struct addrinfo;
const struct addrinfo *ab_dns_answer_addrinfo(const ab_dns_answer *a);
/* ========================================================================
 * The owner's side: what asyncio_bridge's extension (and the C tests) use
 * to run ops.  Not part of the C API that other extensions import through
 * the capsule (asyncio_bridge.h hides it from them).
 * ======================================================================== */
#ifndef AB_NO_OWNER_API

ab_result_kind ab_op_result_kind(const ab_op *op);
int64_t ab_op_result_int(const ab_op *op);
double ab_op_result_float(const ab_op *op);
const void *ab_op_result_data(const ab_op *op, size_t *len);
/* The owner's area of an op: ab_set_owner_size bytes, zeroed, allocated
 * with it (the extension keeps an op's Python side there).  Set the size
 * once, before the first op. */
void ab_set_owner_size(size_t size);
void *ab_op_owner(ab_op *op);
/* Called with each op just before it is freed, on the releasing thread,
 * so that the owner can drop what it keeps for the op.  Set once. */
void ab_set_release_hook(void (*hook)(ab_op *op));

/* ---- sinks: where finished ops go --------------------------------------- */

/* Messages a sink receives, as bits (ab_sink_msgs): an op is queued on its
 * sink at most once, carrying every message sent since it was taken. */
enum { AB_MSG_FINISHED = 1, AB_MSG_PYTHON = 2, AB_MSG_ITEMS = 4 };

struct ab_sink {
    /* Engine thread, when the queue turns non-empty: wake the owner.
     * Never takes the GIL. */
    void (*notify)(ab_sink *sink);
    void *user;
    ab_op *head; /* private: accessed with atomic builtins */
};

void ab_sink_init(ab_sink *sink, void (*notify)(ab_sink *), void *user);
/* Owner thread: take every queued op at once, oldest first; walk them
 * with ab_sink_next.  Returns NULL when empty. */
ab_op *ab_sink_take(ab_sink *sink);
/* The op after `op` in a taken batch. */
ab_op *ab_sink_next(ab_op *op);
/* The messages for `op` (AB_MSG_* bits), taken when the owner handles it:
 * call once per op of a batch, after ab_sink_next (from then on the engine
 * may queue the op again). */
unsigned ab_sink_msgs(ab_op *op);

/* ---- streams: the owner's side ---------------------------------------------- */

/* Make `op` a stream whose consumer buffers at most max_buffered (>= 1)
 * items; before ab_submit.  0, or -ENOMEM, or -EINVAL for a work op. */
int ab_op_set_stream(ab_op *op, int max_buffered);
typedef struct ab_item ab_item;
/* Owner thread: the items emitted since the last call, oldest first (walk
 * them with ab_item_next), or NULL. */
ab_item *ab_op_take_items(ab_op *op);
ab_item *ab_item_next(const ab_item *item);
/* Link item to next (the owner's own list of taken items). */
void ab_item_set_next(ab_item *item, ab_item *next);
/* The item's kind (AB_RESULT_INT/FLOAT/BYTES/STR/KEPT/CUSTOM) and value. */
ab_result_kind ab_item_kind(const ab_item *item);
int64_t ab_item_int(const ab_item *item);
double ab_item_float(const ab_item *item);
const void *ab_item_data(const ab_item *item, size_t *len); /* BYTES, STR */
int ab_item_slot(const ab_item *item);                      /* KEPT */
struct _object *ab_item_custom(const ab_item *item);        /* CUSTOM: calls to_python */
/* Free one item (not its successors); any thread. */
void ab_item_free(ab_item *item);
/* Owner thread: the consumer took n more items (cheap; wakes a producer
 * waiting in ab_await_demand when enough room was made). */
void ab_stream_consumed(ab_op *op, int n);

/* Hand a sink the owner no longer uses to the engine, which calls
 * free_fn(sink) once no notify on it can be running any more (at once if
 * the engine is not running).  Every op submitted to it must have been
 * taken first.  Owner thread. */
void ab_sink_retire(ab_sink *sink, void (*free_fn)(ab_sink *));
/* Run fn(arg) on the engine thread after everything posted before this
 * call, or at once on this thread if the engine is not running (then no
 * engine code runs meanwhile).  For what must not race with a notify,
 * e.g. closing an fd that notify writes.  Any thread. */
void ab_engine_call(void (*fn)(void *arg), void *arg);

/* ---- the engine ------------------------------------------------------------ */

/* Start the engine thread if it is not running; 0 or a negative error.
 * Any thread (not the engine's).  Also called by ab_submit. */
int ab_engine_start(void);
/* Stop and join the engine thread.  Ops in flight are paused, not lost:
 * their timers, fd waits, queued pool work and what was posted to them
 * stay, and the next start (or submit) resumes them.  Pool workers leave
 * after the function they run; with nothing in flight they are joined, so
 * no thread of the library is left.  Any thread but the engine's.
 * Returns at once if not running. */
void ab_engine_stop(void);
/* ab_engine_stop, but only with nothing in flight (ab_submit may race with
 * it from any thread: it then either waits for the stop and starts the
 * engine again, or this sees its op and stops nothing).  Returns 1 if the
 * engine is stopped and nothing is in flight, else 0. */
int ab_engine_stop_if_idle(void);
/* Stop the engine and forget every op in flight: their waits and queued
 * work are dropped (leaked, never run, never delivered) and in_flight is
 * 0 again.  For an owner that goes away for good with ops in flight (an
 * interpreter that ends). */
void ab_engine_abandon(void);
/* After pthread_join of one of the library's threads (tid: its gettid()),
 * wait, at most 100 ms, until the kernel no longer counts it in the
 * process.  A joined thread is still counted in /proc/self/stat for a
 * moment after pthread_join returns (the kernel clears its tid before it
 * leaves the thread group), and os.fork() (3.12+) warns of a
 * multi-threaded process by that count: the pre-fork stop must leave no
 * thread behind. */
void ab_thread_wait_gone(pid_t tid);
/* Number of worker pool threads; 0 means the CPU count.  Takes effect at
 * the next start of the pool (the pool starts on first use). */
int ab_pool_configure(int workers);
int ab_pool_size(void);
/* Most threads of the blocking pool (ab_await_blocking), 1..1024; they
 * start as calls wait for one.  Default 64. */
int ab_blocking_configure(int threads);
int ab_blocking_size(void);

/* Start `op` on the engine (a work op: on its pool); its outcome goes to
 * `sink`.  Takes a second reference, the engine's, which the owner drops
 * with ab_op_collect once the op's AB_MSG_FINISHED arrived.  Owner thread.
 * Returns 0 or a negative error (then nothing was taken); AB_ESTATE for an
 * op submitted before, -EINVAL for a type with no step. */
int ab_submit(ab_op *op, ab_sink *sink);
/* ab_submit for a thread that runs an event loop and submits in bursts
 * (every task one iteration resumes): where ab_submit would wake a
 * sleeping engine, this sets *wake_owed to 1 and leaves the wake to the
 * caller's ab_engine_flush, which it must call soon, e.g. from a callback
 * of the loop's next iteration, so that a burst wakes the engine once.
 * The wake is never lost meanwhile: the next ab_submit, cancel or other
 * immediate post from any thread pays it.  *wake_owed is left alone
 * otherwise. */
int ab_submit_deferred(ab_op *op, ab_sink *sink, int *wake_owed);
/* Wake the engine if a deferred submit left it asleep; cheap otherwise.
 * Any thread. */
void ab_engine_flush(void);
/* Owner thread, after AB_MSG_FINISHED, or when it can never come (the
 * engine went away in a fork): drop the engine's reference.  From then on
 * the op no longer counts as in flight. */
void ab_op_collect(ab_op *op);
/* ab_op_collect for an owner that still holds a reference of its own
 * (one it keeps until later): the same outcome, but when nobody else holds
 * one the count drops without a locked instruction, so the owner's own
 * release later finds it last.  Calling it without holding another
 * reference is a use after free waiting to happen. */
void ab_op_collect_held(ab_op *op);
/* Ask the engine to cancel `op`; harmless if finished.  Owner thread. */
void ab_cancel(ab_op *op);
/* Owner thread, for an AB_MSG_PYTHON op: the awaitable finished; failed is
 * nonzero when it raised. */
void ab_python_done(ab_op *op, int failed);
/* Owner thread, for an AB_MSG_PYTHON op whose awaitable cannot run any
 * more (its loop closed, its Op gone): the step resumes with AB_EV_CANCEL
 * and ab_op_python_failed() true. */
void ab_python_skipped(ab_op *op);
/* The slot an AB_MSG_PYTHON op asks to call. */
int ab_op_python_slot(const ab_op *op);
/* Fork generation: increases in every child; ops submitted in an earlier
 * generation can never finish. */
unsigned ab_fork_generation(void);
unsigned ab_op_generation(const ab_op *op);

/* What a submitted op waits for: a snapshot, from any thread, that may be
 * stale by the time it is read (for repr and debugging). */
typedef enum {
    AB_WAITING_NOTHING, /* running a step, finished, or not started */
    AB_WAITING_TIMER,
    AB_WAITING_FD,
    AB_WAITING_WORK,
    AB_WAITING_PYTHON,
    AB_WAITING_CANCEL,
    AB_WAITING_SIGNAL,
    AB_WAITING_FDS,
    AB_WAITING_DEMAND,
} ab_waiting_kind;

typedef struct ab_waiting {
    ab_waiting_kind kind;
    int fd;          /* AB_WAITING_FD, else -1 */
    unsigned events; /* AB_WAITING_FD: AB_EV_READ and/or AB_EV_WRITE */
} ab_waiting;

void ab_op_waiting(const ab_op *op, ab_waiting *out);

/* ---- name lookups: the owner's side ----------------------------------------- */

/* The resolv.conf evdns reads (NULL: /etc/resolv.conf); taken at the next
 * lookup.  Any thread.  0 or -ENOMEM. */
int ab_dns_configure(const char *resolv_conf);
/* Ops waiting and queries in flight, indexed by AB_DNS_EVDNS/SYSTEM. */
void ab_dns_stats(uint64_t waiting[2], uint64_t queries[2]);

typedef struct ab_stats {
    uint64_t submitted, completed, cancelled, in_flight;
    uint64_t engine_wakeups, sink_wakeups, largest_batch;
    /* The engine's spins for the next post, and those a post came in. */
    uint64_t engine_spins, engine_spins_paid;
    /* Pool functions queued and not yet taken by a worker; threads. */
    uint64_t pool_queued, pool_threads, blocking_queued, blocking_threads;
    /* Bytes of op memory kept free for the next ops (never given back to
     * the system): a leak check subtracts it from the heap in use. */
    uint64_t op_memory_kept;
} ab_stats;

void ab_stats_get(ab_stats *out);
/* Owner thread: record the size of one drained batch. */
void ab_stats_batch(uint64_t n);

#endif /* AB_NO_OWNER_API */

#ifdef __cplusplus
}
#endif
#endif
