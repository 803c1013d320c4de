/* capi.c: the function table that other extensions import.
 *
 * One table, under two capsules: "_C_API_v2" (ASYNCIO_BRIDGE_CAPSULE, named
 * when version 2 came) says the current version; "_C_API", which modules built against the
 * version-1 header import, says version 1, the only value their check
 * accepts.  The table only grows, so a version-1 module finds its calls
 * where it expects them. */
#include "ext.h"

#define CAPI_TABLE(VERSION)                                                   \
    {                                                                         \
        .version = (VERSION),                                                 \
        .size = sizeof(AsyncioBridge_CAPI),                                   \
        CAPI_CALLS                                                            \
    }

#define CAPI_CALLS \
    .strerror = ab_strerror,                                                  \
    .op_new = ab_op_new,                                                      \
    .op_release = ab_op_release,                                              \
    .op_state = ab_op_state,                                                  \
    .op_pc = ab_op_pc,                                                        \
    .op_event = ab_op_event,                                                  \
    .op_cancelled = ab_op_cancelled,                                          \
    .op_error = ab_op_error,                                                  \
    .op_error_message = ab_op_error_message,                                  \
    .op_python_failed = ab_op_python_failed,                                  \
    .return_none = ab_return_none,                                            \
    .return_int = ab_return_int,                                              \
    .return_float = ab_return_float,                                          \
    .return_bytes = ab_return_bytes,                                          \
    .return_str = ab_return_str,                                              \
    .return_kept = ab_return_kept,                                            \
    .return_python = ab_return_python,                                        \
    .return_custom = ab_return_custom,                                        \
    .fail = ab_fail,                                                          \
    .fail_msg = ab_fail_msg,                                                  \
    .await_timer = ab_await_timer,                                            \
    .await_fd = ab_await_fd,                                                  \
    .await_work = ab_await_work,                                              \
    .await_python = ab_await_python,                                          \
    .await_cancel = ab_await_cancel,                                          \
    .op_type_of = ab_op_type_of,                                              \
    .py_keep = abpy_keep,                                                     \
    .py_kept = abpy_kept,                                                     \
    .py_keep_buffer = abpy_keep_buffer,                                       \
    .py_wrap = abpy_wrap,                                                     \
    .py_python_outcome = abpy_python_outcome,                                 \
    .py_raise = abpy_raise,                                                   \
    .py_fd = abpy_fd,                                                         \
    .py_seconds = abpy_seconds,                                               \
    .py_wrap_settled = abpy_wrap_settled,                                     \
    .op_retain = ab_op_retain,                                                \
    .op_signal = ab_op_signal,                                                \
    .await_signal = ab_await_signal,                                          \
    .fds_watch = ab_fds_watch,                                                \
    .await_fds = ab_await_fds,                                                \
    .fds_next = ab_fds_next,                                                  \
    .await_blocking = ab_await_blocking,                                      \
    .work_cancelled = ab_work_cancelled,                                      \
    .yield_int = ab_yield_int,                                                \
    .yield_float = ab_yield_float,                                            \
    .yield_bytes = ab_yield_bytes,                                            \
    .yield_str = ab_yield_str,                                                \
    .yield_kept = ab_yield_kept,                                              \
    .yield_custom = ab_yield_custom,                                          \
    .stream_room = ab_stream_room,                                            \
    .await_demand = ab_await_demand,                                          \
    .py_wrap_stream = abpy_wrap_stream,                                       \
    .await_dns = ab_await_dns,                                                \
    .dns_result = ab_dns_result,                                              \
    .dns_wait_done = ab_dns_wait_done,                                        \
    .dns_answer_release = ab_dns_answer_release,                              \
    .dns_answer_error = ab_dns_answer_error,                                  \
    .dns_answer_count = ab_dns_answer_count,                                  \
    .dns_answer_addr = ab_dns_answer_addr,                                    \
    .dns_answer_ttl = ab_dns_answer_ttl,                                      \
    .dns_answer_addrinfo = ab_dns_answer_addrinfo,


static const AsyncioBridge_CAPI capi = CAPI_TABLE(ASYNCIO_BRIDGE_CAPI_VERSION);
static const AsyncioBridge_CAPI capi_v1 = CAPI_TABLE(1);

/* New reference: the capsule named ASYNCIO_BRIDGE_CAPSULE, or with v1 the
 * one that modules built against the version-1 header import. */
PyObject *
ab_capi_capsule(int v1)
{
    return v1 ? PyCapsule_New((void *)&capi_v1, "asyncio_bridge._ext._C_API", NULL)
              : PyCapsule_New((void *)&capi, ASYNCIO_BRIDGE_CAPSULE, NULL);
}
