"""C API version 2, seen from Python: a module built against the version-1
headers still runs; broken type callbacks fail loudly; waits armed after a
cancel run; streams; ops woken by threads of their own.

The op types live in tests/capi/abr_v2ops.c (and abr_v1ops.c), compiled
by the fixtures in conftest.py as a third-party extension is.
"""

import asyncio
import json
import contextlib
import errno
import gc
import time

import pytest

import asyncio_bridge as ab

AB_EV_WORK = 1 << 4
AB_EV_PYTHON = 1 << 5
AB_EV_CANCEL = 1 << 6


async def wait_for_counter(v2ops, key, at_least, deadline=3.0):
    end = time.monotonic() + deadline
    while v2ops.counters()[key] < at_least and time.monotonic() < end:
        await asyncio.sleep(0.005)
    return v2ops.counters()[key]


# ---- compatibility -----------------------------------------------------------


def test_capsules():
    assert hasattr(ab._ext, "_C_API")  # what version-1 modules import
    assert hasattr(ab._ext, "_C_API_v2")


@pytest.mark.asyncio
async def test_module_built_for_version_1_runs(v1ops):
    assert v1ops.version() == 1
    assert await v1ops.v1_op(0.01, 1000) == 500500
    assert await v1ops.v1_settled(5) == 5
    results = await asyncio.gather(*(v1ops.v1_op(0.001, n) for n in range(100)))
    assert results == [n * (n + 1) // 2 for n in range(100)]


# ---- broken callbacks (bug 2) ------------------------------------------------------


@pytest.mark.parametrize(
    "kind, callback",
    [(0, "to_python"), (1, "to_python"), (2, "to_python"), (3, "raise_error"),
     (4, "raise_error"), (5, "raise_error"), (6, "raise_error")],
)
@pytest.mark.asyncio
async def test_broken_callbacks_fail_loudly(v2ops, kind, callback, settled):
    before = ab.stats()
    # Before the fix the awaiter hung: wait_for turns a hang into a failure.
    # kind 6 on 3.12+: CPython's own SystemError (see abr_v2ops.c)
    message = f"broken: its {callback} callback|is not a BaseException subclass"
    with pytest.raises(SystemError, match=message):
        await asyncio.wait_for(v2ops.broken(kind), 5)
    await settled()
    after = ab.stats()
    assert after["submitted"] - before["submitted"] == 1
    assert after["completed"] + after["cancelled"] - before["completed"] - before["cancelled"] == 1


@pytest.mark.asyncio
async def test_raise_error_keeps_a_long_message(v2ops):
    with pytest.raises(ValueError) as info:
        await v2ops.broken(7)
    assert str(info.value) == "x" * 1000


# ---- waits armed after a cancel (bug 1) -----------------------------------------------


@pytest.mark.asyncio
async def test_python_await_after_cancel_runs(v2ops, settled):
    ran = []

    async def teardown():
        await asyncio.sleep(0.01)
        ran.append("teardown")

    task = asyncio.ensure_future(v2ops.python_after_cancel(teardown))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settled()
    assert ran == ["teardown"]
    assert v2ops.counters()["last_event"] == AB_EV_PYTHON


def test_python_await_after_cancel_skipped_when_the_loop_closed(v2ops, new_loop):
    ran = []

    async def teardown():
        ran.append("teardown")

    async def start():
        task = asyncio.ensure_future(v2ops.python_after_cancel(teardown))
        await asyncio.sleep(0.05)
        return task

    cleanups = v2ops.counters()["cleanups"]
    loop = new_loop()
    task = loop.run_until_complete(start())
    assert not task.done()
    loop.close()  # cancels the op: its Python await cannot run any more
    end = time.monotonic() + 3
    while ab.stats()["in_flight"] and time.monotonic() < end:
        time.sleep(0.01)
    assert ab.stats()["in_flight"] == 0
    assert ran == []
    assert v2ops.counters()["last_event"] == AB_EV_CANCEL
    assert v2ops.counters()["cleanups"] == cleanups + 1


@pytest.mark.asyncio
async def test_blocking_work_after_cancel_runs(v2ops, settled):
    before = v2ops.counters()["teardowns"]
    task = asyncio.ensure_future(v2ops.blocking_after_cancel())
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settled()
    assert v2ops.counters()["teardowns"] == before + 1
    assert v2ops.counters()["last_event"] == AB_EV_WORK


# ---- the blocking pool ------------------------------------------------------------------


def test_configure_blocking_workers():
    before = ab.configure()
    assert before["blocking_workers"] == 64
    try:
        assert ab.configure(blocking_workers=8)["blocking_workers"] == 8
        for bad, exc in ((0, ValueError), (1025, ValueError), (2.0, TypeError), (True, TypeError)):
            with pytest.raises(exc):
                ab.configure(blocking_workers=bad)
    finally:
        ab.configure(blocking_workers=before["blocking_workers"])
    stats = ab.stats()
    for key in ("pool_queued", "pool_threads", "blocking_queued", "blocking_threads"):
        assert isinstance(stats[key], int)


# ---- streams ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_stream_yields_everything_in_order(v2ops, settled):
    s = v2ops.ints(20000, 64)
    assert isinstance(s, ab.Stream)
    assert [x async for x in s] == list(range(20000))
    with pytest.raises(StopAsyncIteration):
        await s.__anext__()
    await settled()


@pytest.mark.asyncio
async def test_buffered_items_need_no_round_trip(v2ops, settled):
    s = v2ops.ints(64, 64)
    assert await s.__anext__() == 0
    await asyncio.sleep(0.05)  # the other 63 arrive and wait in the buffer
    submitted = ab.stats()["submitted"]
    for expected in range(1, 64):
        # The awaitable returns on its first step: no Future, no loop turn.
        with pytest.raises(StopIteration) as info:
            s.__anext__().send(None)
        assert info.value.value == expected
    assert ab.stats()["submitted"] == submitted
    with pytest.raises(StopAsyncIteration):
        await s.__anext__()
    await settled()


@pytest.mark.asyncio
async def test_stream_backpressure(v2ops, settled):
    start = v2ops.counters()["produced"]
    s = v2ops.ints(100000, 8)
    consumed = 0
    async for x in s:
        assert x == consumed
        consumed += 1
        if consumed in (1, 500, 5000):
            await asyncio.sleep(0.05)  # a slow consumer: the producer waits
            produced = v2ops.counters()["produced"] - start
            assert consumed < produced <= consumed + 8
        if consumed == 6000:
            break
    await s.aclose()
    await settled()
    assert v2ops.counters()["produced"] - start <= 6000 + 8


@pytest.mark.asyncio
async def test_stream_failure_after_the_last_item(v2ops, settled):
    s = v2ops.ints(5, 64, fail=True)
    got = []
    with pytest.raises(OSError) as info:
        async for x in s:
            got.append(x)
    assert got == [0, 1, 2, 3, 4]
    assert info.value.errno == errno.EIO
    assert "failed after 5 items" in str(info.value)
    with pytest.raises(StopAsyncIteration):  # raised once, then ended
        await s.__anext__()
    await settled()


@pytest.mark.asyncio
async def test_cancelled_anext_loses_no_item(v2ops, settled):
    s = v2ops.ints(300, 64, pause=0.3)  # pauses after every 100 items
    for expected in range(100):
        assert await s.__anext__() == expected
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(s.__anext__(), 0.05)
    assert await s.__anext__() == 100
    assert [x async for x in s] == list(range(101, 300))
    await settled()


@pytest.mark.asyncio
async def test_second_pending_anext_is_refused(v2ops, settled):
    s = v2ops.ints(300, 64, pause=0.3)
    for _ in range(100):
        await s.__anext__()
    first = asyncio.ensure_future(s.__anext__())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="already pending"):
        await s.__anext__()
    assert await first == 100
    await s.aclose()
    await settled()


