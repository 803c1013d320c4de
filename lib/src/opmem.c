/* opmem.c: the memory of ops, on 64-byte boundaries and kept for reuse.
 *
 * An op goes from the thread that makes it to the engine and back: every
 * cache line the engine writes moves between two cores twice.  The fields
 * the engine writes for every op are the first 64 bytes of its header
 * (struct ab_op), and an op starts on a 64-byte boundary, so that is one
 * line.  glibc's malloc gives 16-byte boundaries, and at a thousand ops in
 * flight its per-thread cache (7 blocks a size) is always empty: every op
 * took its slow paths.
 *
 * Blocks come in classes of 64-byte multiples up to AB__OPMEM_MAX (an op
 * of 248 bytes, the common size, takes 256, as malloc's chunk for it did);
 * larger ops use calloc.  Each thread keeps two magazines of free blocks
 * a class (arrays of AB__OPMEM_MAG addresses, as in Bonwick's magazine
 * allocator): it allocates from one and frees into it, swaps in the other
 * when it runs out or fills, and only then exchanges a whole magazine with
 * a shared depot, in one step under a lock.  A new slab of AB__OPMEM_SLAB
 * blocks is carved only when the depot has none.  A thread that ends hands
 * its magazines over.  Slabs are never returned to the system: a process
 * keeps the memory of its largest number of ops in flight, for the next
 * burst.
 *
 * What is kept is counted exactly (ab__opmem_kept, in ab_stats), so that a
 * leak check can subtract it from the heap: each thread counts the free
 * blocks of its own magazines in a counter on a line of its own (plain
 * relaxed stores by that thread, no locked instruction), the depot counts
 * its magazines under its lock, and magazines themselves count as kept.
 *
 * Built with AB_OP_CACHE=0, or under AddressSanitizer, every op is its own
 * calloc, so that a use after free is found. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "ab-internal.h"

#if defined(__SANITIZE_ADDRESS__)
#define AB__OP_CACHE_DEFAULT 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define AB__OP_CACHE_DEFAULT 0
#endif
#endif
#ifndef AB__OP_CACHE_DEFAULT
#define AB__OP_CACHE_DEFAULT 1
#endif
#ifndef AB_OP_CACHE
#define AB_OP_CACHE AB__OP_CACHE_DEFAULT
#endif

#define AB__OPMEM_LINE 64
#define AB__OPMEM_MAX 512 /* the largest class, bytes */
#define AB__OPMEM_CLASSES (AB__OPMEM_MAX / AB__OPMEM_LINE + 1)
#define AB__OPMEM_MAG 128 /* blocks in a magazine */
#define AB__OPMEM_SLAB 64 /* blocks carved at once */

/* A magazine: free blocks by address, so that moving them between a
 * thread and the depot is one pointer, and never touches the blocks. */
struct mag {
    struct mag *next; /* in the depot */
    unsigned n;
    void *slot[AB__OPMEM_MAG];
};

/* Shared by every thread, under depot_mu: magazines with blocks (full, or
 * partly full from a thread that ended), and empty ones. */
static pthread_mutex_t depot_mu = PTHREAD_MUTEX_INITIALIZER;
static struct mag *depot_full[AB__OPMEM_CLASSES], *depot_empty;

/* Bytes of free blocks in one thread's magazines: written by that thread
 * alone, read by ab__opmem_kept.  In a list of every thread's, under
 * depot_mu. */
struct counter {
    _Alignas(AB__OPMEM_LINE) atomic_long bytes;
    struct counter *next, **prevp;
};
static struct counter *counters;
/* Under depot_mu: bytes of free blocks in the depot's magazines. */
static long depot_bytes;
/* Bytes of magazines allocated (they are never freed). */
static atomic_long mag_bytes;

/* This thread's two magazines a class (allocation takes from cur, then
 * swaps in prev; so does freeing), its counter, and whether its exit hands
 * them over. */
