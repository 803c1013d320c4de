/* The physical floor of a cross-thread round trip on this machine.
 *
 * Two threads ping-pong through a pair of eventfds: the main thread writes
 * "ping" and blocks reading "pong"; the echo thread blocks reading "ping"
 * and writes "pong". One round trip is two wake-ups of a sleeping thread,
 * which is what a bridge round trip costs when both sides sleep: the loop
 * wakes the engine to submit, the engine wakes the loop to deliver.
 *
 * Usage: eventfd_pingpong [round_trips] [free|same|split]
 *   free:  the scheduler places both threads, as it does a loop and the
 *          engine (the default, and the figure the targets use);
 *   same:  both pinned to CPU 0, so each wake-up is a context switch;
 *   split: pinned to CPUs 0 and 1, so each wake-up crosses CPUs (an IPI,
 *          and on a VM the wake of an idle vCPU).
 * Prints one JSON object: {"mode": ..., "n": ..., "p50_us": ..., ...}.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

struct echo_args {
    long rounds;
    int cpu; /* -1: leave placement to the scheduler */
};

static int ping_fd;
static int pong_fd;

/* Pins the calling thread to one CPU, or exits. */
static void pin_to(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (pthread_setaffinity_np(pthread_self(), sizeof set, &set) != 0) {
        fprintf(stderr, "cannot pin a thread to CPU %d\n", cpu);
        exit(1);
    }
}

/* Blocks until the counter is non-zero, then takes it; exits on error. */
static void wait_fd(int fd)
{
    uint64_t value;
    if (read(fd, &value, sizeof value) != sizeof value) {
        perror("read");
        exit(1);
    }
}

static void signal_fd(int fd)
{
    uint64_t one = 1;
    if (write(fd, &one, sizeof one) != sizeof one) {
        perror("write");
        exit(1);
    }
}

static void *echo(void *arg)
{
    const struct echo_args *args = arg;
    if (args->cpu >= 0)
        pin_to(args->cpu);
    for (long i = 0; i < args->rounds; i++) {
        wait_fd(ping_fd);
        signal_fd(pong_fd);
    }
    return NULL;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int compare_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static double percentile_us(const int64_t *sorted, long n, double q)
{
    long index = (long)(q * (double)(n - 1) + 0.5);
    return (double)sorted[index] / 1000.0;
}

int main(int argc, char **argv)
{
    long measured = argc > 1 ? atol(argv[1]) : 20000;
    const char *mode = argc > 2 ? argv[2] : "free";
    long warmup = measured / 10 + 100;
    struct echo_args args = {warmup + measured, -1};
    int64_t *samples = malloc(sizeof *samples * (size_t)(measured > 0 ? measured : 1));
    pthread_t thread;

    if (measured <= 0 || samples == NULL) {
        fprintf(stderr, "usage: %s [round_trips>0] [free|same|split]\n", argv[0]);
        return 2;
    }
    if (strcmp(mode, "same") == 0 || strcmp(mode, "split") == 0) {
        pin_to(0);
        args.cpu = strcmp(mode, "same") == 0 ? 0 : 1;
    } else if (strcmp(mode, "free") != 0) {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    ping_fd = eventfd(0, EFD_CLOEXEC);
    pong_fd = eventfd(0, EFD_CLOEXEC);
    if (ping_fd < 0 || pong_fd < 0) {
        perror("eventfd");
        return 1;
    }
    if (pthread_create(&thread, NULL, echo, &args) != 0) {
        perror("pthread_create");
        return 1;
    }
    for (long i = 0; i < args.rounds; i++) {
        int64_t start = now_ns();
        signal_fd(ping_fd);
        wait_fd(pong_fd);
        if (i >= warmup)
            samples[i - warmup] = now_ns() - start;
    }
    pthread_join(thread, NULL);

    double total = 0;
    for (long i = 0; i < measured; i++)
        total += (double)samples[i];
    qsort(samples, (size_t)measured, sizeof *samples, compare_i64);
    printf("{\"mode\": \"%s\", \"n\": %ld, \"p50_us\": %.3f, \"p99_us\": %.3f, "
           "\"mean_us\": %.3f, \"min_us\": %.3f}\n",
           mode, measured, percentile_us(samples, measured, 0.50),
           percentile_us(samples, measured, 0.99),
           total / (double)measured / 1000.0,
           percentile_us(samples, measured, 0.0));
    free(samples);
    return 0;
}
