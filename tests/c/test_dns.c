/* test_dns: lookups awaited with ab_await_dns (lib/src/dns.c), against a
 * small DNS responder of this test's own on 127.0.0.1 (a thread answering
 * UDP queries), so that ASan, TSan and valgrind see the engine-side
 * resolver: shared queries, waiters that leave alone, queries nobody
 * waits for any more, the system's getaddrinfo on the blocking pool, and
 * an engine stop with a query still running. */
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "harness.h"

/* ---- the responder ----------------------------------------------------------
 * Names (first label): "a" -> A 10.0.0.1 (AAAA: no data); "slow" -> A
 * 10.0.0.2 after 0.2 s; "silent" -> no answer; anything else NXDOMAIN. */

static int srv_fd = -1;
static int srv_port;
static pthread_t srv_thread;
static atomic_int srv_stop;
static atomic_int srv_count[3]; /* queries for a, slow, silent (type A) */

struct pending {
    unsigned char buf[512];
    size_t len;
    struct sockaddr_in to;
    double due;
};

static int
first_label(const unsigned char *q, size_t n, char *out, size_t cap)
{
    if (n < 13 || q[12] == 0 || q[12] >= cap || 13u + q[12] > n)
        return -1;
    memcpy(out, q + 13, q[12]);
    out[q[12]] = 0;
    return 0;
}

/* The question's end (after QTYPE and QCLASS), or 0. */
static size_t
question_end(const unsigned char *q, size_t n, unsigned *qtype)
{
    size_t i = 12;
    while (i < n && q[i] != 0)
        i += 1u + q[i];
    if (i + 5 > n)
        return 0;
    *qtype = (unsigned)(q[i + 1] << 8 | q[i + 2]);
    return i + 5;
}

static size_t
reply(const unsigned char *q, size_t n, unsigned char *out, int rcode, const unsigned char *a4)
{
    unsigned qtype;
    size_t end = question_end(q, n, &qtype);
    if (end == 0)
        return 0;
    memcpy(out, q, end);
    out[2] = (unsigned char)(0x84 | (q[2] & 0x01)); /* QR, AA, RD echoed */
    out[3] = (unsigned char)(0x80 | rcode);         /* RA */
    out[6] = out[7] = out[8] = out[9] = out[10] = out[11] = 0;
    size_t len = end;
    if (a4 != NULL && qtype == 1) {
        static const unsigned char rr[] = {0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4};
        out[7] = 1;
        memcpy(out + len, rr, sizeof(rr));
        memcpy(out + len + sizeof(rr), a4, 4);
        len += sizeof(rr) + 4;
    }
    return len;
}

static void *
srv_main(void *arg)
{
    (void)arg;
    struct pending slow[64];
    int nslow = 0;
    while (!atomic_load(&srv_stop)) {
        struct pollfd p = {srv_fd, POLLIN, 0};
        poll(&p, 1, 10);
        double now = th_now();
        for (int i = 0; i < nslow;) {
            if (slow[i].due <= now) {
                sendto(srv_fd, slow[i].buf, slow[i].len, 0, (struct sockaddr *)&slow[i].to,
                       sizeof(slow[i].to));
                slow[i] = slow[--nslow];
            } else {
                i++;
            }
        }
        unsigned char q[512], out[512];
        struct sockaddr_in from;
        socklen_t flen = sizeof(from);
        ssize_t n;
        while ((n = recvfrom(srv_fd, q, sizeof(q), MSG_DONTWAIT, (struct sockaddr *)&from,
                             &flen)) > 0) {
            char label[64];
            unsigned qtype = 0;
            if (first_label(q, (size_t)n, label, sizeof(label)) < 0 ||
                question_end(q, (size_t)n, &qtype) == 0)
                continue;
            static const unsigned char a[] = {10, 0, 0, 1}, s[] = {10, 0, 0, 2};
            size_t len;
            if (strcmp(label, "a") == 0) {
                if (qtype == 1)
                    atomic_fetch_add(&srv_count[0], 1);
                len = reply(q, (size_t)n, out, 0, a);
            } else if (strcmp(label, "slow") == 0) {
                if (qtype == 1)
                    atomic_fetch_add(&srv_count[1], 1);
                if (nslow < 64) {
                    slow[nslow].len = reply(q, (size_t)n, slow[nslow].buf, 0, s);
                    slow[nslow].to = from;
                    slow[nslow].due = now + 0.2;
                    nslow++;
                }
                continue;
            } else if (strcmp(label, "silent") == 0) {
                if (qtype == 1)
                    atomic_fetch_add(&srv_count[2], 1);
                continue;
            } else {
                len = reply(q, (size_t)n, out, 3, NULL); /* NXDOMAIN */
            }
            if (len > 0)
                sendto(srv_fd, out, len, 0, (struct sockaddr *)&from, flen);
            flen = sizeof(from);
        }
    }
    return NULL;
}

