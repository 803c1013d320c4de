"""read_lines: a stream op (C API v2: abpy_wrap_stream, ab_yield_bytes,
ab_stream_room, ab_await_demand) read with `async for`.

Each test owns its pipe and closes it; guard_v2 (conftest) checks that the
native reader is gone and no fd is left afterwards."""

import asyncio
import contextlib
import errno
import fcntl
import gc
import os
import random
import socket
import threading
import time

import pytest

import asyncio_bridge
import bridge_example as bx

pytestmark = pytest.mark.usefixtures("guard_v2")

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class Pipe:
    """A pipe whose read end is non-blocking; closes what is still open."""

    def __init__(self, size=None):
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        if size is not None:
            fcntl.fcntl(self.w, F_SETPIPE_SZ, size)

    def close_write(self):
        if self.w >= 0:
            os.close(self.w)
            self.w = -1

    def close_read(self):
        if self.r >= 0:
            os.close(self.r)
            self.r = -1

    def close(self):
        self.close_write()
        self.close_read()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def writer_thread(pipe, chunks):
    """Write chunks with blocking writes, then close the write end (the
    test joins the thread before it closes the pipe)."""

    def run():
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(pipe.w, view) :]
        except BrokenPipeError:
            pass  # the test closed the read end
        finally:
            pipe.close_write()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def watched_by_epoll(fd):
    """Whether an epoll instance of this process (the engine's libevent base,
    the loop's selector) watches fd: its fdinfo lists each watched fd as
    'tfd: <fd>'."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") != "anon_inode:[eventpoll]":
                continue
            with open(f"/proc/self/fdinfo/{name}") as info:
                for line in info:
                    if line.startswith("tfd:") and int(line.split()[1]) == fd:
                        return True
        except (FileNotFoundError, ProcessLookupError):
            continue
    return False


async def until(predicate, deadline=5.0):
    end = time.monotonic() + deadline
    while not predicate():
        assert time.monotonic() < end, "timed out waiting"
        await asyncio.sleep(0.001)


def emitted():
    return bx.counters()["lines_emitted"]


async def reader_is_gone(fd):
    """The native op finished and its fd wait is gone from the engine (the
    op itself is freed with its iterator)."""
    gc.collect()
    await until(lambda: asyncio_bridge.stats()["in_flight"] == 0)
    await until(lambda: not watched_by_epoll(fd))


# ---- lines, in order ----------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "data, lines",
    [
        (b"", []),
        (b"a", [b"a"]),
        (b"a\n", [b"a\n"]),
        (b"a\nb", [b"a\n", b"b"]),
        (b"\n\n", [b"\n", b"\n"]),
        (b"a\r\nb\n", [b"a\r\n", b"b\n"]),
        (b"x" * 200_000 + b"\ny", [b"x" * 200_000 + b"\n", b"y"]),
    ],
    ids=["empty", "unterminated", "one", "last-unterminated", "empty-lines", "crlf", "long"],
)
async def test_read_lines_small_inputs(data, lines):
    with Pipe() as pipe:
        thread = writer_thread(pipe, [data])
        assert [line async for line in bx.read_lines(pipe.r)] == lines
        thread.join()


@pytest.mark.asyncio
@pytest.mark.parametrize("max_buffered", [64, 4096])
async def test_read_lines_100k_lines_in_order(max_buffered):
    lines = [b"%d line\n" % i for i in range(100_000)] + [b"the last, unterminated"]
    with Pipe() as pipe:
        chunks = [b"".join(lines[i : i + 1000]) for i in range(0, len(lines), 1000)]
        thread = writer_thread(pipe, chunks)
        start = time.monotonic()
        got = [line async for line in bx.read_lines(pipe.r, max_buffered)]
        elapsed = time.monotonic() - start
        thread.join()
    assert len(got) == len(lines)
    assert got == lines
    print(f"100,001 lines, max_buffered={max_buffered}: {elapsed * 1000:.0f} ms")


@pytest.mark.asyncio
async def test_read_lines_one_item_buffered():
    lines = [b"%d\n" % i for i in range(5000)]
    with Pipe() as pipe:
        thread = writer_thread(pipe, [b"".join(lines)])
        assert [line async for line in bx.read_lines(pipe.r, max_buffered=1)] == lines
        thread.join()


@pytest.mark.asyncio
async def test_two_streams_at_once():
    async def consume(pipe):
        return [line async for line in bx.read_lines(pipe, 8)]

    a_lines = [b"a%d\n" % i for i in range(20_000)]
    b_lines = [b"b%d\n" % i for i in range(20_000)]
    with Pipe() as a, Pipe() as b:
        threads = [writer_thread(a, [b"".join(a_lines)]), writer_thread(b, [b"".join(b_lines)])]
        got = await asyncio.gather(consume(a.r), consume(b.r))
        for thread in threads:
            thread.join()
    assert got == [a_lines, b_lines]


# ---- backpressure ---------------------------------------------------------------------


def line(i):
    return b"line %06d\n" % i


@pytest.mark.asyncio
async def test_a_slow_consumer_holds_the_writer_back():
    max_buffered = 4
    with Pipe(size=4096) as pipe:
        os.set_blocking(pipe.w, False)
        base = emitted()
        it = bx.read_lines(pipe.r, max_buffered)
        os.write(pipe.w, line(0))
        assert await it.__anext__() == line(0)
        taken = 1

        # The consumer sleeps.  Write as fast as the pipe takes it: the
        # reader stops reading once max_buffered lines wait, the pipe fills
        # and the writer would block.
        written, blocked = 1, False
        deadline = time.monotonic() + 5
        while written < 1_000_000 and time.monotonic() < deadline:
            try:
                os.write(pipe.w, line(written))
                written += 1
            except BlockingIOError:
                await asyncio.sleep(0.05)  # the loop runs; the consumer does not take
                try:
                    os.write(pipe.w, line(written))
                    written += 1
                except BlockingIOError:
                    blocked = True
                    break
        assert blocked, f"the writer never blocked after {written} lines"
        # One read's worth (64 KiB) waits natively, plus the pipe's 4 KiB.
        assert written * len(line(0)) < 200_000, written
        await asyncio.sleep(0.2)
        assert emitted() - base - taken <= max_buffered
        with pytest.raises(BlockingIOError):
            os.write(pipe.w, line(written))

        # Now consume everything while the rest is written.
        total = written + 20_000
        os.set_blocking(pipe.w, True)
        thread = writer_thread(pipe, [b"".join(line(i) for i in range(written, total))])
        async for got in it:
            assert got == line(taken)
            taken += 1
            assert emitted() - base - taken <= max_buffered
            if taken % 1000 == 0:
                await asyncio.sleep(0)  # a consumer with other work to do
        thread.join()
        assert taken == total


# ---- cancellation, closing ------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_cancelled_anext_loses_no_line():
    with Pipe() as pipe:
        it = bx.read_lines(pipe.r)
        os.write(pipe.w, b"a\n")
        assert await it.__anext__() == b"a\n"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(it.__anext__(), 0.01)
        os.write(pipe.w, b"b\n")
        assert await asyncio.wait_for(it.__anext__(), 5) == b"b\n"

        # Lines that arrive about when a wait is cancelled: each timeout
        # cancels a pending __anext__, some just as its line comes.
        rng = random.Random(11)

        async def writer():
            for i in range(300):
                await asyncio.sleep(rng.choice([0, 0.001, 0.002, 0.004]))
                os.write(pipe.w, b"%d\n" % i)

        writing = asyncio.ensure_future(writer())
        received, timeouts = [], 0
        deadline = time.monotonic() + 20
        while len(received) < 300 and time.monotonic() < deadline:
            try:
                received.append(await asyncio.wait_for(it.__anext__(), 0.002))
            except TimeoutError:
                timeouts += 1
        await writing
        assert received == [b"%d\n" % i for i in range(300)]
        assert timeouts > 10
        pipe.close_write()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(it.__anext__(), 5)


@pytest.mark.asyncio
async def test_aclose_stops_the_native_reader():
    with Pipe() as pipe:
        it = bx.read_lines(pipe.r)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(it.__anext__(), 0.05)
        assert watched_by_epoll(pipe.r)  # the reader waits on the pipe
        assert asyncio_bridge.stats()["in_flight"] >= 1
        await it.aclose()
        await reader_is_gone(pipe.r)
        with pytest.raises(StopAsyncIteration):
            await it.__anext__()
        os.write(pipe.w, b"nobody reads this\n")
        await asyncio.sleep(0.05)
        assert os.read(pipe.r, 100) == b"nobody reads this\n"


@pytest.mark.asyncio
async def test_dropping_the_iterator_stops_the_native_reader():
    with Pipe() as pipe:
        it = bx.read_lines(pipe.r)
        os.write(pipe.w, b"one\n")
        assert await it.__anext__() == b"one\n"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(it.__anext__(), 0.05)
        assert watched_by_epoll(pipe.r)
        del it
        await reader_is_gone(pipe.r)
        assert bx.counters()["lines_live"] == 0
        os.write(pipe.w, b"two\n")
        await asyncio.sleep(0.05)
        assert os.read(pipe.r, 100) == b"two\n"


@pytest.mark.asyncio
async def test_dropping_an_iterator_with_lines_waiting():
    with Pipe() as pipe:
        os.write(pipe.w, b"".join(line(i) for i in range(100)))
        it = bx.read_lines(pipe.r, 4)
        assert await it.__anext__() == line(0)
        await asyncio.sleep(0.05)  # the reader waits for demand
        del it
        await reader_is_gone(pipe.r)
        assert bx.counters()["lines_live"] == 0


@pytest.mark.asyncio
async def test_aclosing_after_break():
    with Pipe() as pipe:
        os.write(pipe.w, b"1\n2\n3\n")
        async with contextlib.aclosing(bx.read_lines(pipe.r)) as it:
            async for got in it:
                assert got == b"1\n"
                break
        await reader_is_gone(pipe.r)


@pytest.mark.asyncio
async def test_async_with_closes():
    with Pipe() as pipe:
        os.write(pipe.w, b"1\n")
        async with bx.read_lines(pipe.r) as it:
            assert await it.__anext__() == b"1\n"
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(it.__anext__(), 0.02)
        await reader_is_gone(pipe.r)


@pytest.mark.asyncio
async def test_timeout_around_async_for_then_aclose():
    with Pipe() as pipe:
        os.write(pipe.w, b"1\n2\n")
        it = bx.read_lines(pipe.r)
        got = []
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                async for item in it:
                    got.append(item)
        assert got == [b"1\n", b"2\n"]
        await it.aclose()
        await reader_is_gone(pipe.r)


@pytest.mark.asyncio
async def test_never_iterated_iterator_reads_nothing():
    with Pipe() as pipe:
        os.write(pipe.w, b"1\n")
        it = bx.read_lines(pipe.r)
        await asyncio.sleep(0.05)
        del it
        gc.collect()
        assert os.read(pipe.r, 100) == b"1\n"  # never read natively


# ---- failures --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_read_error_after_the_last_line():
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        a.send(b"never read by b")  # b closes with this unread: a's reads then fail
        b.send(b"one\ntwo\nthr")
        it = bx.read_lines(a)
        assert await it.__anext__() == b"one\n"
        b.close()
        await asyncio.sleep(0.1)  # the reader hits ECONNRESET meanwhile
        assert await it.__anext__() == b"two\n"
        with pytest.raises(ConnectionResetError) as info:
            await it.__anext__()  # right after the last line; "thr" is dropped
        assert f"fd {a.fileno()}" in str(info.value)
        with pytest.raises(StopAsyncIteration):
            await it.__anext__()


@pytest.mark.asyncio
async def test_a_line_too_long_fails_after_the_lines_before_it():
    with Pipe() as pipe:
        thread = writer_thread(pipe, [b"ok\n", b"y" * ((1 << 20) + 10)])
        it = bx.read_lines(pipe.r)
        assert await it.__anext__() == b"ok\n"
        with pytest.raises(OSError) as info:
            await it.__anext__()
        assert info.value.errno == errno.EMSGSIZE
        pipe.close_read()  # the writer, blocked on a full pipe, gets EPIPE
        thread.join()


def test_read_lines_checks_arguments():
    with Pipe() as pipe:
        with pytest.raises(ValueError, match="blocking"):
            bx.read_lines(pipe.w)
        with pytest.raises(ValueError, match="max_buffered"):
            bx.read_lines(pipe.r, 0)
        with pytest.raises(TypeError):
            bx.read_lines("0")
        with pytest.raises(ValueError):
            bx.read_lines(-1)
        closed = os.dup(pipe.r)
        os.close(closed)
        with pytest.raises(OSError) as info:
            bx.read_lines(closed)
        assert info.value.errno == errno.EBADF
    assert bx.counters()["lines_live"] == 0
