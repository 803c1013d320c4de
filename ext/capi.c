/* capi.c: the function table that other extensions import. */
#include "ext.h"

static const AsyncioBridge_CAPI capi = {
    .version = ASYNCIO_BRIDGE_CAPI_VERSION,
    .size = sizeof(AsyncioBridge_CAPI),
    .strerror = ab_strerror,
    .op_new = ab_op_new,
    .op_release = ab_op_release,
    .op_state = ab_op_state,
    .op_pc = ab_op_pc,
    .op_event = ab_op_event,
    .op_cancelled = ab_op_cancelled,
    .op_error = ab_op_error,
    .op_error_message = ab_op_error_message,
    .op_python_failed = ab_op_python_failed,
    .return_none = ab_return_none,
    .return_int = ab_return_int,
    .return_float = ab_return_float,
    .return_bytes = ab_return_bytes,
    .return_str = ab_return_str,
    .return_kept = ab_return_kept,
    .return_python = ab_return_python,
    .return_custom = ab_return_custom,
    .fail = ab_fail,
    .fail_msg = ab_fail_msg,
    .await_timer = ab_await_timer,
    .await_fd = ab_await_fd,
    .await_work = ab_await_work,
    .await_python = ab_await_python,
    .await_cancel = ab_await_cancel,
    .op_type_of = ab_op_type_of,
    .py_keep = abpy_keep,
    .py_kept = abpy_kept,
    .py_keep_buffer = abpy_keep_buffer,
    .py_wrap = abpy_wrap,
    .py_python_outcome = abpy_python_outcome,
    .py_raise = abpy_raise,
    .py_fd = abpy_fd,
    .py_seconds = abpy_seconds,
    .py_wrap_settled = abpy_wrap_settled,
};

/* New reference: the capsule named ASYNCIO_BRIDGE_CAPSULE. */
PyObject *
ab_capi_capsule(void)
{
    return PyCapsule_New((void *)&capi, ASYNCIO_BRIDGE_CAPSULE, NULL);
}