@pytest.mark.asyncio
async def test_aclose_cancels_and_runs_cleanup(v2ops, settled):
    cleanups = v2ops.counters()["cleanups"]
    s = v2ops.ints(10**9, 4)
    assert await s.__anext__() == 0
    await s.aclose()  # returns once the native op ended
    assert v2ops.counters()["cleanups"] == cleanups + 1
    with pytest.raises(StopAsyncIteration):
        await s.__anext__()
    await s.aclose()  # again: nothing to do
    await settled()


@pytest.mark.asyncio
async def test_async_with_and_aclosing(v2ops, settled):
    cleanups = v2ops.counters()["cleanups"]
    async with v2ops.ints(10**9, 4) as s:
        async for x in s:
            if x == 10:
                break
    async with contextlib.aclosing(v2ops.ints(10**9, 4)) as s:
        async for x in s:
            if x == 10:
                break
    assert v2ops.counters()["cleanups"] == cleanups + 2
    await settled()


@pytest.mark.asyncio
async def test_dropping_a_stream_cancels_it(v2ops, settled):
    cleanups = v2ops.counters()["cleanups"]
    s = v2ops.ints(10**9, 4)
    assert await s.__anext__() == 0
    del s
    gc.collect()
    await settled()
    assert await wait_for_counter(v2ops, "cleanups", cleanups + 1) == cleanups + 1
    never_started = v2ops.ints(10)
    del never_started
    assert v2ops.counters()["cleanups"] == cleanups + 2


