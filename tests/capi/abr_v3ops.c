/* abr_v3ops.c: op types for the tests of C API version 3 (name lookups),
 * built against the installed headers as a third-party extension is.
 *
 *   lookup(name, family=0, system=False)
 *       ab_await_dns: evdns on the engine thread, or the system's
 *       getaddrinfo on the blocking pool; returns [(family, address), ...]
 *       (evdns) or the addresses getaddrinfo gave; a failure raises
 *       OSError(code, message) with the EAI_* code.
 */
#include "asyncio_bridge.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <string.h>
#include <sys/socket.h>

struct lookup_state {
    ab_dns_wait w;
    char name[256];
    int family, kind, eai;
};

static int
lookup_step(ab_op *op)
{
    struct lookup_state *s = ab_op_state(op);
    AB_BEGIN(op);
    AB_AWAIT(op, ab_await_dns(op, &s->w, s->kind, s->name, NULL, s->family,
                              s->kind == AB_DNS_SYSTEM ? SOCK_STREAM : 0, 0, 0));
    ab_dns_wait_done(&s->w);
    s->eai = ab_dns_answer_error(ab_dns_result(&s->w), NULL);
    return s->eai ? ab_fail(op, AB_EUSER) : ab_return_custom(op);
    AB_END(op);
}

static void
lookup_cleanup(ab_op *op)
{
    ab_dns_wait_done(&((struct lookup_state *)ab_op_state(op))->w);
}

static void
lookup_dispose(ab_op *op)
{
    ab_dns_answer_release(((struct lookup_state *)ab_op_state(op))->w.answer);
}

static int
append(PyObject *list, int family, const void *addr)
{
    char buf[INET6_ADDRSTRLEN];
    inet_ntop(family, addr, buf, sizeof(buf));
    PyObject *t = Py_BuildValue("(is)", family, buf);
    int rc = t != NULL ? PyList_Append(list, t) : -1;
    Py_XDECREF(t);
    return rc;
}

static PyObject *
lookup_to_python(ab_op *op)
{
    struct lookup_state *s = ab_op_state(op);
    const ab_dns_answer *a = ab_dns_result(&s->w);
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    if (s->kind == AB_DNS_EVDNS) {
        static const int fams[] = {AF_INET, AF_INET6};
        for (int f = 0; f < 2; f++)
            for (int i = 0; i < ab_dns_answer_count(a, fams[f]); i++)
                if (append(list, fams[f], ab_dns_answer_addr(a, fams[f], i)) < 0)
                    goto fail;
    } else {
        for (const struct addrinfo *ai = ab_dns_answer_addrinfo(a); ai; ai = ai->ai_next) {
            const void *addr = ai->ai_family == AF_INET
                                   ? (const void *)&((struct sockaddr_in *)ai->ai_addr)->sin_addr
                                   : (const void *)&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr;
            if (append(list, ai->ai_family, addr) < 0)
                goto fail;
        }
    }
    return list;
fail:
    Py_DECREF(list);
    return NULL;
}

static PyObject *
lookup_raise(ab_op *op, int err)
{
    (void)err;
    int eai = ((struct lookup_state *)ab_op_state(op))->eai;
    PyErr_SetObject(PyExc_OSError, Py_BuildValue("(is)", eai, gai_strerror(eai)));
    return NULL;
}

static const ab_op_type lookup_type = {
    .name = "lookup",
    .state_size = sizeof(struct lookup_state),
    .step = lookup_step,
    .cleanup = lookup_cleanup,
    .to_python = lookup_to_python,
    .raise_error = lookup_raise,
    .dispose = lookup_dispose,
};

static PyObject *
py_lookup(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"name", "family", "system", NULL};
    const char *name;
    int family = 0, system = 0;
    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "s|ip:lookup", kwlist, &name, &family,
                                     &system))
        return NULL;
    if (strlen(name) >= sizeof(((struct lookup_state *)0)->name)) {
        PyErr_SetString(PyExc_ValueError, "name too long");
        return NULL;
    }
    ab_op *op = ab_op_new(&lookup_type);
    if (op == NULL)
        return PyErr_NoMemory();
    struct lookup_state *s = ab_op_state(op);
    strcpy(s->name, name);
    s->family = family;
    s->kind = system ? AB_DNS_SYSTEM : AB_DNS_EVDNS;
    return abpy_wrap(op);
}

static PyMethodDef methods[] = {
    {"lookup", (PyCFunction)(void (*)(void))py_lookup, METH_VARARGS | METH_KEYWORDS, NULL},
    {NULL, NULL, 0, NULL},
};

static int
exec_module(PyObject *module)
{
    (void)module;
    return AsyncioBridge_Import();
}

static PyModuleDef_Slot slots[] = {{Py_mod_exec, exec_module}, {0, NULL}};

static PyModuleDef def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "abr_v3ops",
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit_abr_v3ops(void)
{
    return PyModuleDef_Init(&def);
}
