/* dns.c: name lookups that ops await, shared while in flight.
 *
 * Two resolvers answer them:
 * - evdns, libevent's DNS client, on the engine thread: A and AAAA queries
 *   sent at once, no thread at all.  Configured from a resolv.conf
 *   (nameservers, search, domain, ndots, timeout, attempts), re-read when
 *   the file changes (checked at most once a second).  The hosts file is
 *   the owner's business: evdns here only asks DNS servers.
 * - the system's getaddrinfo, on the blocking pool, for what only the
 *   system can answer (nsswitch sources other than files and dns).
 *
 * A lookup is a query that waiters (ops) join: one query per key in
 * flight, however many ops wait for it, each free to leave (cancel) alone.
 * A query nobody waits for any more runs on and its answer is dropped:
 * queries are never cancelled in evdns, whose getaddrinfo cancel is a
 * use-after-free once the callback is scheduled (libevent 2.1.12), and a
 * getaddrinfo call cannot be stopped.  No cache beyond the query in flight.
 *
 * Everything here runs on the engine thread, except configuration (any
 * thread, under a mutex), answers (immutable and reference-counted once
 * published) and the counters (atomic). */
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <event2/dns.h>

#include "ab-internal.h"

#define CHECK_EVERY_NS 1000000000ull
#define NBUCKETS 1024
/* evdns sends at most max-inflight queries per base (64 by default) and
 * queues the rest, and each base reads every answer from one UDP socket
 * per nameserver, whose receive buffer (rmem_max, 208 KiB here) holds a
 * few hundred answers: a burst of 1,000 lookups came back in 16 waves of
 * one round trip, or lost answers to a full buffer and waited out the
 * timeout.  So queries are spread over BASES bases, each with its own
 * sockets (and source ports), at most INFLIGHT each. */
#define BASES 8
#define INFLIGHT "256"

/* One evdns configuration.  A new one is made when resolv.conf changes;
 * the old one answers the queries it started, then goes. */
struct ctx {
    struct evdns_base *base[BASES];
    unsigned rr; /* round robin over the bases */
    int queries; /* queries that still wait for this base's answers */
    int retired;
    struct ctx *next; /* retired list */
};

struct ab__dns_query;

struct sub {
    struct ab__dns_query *q;
    int af;
    int done;
};

struct ab__dns_query {
    struct ab__dns_query *hnext;
    unsigned hash;
    int kind; /* AB_DNS_EVDNS or AB_DNS_SYSTEM */
    int family, socktype, protocol, flags;
    char *host, *serv; /* serv: system lookups only; either may be NULL */
    ab_dns_wait *waiters;
    /* evdns */
    struct ctx *ctx;
    struct sub sub4, sub6;
    int pending;
    int err4, err6; /* DNS_ERR_* of each sub-query, -1 when not asked */
    int n4, n6;
    unsigned char *a4, *a6;
    uint32_t ttl;
    /* system: the engine-owned op that runs getaddrinfo */
    ab_op *sysop;
};

static struct {
    pthread_mutex_t mu; /* guards the configuration below */
    char *resolv_conf;  /* NULL: /etc/resolv.conf */
    unsigned config_gen;

    /* engine thread */
    struct ctx *cur;
    struct ctx *retired;
    unsigned cur_gen;
    uint64_t checked_ns;
    struct stat seen;
    int seen_ok;
    struct ab__dns_query *table[NBUCKETS];
    int nqueries;
    struct event *reap_ev;
} D = {.mu = PTHREAD_MUTEX_INITIALIZER};

/* Lookups waiting, by resolver; queries in flight (with or without waiters). */
static atomic_uint_fast64_t waiting[2], queries[2];

void
ab_dns_stats(uint64_t waiting_out[2], uint64_t queries_out[2])
{
    for (int i = 0; i < 2; i++) {
        waiting_out[i] = atomic_load(&waiting[i]);
        queries_out[i] = atomic_load(&queries[i]);
    }
}

