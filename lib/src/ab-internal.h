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
    AB__WAIT_EVENT,  /* its libevent timer or fd event */
    AB__WAIT_WORK,   /* a pool function */
    AB__WAIT_PYTHON, /* the owner, running a Python awaitable */
    AB__WAIT_CANCEL, /* nothing but cancellation */
};

/* In ab_op.pending beside the AB_EV_* bits: the op is on the inbox. */
#define AB__QUEUED (1u << 31)
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
    enum ab__wait wait;
    unsigned char started, finished, cancelled, cleaned, submitted;
    struct event ev;
    ab_work_fn work;

    /* Links: each queue has its own, since an op can sit on the inbox
     * (a cancel) while its message waits on the sink. */
    ab_op *inbox_next;
    ab_op *sink_next;
    ab_op *pool_next;
    ab_sink *sink;
    int sink_msg;

    /* The Python await, written by the engine before AB_MSG_PYTHON and by
     * the owner before AB_EV_PYTHON: the queues order the two. */
    int python_slot;
    int python_failed;

    /* Outcome, written by the step, read by the owner after
     * AB_MSG_FINISHED. */
    int error;
    char *error_message;
    ab_result_kind kind;
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
/* pool.c: queue fn for op; 0 or a negative error.  Engine thread. */
int ab__pool_submit(ab_op *op);
void ab__pool_atfork_prepare(void);
void ab__pool_atfork_parent(void);
void ab__pool_atfork_child(void);
void ab__pool_stop(void);

#define AB__LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)

#endif
