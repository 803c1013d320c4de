/* ab-internal.h: private to lib/.  The op layout, and the calls between
 * the engine, the pool and the op code. */
#ifndef AB_INTERNAL_H
#define AB_INTERNAL_H

#include <event2/event.h>
#include <event2/event_struct.h>
#include <stdatomic.h>

#include "ab.h"

/* What a suspended op waits for. */
enum ab__wait {
    AB__WAIT_NONE,
    AB__WAIT_EVENT,  /* its libevent fd event */
    AB__WAIT_TIMER,  /* the engine's timer heap */
    AB__WAIT_WORK,   /* a pool function */
    AB__WAIT_PYTHON, /* the owner, running a Python awaitable */
    AB__WAIT_CANCEL, /* nothing but cancellation */
    AB__WAIT_SIGNAL, /* ab_op_signal, maybe with a timer */
    AB__WAIT_FDS,    /* the op's fd set, maybe with a timer */
    AB__WAIT_DEMAND, /* the stream's consumer */
};

/* Posts that may come after the op finished (a cancel from the owner, a
 * signal from any thread, a stream's demand): their inbox entry holds a
 * reference of its own. */
#define AB__POST_REFS (AB_EV_CANCEL | AB_EV_SIGNAL | AB_EV_DEMAND)

/* The op's fd set (ab_fds_watch): entries are allocated one by one, since
 * libevent keeps pointers to their events. */
struct ab__fd {
    int fd;
    unsigned want;  /* AB_EV_READ | AB_EV_WRITE asked for */
    unsigned ready; /* seen ready during the current wait */
    int added;      /* its event is registered with these flags */
    ab_op *op;
    struct event ev;
};
struct ab__fdset {
    struct ab__fd **v;
    int n, cap;
    int cursor; /* ab_fds_next */
};

/* A stream's item (ab_yield_*). */
struct ab_item {
    ab_item *next;
    ab_result_kind kind;
    union {
        int64_t i;
        double d;
        int slot;
        struct {
            char *data; /* follows the item */
            size_t len;
        } buf;
        struct {
            struct _object *(*to_python)(void *data);
            void *data;
            void (*free_data)(void *data);
        } custom;
    } v;
};

/* In ab_op.pending beside the AB_EV_* bits: the op is on the inbox, and
 * that inbox entry holds a reference of its own. */
#define AB__QUEUED (1u << 31)
#define AB__HOLDS_REF (1u << 30)
/* Sent by ab_cancel before AB_EV_CANCEL reaches the engine. */
#define AB__CANCEL_ASKED 1

/* What only some ops need, allocated on first use: an fd set, a stream. */
struct ab__extra {
    struct ab__fdset fds;
    /* Streams (ab_op_set_stream): items emitted and not yet consumed, and
     * whether the producer waits for demand (both: engine and owner). */
    int stream_max;
    int stream_local; /* owner: consumed, not yet subtracted from stream_out */
    atomic_int stream_out;
    atomic_int demand_waiting;
    ab_item *items; /* lock-free stack: the engine pushes, the owner takes */
};

/* 128 bytes on 64-bit Linux, the state follows: each op costs its memory
 * while in flight, so what only some ops use lives in `extra`. */
struct ab_op {
    /* The first 64 bytes are what the engine writes for every op (ops are
     * allocated on a 64-byte boundary: ab_op_new), so that handing an op
     * to the engine and back moves one cache line between the cores. */
    const ab_op_type *type;
    atomic_uint refs;
    atomic_uint pending;      /* AB_EV_* bits posted to the engine | AB__QUEUED */