int
ab_dns_configure(const char *resolv_conf)
{
    char *copy = NULL;
    if (resolv_conf != NULL && (copy = strdup(resolv_conf)) == NULL)
        return -ENOMEM;
    pthread_mutex_lock(&D.mu);
    free(D.resolv_conf);
    D.resolv_conf = copy;
    D.config_gen++;
    pthread_mutex_unlock(&D.mu);
    return 0;
}

/* ---- answers ---------------------------------------------------------------- */

struct ab_dns_answer {
    atomic_uint refs;
    int error;    /* 0 or an EAI_* code */
    int sys_errno; /* for EAI_SYSTEM */
    int n4, n6;
    uint32_t ttl;
    struct addrinfo *ai; /* system lookups */
    unsigned char addrs[]; /* n4 x 4 bytes, then n6 x 16 */
};

static ab_dns_answer *
answer_new(int n4, int n6)
{
    ab_dns_answer *a = calloc(1, sizeof(*a) + (size_t)n4 * 4 + (size_t)n6 * 16);
    if (a != NULL) {
        atomic_init(&a->refs, 1);
        a->n4 = n4;
        a->n6 = n6;
    }
    return a;
}

/* With no memory even for an error: a shared answer saying EAI_MEMORY,
 * never freed. */
static ab_dns_answer *
answer_oom(void)
{
    static ab_dns_answer oom = {.error = EAI_MEMORY};
    atomic_store(&oom.refs, 1u << 30);
    return &oom;
}

void
ab_dns_answer_release(ab_dns_answer *a)
{
    if (a == NULL || atomic_fetch_sub(&a->refs, 1) != 1)
        return;
    if (a->ai != NULL)
        freeaddrinfo(a->ai);
    free(a);
}

int ab_dns_answer_error(const ab_dns_answer *a, int *sys_errno)
{
    if (sys_errno != NULL)
        *sys_errno = a->sys_errno;
    return a->error;
}
int ab_dns_answer_count(const ab_dns_answer *a, int family)
{
    return family == AF_INET ? a->n4 : a->n6;
}
const unsigned char *
ab_dns_answer_addr(const ab_dns_answer *a, int family, int i)
{
    return family == AF_INET ? a->addrs + 4 * i : a->addrs + 4 * a->n4 + 16 * i;
}
const struct addrinfo *ab_dns_answer_addrinfo(const ab_dns_answer *a) { return a->ai; }
uint32_t ab_dns_answer_ttl(const ab_dns_answer *a) { return a->ttl; }

/* ---- the table of queries in flight ------------------------------------------ */

static unsigned
hash_str(unsigned h, const char *s, int fold)
{
    if (s == NULL)
        return h * 31u + 1u;
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (fold && c >= 'A' && c <= 'Z')
            c = (unsigned char)(c - 'A' + 'a');
        h = h * 31u + c;
    }
    return h * 31u;
}

static int
same_str(const char *a, const char *b, int fold)
{
    if (a == NULL || b == NULL)
        return a == b;
    return fold ? strcasecmp(a, b) == 0 : strcmp(a, b) == 0;
}

static unsigned
key_hash(int kind, const char *host, const char *serv, int family, int socktype,
         int protocol, int flags)
{
    /* DNS names compare without case; what the system is given, exactly. */
    unsigned h = hash_str((unsigned)kind * 7919u, host, kind == AB_DNS_EVDNS);
    h = hash_str(h, serv, 0);
    return h ^ ((unsigned)family * 2654435761u) ^ ((unsigned)socktype << 8) ^
           ((unsigned)protocol << 16) ^ ((unsigned)flags << 20);
}

static struct ab__dns_query *
find(unsigned hash, int kind, const char *host, const char *serv, int family, int socktype,
     int protocol, int flags)
{
    for (struct ab__dns_query *q = D.table[hash % NBUCKETS]; q; q = q->hnext)
        if (q->hash == hash && q->kind == kind && q->family == family &&
            q->socktype == socktype && q->protocol == protocol && q->flags == flags &&
            same_str(q->host, host, kind == AB_DNS_EVDNS) && same_str(q->serv, serv, 0))
            return q;
    return NULL;
}

