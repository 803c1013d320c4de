/* stream.c: ops that emit items (ab_yield_*) before they finish.
 *
 * The engine pushes items onto the op's lock-free stack and sends the
 * owner AB_MSG_ITEMS, which rides on the op's one sink entry: a burst of
 * items costs the owner one wake-up.  The owner takes them all at once.
 *
 * Backpressure counts items emitted and not yet consumed (stream_out).  The
 * owner subtracts what it consumed in batches of half the buffer (or at
 * once when the producer waits), so that the two threads do not bounce a
 * cache line per item; a producer waits (ab_await_demand) only while more
 * than half the buffer is outstanding, and every batch the owner holds
 * back is smaller than that, so the wait always ends. */
#include <stdlib.h>
#include <string.h>

#include "ab-internal.h"

static int
half(const ab_op *op)
{
    return op->extra->stream_max / 2;
}

static int
is_stream(const ab_op *op)
{
    return op->extra != NULL && op->extra->stream_max > 0;
}

int
ab_op_set_stream(ab_op *op, int max_buffered)
{
    if (AB__WORK_OP(op))
        return -EINVAL; /* its one step cannot emit items */
    if (ab__extra(op) == NULL)
        return -ENOMEM;
    op->extra->stream_max = max_buffered > 0 ? max_buffered : 1;
    return 0;
}

static int
push(ab_op *op, ab_item *item)
{
    if (!is_stream(op)) {
        ab_item_free(item);
        return AB_ESTATE;
    }
    if (op->cancelled) { /* closed: nobody reads more */
        ab_item_free(item);
        return -ECANCELED;
    }
    struct ab__extra *x = op->extra;
    ab_item *head = __atomic_load_n(&x->items, __ATOMIC_RELAXED);
    do {
        item->next = head;
    } while (!__atomic_compare_exchange_n(&x->items, &head, item, 1, __ATOMIC_RELEASE,
                                          __ATOMIC_RELAXED));
    atomic_fetch_add_explicit(&x->stream_out, 1, memory_order_relaxed);
    ab__sink_send(op, AB_MSG_ITEMS);
    return 0;
}

static ab_item *
item_new(ab_result_kind kind, size_t extra)
{
    ab_item *item = malloc(sizeof(*item) + extra);
    if (item != NULL) {
        item->next = NULL;
        item->kind = kind;
    }
    return item;
}

int
ab_yield_int(ab_op *op, int64_t v)
{
    ab_item *item = item_new(AB_RESULT_INT, 0);
    if (item == NULL)
        return -ENOMEM;
    item->v.i = v;
    return push(op, item);
}

int
ab_yield_float(ab_op *op, double v)
{
    ab_item *item = item_new(AB_RESULT_FLOAT, 0);
    if (item == NULL)
        return -ENOMEM;
    item->v.d = v;
    return push(op, item);
}

static int
yield_copy(ab_op *op, ab_result_kind kind, const void *data, size_t len)
{
    if (len > SIZE_MAX - sizeof(ab_item) - 1)
        return -ENOMEM;
    ab_item *item = item_new(kind, len + 1);
    if (item == NULL)
        return -ENOMEM;
    item->v.buf.data = (char *)(item + 1);
    item->v.buf.len = len;
    if (len)
        memcpy(item->v.buf.data, data, len);
    item->v.buf.data[len] = '\0';
    return push(op, item);
}

int
ab_yield_bytes(ab_op *op, const void *data, size_t len)
{
    return yield_copy(op, AB_RESULT_BYTES, data, len);
}

int
ab_yield_str(ab_op *op, const char *utf8, size_t len)
{
    return yield_copy(op, AB_RESULT_STR, utf8, len);
}

int
ab_yield_kept(ab_op *op, int slot)
{
    ab_item *item = item_new(AB_RESULT_KEPT, 0);
    if (item == NULL)
        return -ENOMEM;
    item->v.slot = slot;
    return push(op, item);
}

