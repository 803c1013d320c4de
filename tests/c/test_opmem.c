/* test_opmem.c: the memory of ops (lib/src/opmem.c): blocks on 64-byte
 * boundaries, zeroed, reused by the thread that freed them, handed between
 * threads through the depot (a thread's surplus, a thread's exit), and
 * usable in a fork child. */
#include "harness.h"

#include <malloc.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ab-internal.h"

#if defined(__SANITIZE_ADDRESS__) || (defined(AB_OP_CACHE) && !AB_OP_CACHE)
#define CACHED 0
#else
#define CACHED 1
#endif

static void
test_aligned_and_zeroed(void)
{
    for (size_t size = 128; size <= 1024; size += 8) {
        unsigned char *p = ab__opmem_alloc(size);
        CHECK(p != NULL);
        if (CACHED && size <= 512)
            CHECK_EQ((uintptr_t)p % 64, 0);
        for (size_t i = 0; i < size; i++)
            CHECK_EQ(p[i], 0);
        memset(p, 0xab, size); /* dirty, for the next one to be zeroed */
        ab__opmem_free(p, size);
    }
}

static void
test_reused_by_the_freeing_thread(void)
{
    void *a = ab__opmem_alloc(248);
    ab__opmem_free(a, 248);
    void *b = ab__opmem_alloc(256); /* the same class */
    if (CACHED)
        CHECK(a == b);
    ab__opmem_free(b, 256);
}

enum { N = 3000 };
static void *blocks[N];

static void *
alloc_and_free_all(void *arg)
{
    (void)arg;
    for (int i = 0; i < N; i++)
        CHECK((blocks[i] = ab__opmem_alloc(200)) != NULL);
    for (int i = 0; i < N; i++)
        ab__opmem_free(blocks[i], 200);
    return NULL;
}

static void
test_a_thread_that_ends_hands_its_blocks_over(void)
{
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, alloc_and_free_all, NULL), 0);
    CHECK_EQ(pthread_join(t, NULL), 0);
    /* Everything the thread freed is in the depot now (its surplus while
     * it ran, the rest when it ended): this thread takes those blocks
     * rather than new ones. */
    int found = 0;
    void *mine[N];
    for (int i = 0; i < N; i++) {
        mine[i] = ab__opmem_alloc(200);
        for (int j = 0; j < N && CACHED; j++)
            if (mine[i] == blocks[j]) {
                found++;
                break;
            }
    }
    if (CACHED)
        CHECK_INT(found, >=, N - 256); /* this thread's own keep aside */
    for (int i = 0; i < N; i++)
        ab__opmem_free(mine[i], 200);
}

/* Blocks made on one thread and freed on another, as ops do (the owner
 * makes them, the engine may drop the last reference). */
enum { ROUNDS = 200, BATCH = 500 };
static void *queue_[BATCH];
static pthread_mutex_t qmu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t qcv = PTHREAD_COND_INITIALIZER;
static int qfull;

static void *
freer(void *arg)
{
    (void)arg;
    for (int r = 0; r < ROUNDS; r++) {
        pthread_mutex_lock(&qmu);
        while (!qfull)
            pthread_cond_wait(&qcv, &qmu);
        for (int i = 0; i < BATCH; i++) {
            unsigned char *p = queue_[i];
            CHECK_EQ(p[0], (unsigned char)r);
            ab__opmem_free(p, 300);
        }
        qfull = 0;
        pthread_cond_signal(&qcv);
        pthread_mutex_unlock(&qmu);
    }
    return NULL;
}

static void
test_made_here_freed_there(void)
{
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, freer, NULL), 0);
    for (int r = 0; r < ROUNDS; r++) {
        pthread_mutex_lock(&qmu);
        while (qfull)
            pthread_cond_wait(&qcv, &qmu);
        for (int i = 0; i < BATCH; i++) {
            unsigned char *p = ab__opmem_alloc(300);
            CHECK(p != NULL && p[0] == 0 && p[299] == 0);
            p[0] = (unsigned char)r;
            queue_[i] = p;
        }
        qfull = 1;
        pthread_cond_signal(&qcv);
        pthread_mutex_unlock(&qmu);
    }
    CHECK_EQ(pthread_join(t, NULL), 0);
}