static char resolv_path[64];

static void
srv_start(void)
{
    srv_fd = socket(AF_INET, SOCK_DGRAM, 0);
    CHECK(srv_fd >= 0);
    struct sockaddr_in sin = {.sin_family = AF_INET};
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECK_OK(bind(srv_fd, (struct sockaddr *)&sin, sizeof(sin)));
    socklen_t len = sizeof(sin);
    CHECK_OK(getsockname(srv_fd, (struct sockaddr *)&sin, &len));
    srv_port = ntohs(sin.sin_port);
    CHECK_OK(pthread_create(&srv_thread, NULL, srv_main, NULL));
    snprintf(resolv_path, sizeof(resolv_path), "/tmp/ab-test-dns-%d.conf", (int)getpid());
    FILE *f = fopen(resolv_path, "w");
    CHECK(f != NULL);
    fprintf(f, "nameserver 127.0.0.1:%d\noptions timeout:1 attempts:1\n", srv_port);
    fclose(f);
    CHECK_OK(ab_dns_configure(resolv_path));
}

static void
srv_stop_all(void)
{
    atomic_store(&srv_stop, 1);
    pthread_join(srv_thread, NULL);
    close(srv_fd);
    unlink(resolv_path);
    CHECK_OK(ab_dns_configure(NULL));
}

/* ---- the op -------------------------------------------------------------------- */

struct look_state {
    ab_dns_wait w;
    int kind, family;
    const char *name;
    int eai;
    int n4;
    unsigned char a4[4];
    int system_found;
    unsigned events;
};

static int
look_step(ab_op *op)
{
    struct look_state *s = ab_op_state(op);
    AB_BEGIN(op);
    AB_AWAIT_OR_CANCEL(op, ab_await_dns(op, &s->w, s->kind, s->name, NULL, s->family,
                                        s->kind == AB_DNS_SYSTEM ? SOCK_STREAM : 0, 0, 0));
    s->events = ab_op_event(op);
    ab_dns_wait_done(&s->w);
    if (ab_op_cancelled(op))
        return ab_fail(op, -ECANCELED);
    {
        const ab_dns_answer *a = ab_dns_result(&s->w);
        CHECK(a != NULL);
        s->eai = ab_dns_answer_error(a, NULL);
        if (s->kind == AB_DNS_EVDNS) {
            s->n4 = ab_dns_answer_count(a, AF_INET);
            if (s->n4 > 0)
                memcpy(s->a4, ab_dns_answer_addr(a, AF_INET, 0), 4);
        } else {
            s->system_found = ab_dns_answer_addrinfo(a) != NULL;
        }
    }
    return ab_return_none(op);
    AB_END(op);
}

static void
look_cleanup(ab_op *op)
{
    ab_dns_wait_done(&((struct look_state *)ab_op_state(op))->w);
}

static void
look_dispose(ab_op *op)
{
    ab_dns_answer_release(((struct look_state *)ab_op_state(op))->w.answer);
}