int
ab_yield_custom(ab_op *op, struct _object *(*to_python)(void *data), void *data,
                void (*free_data)(void *data))
{
    if (to_python == NULL) {
        if (free_data != NULL)
            free_data(data);
        return -EINVAL;
    }
    ab_item *item = item_new(AB_RESULT_CUSTOM, 0);
    if (item == NULL) {
        if (free_data != NULL)
            free_data(data);
        return -ENOMEM;
    }
    item->v.custom.to_python = to_python;
    item->v.custom.data = data;
    item->v.custom.free_data = free_data;
    return push(op, item);
}

int
ab_stream_room(const ab_op *op)
{
    if (!is_stream(op))
        return 0;
    struct ab__extra *x = op->extra;
    return x->stream_max - atomic_load_explicit(&x->stream_out, memory_order_relaxed);
}

int
ab_await_demand(ab_op *op)
{
    if (!is_stream(op))
        return AB_ESTATE;
    struct ab__extra *x = op->extra;
    ab__set_wait(op, AB__WAIT_DEMAND);
    if (op->cancelled) { /* closed: no demand will ever come */
        ab__soon(op, AB_EV_CANCEL);
        return 0;
    }
    if (atomic_load(&x->stream_out) <= half(op)) {
        ab__soon(op, AB_EV_DEMAND);
        return 0;
    }
    /* Dekker with ab_stream_consumed: either it sees the flag, or this
     * sees what it subtracted. */
    atomic_store(&x->demand_waiting, 1);
    if (atomic_load(&x->stream_out) <= half(op) && atomic_exchange(&x->demand_waiting, 0))
        ab__soon(op, AB_EV_DEMAND);
    /* else: demand comes through the inbox (the owner cleared the flag). */
    return 0;
}

/* ---- the owner's side -------------------------------------------------------- */

ab_item *
ab_op_take_items(ab_op *op)
{
    if (op->extra == NULL)
        return NULL;
    ab_item *lifo = __atomic_exchange_n(&op->extra->items, NULL, __ATOMIC_ACQUIRE), *fifo = NULL;
    while (lifo != NULL) {
        ab_item *next = lifo->next;
        lifo->next = fifo;
        fifo = lifo;
        lifo = next;
    }
    return fifo;
}

ab_item *ab_item_next(const ab_item *item) { return item->next; }
void ab_item_set_next(ab_item *item, ab_item *next) { item->next = next; }
ab_result_kind ab_item_kind(const ab_item *item) { return item->kind; }
int64_t ab_item_int(const ab_item *item) { return item->v.i; }
double ab_item_float(const ab_item *item) { return item->v.d; }
int ab_item_slot(const ab_item *item) { return item->v.slot; }

const void *
ab_item_data(const ab_item *item, size_t *len)
{
    *len = item->v.buf.len;
    return item->v.buf.data;
}

struct _object *
ab_item_custom(const ab_item *item)
{
    return item->v.custom.to_python(item->v.custom.data);
}

void
ab_item_free(ab_item *item)
{
    if (item == NULL)
        return;
    if (item->kind == AB_RESULT_CUSTOM && item->v.custom.free_data != NULL)
        item->v.custom.free_data(item->v.custom.data);
    free(item);
}

void
ab__items_free(ab_op *op)
{
    if (op->extra == NULL)
        return;
    ab_item *item = __atomic_exchange_n(&op->extra->items, NULL, __ATOMIC_ACQUIRE);
    while (item != NULL) {
        ab_item *next = item->next;
        ab_item_free(item);
        item = next;
    }
}

void
ab_stream_consumed(ab_op *op, int n)
{
    if (!is_stream(op))
        return;
    struct ab__extra *x = op->extra;
    int t = half(op) > 0 ? half(op) : 1;
    x->stream_local += n;
    if (x->stream_local < t &&
        !atomic_load_explicit(&x->demand_waiting, memory_order_relaxed))
        return;
    int out = atomic_fetch_sub(&x->stream_out, x->stream_local) - x->stream_local;
    x->stream_local = 0;
    if (out <= half(op) && atomic_load(&x->demand_waiting) &&
        atomic_exchange(&x->demand_waiting, 0) &&
        __atomic_load_n(&op->generation, __ATOMIC_RELAXED) == ab_fork_generation())
        ab__engine_post(op, AB_EV_DEMAND);
}