static void
test_a_fork_child_allocates(void)
{
    void *held[600];
    for (int i = 0; i < 600; i++)
        held[i] = ab__opmem_alloc(256);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        /* the depot and this thread's list came along, usable */
        for (int i = 0; i < 600; i++)
            ab__opmem_free(held[i], 256);
        static void *fresh[2000];
        for (int i = 0; i < 2000; i++)
            if ((fresh[i] = ab__opmem_alloc(256)) == NULL)
                _exit(2);
        for (int i = 0; i < 2000; i++)
            ab__opmem_free(fresh[i], 256);
        _exit(0);
    }
    int status;
    CHECK_EQ(waitpid(pid, &status, 0), pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    for (int i = 0; i < 600; i++)
        ab__opmem_free(held[i], 256);
}

/* The C heap in use, as glibc counts it. */
static long
heap_in_use(void)
{
    struct mallinfo2 mi = mallinfo2();
    return (long)(mi.uordblks + mi.hblkhd);
}

static void *
churn(void *arg)
{
    int n = *(int *)arg;
    void **held = calloc((size_t)n, sizeof(*held));
    CHECK(held != NULL);
    for (int round = 0; round < 3; round++) {
        for (int i = 0; i < n; i++)
            CHECK((held[i] = ab__opmem_alloc(248 + (size_t)(i % 3) * 64)) != NULL);
        for (int i = 0; i < n; i++)
            ab__opmem_free(held[i], 248 + (size_t)(i % 3) * 64);
    }
    free(held);
    return NULL;
}

/* What is kept for reuse is counted exactly: the heap in use minus what is
 * kept does not grow with a new peak of blocks, a thread's exit, or blocks
 * taken back from the depot; a block not freed (a leak) still shows. */
static void
test_kept_memory_is_counted(void)
{
    if (!CACHED) {
        CHECK_EQ(ab__opmem_kept(), 0);
        return;
    }
    long base = heap_in_use() - ab__opmem_kept();
    /* A new peak, on two threads that then end. */
    int n = 20000;
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        CHECK_OK(pthread_create(&t[i], NULL, churn, &n));
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    long kept = ab__opmem_kept();
    /* Their blocks went to the depot: at least one thread's peak (the
     * second may have reused the first's, had it ended already). */
    CHECK(kept >= 20000L * 256);
    long after = heap_in_use() - kept;
    /* Slabs' and magazines' malloc headers: under 1% of what is kept. */
    CHECK_INT(after - base, <, kept / 100);
    /* This thread takes blocks back from the depot, then frees them. */
    n = 30000;
    churn(&n);
    long again = heap_in_use() - ab__opmem_kept();
    CHECK_INT(again - base, <, ab__opmem_kept() / 100);
    /* One block not freed: the difference shows it. */
    void *leak = ab__opmem_alloc(248);
    CHECK_EQ((heap_in_use() - ab__opmem_kept()) - again, 256);
    ab__opmem_free(leak, 248);
    CHECK_EQ(heap_in_use() - ab__opmem_kept(), again);
    ab_stats st;
    ab_stats_get(&st);
    CHECK_EQ((long)st.op_memory_kept, ab__opmem_kept());
}

int
main(void)
{
    TH_RUN(test_aligned_and_zeroed);
    TH_RUN(test_reused_by_the_freeing_thread);
    TH_RUN(test_a_thread_that_ends_hands_its_blocks_over);
    TH_RUN(test_made_here_freed_there);
    TH_RUN(test_kept_memory_is_counted);
#ifndef __SANITIZE_THREAD__ /* TSan does not follow a fork after threads ran */
    TH_RUN(test_a_fork_child_allocates);
#endif
    return th_done();
}
