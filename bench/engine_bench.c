/* engine_bench.c: the engine alone, no Python.  How many ops per second can
 * ONE engine thread start, finish and hand to sinks?
 *
 * 1, 2, 4, ... N submitter threads ("loops") share the one engine.  Each has
 * its own sink, as each asyncio loop has its own bridge, and keeps K nop ops
 * in flight: it submits them, collects the finished ones from its sink in
 * batches, and submits as many new ones.  A nop's step returns at once, so
 * what is measured is the engine's own path: inbox, dispatch, step, finish,
 * push onto the sink, notify.
 *
 * Two modes:
 *   wait     the owner sleeps on an eventfd that the sink's notify writes,
 *            as the add_reader delivery does (a loop that drains batches);
 *   produce  the owner never sleeps: notify sets a flag the owner spins on
 *            (yielding now and then), and it keeps a larger window in
 *            flight, to keep the engine as busy as the submitters can.
 *
 * The engine thread's own CPU time comes from its CPU clock
 * (pthread_getcpuclockid on the pthread_t a probe op reads on the engine
 * thread, through the public API only).  Engine CPU per op gives what one
 * engine thread sustains at 100% of one core: 1e9 / (engine ns per op),
 * i.e. ops/s divided by the engine's utilisation.  In wait mode the
 * engine's CPU includes its polling (it spins up to 50 us after each post,
 * lib/src/engine.c AB__SPIN_NS), so that row understates the capacity; the
 * produce rows keep the engine busy and are the tighter figure.  The final
 * line takes the smallest engine CPU per op of all rows (every row's CPU
 * per op is at least the true cost, polling only adds to it).
 *
 * Usage: engine_bench [--threads N] [--inflight K] [--produce-inflight K]
 *                     [--seconds S] [--warmup S] [--mode wait|produce|both]
 *                     [--quick] [--json FILE] [--pin|--no-pin]
 * Build: meson setup B -Dpython=false -Dlib_tests=true && ninja -C B engine_bench
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "ab.h"

#define DIE(...)                                                              \
    do {                                                                      \
        fprintf(stderr, "engine_bench: " __VA_ARGS__);                        \
        fputc('\n', stderr);                                                  \
        exit(1);                                                              \
    } while (0)

enum mode { MODE_WAIT, MODE_PRODUCE };
static const char *const mode_names[] = {"wait", "produce"};

/* ---- the nop op -------------------------------------------------------------- */

static int
nop_step(ab_op *op)
{
    return ab_return_none(op);
}

static const ab_op_type nop_type = {.name = "nop", .step = nop_step};

/* A probe: reads pthread_self() on the engine thread. */
static int
probe_step(ab_op *op)
{
    *(pthread_t *)ab_op_state(op) = pthread_self();
    return ab_return_none(op);
}

static const ab_op_type probe_type = {
    .name = "probe", .state_size = sizeof(pthread_t), .step = probe_step};

/* ---- clocks -------------------------------------------------------------------- */