    /* Engine thread only, unless said otherwise. */
    unsigned event;           /* why the current step runs */
    int pc;
    /* enum ab__wait, and the events of an fd wait: also read by owners
     * (ab_op_waiting) with relaxed atomic loads, so written with relaxed
     * atomic stores (set_wait). */
    unsigned char wait;
    unsigned char wait_events;
    unsigned char started, finished, cancelled, cleaned;
    unsigned char submitted;         /* owner: 1, or AB__ENGINE_OWNED */
    unsigned char signal_kept;       /* a signal came while not waiting for one */
    unsigned char timer_armed;       /* a signal or fd-set wait's timeout */
    unsigned char soon_queued;       /* on the engine's soon list */
    unsigned char work_after_cancel; /* the pool work was armed after a cancel */
    unsigned char work_blocking;     /* on the blocking pool */
    unsigned char work_skipped;      /* pool thread, before AB_EV_WORK */
    unsigned char python_after_cancel; /* the Python await was armed after a cancel */
    /* Owner, before AB_EV_PYTHON; read by the step after. */
    unsigned char python_failed;
    unsigned char python_skipped;    /* ... and the awaitable never ran */
    unsigned short soon_why;         /* AB_EV_* for the soon list's resume */
    /* AB_MSG_* bits for the owner (atomic builtins); the op is on its sink
     * while nonzero. */
    unsigned char sink_msgs;
    unsigned char kind;              /* ab_result_kind of the outcome */
    int error;                       /* the outcome: 0 or the error */

    /* Links: the inbox has its own, since an op can sit on the inbox (a
     * cancel) while it is queued elsewhere; an op waits on the pool or on
     * the sink, never both. */
    ab_op *inbox_next;
    union {
        ab_op *sink_next;
        ab_op *pool_next;
    };

    /* Second line: written by the owner at submit, or by the engine only
     * for some ops (a value, a wait). */
    ab_sink *sink;
    atomic_int cancel_asked;  /* set by the owner; read by pool threads */
    unsigned generation;      /* ab_fork_generation() at submit (atomic builtins) */

    /* Outcome, written by the step, read by the owner after
     * AB_MSG_FINISHED. */
    char *error_message;
    union {
        int64_t i;
        double d;
        int slot;
        struct {
            char *data;
            size_t len;
        } buf;
    } result;

    /* What the current wait needs; one wait at a time. */
    union {
        struct {
            struct event *ev; /* AB__WAIT_EVENT: an fd wait, allocated for it */
            int wait_fd;      /* its fd, also read by owners (relaxed) */
        };
        struct {
            uint64_t deadline; /* the timer heap: CLOCK_MONOTONIC ns */
            unsigned heap_idx;
        };
        ab_work_fn work;      /* AB__WAIT_WORK */
        /* AB__WAIT_PYTHON: the slot to call, written by the engine before
         * AB_MSG_PYTHON (the sink orders it for the owner). */
        int python_slot;
    };

    struct ab__extra *extra; /* NULL until an fd set or a stream needs it */

    _Alignas(max_align_t) unsigned char state[];
};

#if defined(__x86_64__) && defined(__LP64__)
_Static_assert(sizeof(struct ab_op) == 128, "an op's header grew past 128 bytes");
_Static_assert(offsetof(struct ab_op, sink) == 64, "the engine's fields of an op outgrew one cache line");
#endif

/* engine.c */
struct event_base *ab__engine_base(void);
/* Post AB_EV_* bits to an op; wakes the engine once per burst.  Any thread. */
void ab__engine_post(ab_op *op, unsigned bits);
int ab__on_engine_thread(void);
/* op.c */
void ab__op_finish_cleanup(ab_op *op);
/* opmem.c: an op's memory, zeroed, on a 64-byte boundary; freed with the
 * size it was allocated with.  Any thread. */
void *ab__opmem_alloc(size_t size);
void ab__opmem_free(void *p, size_t size);
/* Bytes of op memory kept free for reuse (blocks and their magazines). */
long ab__opmem_kept(void);
/* stream.c: drop a stream's items nobody took (the op is freed). */
void ab__items_free(ab_op *op);
/* op.c: the op's extra part, allocated on first use (NULL: out of memory). */
struct ab__extra *ab__extra(ab_op *op);
/* engine.c: start an op of the engine's own (no sink): it counts as in
 * flight until it finishes, then frees itself; its `submitted` says
 * AB__ENGINE_OWNED (a field of its own would grow the op's header past 128
 * bytes).  Any thread. */
