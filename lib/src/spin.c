/* spin.c: whether a thread that waits for work should spin for it, learnt
 * from whether its spins pay.
 *
 * A spin saves the wake-up (a futex or eventfd write, then a context
 * switch: tens of microseconds across cores on a VM) when the next piece
 * of work comes within the spin.  It pays only where a CPU is spare: on
 * the only CPU, or on one another process's loop needs, it takes the time
 * of the very thread that would post the work.  And it pays only when
 * work comes back soon: a thread whose spins keep timing out (a service
 * whose requests come every few hundred microseconds) spends a CPU for
 * nothing.  So a spinner stops after AB__MISSES spins in a row time out,
 * and skips its spins for the next 1, 2, 4 ... AB__SKIP_MAX waits,
 * growing while they keep missing.  While it skips, each wake-up tells
 * how soon the work came after it went to sleep: work that came within
 * the spin it did not make means spinning pays again, at once.
 *
 * And a spin lasts only as long as the work it catches needs.  Measured
 * on bench/run.py's bursts (1,000 ops in flight), the spins that caught a
 * post caught it within 2 us, while every other spin ran its whole 50 us
 * for nothing (the loop was busy with the burst it had just been given):
 * one miss per burst, and the misses never came two in a row to start the
 * back-off.  So the window is learnt: AB__WINDOW_ROOM times how soon the
 * last catches came, shrinking by a quarter per catch and growing at once
 * for a later one, or for work that came within the longest window after
 * the thread went to sleep. */
#include <fcntl.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ab-internal.h"

#define AB__SPARE_CHECK_NS 20000000u /* how often a CPU to spare is looked for */
#define AB__MISSES 2
#define AB__SKIP_MAX 64
#define AB__SPIN_MIN_NS 8000u /* the shortest window learnt */
#define AB__WINDOW_ROOM 4     /* window: this many times the catches' delay */

/* 1 if this thread may run on two CPUs or more and fewer threads are
 * runnable on the machine (the kernel's count in /proc/loadavg, this one
 * included) than it has CPUs. */
static int
cpu_spare(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) < 0)
        return 0;
    long cpus = CPU_COUNT(&set), online = sysconf(_SC_NPROCESSORS_ONLN);
    if (online > 0 && online < cpus)
        cpus = online;
    if (cpus < 2)
        return 0;
    /* Opened each time (at most every AB__SPARE_CHECK_NS): no fd kept. */
    int fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    char buf[128];
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    /* "0.12 0.34 0.56 running/total last-pid" */
    const char *p = buf;
    for (int field = 0; field < 3 && p != NULL; field++)
        if ((p = strchr(p, ' ')) != NULL)
            p++;
    long running = p != NULL ? strtol(p, NULL, 10) : 0;
    return running > 0 && running - 1 < cpus;
}

int
ab__spin_begin(ab__spinner *s)
{
    uint64_t now = ab__now_ns();
    if (s->spare_checked_ns == 0 || now - s->spare_checked_ns >= AB__SPARE_CHECK_NS) {
        s->spare_checked_ns = now;
        s->spare = cpu_spare();
    }
    if (!s->spare)
        return 0;
    if (s->skip > 0) {
        s->skip--;
        return 0;
    }
    return 1;
}

static uint64_t
clamp_window(uint64_t ns, uint64_t max_ns)
{
    uint64_t min_ns = AB__SPIN_MIN_NS < max_ns ? AB__SPIN_MIN_NS : max_ns;
    return ns < min_ns ? min_ns : ns > max_ns ? max_ns : ns;
}

uint64_t
ab__spin_window(const ab__spinner *s, uint64_t max_ns)
{
    return s->window_ns == 0 ? max_ns : clamp_window(s->window_ns, max_ns);
}

void
ab__spin_caught(ab__spinner *s, uint64_t after_ns, uint64_t max_ns)
{
    uint64_t want = after_ns * AB__WINDOW_ROOM, shrunk = ab__spin_window(s, max_ns) / 4 * 3;
    s->window_ns = clamp_window(want > shrunk ? want : shrunk, max_ns);
}

void
ab__spin_end(ab__spinner *s, int paid)
{
    if (paid) {
        s->misses = 0;
        s->backoff = 0;
    } else if (++s->misses >= AB__MISSES) {
        s->misses = 0;
        s->backoff = s->backoff == 0 ? 1 : (s->backoff * 2 > AB__SKIP_MAX ? AB__SKIP_MAX : s->backoff * 2);
        s->skip = s->backoff;
    }
}

void
ab__spin_sleep(ab__spinner *s)
{
    s->slept_ns = ab__now_ns();
}

void
ab__spin_woken(ab__spinner *s, uint64_t max_ns)
{
    /* Work that came within the longest window would have been caught by
     * a spin that long: spinning pays again, and the window grows to
     * cover it (the wake-up's own delay counts against the spin, so this
     * errs towards sleeping). */
    if (s->slept_ns == 0)
        return;
    uint64_t after = ab__now_ns() - s->slept_ns;
    if (after >= max_ns)
        return;
    if (after > ab__spin_window(s, max_ns))
        s->window_ns = clamp_window(after * AB__WINDOW_ROOM, max_ns);
    if (s->skip > 0) {
        s->skip = 0;
        s->backoff = 0;
        s->misses = 0;
    }
}
