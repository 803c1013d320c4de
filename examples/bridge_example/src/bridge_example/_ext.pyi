from collections.abc import Awaitable, Callable
from typing import TypeVar

from _typeshed import FileDescriptorLike, ReadableBuffer
from asyncio_bridge import Op, Stream

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

def resolve(
    host: str, port: str | None = None, timeout: float | None = None
) -> Op[list[tuple[int, str, int]]]:
    """socket.getaddrinfo(host, port, type=SOCK_STREAM) on glibc's getaddrinfo_a.

    Returns [(family, numeric address, port), ...] in getaddrinfo's order (port
    0 without one).  The lookup runs on glibc's threads, and a thread glibc
    creates for its callback wakes the op: no thread of asyncio's executor is
    taken.  Raises socket.gaierror as socket.getaddrinfo does, and
    TimeoutError after `timeout` seconds.  Cancelling (or the timeout) cancels
    the lookup if it has not started; one already running is let finish and its
    result freed.  host goes to glibc as UTF-8, without IDNA encoding.
    """

def sdk_call(delay: float, value: int) -> Op[int]:
    """A request to a simulated vendor SDK; returns `value`.

    The SDK has one thread of its own, which serves requests in order, each for
    `delay` seconds (at most 3600), and completes each from that thread.
    Cancelling a request that waits in the SDK's queue removes it; one the SDK
    works on is let finish and its result dropped.
    """

def read_lines(fd: FileDescriptorLike, max_buffered: int = 64) -> Stream[bytes]:
    """The lines of a non-blocking fd, read natively, each ending in b"\\n".

    An unterminated last line comes as it is, then the iteration ends at EOF.
    At most `max_buffered` lines wait for the consumer; while they do, the fd
    is not read, so a faster writer fills the pipe and blocks.  A read error
    raises OSError at the __anext__ after the lines read before it; a line
    longer than 1 MiB raises OSError(EMSGSIZE).  Cancelling one __anext__
    loses no line.  aclose(), ``async with``, contextlib.aclosing() or dropping
    the iterator stop the native reader.  The fd is borrowed: keep it open until
    the iteration ended or aclose() returned, then close it yourself.
    """

def open_sockets() -> int:
    """Sockets fetch opened and has not closed yet (a test hook)."""

def counters() -> dict[str, int]:
    """What the ops hold now, and counts of what they did (a test hook).

    resolve_live, sdk_live, lines_live: ops made and not yet freed.
    resolve_unreleased: references held for glibc's callbacks.
    resolve_callbacks: glibc's callbacks that ran.
    gai_canceled, gai_notcanceled, gai_alldone: gai_cancel's answers.
    sdk_queued, sdk_busy: requests in the SDK's queue; its thread at work (0/1).
    sdk_removed, sdk_dropped, sdk_completed: requests cancelled while queued;
    results of cancelled requests dropped; requests the SDK completed.
    lines_emitted: lines read_lines yielded, all iterators together.
    """