@pytest.mark.asyncio
async def test_stream_item_kinds(v2ops, settled):
    freed = v2ops.counters()["custom_freed"]
    marker = object()
    s = v2ops.kinds(marker)
    assert await s.__anext__() == -5
    assert await s.__anext__() == 2.5
    assert await s.__anext__() == b"b\0y"
    assert await s.__anext__() == "\u00e9t\u00e9"
    assert await s.__anext__() is marker
    assert await s.__anext__() == ("custom", 9)
    with pytest.raises(ValueError, match="custom item refused"):
        await s.__anext__()
    assert await s.__anext__() == 99  # the stream goes on after a refused item
    with pytest.raises(StopAsyncIteration):
        await s.__anext__()
    assert v2ops.counters()["custom_freed"] == freed + 2
    await settled()


def test_stream_of_a_closed_loop(v2ops, new_loop):
    cleanups = v2ops.counters()["cleanups"]
    loop = new_loop()
    s = v2ops.ints(10**9, 4)
    assert loop.run_until_complete(s.__anext__()) == 0
    loop.close()
    end = time.monotonic() + 3
    while ab.stats()["in_flight"] and time.monotonic() < end:
        time.sleep(0.01)
    assert ab.stats()["in_flight"] == 0
    assert v2ops.counters()["cleanups"] == cleanups + 1
    loop = new_loop()
    try:
        got = []

        async def drain():
            async for x in s:
                got.append(x)

        with pytest.raises(RuntimeError, match="closed"):
            loop.run_until_complete(drain())
        assert got == [1, 2, 3]  # buffered before the close, then the loss
    finally:
        loop.close()


def test_stream_wrong_arguments(v2ops):
    with pytest.raises(ValueError, match="max_buffered"):
        v2ops.ints(10, 0)


# ---- woken by a thread of its own ------------------------------------------------------


@pytest.mark.asyncio
async def test_woken_by_a_foreign_thread(v2ops, settled):
    assert await v2ops.signal_later(0.01, 7) == 7
    results = await asyncio.gather(*(v2ops.signal_later(0.01, i) for i in range(500)))
    assert results == list(range(500))
    task = asyncio.ensure_future(v2ops.signal_later(0.2, 1))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settled()
    await asyncio.sleep(0.3)  # the thread's late signal and release: harmless


# ---- streams at fork and at exit (in subprocesses) ------------------------------------


def _v2_env(v2ops):
    from pathlib import Path

    return {"PYTHONPATH": str(Path(v2ops.__file__).parent)}