struct tls {
    struct mag *cur[AB__OPMEM_CLASSES], *prev[AB__OPMEM_CLASSES];
    struct counter *mine;
    int registered;
};
/* One block, so that a call finds its thread's part once (in a shared
 * object each access to a __thread variable is a call). */
static __thread struct tls T;

/* This thread's block, found once: without the empty asm the compiler
 * finds it again (another call) after every store. */
static inline struct tls *
my_tls(void)
{
    struct tls *t = &T;
#if defined(__GNUC__)
    __asm__("" : "+r"(t));
#endif
    return t;
}
static pthread_key_t exit_key;
static pthread_once_t once = PTHREAD_ONCE_INIT;

/* This thread's counter moves by delta bytes. */
static inline void
count(struct tls *t, long delta)
{
    atomic_store_explicit(&t->mine->bytes,
                          atomic_load_explicit(&t->mine->bytes, memory_order_relaxed) + delta,
                          memory_order_relaxed);
}

static inline long
mag_bytes_of(int c, const struct mag *m)
{
    return m != NULL ? (long)m->n * c * AB__OPMEM_LINE : 0;
}

/* depot_mu held. */
static void
depot_put(int c, struct mag *m)
{
    if (m == NULL)
        return;
    depot_bytes += mag_bytes_of(c, m);
    if (m->n > 0) {
        m->next = depot_full[c];
        depot_full[c] = m;
    } else {
        m->next = depot_empty;
        depot_empty = m;
    }
}

/* A thread that used ops ends: its magazines go to the depot. */
static void
thread_ends(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&depot_mu);
    for (int c = 0; c < AB__OPMEM_CLASSES; c++) {
        depot_put(c, T.cur[c]);
        depot_put(c, T.prev[c]);
        T.cur[c] = T.prev[c] = NULL;
    }
    if (T.mine != NULL) { /* its blocks are the depot's now */
        *T.mine->prevp = T.mine->next;
        if (T.mine->next != NULL)
            T.mine->next->prevp = T.mine->prevp;
        free(T.mine);
        T.mine = NULL;
    }
    pthread_mutex_unlock(&depot_mu);
}

/* fork: the child's only thread must find the depot unlocked and whole. */
static void
atfork_prepare(void)
{
    pthread_mutex_lock(&depot_mu);
}

static void
atfork_release(void)
{
    pthread_mutex_unlock(&depot_mu);
}

static void
init_once(void)
{
    pthread_key_create(&exit_key, thread_ends);
    pthread_atfork(atfork_prepare, atfork_release, atfork_release);
}

/* 0, or -1 without memory for the thread's counter. */
static int
register_thread(void)
{
    if (T.registered)
        return 0;
    pthread_once(&once, init_once);
    struct counter *k = aligned_alloc(AB__OPMEM_LINE, sizeof(*k));
    if (k == NULL)
        return -1;
    atomic_init(&k->bytes, 0);
    pthread_mutex_lock(&depot_mu);
    k->next = counters;
    k->prevp = &counters;
    if (counters != NULL)
        counters->prevp = &k->next;
    counters = k;
    pthread_mutex_unlock(&depot_mu);
    T.mine = k;
    /* Any non-NULL value makes the destructor run at thread exit. */
    pthread_setspecific(exit_key, &T.registered);
    T.registered = 1;
    return 0;
}

long
ab__opmem_kept(void)
{
    pthread_mutex_lock(&depot_mu);
    long n = depot_bytes + atomic_load_explicit(&mag_bytes, memory_order_relaxed);
    for (struct counter *k = counters; k != NULL; k = k->next)
        n += atomic_load_explicit(&k->bytes, memory_order_relaxed);
    pthread_mutex_unlock(&depot_mu);
    return n;
}

static struct mag *
mag_new(void)
{
    struct mag *m = malloc(sizeof(*m));
    if (m != NULL) {
        m->next = NULL;
        m->n = 0;
        atomic_fetch_add_explicit(&mag_bytes, (long)sizeof(*m), memory_order_relaxed);
    }
    return m;
}

