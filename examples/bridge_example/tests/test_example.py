"""bridge_example: the proof of issue 3, tested as any user's extension would be."""

import array
import asyncio
import contextvars
import gc
import os
import random
import socket
import time
import zlib

import pytest

import asyncio_bridge
import bridge_example as bx

HOST = "127.0.0.1"


def open_fds():
    """{fd: what it is}; the fd that listdir itself used is gone by now."""
    gc.collect()  # sockets left as garbage by earlier tests close now, not later
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            pass
    return fds


def assert_no_new_fds(before):
    new = open_fds().items() - before.items()
    assert not new, new


# ---- servers on 127.0.0.1, port 0 ---------------------------------------------


class Server:
    """An asyncio server; `transports` are its accepted connections."""

    def __init__(self, protocol_factory, host=HOST):
        self.protocol_factory = protocol_factory
        self.host = host
        self.transports = []

    async def __aenter__(self):
        loop = asyncio.get_running_loop()

        def factory():
            protocol = self.protocol_factory()
            protocol.server = self
            return protocol

        self.server = await loop.create_server(factory, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def close_connections(self):
        for transport in self.transports:
            transport.abort()
        self.transports.clear()

    async def __aexit__(self, *exc):
        self.close_connections()
        self.server.close()
        await self.server.wait_closed()
        await asyncio.sleep(0)


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.server.transports.append(transport)

    def data_received(self, data):
        self.transport.write(data)


class Silent(Echo):
    """Reads and never answers."""

    def data_received(self, data):
        pass


class Reply(Echo):
    """Answers the first data with `reply`, then closes."""

    reply = b"short answer"

    def data_received(self, data):
        self.transport.write(self.reply)
        self.transport.close()


class Unread:
    """A listening socket that never accepts: the kernel completes the
    handshake and buffers what the client sends until its buffers fill.
    (An asyncio server cannot stand in: uvloop starts reading even when
    connection_made pauses reading.)"""

    def __enter__(self):
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        return self

    def __exit__(self, *exc):
        self.sock.close()


class Unaccepting:
    """A listening socket whose accept queue is full: a connect hangs."""

    def __enter__(self):
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex((HOST, self.port))
            self.fillers.append(filler)
            time.sleep(0.02)
            if filler.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 and not _writable(
                filler
            ):
                return self  # this one hangs: the queue is full
        pytest.skip("cannot make a connect hang on this kernel")

    def __exit__(self, *exc):
        for filler in self.fillers:
            filler.close()
        self.sock.close()


def _writable(sock):
    import select

    return bool(select.select([], [sock], [], 0.05)[1])


def closed_port():
    sock = socket.socket()
    sock.bind((HOST, 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


BIG = 64 << 20  # more than loopback's socket buffers hold


# ---- fetch ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_fetch_echoes_payload():
    async with Server(Echo) as srv:
        assert await bx.fetch(HOST, srv.port, b"hello, world", 12, 2.0) == b"hello, world"


@pytest.mark.asyncio
async def test_fetch_large_payload_in_many_steps():
    payload = random.Random(1).randbytes(4 << 20)
    async with Server(Echo) as srv:
        assert await bx.fetch(HOST, srv.port, payload, len(payload), 5.0) == payload


@pytest.mark.asyncio
async def test_fetch_stops_at_nbytes():
    async with Server(Echo) as srv:
        assert await bx.fetch(HOST, srv.port, b"0123456789", 4, 2.0) == b"0123"


@pytest.mark.asyncio
async def test_fetch_reads_until_eof():
    async with Server(Reply) as srv:
        assert await bx.fetch(HOST, srv.port, b"?", 1 << 30, 2.0) == Reply.reply


@pytest.mark.asyncio
async def test_fetch_accepts_any_bytes_like_payload_and_no_timeout():
    async with Server(Echo) as srv:
        for payload in (bytearray(b"abc"), memoryview(b"xabcx")[1:4], array.array("b", b"abc")):
            assert await bx.fetch(HOST, srv.port, payload, 3, None) == b"abc"


@pytest.mark.asyncio
async def test_fetch_ipv6():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        srv = await Server(Echo, "::1").__aenter__()
    except OSError:
        pytest.skip("no ::1")
    try:
        assert await bx.fetch("::1", srv.port, b"six", 3, 2.0) == b"six"
    finally:
        await srv.__aexit__(None, None, None)


@pytest.mark.asyncio
async def test_fetch_refused():
    with pytest.raises(ConnectionRefusedError, match="connect to 127.0.0.1"):
        await bx.fetch(HOST, closed_port(), b"x", 1, 2.0)


def test_fetch_checks_arguments_before_anything_starts():
    with pytest.raises(ValueError, match="numeric"):
        bx.fetch("localhost", 80, b"", 1, 1.0)
    with pytest.raises(ValueError, match="port"):
        bx.fetch(HOST, 70000, b"", 1, 1.0)
    with pytest.raises(ValueError, match="nbytes"):
        bx.fetch(HOST, 80, b"", -1, 1.0)
    with pytest.raises(TypeError):
        bx.fetch(HOST, 80, "text", 1, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        bx.fetch(HOST, 80, b"", 1, float("nan"))
    assert bx.open_sockets() == 0


def test_fetch_never_awaited_warns_and_opens_nothing():
    fds = open_fds()
    with pytest.warns(RuntimeWarning, match="bridge_example.fetch' was never awaited"):
        op = bx.fetch(HOST, 80, b"", 1, 1.0)
        del op
        gc.collect()
    assert_no_new_fds(fds)


@pytest.mark.asyncio
async def test_fetch_connect_timeout():
    with Unaccepting() as srv:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="connect to .* timed out"):
            await bx.fetch(HOST, srv.port, b"x", 1, 0.2)
        assert 0.19 <= time.monotonic() - start < 2.0


@pytest.mark.asyncio
async def test_fetch_send_timeout():
    with Unread() as srv:
        with pytest.raises(TimeoutError, match="send to .* timed out"):
            await bx.fetch(HOST, srv.port, bytes(BIG), 1, 0.2)


@pytest.mark.asyncio
async def test_fetch_read_timeout():
    async with Server(Silent) as srv:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="read from .* timed out"):
            await bx.fetch(HOST, srv.port, b"hello", 5, 0.2)
        assert 0.19 <= time.monotonic() - start < 2.0


@pytest.mark.asyncio
async def test_timeout_is_per_step_not_per_op():
    """A server that answers a byte every 0.1 s never trips a 0.3 s timeout."""

    class Slow(Echo):
        def data_received(self, data):
            loop = asyncio.get_running_loop()
            for i in range(5):
                loop.call_later(0.1 * (i + 1), self.transport.write, b"%d" % i)

    async with Server(Slow) as srv:
        assert await bx.fetch(HOST, srv.port, b"go", 5, 0.3) == b"01234"


async def _hang_at(step, start_fetch):
    """Start a fetch that hangs at `step`, cancel it there, and check that
    every fd it opened is closed again."""
    if step == "read":
        async with Server(Silent) as srv:
            await _cancel_while_hanging(start_fetch, srv.port, srv=srv)
        return
    with {"connect": Unaccepting, "send": Unread}[step]() as srv:
        await _cancel_while_hanging(start_fetch, srv.port, srv=None)


async def _cancel_while_hanging(start_fetch, port, srv):
    fds = open_fds()
    task = start_fetch(port)
    await asyncio.sleep(0.2)
    assert not task.done()
    assert bx.open_sockets() == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stats = asyncio_bridge.stats()
    deadline = time.monotonic() + 3
    while (stats["in_flight"] or bx.open_sockets()) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        stats = asyncio_bridge.stats()
    assert bx.open_sockets() == 0
    if srv is not None:
        srv.close_connections()
        await asyncio.sleep(0.05)
    assert_no_new_fds(fds)


@pytest.mark.asyncio
@pytest.mark.parametrize("step", ["connect", "send", "read"])
async def test_cancel_at_every_step_closes_the_socket(step):
    payload = bytes(BIG) if step == "send" else b"hello"
    await _hang_at(
        step, lambda port: asyncio.ensure_future(bx.fetch(HOST, port, payload, 5, None))
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("step", ["connect", "send", "read"])
async def test_asyncio_timeout_at_every_step_closes_the_socket(step):
    payload = bytes(BIG) if step == "send" else b"hello"

    async def bounded(port):
        async with asyncio.timeout(0.2):
            return await bx.fetch(HOST, port, payload, 5, None)

    if step != "read":
        with {"connect": Unaccepting, "send": Unread}[step]() as srv:
            fds = open_fds()
            with pytest.raises(TimeoutError):
                await bounded(srv.port)
            while asyncio_bridge.stats()["in_flight"]:
                await asyncio.sleep(0.01)
            assert bx.open_sockets() == 0
            assert_no_new_fds(fds)
        return
    else:
        async with Server(Silent) as srv:
            fds = open_fds()
            with pytest.raises(TimeoutError):
                await bounded(srv.port)
            while asyncio_bridge.stats()["in_flight"]:
                await asyncio.sleep(0.01)
            srv.close_connections()
            await asyncio.sleep(0.05)
    assert bx.open_sockets() == 0
    assert_no_new_fds(fds)


@pytest.mark.asyncio
async def test_cancel_before_the_op_runs():
    with Unread() as srv:
        task = asyncio.ensure_future(bx.fetch(HOST, srv.port, b"x", 1, 1.0))
        await asyncio.sleep(0)  # submitted, possibly not yet started
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.asyncio
async def test_many_fetches_at_once(settled):
    async with Server(Echo) as srv:
        payloads = [b"%d" % i * (i + 1) for i in range(50)]
        results = await asyncio.gather(
            *(bx.fetch(HOST, srv.port, p, len(p), 5.0) for p in payloads)
        )
        assert results == payloads
    await settled()


# ---- compress ---------------------------------------------------------------------


def text_like(nbytes, seed=7):
    """Compressible but not trivially: zlib needs real time for it."""
    r = random.Random(seed)
    words = [r.randbytes(r.randint(2, 9)) for _ in range(2000)]
    out = bytearray()
    while len(out) < nbytes:
        out += b" ".join(r.choice(words) for _ in range(10000))
    return bytes(out[:nbytes])


SMALL = text_like(100_000)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "make",
    [bytes, bytearray, memoryview, lambda b: memoryview(b"--" + b + b"--")[2:-2]],
    ids=["bytes", "bytearray", "memoryview", "memoryview-slice"],
)
async def test_compress_equals_zlib(make):
    assert await bx.compress(make(SMALL)) == zlib.compress(SMALL, 6)


@pytest.mark.asyncio
@pytest.mark.parametrize("level", [-1, 1, 9])
async def test_compress_levels(level):
    assert await bx.compress(SMALL, level) == zlib.compress(SMALL, level)
    assert await bx.compress(SMALL, level=level) == zlib.compress(SMALL, level)


@pytest.mark.asyncio
async def test_compress_level_0_round_trips():
    # Stored blocks are cut where deflate's output buffer ends, and zlib's
    # Python module feeds it other buffer sizes than compress2: the bytes
    # may differ, the content may not.
    assert zlib.decompress(await bx.compress(SMALL, 0)) == SMALL


@pytest.mark.asyncio
async def test_compress_empty_and_typed_arrays():
    assert await bx.compress(b"") == zlib.compress(b"")
    ints = array.array("i", range(10000))
    assert await bx.compress(ints) == zlib.compress(ints)


@pytest.mark.asyncio
async def test_compress_large():
    data = text_like(32 << 20)
    assert await bx.compress(data, 1) == zlib.compress(data, 1)


def test_compress_checks_arguments():
    with pytest.raises(TypeError):
        bx.compress("text")
    with pytest.raises(BufferError):
        bx.compress(memoryview(b"abcdef")[::2])
    with pytest.raises(ValueError, match="level"):
        bx.compress(b"", 10)


@pytest.mark.asyncio
async def test_eight_at_a_time_while_the_loop_keeps_running():
    datas = [text_like(4 << 20, seed=i) for i in range(8)]
    expected = [zlib.compress(d, 6) for d in datas]
    gaps = []
    stop = asyncio.Event()

    async def ticker():
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.01)
    start = time.monotonic()
    results = await asyncio.gather(*(bx.compress(d) for d in datas))
    elapsed = time.monotonic() - start
    stop.set()
    await tick
    assert results == expected
    assert max(gaps) < 0.1, f"the loop stalled for {max(gaps):.3f} s"
    # The ticker really ran while the pool worked: about one tick per ms.
    assert len(gaps) > elapsed / 0.01, (len(gaps), elapsed)


@pytest.mark.asyncio
async def test_caller_drops_its_references_mid_compress():
    data = text_like(8 << 20)
    task = asyncio.ensure_future(bx.compress(bytearray(data)))  # the op holds the only ref
    await asyncio.sleep(0.005)
    gc.collect()
    assert await task == zlib.compress(data, 6)


@pytest.mark.asyncio
async def test_buffer_is_pinned_until_the_op_is_freed():
    buf = bytearray(SMALL)
    op = bx.compress(buf)
    with pytest.raises(BufferError):
        buf.extend(b"more")  # pinned from the call on, before any await
    assert await op == zlib.compress(SMALL, 6)
    del op
    buf.extend(b"more")  # released with the op


@pytest.mark.asyncio
async def test_cancel_mid_compress_keeps_the_buffer_valid(settled):
    buf = bytearray(text_like(16 << 20))
    task = asyncio.ensure_future(bx.compress(buf, 9))
    await asyncio.sleep(0.02)  # the pool is compressing it now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The pool function may still be reading: the bytearray stays pinned.
    with pytest.raises(BufferError):
        buf.extend(b"x")
    del task
    await settled()
    gc.collect()
    buf.extend(b"x")  # let go once the native side finished
    assert await bx.compress(buf[:1000]) == zlib.compress(bytes(buf[:1000]))


@pytest.mark.asyncio
async def test_wait_for_mid_compress_then_drop_everything(settled):
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(bx.compress(bytearray(text_like(16 << 20)), 9), 0.02)
    gc.collect()
    await settled()


@pytest.mark.asyncio
async def test_configure_workers_then_compress():
    before = asyncio_bridge.configure()["workers"]
    try:
        asyncio_bridge.configure(workers=1)
        results = await asyncio.gather(*(bx.compress(SMALL, 1) for _ in range(4)))
        assert results == [zlib.compress(SMALL, 1)] * 4
    finally:
        asyncio_bridge.configure(workers=before)


@pytest.mark.asyncio
async def test_compress_never_wakes_the_engine():
    # compress is a work op: the loop queues it on the pool, the worker
    # hands the outcome back to the loop; the engine thread is not involved.
    await bx.compress(SMALL)  # the pool and the bridge are up
    before = asyncio_bridge.stats()
    for _ in range(50):
        assert await bx.compress(SMALL, 1) == zlib.compress(SMALL, 1)
    results = await asyncio.gather(*(bx.compress(SMALL, 1) for _ in range(200)))
    assert results == [zlib.compress(SMALL, 1)] * 200
    after = asyncio_bridge.stats()
    assert after["engine_wakeups"] == before["engine_wakeups"]
    assert after["completed"] - before["completed"] == 250
    assert after["submitted"] - before["submitted"] == 250


@pytest.mark.asyncio
async def test_cancel_a_queued_compress_skips_it():
    before_workers = asyncio_bridge.configure()["workers"]
    try:
        asyncio_bridge.configure(workers=1)
        big = asyncio.ensure_future(bx.compress(text_like(16 << 20), 9))
        await asyncio.sleep(0.02)  # the one worker is busy with it
        before = asyncio_bridge.stats()
        queued = asyncio.ensure_future(bx.compress(SMALL))
        await asyncio.sleep(0)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert not big.done()
        assert zlib.decompress(await big)[:100] == text_like(16 << 20)[:100]
        for _ in range(200):  # the skipped op's outcome reaches the loop
            if asyncio_bridge.stats()["cancelled"] > before["cancelled"]:
                break
            await asyncio.sleep(0.005)
        after = asyncio_bridge.stats()
        assert after["cancelled"] - before["cancelled"] == 1
        assert after["completed"] - before["completed"] == 1  # big alone
    finally:
        asyncio_bridge.configure(workers=before_workers)


# ---- retry ---------------------------------------------------------------------------


class Flaky:
    """An async callable that fails `failures` times, then returns 'ok'."""

    def __init__(self, failures):
        self.failures = failures
        self.calls = 0
        self.times = []

    async def __call__(self):
        self.calls += 1
        self.times.append(time.monotonic())
        await asyncio.sleep(0)
        if self.calls <= self.failures:
            raise ValueError(self.calls)
        return "ok"


@pytest.mark.asyncio
async def test_retry_succeeds_on_the_third_attempt():
    fn = Flaky(2)
    assert await bx.retry(fn, 5, 0.05) == "ok"
    assert fn.calls == 3
    gaps = [b - a for a, b in zip(fn.times, fn.times[1:])]
    assert all(g >= 0.045 for g in gaps), gaps  # the native delay, each time


@pytest.mark.asyncio
async def test_retry_first_try_returns_any_object():
    sentinel = object()

    async def fn():
        return sentinel

    assert await bx.retry(fn, 1, 0) is sentinel


@pytest.mark.asyncio
async def test_retry_raises_the_last_exception_after_n():
    fn = Flaky(10)
    with pytest.raises(ValueError) as info:
        await bx.retry(fn, 4, 0.001)
    assert info.value.args == (4,)
    assert fn.calls == 4


@pytest.mark.asyncio
async def test_retry_a_function_that_raises_when_called():
    calls = []

    def fn():
        calls.append(1)
        raise KeyError("sync")

    with pytest.raises(KeyError):
        await bx.retry(fn, 3, 0)
    assert len(calls) == 3


@pytest.mark.asyncio
async def test_cancelling_retry_cancels_the_inner_task():
    started = asyncio.Event()
    inner = {}

    async def fn():
        inner["task"] = asyncio.current_task()
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            inner["cancelled"] = True
            raise

    task = asyncio.ensure_future(bx.retry(fn, 3, 0))
    await started.wait()
    assert inner["task"] is not task
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert inner.get("cancelled")
    assert inner["task"].cancelled()


@pytest.mark.asyncio
async def test_cancelling_retry_during_the_native_delay():
    fn = Flaky(10)
    task = asyncio.ensure_future(bx.retry(fn, 3, 3600))
    while fn.calls == 0:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fn.calls == 1


@pytest.mark.asyncio
async def test_retry_under_asyncio_timeout():
    async def never():
        await asyncio.sleep(3600)

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await bx.retry(never, 3, 0)


REQUEST_ID = contextvars.ContextVar("request_id", default=None)


@pytest.mark.asyncio
async def test_retry_runs_fn_in_the_callers_context():
    seen = []

    async def fn():
        seen.append(REQUEST_ID.get())
        if seen.count(REQUEST_ID.get()) < 2:
            raise RuntimeError("again")
        return REQUEST_ID.get()

    async def caller(value):
        REQUEST_ID.set(value)
        return await bx.retry(fn, 3, 0)

    results = await asyncio.gather(caller("a"), caller("b"))
    assert results == ["a", "b"]
    assert sorted(seen) == ["a", "a", "b", "b"]
    assert REQUEST_ID.get() is None


def test_retry_checks_arguments():
    async def fn():
        pass

    with pytest.raises(TypeError, match="callable"):
        bx.retry(42, 1, 0)
    with pytest.raises(ValueError, match="attempts"):
        bx.retry(fn, 0, 0)
    with pytest.raises(TypeError, match="delay"):
        bx.retry(fn, 1, "soon")


@pytest.mark.asyncio
async def test_retry_with_fetch_inside():
    """Native op -> Python coroutine -> native op: the layers compose."""
    async with Server(Echo) as srv:
        port = srv.port
        calls = []

        async def fn():
            calls.append(1)
            if len(calls) == 1:
                return await bx.fetch(HOST, closed_port(), b"", 1, 1.0)
            return await bx.fetch(HOST, port, b"pong", 4, 1.0)

        assert await bx.retry(fn, 2, 0.01) == b"pong"