static void
unlink_query(struct ab__dns_query *q)
{
    struct ab__dns_query **pp = &D.table[q->hash % NBUCKETS];
    while (*pp != NULL && *pp != q)
        pp = &(*pp)->hnext;
    if (*pp == q) {
        *pp = q->hnext;
        D.nqueries--;
        atomic_fetch_sub(&queries[q->kind], 1);
    }
    q->hnext = NULL;
}

static void
query_free(struct ab__dns_query *q)
{
    free(q->host);
    free(q->serv);
    free(q->a4);
    free(q->a6);
    free(q);
}

static void
detach(ab_dns_wait *w)
{
    struct ab__dns_query *q = w->query;
    if (q == NULL)
        return;
    if (w->prev != NULL)
        w->prev->next = w->next;
    else
        q->waiters = w->next;
    if (w->next != NULL)
        w->next->prev = w->prev;
    w->next = w->prev = NULL;
    w->query = NULL;
    atomic_fetch_sub(&waiting[q->kind], 1);
}

/* Hand the answer to every waiter and forget the query's key: a lookup
 * that starts from now on asks again. */
static void
publish(struct ab__dns_query *q, ab_dns_answer *a)
{
    unlink_query(q);
    while (q->waiters != NULL) {
        ab_dns_wait *w = q->waiters;
        detach(w);
        if (a != NULL)
            atomic_fetch_add(&a->refs, 1);
        w->answer = a;
        ab__soon(w->op, AB_EV_SIGNAL);
    }
    ab_dns_answer_release(a);
}

static void
attach(struct ab__dns_query *q, ab_dns_wait *w, ab_op *op)
{
    w->op = op;
    w->query = q;
    w->prev = NULL;
    w->next = q->waiters;
    if (q->waiters != NULL)
        q->waiters->prev = w;
    q->waiters = w;
    atomic_fetch_add(&waiting[q->kind], 1);
}

/* ---- evdns ------------------------------------------------------------------ */

static void ctx_reap_soon(void);

static struct ctx *
ctx_new(const char *path)
{
    struct ctx *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return NULL;
    for (int i = 0; i < BASES; i++) {
        struct evdns_base *b = evdns_base_new(ab__engine_base(), 0);
        if (b == NULL) {
            while (i-- > 0)
                evdns_base_free(c->base[i], 0);
            free(c);
            return NULL;
        }
        /* As the system's stub resolver: glibc's defaults (5 s, 2
         * attempts) unless resolv.conf says otherwise, and names sent as
         * given (evdns would randomise their case, which some servers do
         * not echo). */
        evdns_base_set_option(b, "randomize-case:", "0");
        evdns_base_set_option(b, "timeout:", "5");
        evdns_base_set_option(b, "attempts:", "2");
        evdns_base_set_option(b, "max-inflight:", INFLIGHT);
        evdns_base_set_option(b, "so-rcvbuf:", "4194304"); /* the kernel caps it */
        evdns_base_resolv_conf_parse(b,
                                     DNS_OPTION_SEARCH | DNS_OPTION_NAMESERVERS | DNS_OPTION_MISC,
                                     path != NULL ? path : "/etc/resolv.conf");
        c->base[i] = b;
    }
    return c;
}

static void
ctx_free(struct ctx *c)
{
    for (int i = 0; i < BASES; i++)
        evdns_base_free(c->base[i], 0);
    free(c);
}

static void
on_reap(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    struct ctx **pp = &D.retired;
    while (*pp != NULL) {
        struct ctx *c = *pp;
        if (c->queries == 0) {
            *pp = c->next;
            ctx_free(c);
        } else {
            pp = &c->next;
        }
    }
}

/* Free retired bases with no query left, outside evdns's callbacks. */
static void
ctx_reap_soon(void)
{
    if (D.reap_ev == NULL)
        D.reap_ev = evtimer_new(ab__engine_base(), on_reap, NULL);
    if (D.reap_ev != NULL)
        event_active(D.reap_ev, EV_TIMEOUT, 1);
}

/* The configuration to start a query with: re-read resolv.conf when it
 * changed, looked at no more than once a second (or at once after
 * ab_dns_configure). */
