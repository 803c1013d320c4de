/* timers.c: the engine's timers, a binary min-heap of ops by deadline
 * behind one libevent timer.  An op pays 16 bytes for a timer instead of
 * a struct event (128), and 100,000 timers cost one libevent event.
 * Engine thread only. */
#include <stdlib.h>
#include <time.h>

#include "ab-internal.h"

static struct {
    ab_op **heap;
    unsigned len, cap;
    struct event *ev; /* fires at heap[0]'s deadline */
    void (*fire)(ab_op *op);
} T;

uint64_t
ab__now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void
place(unsigned i, ab_op *op)
{
    T.heap[i] = op;
    op->heap_idx = i;
}

static void
sift_up(unsigned i)
{
    ab_op *op = T.heap[i];
    while (i > 0) {
        unsigned parent = (i - 1) / 2;
        if (T.heap[parent]->deadline <= op->deadline)
            break;
        place(i, T.heap[parent]);
        i = parent;
    }
    place(i, op);
}

static void
sift_down(unsigned i)
{
    ab_op *op = T.heap[i];
    for (;;) {
        unsigned child = 2 * i + 1;
        if (child >= T.len)
            break;
        if (child + 1 < T.len && T.heap[child + 1]->deadline < T.heap[child]->deadline)
            child++;
        if (op->deadline <= T.heap[child]->deadline)
            break;
        place(i, T.heap[child]);
        i = child;
    }
    place(i, op);
}

static void
rearm(void)
{
    if (T.len == 0) {
        event_del(T.ev);
        return;
    }
    uint64_t now = ab__now_ns(), at = T.heap[0]->deadline;
    /* Round up to the microsecond: late, never early. */
    uint64_t us = at > now ? (at - now + 999) / 1000 : 0;
    struct timeval tv = {.tv_sec = (time_t)(us / 1000000), .tv_usec = (suseconds_t)(us % 1000000)};
    event_add(T.ev, &tv);
}

static void
on_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    uint64_t now = ab__now_ns();
    while (T.len > 0 && T.heap[0]->deadline <= now) {
        ab_op *op = T.heap[0];
        ab__timer_remove(op);
        T.fire(op);
    }
    rearm();
}

int
ab__timers_start(struct event_base *base, void (*fire)(ab_op *op))
{
    T.fire = fire;
    T.len = 0;
    T.ev = evtimer_new(base, on_timer, NULL);
    return T.ev != NULL ? 0 : -ENOMEM;
}

void
ab__timers_stop(void)
{
    if (T.ev != NULL)
        event_free(T.ev);
    T.ev = NULL;
    free(T.heap);
    T.heap = NULL;
    T.len = T.cap = 0;
}

/* The child of a fork: the heap belongs to the abandoned base. */
void
ab__timers_forget(void)
{
    T.ev = NULL;
    T.heap = NULL;
    T.len = T.cap = 0;
}

int
ab__timer_add(ab_op *op, uint64_t deadline)
{
    if (T.len == T.cap) {
        unsigned cap = T.cap ? T.cap * 2 : 64;
        ab_op **heap = realloc(T.heap, cap * sizeof(*heap));
        if (heap == NULL)
            return -ENOMEM;
        T.heap = heap;
        T.cap = cap;
    }
    op->deadline = deadline;
    place(T.len++, op);
    sift_up(op->heap_idx);
    if (op->heap_idx == 0)
        rearm();
    return 0;
}

void
ab__timer_remove(ab_op *op)
{
    unsigned i = op->heap_idx;
    ab_op *last = T.heap[--T.len];
    if (i < T.len) {
        place(i, last);
        sift_down(i);
        sift_up(last->heap_idx);
    }
    /* Re-arming for a new earliest deadline waits for on_timer or the next
     * add: a timer that fires early finds nothing due and re-arms. */
}
