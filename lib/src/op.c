/* op.c: an op's memory, its outcome, and the sink queue. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ab-internal.h"

static void (*release_hook)(ab_op *op);
static size_t owner_size;

/* The owner area follows the state, aligned. */
static size_t
state_span(const ab_op_type *type)
{
    size_t a = _Alignof(max_align_t);
    return (type->state_size + a - 1) / a * a;
}

const char *
ab_strerror(int err)
{
    switch (err) {
#define AB__ERR_CASE(name, code, msg)                                         \
    case code:                                                                \
        return msg;
        AB_ERRNO_MAP(AB__ERR_CASE)
#undef AB__ERR_CASE
    }
    if (err < 0 && err > -4096)
        return strerror(-err);
    return "unknown error";
}

/* An op's whole allocation: header, state, owner data. */
static size_t
op_size(const ab_op_type *type)
{
    return sizeof(ab_op) + state_span(type) + owner_size;
}

ab_op *
ab_op_new(const ab_op_type *type)
{
    ab_op *op = ab__opmem_alloc(op_size(type));
    if (op == NULL)
        return NULL;
    op->type = type;
    atomic_init(&op->refs, 1);
    /* ab_op_signal ignores ops of another fork generation. */
    op->generation = ab_fork_generation();
    return op;
}

void
ab_set_owner_size(size_t size)
{
    owner_size = size;
}

void *
ab_op_owner(ab_op *op)
{
    return op->state + state_span(op->type);
}

void
ab_set_release_hook(void (*hook)(ab_op *op))
{
    release_hook = hook;
}

static void
free_result(ab_op *op)
{
    if (op->kind == AB_RESULT_BYTES || op->kind == AB_RESULT_STR)
        free(op->result.buf.data);
    op->kind = AB_RESULT_NONE;
}

/* cleanup runs once: here only if the engine never finished the op. */
void
ab__op_finish_cleanup(ab_op *op)
{
    if (op->cleaned)
        return;
    op->cleaned = 1;
    if (op->type->cleanup != NULL)
        op->type->cleanup(op);
}

void
ab_op_retain(ab_op *op)
{
    atomic_fetch_add_explicit(&op->refs, 1, memory_order_relaxed);
}

void
ab_op_release(ab_op *op)
{
    /* The last holder needs no locked instruction: only a holder may take
     * another reference, so a count of 1 that is ours stays 1.  Owners
     * drop the last reference of nearly every op. */
    if (atomic_load_explicit(&op->refs, memory_order_acquire) != 1 &&
        atomic_fetch_sub_explicit(&op->refs, 1, memory_order_acq_rel) != 1)
        return;
    ab__op_finish_cleanup(op);
    if (release_hook != NULL)
        release_hook(op);
    if (op->type->dispose != NULL)
        op->type->dispose(op);
    free_result(op);
    ab__items_free(op);
    free(op->extra);
    free(op->error_message);
    ab__opmem_free(op, op_size(op->type));
}

const ab_op_type *ab_op_type_of(const ab_op *op) { return op->type; }
void *ab_op_state(ab_op *op) { return op->state; }
int *ab_op_pc(ab_op *op) { return &op->pc; }
unsigned ab_op_event(const ab_op *op) { return op->event; }
int ab_op_cancelled(const ab_op *op) { return op->cancelled; }
int ab_op_error(const ab_op *op) { return op->error; }
const char *ab_op_error_message(const ab_op *op) { return op->error_message; }
ab_result_kind ab_op_result_kind(const ab_op *op) { return (ab_result_kind)op->kind; }
int64_t ab_op_result_int(const ab_op *op) { return op->result.i; }
double ab_op_result_float(const ab_op *op) { return op->result.d; }
int ab_op_python_failed(const ab_op *op) { return op->python_failed; }
int ab_op_python_slot(const ab_op *op) { return op->python_slot; }
unsigned ab_op_generation(const ab_op *op) { return op->generation; }

const void *
ab_op_result_data(const ab_op *op, size_t *len)
{
    if (op->kind == AB_RESULT_KEPT) {
        *len = 0;
        return &op->result.slot;
    }
    if (op->kind != AB_RESULT_BYTES && op->kind != AB_RESULT_STR) {
        *len = 0;
        return NULL;
    }
    *len = op->result.buf.len;
    return op->result.buf.data;
}

static int
set_kind(ab_op *op, ab_result_kind kind)
{
    free_result(op);
    op->error = 0;
    op->kind = (unsigned char)kind;
    return AB_DONE;
}

int ab_return_none(ab_op *op) { return set_kind(op, AB_RESULT_NONE); }
int ab_return_python(ab_op *op) { return set_kind(op, AB_RESULT_PYTHON); }
int ab_return_custom(ab_op *op) { return set_kind(op, AB_RESULT_CUSTOM); }

int
ab_return_int(ab_op *op, int64_t v)
{
    set_kind(op, AB_RESULT_INT);
    op->result.i = v;
    return AB_DONE;
}

int
ab_return_float(ab_op *op, double v)
{
    set_kind(op, AB_RESULT_FLOAT);
    op->result.d = v;
    return AB_DONE;
}

int
ab_return_kept(ab_op *op, int slot)
{
    set_kind(op, AB_RESULT_KEPT);
    op->result.slot = slot;
    return AB_DONE;
}

static int
return_copy(ab_op *op, ab_result_kind kind, const void *data, size_t len)
{
    /* One spare byte: STR results stay NUL-terminated. */
    char *copy = malloc(len + 1);
    if (copy == NULL)
        return ab_fail(op, -ENOMEM);
    if (len)
        memcpy(copy, data, len);
    copy[len] = '\0';
    set_kind(op, kind);
    op->result.buf.data = copy;
    op->result.buf.len = len;
    return AB_DONE;
}

int
ab_return_bytes(ab_op *op, const void *data, size_t len)
{
    return return_copy(op, AB_RESULT_BYTES, data, len);
}

int
ab_return_str(ab_op *op, const char *utf8, size_t len)
{
    return return_copy(op, AB_RESULT_STR, utf8, len);
}

int
ab_fail(ab_op *op, int err)
{
    free_result(op);
    op->error = err < 0 ? err : AB_ESTATE;
    return AB_DONE;
}

int
ab_fail_msg(ab_op *op, int err, const char *fmt, ...)
{
    char buf[201];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    free(op->error_message);
    op->error_message = strdup(buf);
    return ab_fail(op, err);
}

/* ---- sink: a lock-free stack; the owner reverses a taken batch ---------- */

void
ab_sink_init(ab_sink *sink, void (*notify)(ab_sink *), void *user)
{
    sink->notify = notify;
    sink->user = user;
    __atomic_store_n(&sink->head, NULL, __ATOMIC_RELEASE);
}

ab_op *
ab_sink_take(ab_sink *sink)
{
    ab_op *op = __atomic_exchange_n(&sink->head, NULL, __ATOMIC_ACQ_REL);
    ab_op *fifo = NULL;
    while (op != NULL) {
        ab_op *next = op->sink_next;
        op->sink_next = fifo;
        fifo = op;
        op = next;
    }
    return fifo;
}

ab_op *
ab_sink_next(ab_op *op)
{
    return op->sink_next;
}

unsigned
ab_sink_msgs(ab_op *op)
{
    return __atomic_exchange_n(&op->sink_msgs, 0, __ATOMIC_SEQ_CST);
}

struct ab__extra *
ab__extra(ab_op *op)
{
    if (op->extra == NULL)
        op->extra = calloc(1, sizeof(*op->extra));
    return op->extra;
}