static struct ctx *
current_ctx(void)
{
    uint64_t now = ab__now_ns();
    pthread_mutex_lock(&D.mu);
    unsigned gen = D.config_gen;
    pthread_mutex_unlock(&D.mu);
    if (D.cur != NULL && gen == D.cur_gen && now - D.checked_ns < CHECK_EVERY_NS)
        return D.cur; /* the common case: no copy, no stat */
    pthread_mutex_lock(&D.mu);
    gen = D.config_gen;
    char *path = D.resolv_conf != NULL ? strdup(D.resolv_conf) : NULL;
    int failed = D.resolv_conf != NULL && path == NULL;
    pthread_mutex_unlock(&D.mu);
    if (failed)
        return D.cur;
    D.checked_ns = now;
    struct stat st;
    int ok = stat(path != NULL ? path : "/etc/resolv.conf", &st) == 0;
    int changed = D.cur == NULL || gen != D.cur_gen || ok != D.seen_ok ||
                  (ok && (st.st_mtim.tv_sec != D.seen.st_mtim.tv_sec ||
                          st.st_mtim.tv_nsec != D.seen.st_mtim.tv_nsec ||
                          st.st_size != D.seen.st_size || st.st_ino != D.seen.st_ino ||
                          st.st_dev != D.seen.st_dev));
    if (changed) {
        struct ctx *c = ctx_new(path);
        if (c != NULL) {
            if (D.cur != NULL) {
                D.cur->retired = 1;
                D.cur->next = D.retired;
                D.retired = D.cur;
                ctx_reap_soon();
            }
            D.cur = c;
            D.cur_gen = gen;
            D.seen_ok = ok;
            if (ok)
                D.seen = st;
        }
    }
    free(path);
    return D.cur;
}

/* An evdns error as getaddrinfo's (glibc's choices). */
static int
eai_of(int dns_err)
{
    switch (dns_err) {
    case DNS_ERR_NOTEXIST:
        return EAI_NONAME;
    case DNS_ERR_NODATA:
        return EAI_NODATA;
    case DNS_ERR_FORMAT:
    case DNS_ERR_NOTIMPL:
        return EAI_FAIL;
    default: /* SERVFAIL, REFUSED, a timeout, a truncated or odd reply */
        return EAI_AGAIN;
    }
}

static void
evdns_done(struct ab__dns_query *q)
{
    struct ctx *c = q->ctx;
    q->ctx = NULL;
    if (--c->queries == 0 && c->retired)
        ctx_reap_soon();
    ab_dns_answer *a;
    if (q->n4 + q->n6 > 0) {
        a = answer_new(q->n4, q->n6);
        if (a != NULL) {
            if (q->n4)
                memcpy(a->addrs, q->a4, (size_t)q->n4 * 4);
            if (q->n6)
                memcpy(a->addrs + 4 * q->n4, q->a6, (size_t)q->n6 * 16);
            a->ttl = q->ttl;
        }
    } else {
        a = answer_new(0, 0);
        if (a != NULL) {
            /* Most telling first: the name does not exist; a server that
             * failed; a malformed exchange; no address of that family. */
            int e4 = q->err4 >= 0 ? eai_of(q->err4) : 0;
            int e6 = q->err6 >= 0 ? eai_of(q->err6) : 0;
            static const int order[] = {EAI_NONAME, EAI_AGAIN, EAI_FAIL, EAI_NODATA};
            a->error = EAI_NODATA;
            for (size_t i = 0; i < sizeof(order) / sizeof(order[0]); i++)
                if (e4 == order[i] || e6 == order[i]) {
                    a->error = order[i];
                    break;
                }
        }
    }
    if (a == NULL && (a = answer_new(0, 0)) != NULL)
        a->error = EAI_MEMORY; /* the answer did not fit */
    if (a == NULL)
        a = answer_oom();
    publish(q, a);
    query_free(q);
}

