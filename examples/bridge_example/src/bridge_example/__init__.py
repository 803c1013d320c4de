"""bridge_example: a third-party extension written on asyncio_bridge's C API.

Every function returns a lazy awaitable (an ``asyncio_bridge.Op``) whose
work runs natively on asyncio_bridge's engine thread or worker pool.
"""

from ._ext import compress, fetch, open_sockets, retry

__all__ = ["compress", "fetch", "open_sockets", "retry"]
