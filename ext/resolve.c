/* resolve.c: the native half of asyncio_bridge.getaddrinfo.
 *
 * asyncio_bridge/_resolver.py decides, for each lookup, what answers it
 * (the loop thread itself for numeric hosts and hosts-file names, evdns on
 * the engine thread, or the system's getaddrinfo on the blocking pool) and
 * shapes the result; this file runs the ops that wait for lib/src/dns.c.
 *
 *   _lookup(kind, host, serv, family, type, proto, flags, finish) -> Op
 *       kind 0: evdns (host: str); the result is finish([(af, address
 *       str), ...]) with the addresses in the server's order.
 *       kind 1: the system's getaddrinfo (host, serv: bytes or None); the
 *       result is finish([(af, type, proto, canonname, sockaddr), ...]),
 *       as _socket.getaddrinfo returns it.
 *       A failure raises socket.gaierror(code, message) as
 *       socket.getaddrinfo does (OSError from errno for EAI_SYSTEM).
 *   _settled(value) / _settled_error(exception) -> Op
 *       an outcome known at once (a numeric host, a hosts-file name).
 *   _addrconfig() -> (ipv4, ipv6): whether an address other than
 *       loopback is configured, as glibc's AI_ADDRCONFIG decides. */
#include "ext.h"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netdb.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

/* ---- the lookup op ------------------------------------------------------------------- */

struct lookup_state {
    ab_dns_wait w;
    int kind, family, socktype, protocol, flags;
    char *host, *serv; /* until the first step hands them to the resolver */
    int finish;        /* kept: the Python callable shaping the result */
    int outcome;       /* kept by _settled: the value or the exception */
    int eai, sys_errno;
};

enum { ERR_GAI = AB_EUSER, ERR_KEPT = AB_EUSER - 1 };

static void
lookup_free_names(struct lookup_state *s)
{
    free(s->host);
    free(s->serv);
    s->host = s->serv = NULL;
}

static int
lookup_step(ab_op *op)
{
    struct lookup_state *s = ab_op_state(op);
    AB_BEGIN(op);
    {
        int rc = ab_await_dns(op, &s->w, s->kind, s->host, s->serv, s->family, s->socktype,
                              s->protocol, s->flags);
        lookup_free_names(s);
        if (rc == -EINVAL) { /* a name evdns cannot even put in a query */
            s->eai = EAI_NONAME;
            return ab_fail(op, ERR_GAI);
        }
        if (rc < 0)
            return ab_fail(op, rc);
    }
    AB__SUSPEND(op, 0);
    /* Resumed by the answer (AB_EV_SIGNAL) or a cancel; a cancel wins even
     * if the answer came in the same turn. */
    if (ab_op_cancelled(op)) {
        ab_dns_wait_done(&s->w);
        return ab_fail(op, -ECANCELED);
    }
    {
        const ab_dns_answer *a = ab_dns_result(&s->w);
        if (a == NULL) { /* a stray ab_op_signal: nothing sends one */
            ab_dns_wait_done(&s->w);
            return ab_fail(op, AB_ESTATE);
        }
        s->eai = ab_dns_answer_error(a, &s->sys_errno);
        if (s->eai != 0)
            return ab_fail(op, ERR_GAI);
    }
    return ab_return_custom(op);
    AB_END(op);
}

static void
lookup_cleanup(ab_op *op)
{
    struct lookup_state *s = ab_op_state(op);
    ab_dns_wait_done(&s->w);
    lookup_free_names(s);
}

static void
lookup_dispose(ab_op *op)
{
    struct lookup_state *s = ab_op_state(op);
    ab_dns_answer_release(s->w.answer);
    s->w.answer = NULL;
}