static const ab_op_type look_type = {
    .name = "look",
    .state_size = sizeof(struct look_state),
    .step = look_step,
    .cleanup = look_cleanup,
    .dispose = look_dispose,
};

static ab_op *
look_new(int kind, const char *name, int family)
{
    ab_op *op = th_op_new(&look_type);
    struct look_state *s = ab_op_state(op);
    s->kind = kind;
    s->name = name;
    s->family = family;
    return op;
}

static struct look_state *
st(ab_op *op)
{
    return ab_op_state(op);
}

static void
dns_stats(uint64_t *waiting, uint64_t *queries)
{
    ab_dns_stats(waiting, queries);
}

/* Wait until the evdns query count reaches `want` (engine-side bookkeeping). */
static void
expect_queries(int kind, uint64_t want, double timeout)
{
    uint64_t w[2], q[2];
    double until = th_now() + timeout;
    do {
        dns_stats(w, q);
        if (q[kind] == want)
            return;
        th_sleep(0.002);
    } while (th_now() < until);
    CHECK_EQ(q[kind], want);
}

/* ---- tests ------------------------------------------------------------------------ */

static void
test_answers_and_errors(void)
{
    th_sink ts;
    th_sink_init(&ts);
    ab_op *ok = look_new(AB_DNS_EVDNS, "a.test", AF_UNSPEC);
    ab_op *nx = look_new(AB_DNS_EVDNS, "nope.test", AF_INET);
    ab_op *v6 = look_new(AB_DNS_EVDNS, "a.test", AF_INET6);
    CHECK_OK(ab_submit(ok, &ts.sink));
    TH_FINISH(&ts, ok);
    CHECK_OK(ab_submit(nx, &ts.sink));
    TH_FINISH(&ts, nx);
    CHECK_OK(ab_submit(v6, &ts.sink));
    TH_FINISH(&ts, v6);
    CHECK_EQ(st(ok)->eai, 0);
    CHECK_EQ(st(ok)->n4, 1);
    CHECK_EQ(memcmp(st(ok)->a4, "\x0a\x00\x00\x01", 4), 0);
    CHECK(st(ok)->events & AB_EV_SIGNAL);
    CHECK_EQ(st(nx)->eai, EAI_NONAME);
    CHECK_EQ(st(v6)->eai, EAI_NODATA);
    ab_op_release(ok);
    ab_op_release(nx);
    ab_op_release(v6);
    th_sink_destroy(&ts);
}

/* 40 lookups of one name share one query; half of them leave (cancel)
 * while it runs, and the others get the answer. */
static void
test_shared_and_cancelled_alone(void)
{
    th_sink ts;
    th_sink_init(&ts);
    enum { N = 40 };
    ab_op *ops[N];
    int before = atomic_load(&srv_count[1]);
    for (int i = 0; i < N; i++) {
        ops[i] = look_new(AB_DNS_EVDNS, "slow.test", AF_INET);
        CHECK_OK(ab_submit(ops[i], &ts.sink));
    }
    uint64_t w[2], q[2];
    double until = th_now() + 2;
    do {
        dns_stats(w, q);
        th_sleep(0.002);
    } while (w[AB_DNS_EVDNS] < N && th_now() < until);
    CHECK_EQ(w[AB_DNS_EVDNS], N);
    CHECK_EQ(q[AB_DNS_EVDNS], 1);
    for (int i = 0; i < N; i += 2)
        ab_cancel(ops[i]);
    int done = 0, cancelled = 0;
    while (done < N) {
        int msg;
        ab_op *op = th_next(&ts, 5.0, &msg);
        CHECK(op != NULL);
        CHECK_EQ(msg, AB_MSG_FINISHED);
        ab_op_collect(op);
        if (ab_op_error(op) == -ECANCELED) {
            cancelled++;
        } else {
            CHECK_EQ(ab_op_error(op), 0);
            CHECK_EQ(st(op)->n4, 1);
            CHECK_EQ(memcmp(st(op)->a4, "\x0a\x00\x00\x02", 4), 0);
        }
        done++;
    }
    CHECK_EQ(cancelled, N / 2);
    CHECK_EQ(atomic_load(&srv_count[1]) - before, 1);
    for (int i = 0; i < N; i++)
        ab_op_release(ops[i]);
    expect_queries(AB_DNS_EVDNS, 0, 2.0);
    th_sink_destroy(&ts);
}