def test_stream_in_flight_at_fork(v2ops, run_script):
    proc = run_script(
        """
        import threading, warnings
        import abr_v2ops
        warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
        loop = new_loop()
        s = abr_v2ops.ints(10**9, 4)
        assert loop.run_until_complete(s.__anext__()) == 0
        time.sleep(0.05)  # more items wait for the loop
        pid = os.fork()
        if pid == 0:
            box = []
            def child():
                l2 = new_loop()
                try:
                    for _ in range(100):  # what was delivered before the fork, then the loss
                        box.append(l2.run_until_complete(s.__anext__()))
                    box.append("no error")
                except ab.ForkError:
                    box.append("ForkError")
                except BaseException as e:
                    box.append(repr(e))
                finally:
                    l2.close()
            t = threading.Thread(target=child); t.start(); t.join(5)
            print(json.dumps({"child": box}), flush=True)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        got = [loop.run_until_complete(s.__anext__()) for _ in range(10)]
        loop.run_until_complete(s.aclose())
        loop.close()
        print(json.dumps({"parent": got, "status": status, "in_flight": settle()["in_flight"]}))
        """,
        env=_v2_env(v2ops),
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    child = next(line["child"] for line in lines if "child" in line)
    assert child[-1] == "ForkError"
    assert child[:-1] == list(range(1, len(child)))  # items buffered before the fork
    assert len(child) <= 5
    parent = next(line for line in lines if "parent" in line)
    assert parent == {"parent": list(range(1, 11)), "status": 0, "in_flight": 0}


def test_stream_in_flight_at_exit(v2ops, run_script):
    proc = run_script(
        """
        import abr_v2ops
        loop = new_loop()
        s = abr_v2ops.ints(10**9, 4)
        assert loop.run_until_complete(s.__anext__()) == 0
        print("started", flush=True)
        # exit with the stream in flight and its loop open
        """,
        env=_v2_env(v2ops),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "started\n"
    assert proc.stderr == ""
    assert proc.wall < 10


@pytest.mark.asyncio
async def test_a_burst_of_items_is_one_wake_up(v2ops, settled):
    s = v2ops.ints(5000, 5000)
    assert await s.__anext__() == 0
    before = ab.stats()["wakeups"]
    # The consumer is busy (the loop thread itself, so that no delivery can
    # run meanwhile, however slowly the producer runs): the other 4,999
    # items arrive.
    time.sleep(0.3)
    got = [x async for x in s]
    assert got == list(range(1, 5000))
    wakeups = ab.stats()["wakeups"] - before
    assert wakeups <= 3, wakeups  # the burst, and the end
    await settled()


def test_a_stream_in_a_reference_cycle_is_collected(v2ops):
    cleanups = v2ops.counters()["cleanups"]
    holder = []
    s = v2ops.kinds(holder)  # the stream keeps `holder`...
    holder.append(s)  # ...which keeps the stream
    del s, holder
    gc.collect()
    assert v2ops.counters()["cleanups"] == cleanups + 1


def test_loop_closed_under_a_pending_anext_and_aclose(v2ops, new_loop):
    """The loop stops with tasks waiting in __anext__ and in aclose(), then
    closes: nothing is resolved on the closed loop (no error reported), the
    ops end, and the streams report the loss."""
    cleanups = v2ops.counters()["cleanups"]
    loop = new_loop()
    reports = []
    loop.set_exception_handler(lambda loop, context: reports.append(context))
    a = v2ops.ints(300, 64, pause=30)  # 100 items, then a long pause
    b = v2ops.ints(10**9, 4)

    async def start():
        for _ in range(100):
            await a.__anext__()
        await b.__anext__()
        t1 = asyncio.ensure_future(a.__anext__())
        await asyncio.sleep(0.05)
        return t1

    t1 = loop.run_until_complete(start())
    assert not t1.done()
    loop.close()
    end = time.monotonic() + 3
    while ab.stats()["in_flight"] and time.monotonic() < end:
        time.sleep(0.01)
    assert ab.stats()["in_flight"] == 0
    assert v2ops.counters()["cleanups"] == cleanups + 2
    assert reports == []
    loop = new_loop()
    try:
        with pytest.raises(RuntimeError, match="closed"):
            loop.run_until_complete(a.__anext__())
        loop.run_until_complete(b.aclose())
    finally:
        loop.close()


@pytest.mark.asyncio
async def test_a_stream_awaits_python(v2ops, settled):
    ran = []

    async def fn():
        await asyncio.sleep(0.01)
        ran.append(1)

    async def bad():
        raise ValueError("no")

    assert [x async for x in v2ops.ints_python(fn)] == [1, 0, 3]
    assert ran == [1]
    assert [x async for x in v2ops.ints_python(bad)] == [1, 1, 3]
    await settled()