static uint64_t
clock_ns(clockid_t clk)
{
    struct timespec ts;
    if (clock_gettime(clk, &ts) != 0)
        return 0;
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void
sleep_s(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* ---- submitters ---------------------------------------------------------------- */

struct worker {
    _Alignas(64) pthread_t thread;
    clockid_t cpu_clock;
    enum mode mode;
    int inflight_target;
    ab_sink sink;
    int efd;
    atomic_int retired;
    long in_flight;
    _Alignas(64) atomic_int ready; /* produce: set by notify, on its own line */
    /* Written by the worker, read by main: its own cache line. */
    _Alignas(64) atomic_uint_fast64_t done, wakes, batches;
};

static pthread_barrier_t start_barrier;
static atomic_int stopping;
/* --pin: the engine alone on one CPU, submitters (and main) on the others. */
static int pinned;
static cpu_set_t submitter_cpus;

static void
notify_efd(ab_sink *sink)
{
    struct worker *w = sink->user;
    uint64_t one = 1;
    while (write(w->efd, &one, sizeof(one)) < 0 && errno == EINTR)
        ;
}

static void
notify_none(ab_sink *sink)
{
    (void)sink;
}

/* produce mode: the owner spins on this flag instead of sleeping. */
static void
notify_flag(ab_sink *sink)
{
    struct worker *w = sink->user;
    atomic_store_explicit(&w->ready, 1, memory_order_release);
}

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#else
#define CPU_RELAX() __asm__ __volatile__("" ::: "memory")
#endif

static void
on_retired(ab_sink *sink)
{
    atomic_store(&((struct worker *)sink->user)->retired, 1);
}

static void
submit_one(struct worker *w)
{
    ab_op *op = ab_op_new(&nop_type);
    if (op == NULL)
        DIE("out of memory");
    int rc = ab_submit(op, &w->sink);
    if (rc < 0)
        DIE("ab_submit: %s", ab_strerror(rc));
    w->in_flight++;
}

static void *
worker_main(void *arg)
{
    struct worker *w = arg;
    uint64_t done = 0, wakes = 0, batches = 0;
    pthread_barrier_wait(&start_barrier);
    for (int i = 0; i < w->inflight_target; i++)
        submit_one(w);
    for (;;) {
        ab_op *op = ab_sink_take(&w->sink);
        if (op == NULL) {
            if (atomic_load_explicit(&stopping, memory_order_relaxed) && w->in_flight == 0)
                break;
            if (w->mode == MODE_WAIT) {
                /* Every op in flight finishes, so a notify always comes. */
                uint64_t n;
                while (read(w->efd, &n, sizeof(n)) < 0 && errno == EINTR)
                    ;
                atomic_store_explicit(&w->wakes, ++wakes, memory_order_relaxed);
            } else {
                /* Spin on the flag notify sets (a plain load keeps the line
                 * shared), yielding now and then so that submitters sharing
                 * a CPU take turns. */
                for (int spins = 0; !atomic_load_explicit(&w->ready, memory_order_acquire);
                     spins++) {
                    CPU_RELAX();
                    if (spins == 4096) {
                        sched_yield();
                        spins = 0;
                    }
                }
                atomic_store_explicit(&w->ready, 0, memory_order_relaxed);
            }
            continue;
        }
        uint64_t n = 0;
        while (op != NULL) {
            ab_op *next = ab_sink_next(op); /* before handling op */
            if (ab_sink_msgs(op) != AB_MSG_FINISHED || ab_op_error(op) != 0)
                DIE("unexpected outcome for a nop");
            ab_op_collect(op);
            ab_op_release(op);
            w->in_flight--;
            n++;
            op = next;
        }
        ab_stats_batch(n);
        done += n;
        atomic_store_explicit(&w->done, done, memory_order_relaxed);
        atomic_store_explicit(&w->batches, ++batches, memory_order_relaxed);
        if (!atomic_load_explicit(&stopping, memory_order_relaxed)) {
            for (uint64_t i = 0; i < n; i++)
                submit_one(w);
        } else if (w->in_flight == 0) {
            break;
        }
    }
    return NULL;
}

/* ---- one measurement ------------------------------------------------------------ */

struct snapshot {
    uint64_t wall, engine_cpu, process_cpu, submitters_cpu, done, wakes, batches;
    ab_stats st;
};

struct row {
    enum mode mode;
    int threads, inflight;
    double seconds, ops_per_s, engine_util, engine_ns_per_op, capacity;
    double submitters_ns_per_op, process_ns_per_op;
    double engine_wakeups_per_op, sink_wakeups_per_op, owner_wakes_per_op, ops_per_batch;
};

static void
take_snapshot(struct snapshot *s, clockid_t engine_clock, struct worker *w, int n)
{
    s->wall = clock_ns(CLOCK_MONOTONIC);
    s->engine_cpu = clock_ns(engine_clock);
    s->process_cpu = clock_ns(CLOCK_PROCESS_CPUTIME_ID);
    s->submitters_cpu = s->done = s->wakes = s->batches = 0;
    for (int i = 0; i < n; i++) {
        s->submitters_cpu += clock_ns(w[i].cpu_clock);
        s->done += atomic_load_explicit(&w[i].done, memory_order_relaxed);
        s->wakes += atomic_load_explicit(&w[i].wakes, memory_order_relaxed);
        s->batches += atomic_load_explicit(&w[i].batches, memory_order_relaxed);
    }
    ab_stats_get(&s->st);
}

static struct row
measure(enum mode mode, int n, int inflight, double warmup, double seconds,
        clockid_t engine_clock)
{
    struct worker *w = aligned_alloc(64, sizeof(*w) * (size_t)n);
    if (w == NULL)
        DIE("out of memory");
    memset(w, 0, sizeof(*w) * (size_t)n);
    atomic_store(&stopping, 0);
    if (pthread_barrier_init(&start_barrier, NULL, (unsigned)n + 1) != 0)
        DIE("pthread_barrier_init");
    for (int i = 0; i < n; i++) {
        w[i].mode = mode;
        w[i].inflight_target = inflight;
        w[i].efd = -1;
        if (mode == MODE_WAIT) {
            w[i].efd = eventfd(0, EFD_CLOEXEC); /* blocking: the owner sleeps in read */
            if (w[i].efd < 0)
                DIE("eventfd: %s", strerror(errno));
        }
        ab_sink_init(&w[i].sink, mode == MODE_WAIT ? notify_efd : notify_flag, &w[i]);
        if (pthread_create(&w[i].thread, NULL, worker_main, &w[i]) != 0)
            DIE("pthread_create");
        if (pinned && pthread_setaffinity_np(w[i].thread, sizeof(submitter_cpus),
                                             &submitter_cpus) != 0)
            DIE("pthread_setaffinity_np");
        if (pthread_getcpuclockid(w[i].thread, &w[i].cpu_clock) != 0)
            DIE("pthread_getcpuclockid");
    }
    pthread_barrier_wait(&start_barrier); /* all start together */
    sleep_s(warmup);
    struct snapshot a, b;
    take_snapshot(&a, engine_clock, w, n);
    sleep_s(seconds);
    take_snapshot(&b, engine_clock, w, n);
    atomic_store(&stopping, 1);
    for (int i = 0; i < n; i++)
        if (pthread_join(w[i].thread, NULL) != 0)
            DIE("pthread_join");
    /* Every op was taken: hand the sinks back to the engine, which answers
     * once no notify can run on them, before their eventfds close. */
    for (int i = 0; i < n; i++)
        ab_sink_retire(&w[i].sink, on_retired);
    for (int i = 0; i < n; i++) {
        while (!atomic_load(&w[i].retired))
            sleep_s(0.0001);
        if (w[i].efd >= 0)
            close(w[i].efd);
    }
    pthread_barrier_destroy(&start_barrier);

    double wall = (double)(b.wall - a.wall) * 1e-9;
    double ops = (double)(b.done - a.done);
    if (ops <= 0)
        DIE("no op finished in %.2f s", wall);
    struct row r = {.mode = mode, .threads = n, .inflight = inflight, .seconds = wall};
    r.ops_per_s = ops / wall;
    double engine_ns = (double)(b.engine_cpu - a.engine_cpu);
    r.engine_util = engine_ns * 1e-9 / wall;
    r.engine_ns_per_op = engine_ns / ops;
    r.capacity = r.engine_ns_per_op > 0 ? 1e9 / r.engine_ns_per_op : 0;
    r.submitters_ns_per_op = (double)(b.submitters_cpu - a.submitters_cpu) / ops;
    r.process_ns_per_op = (double)(b.process_cpu - a.process_cpu) / ops;
    r.engine_wakeups_per_op = (double)(b.st.engine_wakeups - a.st.engine_wakeups) / ops;
    r.sink_wakeups_per_op = (double)(b.st.sink_wakeups - a.st.sink_wakeups) / ops;
    r.owner_wakes_per_op = (double)(b.wakes - a.wakes) / ops;
    r.ops_per_batch = b.batches > a.batches ? ops / (double)(b.batches - a.batches) : 0;
    free(w);
    return r;
}

/* ---- main -------------------------------------------------------------------------- */

static atomic_int probe_sink_retired;

static void
probe_retired(ab_sink *sink)
{
    (void)sink;
    atomic_store(&probe_sink_retired, 1);
}

static pthread_t
engine_thread(void)
{
    ab_sink sink;
    ab_sink_init(&sink, notify_none, NULL);
    ab_op *op = ab_op_new(&probe_type);
    if (op == NULL)
        DIE("out of memory");
    int rc = ab_submit(op, &sink);
    if (rc < 0)
        DIE("ab_submit: %s", ab_strerror(rc));
    ab_op *got;
    while ((got = ab_sink_take(&sink)) == NULL)
        sleep_s(0.0001);
    if (got != op || ab_sink_next(got) != NULL)
        DIE("probe: unexpected batch");
    (void)ab_sink_msgs(got);
    pthread_t t = *(pthread_t *)ab_op_state(op);
    ab_op_collect(op);
    ab_op_release(op);
    /* The sink lives on this stack: wait until the engine is done with it. */
    ab_sink_retire(&sink, probe_retired);
    while (!atomic_load(&probe_sink_retired))
        sleep_s(0.0001);
    return t;
}

/* The 1-minute load average: other work on the machine shows in ops/s. */
static double
loadavg(void)
{
    double l = -1;
    FILE *f = fopen("/proc/loadavg", "r");
    if (f != NULL) {
        if (fscanf(f, "%lf", &l) != 1)
            l = -1;
        fclose(f);
    }
    return l;
}

static void
print_row(const struct row *r)
{
    printf("%-8s %4d %6d %10.0f %7.1f%% %9.1f %10.2f %9.1f %9.1f %9.4f %9.4f %9.4f %8.1f\n",
           mode_names[r->mode], r->threads, r->inflight, r->ops_per_s,
           r->engine_util * 100.0, r->engine_ns_per_op, r->capacity * 1e-6,
           r->submitters_ns_per_op, r->process_ns_per_op, r->engine_wakeups_per_op,
           r->sink_wakeups_per_op, r->owner_wakes_per_op, r->ops_per_batch);
    fflush(stdout);
}

static void
write_json(const char *path, const struct row *rows, int nrows, const struct row *best,
           int ncpu)
{
    FILE *f = fopen(path, "w");
    if (f == NULL)
        DIE("%s: %s", path, strerror(errno));
    fprintf(f, "{\n  \"cpus\": %d,\n  \"rows\": [\n", ncpu);
    for (int i = 0; i < nrows; i++) {
        const struct row *r = &rows[i];
        fprintf(f,
                "    {\"mode\": \"%s\", \"threads\": %d, \"inflight\": %d, \"seconds\": %.3f, "
                "\"ops_per_s\": %.1f, \"engine_util\": %.4f, \"engine_ns_per_op\": %.2f, "
                "\"capacity_ops_per_s\": %.1f, \"submitters_ns_per_op\": %.2f, "
                "\"process_ns_per_op\": %.2f, \"engine_wakeups_per_op\": %.6f, "
                "\"sink_wakeups_per_op\": %.6f, \"owner_wakes_per_op\": %.6f, "
                "\"ops_per_batch\": %.2f}%s\n",
                mode_names[r->mode], r->threads, r->inflight, r->seconds, r->ops_per_s,
                r->engine_util, r->engine_ns_per_op, r->capacity, r->submitters_ns_per_op,
                r->process_ns_per_op, r->engine_wakeups_per_op, r->sink_wakeups_per_op,
                r->owner_wakes_per_op, r->ops_per_batch, i + 1 < nrows ? "," : "");
    }
    fprintf(f,
            "  ],\n  \"capacity\": {\"ops_per_s\": %.1f, \"engine_ns_per_op\": %.2f, "
            "\"mode\": \"%s\", \"threads\": %d}\n}\n",
            best->capacity, best->engine_ns_per_op, mode_names[best->mode], best->threads);
    fclose(f);
}

static void
usage(void)
{
    fprintf(stderr,
            "usage: engine_bench [--threads N] [--inflight K] [--produce-inflight K]\n"
            "                    [--seconds S] [--warmup S] [--mode wait|produce|both]\n"
            "                    [--quick] [--json FILE]\n");
    exit(2);
}

int
main(int argc, char **argv)
{
    int max_threads = 8, inflight = 256, produce_inflight = 4096;
    double seconds = 3.0, warmup = 0.3;
    int modes = 3; /* bit 0 wait, bit 1 produce */
    int pin = -1;  /* -1: pin when there are at least 2 CPUs */
    const char *json = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--quick") == 0) {
            seconds = 1.0;
            warmup = 0.2;
        } else if (strcmp(a, "--pin") == 0) {
            pin = 1;
        } else if (strcmp(a, "--no-pin") == 0) {
            pin = 0;
        } else if (strcmp(a, "--threads") == 0 && v) {
            max_threads = atoi(v), i++;
        } else if (strcmp(a, "--inflight") == 0 && v) {
            inflight = atoi(v), i++;
        } else if (strcmp(a, "--produce-inflight") == 0 && v) {
            produce_inflight = atoi(v), i++;
        } else if (strcmp(a, "--seconds") == 0 && v) {
            seconds = atof(v), i++;
        } else if (strcmp(a, "--warmup") == 0 && v) {
            warmup = atof(v), i++;
        } else if (strcmp(a, "--json") == 0 && v) {
            json = v, i++;
        } else if (strcmp(a, "--mode") == 0 && v) {
            modes = strcmp(v, "wait") == 0      ? 1
                    : strcmp(v, "produce") == 0 ? 2
                    : strcmp(v, "both") == 0    ? 3
                                                : 0;
            if (modes == 0)
                usage();
            i++;
        } else {
            usage();
        }
    }
    if (max_threads < 1 || max_threads > 1024 || inflight < 1 || produce_inflight < 1 ||
        seconds <= 0 || warmup < 0)
        usage();

    pthread_t engine = engine_thread();
    clockid_t engine_clock;
    if (pthread_getcpuclockid(engine, &engine_clock) != 0)
        DIE("pthread_getcpuclockid on the engine thread");
    int ncpu = (int)sysconf(_SC_NPROCESSORS_ONLN);
    cpu_set_t usable;
    char pin_note[160] = "not pinned: the scheduler places the engine and the submitters";
    if (sched_getaffinity(0, sizeof(usable), &usable) == 0 && CPU_COUNT(&usable) >= 2 &&
        pin != 0) {
        int engine_cpu = -1;
        CPU_ZERO(&submitter_cpus);
        for (int c = 0; c < CPU_SETSIZE; c++) {
            if (!CPU_ISSET(c, &usable))
                continue;
            if (engine_cpu < 0)
                engine_cpu = c;
            else
                CPU_SET(c, &submitter_cpus);
        }
        cpu_set_t one;
        CPU_ZERO(&one);
        CPU_SET(engine_cpu, &one);
        if (pthread_setaffinity_np(engine, sizeof(one), &one) != 0 ||
            pthread_setaffinity_np(pthread_self(), sizeof(submitter_cpus), &submitter_cpus) != 0)
            DIE("cannot pin the engine thread");
        pinned = 1;
        snprintf(pin_note, sizeof(pin_note),
                 "pinned: the engine alone on CPU %d, submitters on the other %d CPU(s)",
                 engine_cpu, CPU_COUNT(&submitter_cpus));
    } else if (pin == 1) {
        DIE("--pin needs at least 2 usable CPUs");
    }

    int counts[64], ncounts = 0;
    for (int n = 1; n < max_threads && ncounts < 63; n *= 2)
        counts[ncounts++] = n;
    counts[ncounts++] = max_threads;

    printf("engine_bench: one engine thread, nop ops; %d CPUs online (load average %.2f); "
           "%.1f s per row after %.1f s warm-up\n",
           ncpu, loadavg(), seconds, warmup);
    printf("%s\n", pin_note);
    printf("wait: each submitter sleeps on an eventfd its sink's notify writes (as add_reader "
           "delivery), %d in flight each\n",
           inflight);
    printf("produce: each submitter spins on a flag its sink's notify sets, never sleeps, %d in flight each\n\n",
           produce_inflight);
    printf("%-8s %4s %6s %10s %8s %9s %10s %9s %9s %9s %9s %9s %8s\n", "mode", "thr",
           "inflt", "ops/s", "eng cpu", "eng ns/op", "cap Mops/s", "sub ns/op", "all ns/op",
           "eng wk/op", "sink wk/op", "own wk/op", "ops/bat");
    printf("%.*s\n", 138,
           "-----------------------------------------------------------------------------"
           "-----------------------------------------------------------------------------");

    struct row rows[128];
    int nrows = 0;
    for (int m = 0; m < 2; m++) {
        if (!(modes & (1 << m)))
            continue;
        for (int c = 0; c < ncounts; c++) {
            rows[nrows] = measure((enum mode)m, counts[c],
                                  m == MODE_WAIT ? inflight : produce_inflight, warmup,
                                  seconds, engine_clock);
            print_row(&rows[nrows]);
            nrows++;
        }
    }
    printf("(eng cpu: the engine thread's CPU time / wall time; eng ns/op: its CPU per op; "
           "cap: 1e9 / eng ns/op, the ops/s one engine thread sustains at 100%% of one core; "
           "sub: the submitters' CPU per op; all: the whole process; wk/op: engine wake-ups, "
           "sink notifies and owner wake-ups per op; ops/bat: ops per batch an owner took)\n");

    const struct row *best = &rows[0], *best_wait = NULL, *best_produce = NULL;
    for (int i = 0; i < nrows; i++) {
        const struct row *r = &rows[i];
        if (r->capacity > best->capacity)
            best = r;
        const struct row **slot = r->mode == MODE_WAIT ? &best_wait : &best_produce;
        if (*slot == NULL || r->capacity > (*slot)->capacity)
            *slot = r;
    }
    const struct row *fastest = &rows[0];
    for (int i = 0; i < nrows; i++)
        if (rows[i].ops_per_s > fastest->ops_per_s)
            fastest = &rows[i];
    printf("\nmost ops/s measured: %.2f Mops/s (%s, %d threads; engine at %.0f%% of a core)\n",
           fastest->ops_per_s * 1e-6, mode_names[fastest->mode], fastest->threads,
           fastest->engine_util * 100.0);
    if (best_wait)
        printf("loop-like (wait) rows: engine %.1f ns/op at best (%d threads), its polling "
               "included: %.2f Mops/s per core\n",
               best_wait->engine_ns_per_op, best_wait->threads, best_wait->capacity * 1e-6);
    if (best_produce)
        printf("saturating (produce) rows: engine %.1f ns/op at best (%d threads): %.2f Mops/s "
               "per core\n",
               best_produce->engine_ns_per_op, best_produce->threads,
               best_produce->capacity * 1e-6);
    printf("load average at the end: %.2f (other work on this machine slows ops/s; the "
           "engine's CPU per op is its own CPU clock)\n",
           loadavg());
    if (!pinned)
        printf("note: not pinned: submitters may share the engine's core (ops then stay in "
               "its cache), so CPU per op may look lower than across cores\n");
    else if (CPU_COUNT(&submitter_cpus) < max_threads)
        printf("note: %d submitter(s) share %d CPU(s): ops/s is bounded by the submitters, "
               "not the engine; read capacity (engine CPU per op)\n",
               max_threads, CPU_COUNT(&submitter_cpus));
    printf("engine thread capacity: %.2f Mops/s at 100%% of one core (%.1f ns of engine CPU "
           "per op, %s mode, %d threads)\n",
           best->capacity * 1e-6, best->engine_ns_per_op, mode_names[best->mode],
           best->threads);
    if (json)
        write_json(json, rows, nrows, best, ncpu);
    return 0;
}