/* Every waiter leaves a query that never answers: it runs on (never
 * cancelled in evdns) until its timeout, answering nobody. */
static void
test_orphaned_query(void)
{
    th_sink ts;
    th_sink_init(&ts);
    ab_op *op = look_new(AB_DNS_EVDNS, "silent.test", AF_INET);
    CHECK_OK(ab_submit(op, &ts.sink));
    expect_queries(AB_DNS_EVDNS, 1, 2.0);
    double t0 = th_now();
    ab_cancel(op);
    TH_FINISH(&ts, op);
    CHECK(th_now() - t0 < 0.5);
    CHECK_EQ(ab_op_error(op), -ECANCELED);
    uint64_t w[2], q[2];
    dns_stats(w, q);
    CHECK_EQ(w[AB_DNS_EVDNS], 0);
    CHECK_EQ(q[AB_DNS_EVDNS], 1);
    expect_queries(AB_DNS_EVDNS, 0, 3.0); /* timeout:1 attempts:1 */
    ab_op_release(op);
    th_sink_destroy(&ts);
}

/* The system's getaddrinfo, on the blocking pool, shared too. */
static void
test_system(void)
{
    th_sink ts;
    th_sink_init(&ts);
    ab_op *a = look_new(AB_DNS_SYSTEM, "localhost", AF_INET);
    ab_op *b = look_new(AB_DNS_SYSTEM, "localhost", AF_INET);
    CHECK_OK(ab_submit(a, &ts.sink));
    CHECK_OK(ab_submit(b, &ts.sink));
    for (int i = 0; i < 2; i++) {
        int msg;
        ab_op *op = th_next(&ts, 10.0, &msg);
        CHECK(op != NULL);
        ab_op_collect(op);
    }
    CHECK_EQ(st(a)->eai, 0);
    CHECK(st(a)->system_found);
    CHECK(st(b)->system_found);
    ab_op_release(a);
    ab_op_release(b);
    th_sink_destroy(&ts);
}

/* The engine stops while a query nobody waits for runs: its evdns bases
 * and the query go with the base, and the next lookup starts afresh. */
static void
test_stop_with_orphan(void)
{
    th_sink ts;
    th_sink_init(&ts);
    ab_op *op = look_new(AB_DNS_EVDNS, "silent.test", AF_UNSPEC);
    CHECK_OK(ab_submit(op, &ts.sink));
    expect_queries(AB_DNS_EVDNS, 1, 2.0);
    ab_cancel(op);
    TH_FINISH(&ts, op);
    ab_op_release(op);
    CHECK_EQ(ab_engine_stop_if_idle(), 1);
    uint64_t w[2], q[2];
    dns_stats(w, q);
    CHECK_EQ(q[AB_DNS_EVDNS], 0);
    ab_op *again = look_new(AB_DNS_EVDNS, "a.test", AF_INET);
    CHECK_OK(ab_submit(again, &ts.sink));
    TH_FINISH(&ts, again);
    CHECK_EQ(st(again)->n4, 1);
    ab_op_release(again);
    th_sink_destroy(&ts);
}

int
main(void)
{
    srv_start();
    TH_RUN(test_answers_and_errors);
    TH_RUN(test_shared_and_cancelled_alone);
    TH_RUN(test_orphaned_query);
    TH_RUN(test_system);
    TH_RUN(test_stop_with_orphan);
    ab_engine_stop();
    srv_stop_all();
    return th_done();
}
