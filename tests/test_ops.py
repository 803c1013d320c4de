"""The ops of issue 2, point 4: sleep, nop, wait_readable, wait_writable."""

import asyncio
import errno
import gc
import math
import os
import random
import socket
import sys
import time

import pytest

import asyncio_bridge as ab


@pytest.fixture
def pipe():
    r, w = os.pipe()
    fds = {"r": r, "w": w}
    yield fds
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass


async def assert_pending(task, seconds=0.05):
    await asyncio.sleep(seconds)
    assert not task.done(), task


def fill(sock):
    """Fill the socket's send buffer so that it is no longer writable."""
    sock.setblocking(False)
    chunk = b"x" * 65536
    try:
        while True:
            sock.send(chunk)
    except BlockingIOError:
        pass


def drain(sock):
    sock.setblocking(False)
    try:
        while sock.recv(1 << 20):
            pass
    except BlockingIOError:
        pass


# ---- sleep -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_sleep_returns_result_after_delay():
    start = time.monotonic()
    assert await ab.sleep(0.1, "result") == "result"
    elapsed = time.monotonic() - start
    assert 0.095 <= elapsed < 1.0, elapsed


@pytest.mark.asyncio
async def test_sleep_default_result_is_none_and_int_delay_works():
    assert await ab.sleep(0.01) is None
    assert await ab.sleep(0) is None
    assert await ab.sleep(delay=0, result="kw") == "kw"


@pytest.mark.asyncio
async def test_sleep_returns_the_same_object():
    obj = object()
    before = sys.getrefcount(obj)
    for _ in range(50):
        assert await ab.sleep(0, obj) is obj
    await asyncio.sleep(0)  # drop the Future that woke this step
    assert sys.getrefcount(obj) == before


@pytest.mark.asyncio
@pytest.mark.parametrize("delay", [0, 0.0, -1, -0.5, -math.inf])
async def test_sleep_non_positive_delay_yields_once(delay):
    ran = []

    async def other():
        ran.append(True)

    asyncio.get_running_loop().call_soon(ran.append, "callback")
    task = asyncio.create_task(other())
    start = time.monotonic()
    assert await ab.sleep(delay, "r") == "r"
    assert time.monotonic() - start < 0.5
    assert ran == ["callback", True]
    await task


@pytest.mark.asyncio
async def test_sleeps_finish_in_order_of_delay():
    delays = [0.03 * i for i in range(1, 9)]
    shuffled = random.sample(delays, len(delays))
    order = []

    async def one(delay):
        order.append(await ab.sleep(delay, delay))

    await asyncio.gather(*(one(d) for d in shuffled))
    assert order == delays