static void
on_dns(int result, char type, int count, int ttl, void *addresses, void *arg)
{
    struct sub *s = arg;
    struct ab__dns_query *q = s->q;
    int err = result;
    if (result == DNS_ERR_NONE && count > 0 &&
        (type == DNS_IPv4_A || type == DNS_IPv6_AAAA)) {
        size_t len = type == DNS_IPv4_A ? 4 : 16;
        unsigned char *copy = malloc(len * (size_t)count);
        if (copy != NULL) {
            memcpy(copy, addresses, len * (size_t)count);
            if (type == DNS_IPv4_A) {
                q->a4 = copy;
                q->n4 = count;
            } else {
                q->a6 = copy;
                q->n6 = count;
            }
            if ((uint32_t)ttl < q->ttl || q->ttl == 0)
                q->ttl = (uint32_t)ttl;
        } else {
            err = DNS_ERR_UNKNOWN;
        }
    } else if (result == DNS_ERR_NONE) {
        err = DNS_ERR_NODATA;
    }
    if (s->af == AF_INET)
        q->err4 = err;
    else
        q->err6 = err;
    s->done = 1;
    if (--q->pending == 0)
        evdns_done(q);
}

static int
evdns_start(struct ab__dns_query *q)
{
    struct ctx *c = current_ctx();
    if (c == NULL)
        return -ENOMEM;
    /* A trailing dot makes the name absolute: no search list. */
    size_t len = strlen(q->host);
    int flags = 0;
    char *name = q->host;
    char buf[NI_MAXHOST];
    if (len > 0 && q->host[len - 1] == '.') {
        if (len >= sizeof(buf))
            return -EINVAL;
        memcpy(buf, q->host, len - 1);
        buf[len - 1] = 0;
        name = buf;
        flags = DNS_QUERY_NO_SEARCH;
    }
    q->ctx = c;
    q->err4 = q->err6 = -1;
    q->sub4 = (struct sub){q, AF_INET, 0};
    q->sub6 = (struct sub){q, AF_INET6, 0};
    q->pending = (q->family != AF_INET6) + (q->family != AF_INET);
    c->queries++;
    /* evdns answers later, never inside these calls; NULL means it could
     * not even make the request (a name it cannot encode). */
    int started = 0;
    struct evdns_base *base = c->base[c->rr++ % BASES];
    if (q->family != AF_INET6) {
        if (evdns_base_resolve_ipv4(base, name, flags, on_dns, &q->sub4) != NULL)
            started++;
        else
            q->err4 = DNS_ERR_FORMAT, q->pending--;
    }
    if (q->family != AF_INET) {
        if (evdns_base_resolve_ipv6(base, name, flags, on_dns, &q->sub6) != NULL)
            started++;
        else
            q->err6 = DNS_ERR_FORMAT, q->pending--;
    }
    if (started == 0) {
        c->queries--;
        q->ctx = NULL;
        return -EINVAL;
    }
    return 0;
}

/* ---- system lookups: an engine-owned op per query ---------------------------- */

struct sys_state {
    struct ab__dns_query *q;
    int rc, err;
    struct addrinfo *res;
};

static void
sys_work(ab_op *op)
{
    struct sys_state *s = ab_op_state(op);
    struct ab__dns_query *q = s->q;
    struct addrinfo hints = {0};
    hints.ai_family = q->family;
    hints.ai_socktype = q->socktype;
    hints.ai_protocol = q->protocol;
    hints.ai_flags = q->flags;
    errno = 0;
    s->rc = getaddrinfo(q->host, q->serv, &hints, &s->res);
    s->err = errno;
}

static int
sys_step(ab_op *op)
{
    struct sys_state *s = ab_op_state(op);
    AB_BEGIN(op);
    AB__SUSPEND(op, ab_await_blocking(op, sys_work));
    {
        struct ab__dns_query *q = s->q;
        ab_dns_answer *a = answer_new(0, 0);
        if (a != NULL) {
            a->error = s->rc;
            a->sys_errno = s->err;
            a->ai = s->res;
            s->res = NULL;
            if (a->error == 0 && a->ai == NULL)
                a->error = EAI_NONAME;
        } else if (s->res != NULL) {
            freeaddrinfo(s->res);
            s->res = NULL;
        }
        q->sysop = NULL;
        if (a == NULL)
            a = answer_oom();
        publish(q, a);
        query_free(q);
        s->q = NULL;
    }
    return ab_return_none(op);
    AB_END(op);
}

static const ab_op_type sys_type = {
    .name = "getaddrinfo",
    .state_size = sizeof(struct sys_state),
    .step = sys_step,
};

