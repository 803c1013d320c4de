"""bridge_example: a third-party extension written on asyncio_bridge's C API.

Every function returns a lazy awaitable (an ``asyncio_bridge.Op``) whose
work runs natively on asyncio_bridge's engine thread or worker pool, or on a
foreign thread that wakes it (``resolve``, ``sdk_call``); ``read_lines``
returns an async iterator fed by a native stream op.
"""

from ._ext import compress, counters, fetch, open_sockets, read_lines, resolve, retry, sdk_call

__all__ = [
    "compress",
    "counters",
    "fetch",
    "open_sockets",
    "read_lines",
    "resolve",
    "retry",
    "sdk_call",
]
