/* test_spin.c: the engine's spinner (lib/src/spin.c) stops spinning while
 * spins time out, backs off longer while they keep timing out, spins
 * again at once when work comes back soon, and spins only as long as the
 * work it catches needs.  The CPU-to-spare check is
 * taken as done (spare, checked now), so the test is the same on any
 * machine. */
#include "harness.h"

#include "ab-internal.h"

static void
as_if_spare(ab__spinner *s)
{
    s->spare = 1;
    s->spare_checked_ns = ab__now_ns();
}

/* How many of the next `n` waits the spinner skips. */
static int
skipped(ab__spinner *s, int n)
{
    int skips = 0;
    for (int i = 0; i < n; i++) {
        as_if_spare(s);
        if (!ab__spin_begin(s))
            skips++;
        else {
            ab__spin_end(s, 0);
            return skips;
        }
    }
    return skips;
}

static void
test_spins_that_pay_go_on(void)
{
    ab__spinner s = {0};
    for (int i = 0; i < 1000; i++) {
        as_if_spare(&s);
        CHECK(ab__spin_begin(&s));
        ab__spin_end(&s, 1);
    }
    /* one miss alone does not stop it */
    as_if_spare(&s);
    CHECK(ab__spin_begin(&s));
    ab__spin_end(&s, 0);
    as_if_spare(&s);
    CHECK(ab__spin_begin(&s));
    ab__spin_end(&s, 1);
}

static void
test_misses_back_off_exponentially(void)
{
    ab__spinner s = {0};
    /* two misses in a row: skip 1, then each further streak doubles */
    as_if_spare(&s);
    CHECK(ab__spin_begin(&s));
    ab__spin_end(&s, 0);
    as_if_spare(&s);
    CHECK(ab__spin_begin(&s));
    ab__spin_end(&s, 0);
    int expect = 1;
    for (int round = 0; round < 10; round++) {
        int got = skipped(&s, 1000);
        CHECK_EQ(got, expect);
        /* skipped() spent one more miss: complete the streak */
        as_if_spare(&s);
        CHECK(ab__spin_begin(&s));
        ab__spin_end(&s, 0);
        expect = expect * 2 > 64 ? 64 : expect * 2;
    }
    /* a spin that pays ends the back-off */
    as_if_spare(&s);
    CHECK(!ab__spin_begin(&s));
    s.skip = 0;
    as_if_spare(&s);
    CHECK(ab__spin_begin(&s));
    ab__spin_end(&s, 1);
    CHECK(s.backoff == 0 && s.misses == 0);
}

static void
test_work_that_came_soon_ends_the_back_off(void)
{
    ab__spinner s = {0};
    s.skip = s.backoff = 64;
    /* slept long ago: the work came late, the back-off stands */
    s.slept_ns = ab__now_ns() - 10000000u;
    ab__spin_woken(&s, 50000u);
    CHECK(s.skip == 64);
    /* slept just now: a spin would have caught it */
    ab__spin_sleep(&s);
    ab__spin_woken(&s, 50000000u);
    CHECK(s.skip == 0 && s.backoff == 0);
    as_if_spare(&s);
    CHECK(ab__spin_begin(&s));
}

static void
test_no_cpu_to_spare_never_spins(void)
{
    ab__spinner s = {0};
    s.spare = 0;
    s.spare_checked_ns = ab__now_ns(); /* looked at just now: not again */
    for (int i = 0; i < 100; i++)
        CHECK(!ab__spin_begin(&s));
}

#define MAX_NS 50000u
#define MIN_NS 8000u

static void
test_window_shrinks_to_what_catches_need(void)
{
    ab__spinner s = {0};
    CHECK_EQ(ab__spin_window(&s, MAX_NS), MAX_NS); /* nothing learnt yet */
    /* catches within 1 us: a quarter less per catch, down to the floor */
    uint64_t expect = MAX_NS;
    for (int i = 0; i < 20; i++) {
        ab__spin_caught(&s, 1000u, MAX_NS);
        expect = expect / 4 * 3 < MIN_NS ? MIN_NS : expect / 4 * 3;
        CHECK_EQ(ab__spin_window(&s, MAX_NS), expect);
    }
    CHECK_EQ(ab__spin_window(&s, MAX_NS), MIN_NS);
    /* a later catch widens it at once, to 4 times its delay */
    ab__spin_caught(&s, 5000u, MAX_NS);
    CHECK_EQ(ab__spin_window(&s, MAX_NS), 20000u);
    ab__spin_caught(&s, 30000u, MAX_NS);
    CHECK_EQ(ab__spin_window(&s, MAX_NS), MAX_NS);
    /* never longer than the caller's longest */
    CHECK_EQ(ab__spin_window(&s, 10000u), 10000u);
}

static void
test_work_soon_after_sleep_widens_the_window(void)
{
    ab__spinner s = {0};
    for (int i = 0; i < 20; i++)
        ab__spin_caught(&s, 100u, MAX_NS);
    CHECK_EQ(ab__spin_window(&s, MAX_NS), MIN_NS);
    /* came after the longest window: nothing to learn */
    s.slept_ns = ab__now_ns() - 2 * MAX_NS;
    ab__spin_woken(&s, MAX_NS);
    CHECK_EQ(ab__spin_window(&s, MAX_NS), MIN_NS);
    /* came at least 10 us after the sleep, well within a longest window of
     * 50 ms (slow under valgrind): the window grows to 4 times that */
    uint64_t max = 50000000u;
    s.slept_ns = ab__now_ns() - 10000u;
    ab__spin_woken(&s, max);
    uint64_t w = ab__spin_window(&s, max);
    CHECK(w >= 40000u && w <= max);
}

int
main(void)
{
    TH_RUN(test_spins_that_pay_go_on);
    TH_RUN(test_misses_back_off_exponentially);
    TH_RUN(test_work_that_came_soon_ends_the_back_off);
    TH_RUN(test_no_cpu_to_spare_never_spins);
    TH_RUN(test_window_shrinks_to_what_catches_need);
    TH_RUN(test_work_soon_after_sleep_widens_the_window);
    return th_done();
}