/* New reference: socket.gaierror(code, message), as socketmodule makes it. */
static PyObject *
raise_gai(int eai, int sys_errno)
{
    if (eai == EAI_SYSTEM) {
        errno = sys_errno;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *mod = PyImport_ImportModule("_socket");
    PyObject *cls = mod != NULL ? PyObject_GetAttrString(mod, "gaierror") : NULL;
    Py_XDECREF(mod);
    if (cls == NULL)
        return NULL;
    /* An instance, not (code, message) for CPython to instantiate. */
    PyObject *exc = PyObject_CallFunction(cls, "is", eai, gai_strerror(eai));
    if (exc != NULL)
        PyErr_SetObject(cls, exc);
    Py_XDECREF(exc);
    Py_DECREF(cls);
    return NULL;
}

static PyObject *
lookup_raise(ab_op *op, int err)
{
    struct lookup_state *s = ab_op_state(op);
    if (err == ERR_KEPT) {
        PyObject *exc = abpy_kept(op, s->outcome);
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        return NULL;
    }
    return raise_gai(s->eai, s->sys_errno);
}

/* New reference: an address as text. */
static PyObject *
addr_str(int af, const void *addr)
{
    char buf[INET6_ADDRSTRLEN];
    if (inet_ntop(af, addr, buf, sizeof(buf)) == NULL)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyUnicode_FromString(buf);
}

/* New reference: a sockaddr as socketmodule's makesockaddr shows it. */
static PyObject *
sockaddr_obj(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const void *)sa;
        PyObject *host = addr_str(AF_INET, &in->sin_addr);
        return host == NULL ? NULL : Py_BuildValue("(Ni)", host, ntohs(in->sin_port));
    }
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const void *)sa;
        PyObject *host = addr_str(AF_INET6, &in6->sin6_addr);
        return host == NULL ? NULL
                            : Py_BuildValue("(NiII)", host, ntohs(in6->sin6_port),
                                            (unsigned)ntohl(in6->sin6_flowinfo),
                                            (unsigned)in6->sin6_scope_id);
    }
    return Py_BuildValue("(iy#)", sa->sa_family, sa->sa_data, (Py_ssize_t)sizeof(sa->sa_data));
}

static PyObject *
lookup_to_python(ab_op *op)
{
    struct lookup_state *s = ab_op_state(op);
    if (s->outcome >= 0) /* _settled */
        return Py_NewRef(abpy_kept(op, s->outcome));
    const ab_dns_answer *a = ab_dns_result(&s->w);
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    if (s->kind == AB_DNS_EVDNS) {
        static const int fams[] = {AF_INET, AF_INET6};
        for (int f = 0; f < 2; f++)
            for (int i = 0; i < ab_dns_answer_count(a, fams[f]); i++) {
                PyObject *host = addr_str(fams[f], ab_dns_answer_addr(a, fams[f], i));
                PyObject *t = host != NULL ? Py_BuildValue("(iN)", fams[f], host) : NULL;
                if (t == NULL || PyList_Append(list, t) < 0) {
                    Py_XDECREF(t);
                    Py_DECREF(list);
                    return NULL;
                }
                Py_DECREF(t);
            }
    } else {
        for (const struct addrinfo *ai = ab_dns_answer_addrinfo(a); ai != NULL;
             ai = ai->ai_next) {
            PyObject *sa = sockaddr_obj(ai->ai_addr);
            PyObject *t = sa != NULL ? Py_BuildValue("(iiisN)", ai->ai_family, ai->ai_socktype,
                                                     ai->ai_protocol,
                                                     ai->ai_canonname ? ai->ai_canonname : "", sa)
                                     : NULL;
            if (t == NULL || PyList_Append(list, t) < 0) {
                Py_XDECREF(t);
                Py_DECREF(list);
                return NULL;
            }
            Py_DECREF(t);
        }
    }
    PyObject *result = PyObject_CallOneArg(abpy_kept(op, s->finish), list);
    Py_DECREF(list);
    return result;
}

static const ab_op_type lookup_type = {
    .name = "getaddrinfo",
    .state_size = sizeof(struct lookup_state),
    .step = lookup_step,
    .cleanup = lookup_cleanup,
    .to_python = lookup_to_python,
    .raise_error = lookup_raise,
    .dispose = lookup_dispose,
};

/* NULL (no exception) for None; else a malloc'd copy of the bytes, or
 * NULL with an exception. */