#define AB__ENGINE_OWNED 2
void ab__engine_own(ab_op *op);
/* dns.c: the engine's base is freed (engine stopped, nothing in flight),
 * or abandoned (a fork child, an owner gone). */
void ab__dns_free(void);
void ab__dns_forget(void);
/* engine.c: queue AB_MSG_* bits for the owner (engine thread). */
void ab__sink_send(ab_op *op, unsigned msg);
/* A work op (AB_TYPE_WORK, AB_TYPE_BLOCKING): its step runs on a pool
 * thread, which finishes it; its waits return AB_ESTATE. */
#define AB__WORK_OP(op) (((op)->type->flags & (AB_TYPE_WORK | AB_TYPE_BLOCKING)) != 0)
/* A pool thread: run a work op's step and hand its outcome to the sink. */
void ab__work_op_run(ab_op *op);
/* engine.c: resume a suspended op with `why` after the current callbacks
 * (engine thread); skipped if it resumes otherwise first. */
void ab__soon(ab_op *op, unsigned why);
void ab__set_wait(ab_op *op, enum ab__wait wait);
/* spin.c, the engine thread */
/* Whether a thread that waits for work (the engine) should
 * spin for the next piece rather than sleep: only with a CPU to spare, and
 * only while its spins pay (spin.c).  One per thread, zero-initialised,
 * used by that thread only. */
typedef struct ab__spinner {
    uint64_t spare_checked_ns, slept_ns;
    uint64_t window_ns; /* learnt; 0: not yet, the longest */
    int spare, skip, backoff, misses;
} ab__spinner;

/* 1 if the thread should spin now, for ab__spin_window. */
int ab__spin_begin(ab__spinner *s);
/* How long to spin: what recent work needed to come, with room, between
 * AB__SPIN_MIN_NS and max_ns (the longest spin that can pay). */
uint64_t ab__spin_window(const ab__spinner *s, uint64_t max_ns);
/* A spin caught work after_ns into it (or into its renewal after a lone
 * catch): called for every catch. */
void ab__spin_caught(ab__spinner *s, uint64_t after_ns, uint64_t max_ns);
/* After a spin: whether work came within it. */
void ab__spin_end(ab__spinner *s, int paid);
/* The thread goes to sleep (spun or not), and is woken by work: how soon
 * the work came teaches the spinner whether a spin of at most max_ns would
 * have paid, and how long it would have needed. */
void ab__spin_sleep(ab__spinner *s);
void ab__spin_woken(ab__spinner *s, uint64_t max_ns);

/* timers.c, engine thread */
uint64_t ab__now_ns(void);
int ab__timers_start(struct event_base *base, void (*fire)(ab_op *op));
void ab__timers_stop(void);
void ab__timers_forget(void);
int ab__timer_add(ab_op *op, uint64_t deadline);
void ab__timer_remove(ab_op *op);
/* pool.c: queue op->work on the CPU pool, or the blocking pool when
 * op->work_blocking; 0 or a negative error.  Engine thread. */
int ab__pool_submit(ab_op *op);
void ab__pool_stats(ab_stats *out);
void ab__pool_atfork_prepare(void);
void ab__pool_atfork_parent(void);
void ab__pool_atfork_child(void);
/* Workers leave (after the function they run); queued work stays for
 * ab__pool_resume.  join: wait until every worker has left, for callers
 * that know none is running a function. */
void ab__pool_stop(int join);
void ab__pool_resume(void);
/* Drop queued work without running it (ab_engine_abandon). */
void ab__pool_forget(void);

#define AB__LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)

#endif
