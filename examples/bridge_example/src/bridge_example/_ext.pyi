from collections.abc import Awaitable, Callable
from typing import TypeVar

from _typeshed import ReadableBuffer
from asyncio_bridge import Op

_T = TypeVar("_T")

def fetch(
    host: str, port: int, payload: ReadableBuffer, nbytes: int, timeout: float | None = None
) -> Op[bytes]:
    """Connect to a numeric IPv4/IPv6 host, send payload, read until nbytes or EOF.

    Each step (connect, each wait to send, each wait to read) times out after
    `timeout` seconds with TimeoutError; a refused connection raises
    ConnectionRefusedError.  Cancelling closes the socket.
    """

def compress(data: ReadableBuffer, level: int = 6) -> Op[bytes]:
    """zlib.compress(data, level), run on the worker pool without the GIL."""

def retry(fn: Callable[[], Awaitable[_T]], attempts: int, delay: float) -> Op[_T]:
    """Await fn() up to `attempts` times, sleeping `delay` natively after each failure.

    Returns the first result or raises the last exception.  fn must return a
    coroutine; it runs as a task in the caller's contextvars context.
    """

def open_sockets() -> int:
    """Sockets fetch opened and has not closed yet (a test hook)."""