static int
copy_name(PyObject *obj, char **out)
{
    const char *p;
    Py_ssize_t n;
    *out = NULL;
    if (obj == Py_None)
        return 0;
    if (PyUnicode_Check(obj)) {
        p = PyUnicode_AsUTF8AndSize(obj, &n);
        if (p == NULL)
            return -1;
    } else if (PyBytes_Check(obj)) {
        p = PyBytes_AS_STRING(obj);
        n = PyBytes_GET_SIZE(obj);
    } else {
        PyErr_SetString(PyExc_TypeError, "host and serv must be str, bytes or None");
        return -1;
    }
    if ((Py_ssize_t)strlen(p) != n) {
        PyErr_SetString(PyExc_ValueError, "embedded null character");
        return -1;
    }
    if ((*out = strdup(p)) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static PyObject *
py_lookup(PyObject *module, PyObject *args)
{
    int kind, family, socktype, proto, flags;
    PyObject *host, *serv, *finish;
    (void)module;
    if (!PyArg_ParseTuple(args, "iOOiiiiO:_lookup", &kind, &host, &serv, &family, &socktype,
                          &proto, &flags, &finish))
        return NULL;
    if (kind != AB_DNS_EVDNS && kind != AB_DNS_SYSTEM) {
        PyErr_SetString(PyExc_ValueError, "_lookup: kind must be 0 (evdns) or 1 (system)");
        return NULL;
    }
    if (kind == AB_DNS_EVDNS && (!PyUnicode_Check(host) || serv != Py_None)) {
        PyErr_SetString(PyExc_TypeError, "_lookup: evdns takes a str host and no serv");
        return NULL;
    }
    if (!PyCallable_Check(finish)) {
        PyErr_SetString(PyExc_TypeError, "_lookup: finish must be callable");
        return NULL;
    }
    ab_op *op = ab_op_new(&lookup_type);
    if (op == NULL)
        return PyErr_NoMemory();
    struct lookup_state *s = ab_op_state(op);
    s->outcome = -1;
    s->kind = kind;
    s->family = family;
    s->socktype = socktype;
    s->protocol = proto;
    s->flags = flags;
    if (copy_name(host, &s->host) < 0 || copy_name(serv, &s->serv) < 0 ||
        (s->finish = abpy_keep(op, finish)) < 0) {
        ab_op_release(op);
        return NULL;
    }
    return abpy_wrap(op);
}

static PyObject *
settled(PyObject *outcome, int failed)
{
    ab_op *op = ab_op_new(&lookup_type);
    if (op == NULL)
        return PyErr_NoMemory();
    struct lookup_state *s = ab_op_state(op);
    s->finish = -1;
    if ((s->outcome = abpy_keep(op, outcome)) < 0) {
        ab_op_release(op);
        return NULL;
    }
    if (failed)
        ab_fail(op, ERR_KEPT);
    else
        ab_return_custom(op);
    return abpy_wrap_settled(op);
}

static PyObject *
py_settled(PyObject *module, PyObject *value)
{
    (void)module;
    return settled(value, 0);
}

static PyObject *
py_settled_error(PyObject *module, PyObject *exc)
{
    (void)module;
    if (!PyExceptionInstance_Check(exc)) {
        PyErr_SetString(PyExc_TypeError, "_settled_error: an exception instance is needed");
        return NULL;
    }
    return settled(exc, 1);
}

/* glibc's __check_pf: IPv4 counts unless it is 127.0.0.1, IPv6 unless ::1. */
static PyObject *
py_addrconfig(PyObject *module, PyObject *unused)
{
    struct ifaddrs *ifa, *p;
    int v4 = 0, v6 = 0;
    (void)module;
    (void)unused;
    if (getifaddrs(&ifa) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    for (p = ifa; p != NULL; p = p->ifa_next) {
        if (p->ifa_addr == NULL)
            continue;
        if (p->ifa_addr->sa_family == AF_INET) {
            const struct sockaddr_in *in = (const void *)p->ifa_addr;
            if (in->sin_addr.s_addr != htonl(INADDR_LOOPBACK))
                v4 = 1;
        } else if (p->ifa_addr->sa_family == AF_INET6) {
            const struct sockaddr_in6 *in6 = (const void *)p->ifa_addr;
            if (!IN6_IS_ADDR_LOOPBACK(&in6->sin6_addr))
                v6 = 1;
        }
    }
    freeifaddrs(ifa);
    return Py_BuildValue("(OO)", v4 ? Py_True : Py_False, v6 ? Py_True : Py_False);
}

static PyObject *
py_resolv_conf(PyObject *module, PyObject *path)
{
    PyObject *fs = NULL;
    (void)module;
    if (path != Py_None && !PyUnicode_FSConverter(path, &fs))
        return NULL;
    int rc = ab_dns_configure(fs != NULL ? PyBytes_AS_STRING(fs) : NULL);
    Py_XDECREF(fs);
    if (rc < 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *
py_dns_stats(PyObject *module, PyObject *unused)
{
    uint64_t waiting[2], queries[2];
    (void)module;
    (void)unused;
    ab_dns_stats(waiting, queries);
    return Py_BuildValue("(KKKK)", (unsigned long long)waiting[AB_DNS_EVDNS],
                         (unsigned long long)waiting[AB_DNS_SYSTEM],
                         (unsigned long long)queries[AB_DNS_EVDNS],
                         (unsigned long long)queries[AB_DNS_SYSTEM]);
}

static PyObject *
py_gai_strerror(PyObject *module, PyObject *arg)
{
    (void)module;
    long code = PyLong_AsLong(arg);
    if (code == -1 && PyErr_Occurred())
        return NULL;
    return PyUnicode_FromString(gai_strerror((int)code));
}

/* ---- getnameinfo on the blocking pool ----------------------------------------------- */

struct nameinfo_state {
    struct sockaddr_storage sa;
    socklen_t salen;
    int flags;
    int rc, sys_errno;
    char host[NI_MAXHOST], serv[NI_MAXSERV];
};

static void
nameinfo_work(ab_op *op)
{
    struct nameinfo_state *s = ab_op_state(op);
    errno = 0;
    s->rc = getnameinfo((struct sockaddr *)&s->sa, s->salen, s->host, sizeof(s->host), s->serv,
                        sizeof(s->serv), s->flags);
    s->sys_errno = errno;
}

static int
nameinfo_step(ab_op *op)
{
    struct nameinfo_state *s = ab_op_state(op);
    AB_BEGIN(op);
    AB_AWAIT(op, ab_await_blocking(op, nameinfo_work));
    return s->rc == 0 ? ab_return_custom(op) : ab_fail(op, ERR_GAI);
    AB_END(op);
}

static PyObject *
nameinfo_to_python(ab_op *op)
{
    struct nameinfo_state *s = ab_op_state(op);
    return Py_BuildValue("(ss)", s->host, s->serv);
}

static PyObject *
nameinfo_raise(ab_op *op, int err)
{
    struct nameinfo_state *s = ab_op_state(op);
    (void)err;
    return raise_gai(s->rc, s->sys_errno);
}

static const ab_op_type nameinfo_type = {
    .name = "getnameinfo",
    .state_size = sizeof(struct nameinfo_state),
    .step = nameinfo_step,
    .to_python = nameinfo_to_python,
    .raise_error = nameinfo_raise,
};

/* _nameinfo(family, packed address, port, flowinfo, scope_id, flags): the
 * arguments were checked by socket.getnameinfo's numeric call. */
static PyObject *
py_nameinfo(PyObject *module, PyObject *args)
{
    int family, port, flags;
    unsigned flowinfo, scope_id;
    Py_buffer addr;
    (void)module;
    if (!PyArg_ParseTuple(args, "iy*iIIi:_nameinfo", &family, &addr, &port, &flowinfo,
                          &scope_id, &flags))
        return NULL;
    size_t need = family == AF_INET ? 4 : family == AF_INET6 ? 16 : 0;
    if (need == 0 || (size_t)addr.len != need || port < 0 || port > 65535) {
        PyBuffer_Release(&addr);
        PyErr_SetString(PyExc_ValueError, "_nameinfo: bad address");
        return NULL;
    }
    ab_op *op = ab_op_new(&nameinfo_type);
    if (op == NULL) {
        PyBuffer_Release(&addr);
        return PyErr_NoMemory();
    }
    struct nameinfo_state *s = ab_op_state(op);
    s->flags = flags;
    if (family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)&s->sa;
        in->sin_family = AF_INET;
        in->sin_port = htons((uint16_t)port);
        memcpy(&in->sin_addr, addr.buf, 4);
        s->salen = sizeof(*in);
    } else {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&s->sa;
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)port);
        in6->sin6_flowinfo = htonl(flowinfo);
        in6->sin6_scope_id = scope_id;
        memcpy(&in6->sin6_addr, addr.buf, 16);
        s->salen = sizeof(*in6);
    }
    PyBuffer_Release(&addr);
    return abpy_wrap(op);
}

PyMethodDef ab_resolve_methods[] = {
    {"_nameinfo", py_nameinfo, METH_VARARGS,
     "_nameinfo(family, address, port, flowinfo, scope_id, flags): getnameinfo on the "
     "blocking pool."},
    {"_gai_strerror", py_gai_strerror, METH_O, "_gai_strerror(code): the system's message."},
    {"_lookup", py_lookup, METH_VARARGS,
     "_lookup(kind, host, serv, family, type, proto, flags, finish): a lookup op."},
    {"_settled", py_settled, METH_O, "_settled(value): an op that returns value."},
    {"_settled_error", py_settled_error, METH_O, "_settled_error(exc): an op that raises exc."},
    {"_addrconfig", py_addrconfig, METH_NOARGS,
     "_addrconfig() -> (ipv4, ipv6): non-loopback addresses configured."},
    {"_resolv_conf", py_resolv_conf, METH_O,
     "_resolv_conf(path or None): the resolv.conf evdns reads."},
    {"_dns_stats", py_dns_stats, METH_NOARGS,
     "_dns_stats() -> (evdns waiting, system waiting, evdns queries, system queries)."},
    {NULL, NULL, 0, NULL},
};