static int
system_start(struct ab__dns_query *q)
{
    ab_op *op = ab_op_new(&sys_type);
    if (op == NULL)
        return -ENOMEM;
    ((struct sys_state *)ab_op_state(op))->q = q;
    q->sysop = op;
    ab__engine_own(op);
    return 0;
}

/* ---- waiting -------------------------------------------------------------------- */

int
ab_await_dns(ab_op *op, ab_dns_wait *w, int kind, const char *host, const char *serv,
             int family, int socktype, int protocol, int flags)
{
    if (AB__WORK_OP(op))
        return AB_ESTATE; /* a work op's step runs on a pool thread */
    if (kind != AB_DNS_EVDNS && kind != AB_DNS_SYSTEM)
        return -EINVAL;
    if (kind == AB_DNS_EVDNS &&
        (host == NULL || (family != AF_UNSPEC && family != AF_INET && family != AF_INET6)))
        return -EINVAL;
    if (kind == AB_DNS_EVDNS)
        serv = NULL, socktype = protocol = flags = 0;
    w->answer = NULL;
    unsigned hash = key_hash(kind, host, serv, family, socktype, protocol, flags);
    struct ab__dns_query *q = find(hash, kind, host, serv, family, socktype, protocol, flags);
    if (q == NULL) {
        q = calloc(1, sizeof(*q));
        if (q == NULL)
            return -ENOMEM;
        q->hash = hash;
        q->kind = kind;
        q->family = family;
        q->socktype = socktype;
        q->protocol = protocol;
        q->flags = flags;
        if ((host != NULL && (q->host = strdup(host)) == NULL) ||
            (serv != NULL && (q->serv = strdup(serv)) == NULL)) {
            query_free(q);
            return -ENOMEM;
        }
        int rc = kind == AB_DNS_EVDNS ? evdns_start(q) : system_start(q);
        if (rc < 0) {
            query_free(q);
            return rc;
        }
        q->hnext = D.table[hash % NBUCKETS];
        D.table[hash % NBUCKETS] = q;
        D.nqueries++;
        atomic_fetch_add(&queries[kind], 1);
    }
    attach(q, w, op);
    ab__set_wait(op, AB__WAIT_SIGNAL);
    return 0;
}

const ab_dns_answer *ab_dns_result(const ab_dns_wait *w) { return w->answer; }

void
ab_dns_wait_done(ab_dns_wait *w)
{
    detach(w); /* a query left by its last waiter runs on, answering nobody */
}

/* ---- the engine's base goes -------------------------------------------------------- */

/* Engine stopped for good with nothing in flight (its base is about to be
 * freed): free the evdns bases and the queries nobody waits for any more.
 * System queries have an op in flight, so none is left here. */
void
ab__dns_free(void)
{
    for (int i = 0; i < NBUCKETS; i++) {
        struct ab__dns_query *q = D.table[i];
        while (q != NULL) {
            struct ab__dns_query *next = q->hnext;
            if (q->kind == AB_DNS_EVDNS) {
                unlink_query(q);
                query_free(q);
            }
            q = next;
        }
    }
    /* Queries already unlinked but still answered by evdns: none can be,
     * since every evdns query stays in the table until answered. */
    if (D.cur != NULL)
        ctx_free(D.cur);
    D.cur = NULL;
    while (D.retired != NULL) {
        struct ctx *c = D.retired;
        D.retired = c->next;
        ctx_free(c);
    }
    if (D.reap_ev != NULL)
        event_free(D.reap_ev);
    D.reap_ev = NULL;
}

/* The base was abandoned (a fork child, an owner gone): forget everything,
 * leaking what belonged to it.  The next lookup starts afresh. */
void
ab__dns_forget(void)
{
    memset(D.table, 0, sizeof(D.table));
    D.nqueries = 0;
    D.cur = NULL;
    D.retired = NULL;
    D.reap_ev = NULL;
    D.checked_ns = 0;
    D.seen_ok = 0;
    for (int i = 0; i < 2; i++) {
        atomic_store(&waiting[i], 0);
        atomic_store(&queries[i], 0);
    }
    pthread_mutex_init(&D.mu, NULL);
}
