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
};

/* In ab_op.pending beside the AB_EV_* bits: the op is on the inbox, and
 * that inbox entry holds a reference of its own. */
#define AB__QUEUED (1u << 31)
#define AB__HOLDS_REF (1u << 30)
/* Sent by ab_cancel before AB_EV_CANCEL reaches the engine. */
#define AB__CANCEL_ASKED 1

struct ab_op {
    const ab_op_type *type;
    atomic_uint refs;
    atomic_uint pending;      /* AB_EV_* bits posted to the engine | AB__QUEUED */
    atomic_int cancel_asked;  /* set by the owner; read by pool threads */
    unsigned generation;      /* ab_fork_generation() at submit */

    /* Engine thread only. */
    unsigned event;           /* why the current step runs */
    int pc;
    /* enum ab__wait, and the fd and events of an fd wait: also read by
     * owners (ab_op_waiting) with relaxed atomic loads, so written with
     * relaxed atomic stores (set_wait). */
    unsigned char wait;
    unsigned char wait_events;
    unsigned char started, finished, cancelled, cleaned, submitted;
    int sink_msg;
    int wait_fd;
    /* What the current wait needs; one wait at a time. */
    union {
        struct event *ev;     /* AB__WAIT_EVENT: an fd wait, allocated for it */
        struct {
            uint64_t deadline; /* AB__WAIT_TIMER: CLOCK_MONOTONIC ns */
            unsigned heap_idx;
        };
        ab_work_fn work;      /* AB__WAIT_WORK */
        /* AB__WAIT_PYTHON: the slot to call, written by the engine before
         * AB_MSG_PYTHON (the sink orders it for the owner). */
        int python_slot;
    };
    /* Written by the owner before AB_EV_PYTHON; read by the step after. */
    int python_failed;

    /* Links: the inbox has its own, since an op can sit on the inbox (a
     * cancel) while it is queued elsewhere; an op waits on the pool or on
     * the sink, never both. */
    ab_op *inbox_next;
    union {
        ab_op *sink_next;
        ab_op *pool_next;
    };
    ab_sink *sink;

    /* Outcome, written by the step, read by the owner after
     * AB_MSG_FINISHED. */
    int error;
    ab_result_kind kind;
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

    _Alignas(max_align_t) unsigned char state[];
};

/* engine.c */
struct event_base *ab__engine_base(void);
/* Post AB_EV_* bits to an op; wakes the engine once per burst.  Any thread. */
void ab__engine_post(ab_op *op, unsigned bits);
int ab__on_engine_thread(void);
/* op.c */
void ab__op_finish_cleanup(ab_op *op);
/* timers.c, engine thread */
uint64_t ab__now_ns(void);
int ab__timers_start(struct event_base *base, void (*fire)(ab_op *op));
void ab__timers_stop(void);
void ab__timers_forget(void);
int ab__timer_add(ab_op *op, uint64_t deadline);
void ab__timer_remove(ab_op *op);
/* pool.c: queue fn for op; 0 or a negative error.  Engine thread. */
int ab__pool_submit(ab_op *op);
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