/* T.cur[c] and T.prev[c] are empty (or missing): give this thread a magazine
 * with blocks, from the depot or from a new slab.  0, or -1 without
 * memory. */
static int
refill(int c)
{
    if (register_thread() < 0)
        return -1;
    pthread_mutex_lock(&depot_mu);
    struct mag *full = depot_full[c];
    if (full != NULL) {
        depot_full[c] = full->next;
        depot_bytes -= mag_bytes_of(c, full);
        count(&T, mag_bytes_of(c, full) - mag_bytes_of(c, T.cur[c]));
        depot_put(c, T.cur[c]);
        T.cur[c] = full;
    }
    pthread_mutex_unlock(&depot_mu);
    if (full != NULL)
        return 0;
    if (T.cur[c] == NULL && (T.cur[c] = mag_new()) == NULL)
        return -1;
    size_t size = (size_t)c * AB__OPMEM_LINE;
    char *slab = aligned_alloc(AB__OPMEM_LINE, size * AB__OPMEM_SLAB);
    if (slab == NULL)
        return -1;
    /* Carved so that the lowest address goes out first. */
    for (int i = AB__OPMEM_SLAB - 1; i >= 0; i--)
        T.cur[c]->slot[T.cur[c]->n++] = slab + (size_t)i * size;
    count(&T, (long)size * AB__OPMEM_SLAB);
    return 0;
}

/* T.cur[c] and T.prev[c] are full (or missing): give this thread an empty
 * magazine, handing the full prev to the depot.  0, or -1 without
 * memory. */
static int
make_room(int c)
{
    if (register_thread() < 0)
        return -1;
    pthread_mutex_lock(&depot_mu);
    struct mag *empty = depot_empty;
    if (empty != NULL)
        depot_empty = empty->next;
    count(&T, -mag_bytes_of(c, T.prev[c]));
    depot_put(c, T.prev[c]);
    T.prev[c] = NULL;
    pthread_mutex_unlock(&depot_mu);
    if (empty == NULL && (empty = mag_new()) == NULL)
        return -1;
    T.prev[c] = T.cur[c];
    T.cur[c] = empty;
    return 0;
}

static int
class_of(size_t size)
{
    return (int)((size + AB__OPMEM_LINE - 1) / AB__OPMEM_LINE);
}

void *
ab__opmem_alloc(size_t size)
{
    if (!AB_OP_CACHE || size > AB__OPMEM_MAX)
        return calloc(1, size);
    int c = class_of(size);
    struct tls *t = my_tls();
    struct mag *m = t->cur[c];
    if (m == NULL || m->n == 0) {
        if (t->prev[c] != NULL && t->prev[c]->n > 0) {
            t->cur[c] = t->prev[c];
            t->prev[c] = m;
        } else if (refill(c) < 0) {
            return NULL;
        }
        m = t->cur[c];
    }
    void *p = m->slot[--m->n];
    count(t, -(long)c * AB__OPMEM_LINE);
    memset(p, 0, size);
    return p;
}

void
ab__opmem_free(void *p, size_t size)
{
    if (!AB_OP_CACHE || size > AB__OPMEM_MAX) {
        free(p);
        return;
    }
    int c = class_of(size);
    struct tls *t = my_tls();
    struct mag *m = t->cur[c];
    if (m == NULL || m->n == AB__OPMEM_MAG) {
        if (t->prev[c] != NULL && t->prev[c]->n < AB__OPMEM_MAG) {
            t->cur[c] = t->prev[c];
            t->prev[c] = m;
        } else if (make_room(c) < 0) {
            /* No memory for a magazine: the block is lost to reuse (it
             * came from a slab, so free() cannot take it). */
            return;
        }
        m = t->cur[c];
    }
    m->slot[m->n++] = p;
    count(t, (long)c * AB__OPMEM_LINE);
}