@pytest.mark.asyncio
@pytest.mark.parametrize("delay", [math.inf, 1e300, 1e20, 2.0**64, 10**30])
async def test_huge_delay_sleeps_until_cancelled(delay, settled):
    before = ab.stats()
    task = asyncio.create_task(ab.sleep(delay, "never"))
    await assert_pending(task, 0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stats = await settled()
    assert stats["cancelled"] >= before["cancelled"] + 1


@pytest.mark.asyncio
async def test_many_concurrent_sleeps():
    n = 2000
    results = await asyncio.gather(*(ab.sleep(random.random() * 0.05, i) for i in range(n)))
    assert results == list(range(n))


# ---- nop -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_nop_returns_its_value():
    assert await ab.nop() is None
    obj = object()
    assert await ab.nop(obj) is obj
    assert await ab.nop(value=3) == 3


@pytest.mark.asyncio
async def test_nop_does_not_leak_references():
    obj = object()
    before = sys.getrefcount(obj)
    for _ in range(100):
        await ab.nop(obj)
    await asyncio.gather(*(ab.nop(obj) for _ in range(100)))
    await asyncio.sleep(0)  # drop the Future that woke this step
    gc.collect()  # gather's tasks and futures form cycles
    assert sys.getrefcount(obj) == before


@pytest.mark.asyncio
async def test_nop_burst_keeps_every_value_with_its_awaiter():
    values = [object() for _ in range(3000)]
    results = await asyncio.gather(*(ab.nop(v) for v in values))
    assert all(r is v for r, v in zip(results, values, strict=True))


# ---- wait_readable / wait_writable -------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("as_int", [True, False], ids=["int", "socket"])
async def test_wait_readable_socket(sock_pair, as_int):
    a, b = sock_pair
    task = asyncio.create_task(ab.wait_readable(a.fileno() if as_int else a))
    await assert_pending(task)
    b.send(b"x")
    assert await asyncio.wait_for(task, 5) is None
    assert a.recv(1) == b"x"


@pytest.mark.asyncio
async def test_wait_readable_already_readable(sock_pair):
    a, b = sock_pair
    b.send(b"x")
    assert await asyncio.wait_for(ab.wait_readable(a), 5) is None


@pytest.mark.asyncio
async def test_wait_readable_pipe_and_eof(pipe):
    task = asyncio.create_task(ab.wait_readable(pipe["r"]))
    await assert_pending(task)
    os.write(pipe["w"], b"x")
    assert await asyncio.wait_for(task, 5) is None
    assert os.read(pipe["r"], 1) == b"x"
    task = asyncio.create_task(ab.wait_readable(pipe["r"]))
    await assert_pending(task)
    os.close(pipe.pop("w"))
    assert await asyncio.wait_for(task, 5) is None


@pytest.mark.asyncio
async def test_wait_readable_file_object_with_fileno(pipe):
    with open(pipe.pop("r"), "rb", buffering=0) as reader:
        task = asyncio.create_task(ab.wait_readable(reader))
        await assert_pending(task)
        os.write(pipe["w"], b"y")
        assert await asyncio.wait_for(task, 5) is None
        assert reader.read(1) == b"y"


@pytest.mark.asyncio
async def test_wait_readable_custom_fileno_object(sock_pair):
    a, b = sock_pair

    class HasFileno:
        def fileno(self):
            return a.fileno()

    task = asyncio.create_task(ab.wait_readable(HasFileno()))
    await assert_pending(task)
    b.send(b"x")
    assert await asyncio.wait_for(task, 5) is None


@pytest.mark.asyncio
async def test_wait_writable_is_ready_at_once(sock_pair, pipe):
    a, _ = sock_pair
    assert await asyncio.wait_for(ab.wait_writable(a), 5) is None
    assert await asyncio.wait_for(ab.wait_writable(a.fileno(), timeout=1), 5) is None
    assert await asyncio.wait_for(ab.wait_writable(pipe["w"]), 5) is None


@pytest.mark.asyncio
async def test_wait_writable_waits_for_buffer_space(sock_pair):
    a, b = sock_pair
    fill(a)
    task = asyncio.create_task(ab.wait_writable(a))
    await assert_pending(task)
    drain(b)
    assert await asyncio.wait_for(task, 5) is None


@pytest.mark.asyncio
async def test_two_ops_on_one_fd_both_complete(sock_pair):
    a, b = sock_pair
    t1 = asyncio.create_task(ab.wait_readable(a))
    t2 = asyncio.create_task(ab.wait_readable(a.fileno()))
    t3 = asyncio.create_task(ab.wait_writable(a))
    await assert_pending(t1)
    assert not t2.done()
    assert await asyncio.wait_for(t3, 5) is None
    b.send(b"x")
    assert await asyncio.wait_for(asyncio.gather(t1, t2), 5) == [None, None]


@pytest.mark.asyncio
async def test_many_fds_complete_independently():
    pairs = [socket.socketpair() for _ in range(50)]
    try:
        tasks = [asyncio.create_task(ab.wait_readable(a)) for a, _ in pairs]
        await asyncio.sleep(0.05)
        for i in reversed(range(len(pairs))):
            assert not any(t.done() for t in tasks[:i + 1]), i
            pairs[i][1].send(b"x")
            await asyncio.wait_for(tasks[i], 5)
            await asyncio.sleep(0)
            assert not any(t.done() for t in tasks[:i]), i
    finally:
        for a, b in pairs:
            a.close()
            b.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("op", [ab.wait_readable, ab.wait_writable])
async def test_wait_timeout_raises_timeout_error(sock_pair, op):
    a, _ = sock_pair
    if op is ab.wait_writable:
        fill(a)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        await op(a, timeout=0.1)
    elapsed = time.monotonic() - start
    assert 0.095 <= elapsed < 1.0, elapsed


@pytest.mark.asyncio
async def test_wait_ready_before_timeout_returns_none(sock_pair):
    a, b = sock_pair
    task = asyncio.create_task(ab.wait_readable(a, timeout=5))
    await assert_pending(task)
    b.send(b"x")
    assert await asyncio.wait_for(task, 5) is None
    await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_infinite_timeout_means_none(sock_pair):
    a, b = sock_pair
    task = asyncio.create_task(ab.wait_readable(a, timeout=math.inf))
    await assert_pending(task)
    b.send(b"x")
    assert await asyncio.wait_for(task, 5) is None


@pytest.mark.asyncio
@pytest.mark.parametrize("op", [ab.wait_readable, ab.wait_writable])
async def test_closed_fd_raises_ebadf(op):
    await ab.nop()  # the bridge (and any fd it opens) exists before we pick a closed fd
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as info:
        await asyncio.wait_for(op(r), 5)
    assert info.value.errno == errno.EBADF
    assert info.value.strerror
    assert type(info.value) is OSError


@pytest.mark.asyncio
async def test_regular_file_is_ready_or_a_clear_oserror(tmp_path):
    with open(tmp_path / "f", "wb+") as f:
        for op in (ab.wait_readable, ab.wait_writable):
            try:
                result = await asyncio.wait_for(op(f), 5)
            except OSError as exc:
                assert exc.errno is not None
            else:
                assert result is None
