"""Behaving like asyncio in every corner (issue 8).

Each case is compared with what asyncio.sleep or a plain coroutine does in
the same situation.  The process-level ones (atexit, threads left behind,
fork, subinterpreters) run in a subprocess.
"""

import asyncio
import collections.abc
import decimal
import fractions
import gc
import inspect
import io
import json
import logging
import os
import sys
import time
import types
import warnings
import weakref

import pytest
import uvloop

import asyncio_bridge as ab

LOOP_CLASSES = {"asyncio": asyncio.SelectorEventLoop, "uvloop": uvloop.Loop}
PY312 = sys.version_info >= (3, 12)


def json_lines(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def assert_clean(proc, budget=10.0):
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr == "", proc.stderr
    assert proc.wall < budget, proc.wall


def open_fds():
    """The fds open now, by number, with what each is.  Listing
    /proc/self/fd opens a directory fd of its own, which the listing shows
    and which is closed by the time it is read back; it is left out, as is
    any fd another thread opened and closed meanwhile (the engine reads
    /proc/loadavg now and then).  Counting the listing's own fd made the
    comparison fail whenever its number moved: an fd opened meanwhile below
    it at the first listing, or one closed below it at the second, and the
    directory fd lands on a number the other listing did not have."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return fds


def wait_until(predicate, deadline=3.0):
    end = time.monotonic() + deadline
    while not predicate() and time.monotonic() < end:
        time.sleep(0.005)
    return predicate()


# ---- 1. atexit handlers that run after the library's own ---------------------------

# Registered before asyncio_bridge is imported, so run after its shutdown hook
# (atexit runs last-registered first).  The loop is chosen by argv[1].
ATEXIT = """
import asyncio, atexit, json, os, sys, time
import uvloop

def new_loop():
    return uvloop.new_event_loop() if sys.argv[1] == "uvloop" else asyncio.SelectorEventLoop()

def threads():
    return len(os.listdir("/proc/self/task"))

def finally_():  # registered first: runs last, as finalization starts
    print(json.dumps({"threads_at_finalization": threads()}), flush=True)

async def hundred():
    return await asyncio.gather(*(ab.nop(i) for i in range(100)))

def late():
    runner = asyncio.Runner(loop_factory=new_loop)
    got = runner.run(ab.sleep(0.01, "done"))
    more = runner.run(hundred())
    runner.close()
    again = EARLY_LOOP.run_until_complete(ab.sleep(0.01, "again"))
    EARLY_LOOP.close()
    print(json.dumps({"late": got, "more": more == list(range(100)), "again": again,
                      "in_flight": ab.stats()["in_flight"] - IN_FLIGHT_AT_EXIT}), flush=True)

atexit.register(finally_)
atexit.register(late)
import asyncio_bridge as ab

EARLY_LOOP = new_loop()
async def start():
    await ab.nop()
    ops = [ab.sleep(30) for _ in range(KEEP)]
    return ops, [op.send(None) for op in ops]  # in flight at exit
held = EARLY_LOOP.run_until_complete(start())
IN_FLIGHT_AT_EXIT = ab.stats()["in_flight"]
print(json.dumps({"exiting_with": IN_FLIGHT_AT_EXIT, "at": time.monotonic()}), flush=True)
"""


@pytest.mark.parametrize("keep", [0, 1000])
def test_atexit_handler_after_ours_runs_ops(run_script, loop_name, keep):
    """asyncio prints "done" here and exits; so must an op."""
    proc = run_script(ATEXIT.replace("KEEP", str(keep)), prelude=False)
    ended = time.monotonic()
    assert_clean(proc)
    start, late, final = json_lines(proc.stdout)
    assert start["exiting_with"] == keep
    assert late == {"late": "done", "more": True, "again": "again", "in_flight": 0}
    # The threads started for the late handler stopped again before
    # finalization: only the main thread is left.
    assert final == {"threads_at_finalization": 1}
    assert ended - start["at"] < 2.0


def test_ops_in_a_daemon_thread_after_exit_wait_quietly(run_script):
    """A loop in a daemon thread that starts ops once exit began: they wait
    (the interpreter ends under them) rather than raise into the thread."""
    proc = run_script("""
        import threading
        started = threading.Event()
        def run():
            async def main():
                while True:
                    started.set()
                    await ab.sleep(0.001)
            new_loop().run_until_complete(main())
        threading.Thread(target=run, daemon=True).start()
        started.wait(5)
        print(json.dumps({"at": time.monotonic()}), flush=True)
    """)
    assert_clean(proc)


# ---- 2. KeyboardInterrupt and SystemExit while delivering -------------------------------


def interrupting_loop(loop_name, exc_type):
    armed = []

    class Loop(LOOP_CLASSES[loop_name]):
        def call_soon(self, *args, **kwargs):
            if armed:
                armed.pop()
                raise exc_type("from call_soon")
            return super().call_soon(*args, **kwargs)

    return Loop(), armed


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exception_while_delivering_propagates(loop_name, exc_type):
    loop, armed = interrupting_loop(loop_name, exc_type)
    reports = []
    loop.set_exception_handler(lambda loop, ctx: reports.append(ctx))
    n = 20
    try:
        async def start():
            tasks = [asyncio.ensure_future(ab.sleep(0.25, i)) for i in range(n)]
            await asyncio.sleep(0)
            return tasks

        before = ab.stats()["completed"]
        tasks = loop.run_until_complete(start())
        # Every op finishes natively while the loop is not running: the
        # first call_soon of the next drain is the one that raises.  (With
        # sleeps of 10 ms, start() under ASan once outlasted them, and the
        # ops were delivered before the interrupt was armed.)
        assert not any(task.done() for task in tasks)
        assert wait_until(lambda: ab.stats()["completed"] >= before + n)
        gathered = asyncio.gather(*tasks, return_exceptions=True)
        armed.append(True)
        with pytest.raises(exc_type, match="from call_soon"):
            loop.run_until_complete(gathered)
        # As with any callback that raises it, and as with asyncio.sleep:
        # the Future whose set_result raised is done with its callbacks
        # lost.  Every other op of the batch is delivered by the next pass,
        # and cancellation and wait_for work on the loop.
        done, pending = loop.run_until_complete(asyncio.wait(tasks, timeout=2))
        assert len(done) == n - 1, (len(done), len(pending))
        assert all(t.result() == tasks.index(t) for t in done)
        sleeper = loop.create_task(ab.sleep(30))
        with pytest.raises(TimeoutError):
            loop.run_until_complete(asyncio.wait_for(sleeper, 0.05))
        assert sleeper.cancelled()
        assert loop.run_until_complete(asyncio.wait_for(ab.nop("after"), 5)) == "after"
        assert reports == []
    finally:
        loop.close()


def test_asyncio_sleep_loses_the_same_future():
    """The control: a call_soon that raises inside asyncio.sleep's set_result
    leaves that task pending too (asyncio's own behaviour)."""
    loop, armed = interrupting_loop("asyncio", KeyboardInterrupt)
    try:
        task = loop.create_task(asyncio.sleep(0.02, "r"))
        loop.run_until_complete(asyncio.sleep(0))
        loop.call_later(0.01, armed.append, True)
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(task)
        loop.run_until_complete(asyncio.sleep(0.05))
        assert not task.done()
    finally:
        loop.set_exception_handler(lambda loop, ctx: None)
        loop.close()


def test_exception_while_delivering_goes_to_the_exception_handler(loop_name):
    """An Exception (not a BaseException) from a delivery is reported as
    asyncio reports one from a callback, and the rest is delivered."""
    loop, armed = interrupting_loop(loop_name, RuntimeError)
    reports = []
    loop.set_exception_handler(lambda loop, ctx: reports.append(ctx))
    try:
        async def start():
            pairs = []
            for i in range(5):
                op = ab.sleep(0.01, i)  # finishes after start() returned
                fut = op.send(None)
                fut.add_done_callback(lambda f: None)  # set_result calls call_soon
                pairs.append((op, fut))
            return pairs

        def finish():
            armed.clear()
            waiter.set_result(None)

        before = ab.stats()["completed"]
        pairs = loop.run_until_complete(start())
        assert wait_until(lambda: ab.stats()["completed"] >= before + 5)
        waiter = loop.create_future()
        loop.call_later(0.05, finish)
        armed.append(True)  # the next call_soon is the drain's first set_result
        loop.run_until_complete(waiter)
        assert [r["message"] for r in reports] == ["Exception in callback Bridge.drain()"]
        assert isinstance(reports[0]["exception"], RuntimeError)
        assert sum(f.done() for _, f in pairs) == 5
    finally:
        loop.close()


# ---- 3 and 4. Loops dropped or closed: collected, and their fds released -----------------


def test_a_dropped_loop_is_collected_with_its_ops(sock_pair):
    """asyncio: True and nothing left.  (uvloop keeps any loop with an
    active handle alive by design, asyncio.sleep's included.)"""
    loop = asyncio.SelectorEventLoop()
    reports = []
    loop.set_exception_handler(lambda loop, ctx: reports.append(ctx["message"]))

    async def main():
        asyncio.get_running_loop().create_task(ab.sleep(3600))
        asyncio.get_running_loop().create_task(ab.wait_readable(sock_pair[0]))
        asyncio.get_running_loop().create_task(asyncio.sleep(3600))
        await asyncio.sleep(0)

    loop.run_until_complete(main())
    ref = weakref.ref(loop)
    del loop
    gc.collect()
    assert ref() is None
    assert wait_until(lambda: ab.stats()["in_flight"] == 0)
    # What asyncio says of any pending task it destroys, once per task.
    assert reports == ["Task was destroyed but it is pending!"] * 3


def test_a_running_loop_keeps_tasks_awaiting_ops():
    """The loop owns its ops' Futures, as it owns its timers: a task
    nobody else references survives gc.collect() under a running op."""
    async def main():
        done = []

        async def body():
            done.append(await ab.sleep(0.02, "kept"))

        asyncio.ensure_future(body())
        await asyncio.sleep(0)
        gc.collect()
        await asyncio.sleep(0.1)
        return done

    assert asyncio.run(main()) == ["kept"]


# ---- The Future an op awaits ------------------------------------------------------------


@pytest.mark.asyncio
async def test_an_op_awaits_a_plain_future_of_its_running_loop(settled):
    """Made directly where create_future() is asyncio's or uvloop's own, it
    is still what create_future() returns: an asyncio.Future of the loop,
    with the source traceback of a debug-mode loop."""
    loop = asyncio.get_running_loop()
    task = loop.create_task(ab.sleep(30, "unused"))
    await asyncio.sleep(0)
    future = task._fut_waiter
    assert type(future) is asyncio.Future
    assert future.get_loop() is loop
    assert (future._source_traceback is not None) == loop.get_debug()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert future.cancelled()
    await settled()


def test_a_loops_own_create_future_makes_the_futures(loop_name):
    """A loop class that overrides create_future() gets every Future the
    bridge awaits from it, as with asyncio.sleep."""
    base = LOOP_CLASSES[loop_name]

    class Marked(asyncio.Future):
        pass

    class Loop(base):
        made = 0

        def create_future(self):
            Loop.made += 1
            return Marked(loop=self)

    async def main():
        seen = []
        for i in range(3):
            task = asyncio.get_running_loop().create_task(ab.sleep(0.001, i))
            await asyncio.sleep(0)
            seen.append(type(task._fut_waiter))
            assert await task == i
        return seen

    loop = Loop()
    try:
        assert loop.run_until_complete(main()) == [Marked] * 3
    finally:
        loop.close()
    assert Loop.made == 3


def loop_holders(loop):
    return [r for r in gc.get_referrers(loop)
            if isinstance(r, dict) and r.get("loop") is loop]


def test_a_bridge_holds_no_reference_to_its_loop(loop_name):
    """The keywords the bridge makes its Futures with hold the loop only
    while ops are in flight (whose Futures hold it too): once none is,
    however they ended, nothing of the bridge refers to it."""
    loop = LOOP_CLASSES[loop_name]()

    async def main():
        for i in range(50):
            assert await ab.sleep(0, i) == i
        assert loop_holders(loop) == []
        results = await asyncio.gather(*(ab.sleep(0.001, i) for i in range(50)))
        assert loop_holders(loop) == []
        tasks = [loop.create_task(ab.sleep(30)) for _ in range(5)]
        await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while ab.stats()["in_flight"]:
            await asyncio.sleep(0.001)
        assert loop_holders(loop) == []
        return results

    try:
        assert loop.run_until_complete(main()) == list(range(50))
        # and ops left in flight when the loop closes
        for _ in range(5):
            loop.create_task(ab.sleep(30))
        loop.run_until_complete(asyncio.sleep(0.01))
        assert ab.stats()["in_flight"] == 5
        loop.set_exception_handler(lambda loop, ctx: None)
    finally:
        loop.close()
    assert wait_until(lambda: ab.stats()["in_flight"] == 0)
    assert loop_holders(loop) == []


@pytest.mark.parametrize("in_flight", [False, True])
def test_close_releases_every_fd(new_loop, in_flight):
    keeper = new_loop()  # keeps the engine (its epoll fd) running throughout
    keeper.run_until_complete(ab.nop())
    before = open_fds()
    loops = []
    for _ in range(100):
        loop = new_loop()

        async def one():
            await ab.nop()
            if in_flight:
                asyncio.get_running_loop().create_task(ab.sleep(float("inf")))
                await asyncio.sleep(0)

        loop.run_until_complete(one())
        loop.set_exception_handler(lambda loop, ctx: None)
        loop.close()
        loops.append(loop)  # still referenced
    assert wait_until(lambda: open_fds().keys() <= before.keys(), 1.0), {
        fd: target for fd, target in open_fds().items() if fd not in before}
    assert wait_until(lambda: ab.stats()["in_flight"] == 0)
    # With call_soon_threadsafe delivery the courier finds the closes (it
    # polls is_closed(), every 0.25 s): nothing holds an fd meanwhile.
    assert wait_until(lambda: all(ab._ext._bridge_of(loop) is None for loop in loops))
    keeper.close()


# ---- 5. sleep(0) ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_sleep_zero_yields_exactly_one_iteration():
    async def interleave(first, second):
        order = []

        async def a():
            for i in range(3):
                order.append(f"a{i}")
                await first(0)

        async def b():
            for i in range(3):
                order.append(f"b{i}")
                await second(0)

        await asyncio.gather(a(), b())
        return order

    expected = ["a0", "b0", "a1", "b1", "a2", "b2"]
    assert await interleave(asyncio.sleep, asyncio.sleep) == expected
    before = ab.stats()["submitted"]
    assert await interleave(ab.sleep, asyncio.sleep) == expected
    assert await interleave(asyncio.sleep, ab.sleep) == expected
    assert ab.stats()["submitted"] == before  # no engine round trip


@pytest.mark.asyncio
async def test_sleep_zero_or_less_returns_its_result_and_can_be_cancelled():
    assert await ab.sleep(0) is None
    assert await ab.sleep(-5, "r") == "r"
    assert await ab.sleep(-10**400, "huge") == "huge"  # as asyncio.sleep(-10**400)
    assert await ab.sleep(False, "f") == "f"
    it = ab.sleep(0, "v").__await__()
    assert it.send(None) is None  # the bare yield asyncio.sleep(0) makes
    with pytest.raises(StopIteration) as stop:
        it.send(None)
    assert stop.value.value == "v"
    task = asyncio.ensure_future(ab.sleep(0, "never"))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.asyncio
async def test_settled_ops_of_other_extensions(testops):
    assert await testops.settled("x") == "x"
    with pytest.raises(ConnectionRefusedError, match="settled"):
        await testops.settled(None)
    op = testops.settled(1)
    assert "yielding once" in repr(op.send(None) or op)
    op.close()


# ---- 6. introspection --------------------------------------------------------------------


def annotated() -> ab.Op[int]:
    return ab.nop(1)


def test_op_is_generic_at_run_time():
    alias = ab.Op[int]
    assert isinstance(alias, types.GenericAlias)
    assert alias.__origin__ is ab.Op and alias.__args__ == (int,)
    assert inspect.signature(annotated).return_annotation == ab.Op[int]
    annotated().close()


def test_coroutine_types_decision():
    """asyncio.iscoroutine and the Coroutine ABC say yes; inspect.iscoroutine
    says no, as for every coroutine not made by an async def (README)."""
    op = ab.nop()
    assert asyncio.iscoroutine(op)
    assert isinstance(op, collections.abc.Coroutine)
    assert inspect.isawaitable(op)
    assert not inspect.iscoroutine(op)
    op.close()


@pytest.mark.asyncio
async def test_coroutine_attributes_through_the_life_of_an_op():
    op = ab.sleep(0.2, "s")
    assert op.cr_running is False and op.cr_suspended is False
    assert op.cr_await is None
    assert op.cr_code.co_name == "sleep" and op.cr_code.co_filename == "<asyncio_bridge>"
    assert op.cr_frame.f_code is op.cr_code
    if sys.get_coroutine_origin_tracking_depth():  # the debug loop turned it on
        assert op.cr_origin[0][0] == __file__
    else:
        assert op.cr_origin is None
    assert inspect.getcoroutinestate(op) == inspect.CORO_CREATED
    task = asyncio.ensure_future(op)
    await asyncio.sleep(0)
    assert op.cr_suspended is True and op.cr_running is False
    assert asyncio.isfuture(op.cr_await)
    assert inspect.getcoroutinestate(op) == inspect.CORO_SUSPENDED
    assert await task == "s"
    assert op.cr_await is None and op.cr_frame is None
    assert inspect.getcoroutinestate(op) == inspect.CORO_CLOSED
    assert op.cr_code.co_name == "sleep"


@pytest.mark.asyncio
async def test_task_stack_and_monitors_show_the_op(settled):
    task = asyncio.ensure_future(ab.sleep(30))
    await asyncio.sleep(0)
    stack = task.get_stack()
    assert [f.f_code.co_name for f in stack] == ["sleep"]
    out = io.StringIO()
    task.print_stack(file=out)
    assert "No stack" not in out.getvalue()
    assert 'File "<asyncio_bridge>", line 1, in sleep' in out.getvalue()
    assert "coro=<sleep() running at <asyncio_bridge>:1>" in repr(task)

    async def outer():
        return await ab.sleep(30)

    # What aiomonitor walks: cr_frame and cr_await, down the chain.
    task2 = asyncio.ensure_future(outer())
    await asyncio.sleep(0)
    chain, coro = [], task2.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None)
        if frame is not None:
            chain.append(frame.f_code.co_name)
        coro = getattr(coro, "cr_await", None)
    assert chain == ["outer", "sleep"]
    task.cancel()
    task2.cancel()
    await asyncio.gather(task, task2, return_exceptions=True)
    await settled()


@pytest.mark.asyncio
async def test_repr_says_what_the_op_waits_for(sock_pair, testops, settled):
    a, _ = sock_pair

    async def never():
        await asyncio.sleep(30)

    ops = {
        "timer": ab.sleep(30),
        "fd": ab.wait_readable(a),
        "pool": testops.on_pool(0.3),
        "python": testops.call_python(never),
    }
    assert repr(ops["timer"]).startswith("<asyncio_bridge.Op sleep created at 0x")
    tasks = [asyncio.ensure_future(op) for op in ops.values()]
    for _ in range(50):
        await asyncio.sleep(0.005)
        if "waiting for <Task" in repr(ops["python"]) and "pool" in repr(ops["pool"]):
            break
    assert "sleep waiting for a timer" in repr(ops["timer"])
    assert f"wait_readable waiting for fd {a.fileno()} to be readable" in repr(ops["fd"])
    assert "on_pool waiting for a function on the worker pool" in repr(ops["pool"])
    assert "call_python waiting for <Task" in repr(ops["python"])
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await settled()
    assert repr(ops["timer"]).startswith("<asyncio_bridge.Op sleep done at 0x")


# ---- 7. where a never-awaited op was created ---------------------------------------------


def test_never_awaited_warning_names_the_creation_site():
    depth = sys.get_coroutine_origin_tracking_depth()
    sys.set_coroutine_origin_tracking_depth(5)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            op = ab.sleep(1); line = sys._getframe().f_lineno  # noqa: E702
            assert op.cr_origin[0] == (__file__, line, "test_never_awaited_warning_names_the_creation_site")
            del op
            gc.collect()
    finally:
        sys.set_coroutine_origin_tracking_depth(depth)
    [warning] = [w for w in caught if "never awaited" in str(w.message)]
    text = str(warning.message)
    assert text.startswith("coroutine 'sleep' was never awaited\nCoroutine created at")
    assert f'File "{__file__}", line {line}' in text


def test_never_awaited_in_asyncio_debug_mode_matches_a_coroutine(run_script):
    proc = run_script("""
        import gc, warnings
        warnings.simplefilter("always")
        async def coro():
            pass
        async def main():
            coro()
            ab.nop()
            gc.collect()
        asyncio.run(main(), debug=True)
    """)
    assert proc.returncode == 0, proc.stderr
    for name in ("coro", "nop"):
        assert f"RuntimeWarning: coroutine '{name}' was never awaited\nCoroutine created at" in proc.stderr
    assert proc.stderr.count("in main") == 2, proc.stderr


# ---- 8. protocol edges ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_second_send_while_suspended_as_a_coroutine(settled):
    before = ab.stats()
    it = ab.sleep(30).__await__()
    fut = it.send(None)
    # The blocking flag is still set (no task took the Future): a coroutine
    # fails with "await wasn't used with future" and is closed.
    with pytest.raises(RuntimeError, match="await wasn't used with future"):
        it.send(None)
    assert inspect.getcoroutinestate(it) == inspect.CORO_CLOSED
    assert (await settled())["cancelled"] >= before["cancelled"] + 1
    assert fut.cancelled()
    # With the flag reset, as a task resets it, the same Future again.
    it = ab.sleep(0.01, "v").__await__()
    fut = it.send(None)
    fut._asyncio_future_blocking = False
    assert it.send(None) is fut
    fut._asyncio_future_blocking = False
    await fut
    with pytest.raises(StopIteration):
        it.send(None)


def test_throw_after_close_or_finish_raises_runtime_error():
    async def coro():
        pass

    for make in (coro, ab.nop):
        c = make()
        c.close()
        with pytest.raises(RuntimeError, match="cannot reuse already awaited coroutine"):
            c.throw(ValueError("v"))
    op = ab.nop(1)
    assert asyncio.run(op) == 1
    with pytest.raises(RuntimeError, match="cannot reuse already awaited coroutine"):
        op.throw(ValueError("v"))


@pytest.mark.parametrize("nargs", [1, 2, 3])
def test_throw_signatures_warn_as_for_coroutines(nargs):
    async def coro():
        await asyncio.sleep(0)

    args = [(ValueError("v"),), (ValueError, ValueError("v")), (ValueError, ValueError("v"), None)]

    def warned(c):
        c.send(None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(ValueError):
                c.throw(*args[nargs - 1])
        return [str(w.message) for w in caught if w.category is DeprecationWarning]

    loop = asyncio.new_event_loop()
    try:
        async def both():
            return warned(coro()), warned(ab.sleep(30))

        mine, op = loop.run_until_complete(both())
    finally:
        loop.close()
    assert op == mine
    assert bool(op) == (PY312 and nargs > 1)


@pytest.mark.asyncio
async def test_closing_an_op_whose_failure_is_queued_logs_nothing(sock_pair, loop_errors):
    a, _ = sock_pair
    before = ab.stats()
    it = ab.wait_readable(a, timeout=0.001).__await__()
    fut = it.send(None)
    # The native op fails (TimeoutError) while the loop does not run.
    assert wait_until(lambda: ab.stats()["completed"] > before["completed"])
    it.close()  # and is kept: the drain finds a closed op, not a dropped one
    await asyncio.sleep(0.05)
    assert fut.cancelled()  # nobody can retrieve an outcome set now
    del it, fut
    gc.collect()
    await asyncio.sleep(0.01)
    assert loop_errors == []  # no "Future exception was never retrieved"


# ---- 9. arguments --------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("delay,error", [
    (decimal.Decimal(1), TypeError),
    ("1", TypeError),
    (10**400, OverflowError),
])
async def test_bad_delays_raise_what_asyncio_raises(delay, error):
    if type(asyncio.get_running_loop()) is asyncio.SelectorEventLoop:  # uvloop takes more
        with pytest.raises(error):
            await asyncio.sleep(delay)
    with pytest.raises(error):
        ab.sleep(delay)
    if delay != "1":
        with pytest.raises(error):
            ab.wait_readable(0, timeout=delay)


@pytest.mark.asyncio
async def test_numbers_asyncio_takes():
    assert await ab.sleep(fractions.Fraction(1, 1000), "frac") == "frac"
    assert await ab.sleep(True, "bool") == "bool"
    with pytest.raises(ValueError, match="NaN"):  # asyncio lets NaN through; see README
        ab.sleep(float("nan"))


# ---- 10. a very large batch in debug mode --------------------------------------------------------


@pytest.mark.asyncio
async def test_a_large_batch_never_holds_a_debug_loop(caplog, settled, sock_pair):
    """10,000 ops finishing at one moment (waits on one fd, which becomes
    readable), each Future with a callback (in debug mode every call_soon
    extracts a stack): delivered over several loop iterations, as asyncio's
    own 10,000 timers due at once are run one short handle at a time.

    The cyclic GC is off meanwhile: with 10,000 ops, Futures and debug-mode
    tracebacks alive, a generation-2 collection takes up to 0.1 s on its own
    (measured: 10-94 ms, growing with the held objects), and one landing
    inside any handle (asyncio.sleep's too) makes it "slow"."""
    gc.collect()
    gc.disable()
    try:
        await _large_batch(caplog, sock_pair)
    finally:
        gc.enable()
    await settled()


async def _large_batch(caplog, sock_pair):
    a, b = sock_pair
    loop = asyncio.get_running_loop()
    assert loop.get_debug()
    lags, ticking, got = [], [True], []

    def tick(at):
        lags.append(loop.time() - at)
        if ticking:
            loop.call_later(0.001, tick, loop.time() + 0.001)

    held = []
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        for start in range(0, 10000, 20):  # a short step at a time
            for i in range(start, start + 20):
                op = ab.wait_readable(a)
                fut = op.send(None)
                fut.add_done_callback(lambda f, i=i: got.append(i))
                held.append((op, fut))
            await asyncio.sleep(0)
        loop.call_later(0.001, tick, loop.time() + 0.001)
        await asyncio.sleep(0.05)
        b.send(b"x")  # every op finishes in one engine turn
        give_up = loop.time() + 60
        while len(got) < 10000 and loop.time() < give_up:
            await asyncio.sleep(0.01)
        ticking.clear()
    assert sorted(got) == list(range(10000))
    # (The test's own steps that make ops are asyncio's debug cost, not ours.)
    slow = [r.getMessage() for r in caplog.records
            if "Executing" in r.getMessage() and "Bridge.drain" in r.getMessage()]
    assert slow == []
    assert max(lags) < loop.slow_callback_duration, max(lags)


@pytest.mark.asyncio
async def test_drain_budget_zero_still_delivers_everything():
    before = ab.configure()["drain_budget"]
    try:
        assert ab.configure(drain_budget=0)["drain_budget"] == 0
        assert await asyncio.gather(*(ab.nop(i) for i in range(3000))) == list(range(3000))
    finally:
        ab.configure(drain_budget=before)


def test_drain_budget_is_checked():
    with pytest.raises(TypeError):
        ab.configure(drain_budget="1")
    for bad in (-1, float("nan"), float("inf"), 61):
        with pytest.raises(ValueError):
            ab.configure(drain_budget=bad)
    assert ab.configure()["drain_budget"] == pytest.approx(0.002)


# ---- 11. no thread left behind -------------------------------------------------------------------

IDLE_THREADS = """
import warnings
warnings.simplefilter("error")  # 3.12+: forking a multi-threaded process warns

def threads():
    return len(os.listdir("/proc/self/task"))

def fork_now():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

report = {}
# A loop that stays open keeps the threads.
loop = new_loop()
loop.run_until_complete(ab.sleep(0.01))
report["with_loop_open"] = threads()
time.sleep(1.0)
report["open_a_second_later"] = threads()
loop.close()
start = time.monotonic()
while threads() > 1 and time.monotonic() - start < 3:
    time.sleep(0.01)
report["stopped_after"] = round(time.monotonic() - start, 2)
report["threads"] = threads()
report["fork_idle"] = fork_now()
# They start again on the next op, and a fork right after asyncio.run()
# finds none (os.register_at_fork's before hook stops an idle library).
with asyncio.Runner(loop_factory=new_loop) as runner:
    report["again"] = runner.run(ab.sleep(0.01, "again"))
report["fork_right_after"] = fork_now()
report["threads_after_fork"] = threads()
print(json.dumps(report))
"""


def test_threads_stop_once_every_loop_closed(run_script):
    proc = run_script(IDLE_THREADS)
    assert_clean(proc)
    [report] = json_lines(proc.stdout)
    assert report["with_loop_open"] > 1 and report["open_a_second_later"] > 1, report
    assert report["threads"] == 1 and report["stopped_after"] < 2.0, report
    assert report["fork_idle"] == 0 and report["fork_right_after"] == 0, report
    assert report["again"] == "again" and report["threads_after_fork"] == 1, report


# ---- 12. subinterpreters ------------------------------------------------------------------------

SUBINTERPRETERS = """
import asyncio, json, sys, _testcapi
USE = '''
import asyncio, asyncio_bridge as ab
print("sub:", asyncio.run(ab.sleep(0.01, "sub")), flush=True)
'''

def isolated(code):  # the name of what code raised in an isolated interpreter, or "ok"
    if sys.version_info >= (3, 13):
        import _interpreters as interpreters
        interp = interpreters.create()
        try:
            failed = interpreters.exec(interp, code)
            return failed.type.__name__ if failed else "ok"
        finally:
            interpreters.destroy(interp)
    import _xxsubinterpreters as interpreters
    interp = interpreters.create(isolated=True)
    try:
        interpreters.run_string(interp, code)
        return "ok"
    except interpreters.RunFailedError as exc:
        return str(exc).split("'")[1].rsplit(".", 1)[-1]
    finally:
        interpreters.destroy(interp)

report = {}
if sys.argv[2] == "sub-first":
    report["sub"] = _testcapi.run_in_subinterp(USE)
    import asyncio_bridge as ab
    report["main"] = asyncio.run(ab.sleep(0.01, "main"))
else:
    import asyncio_bridge as ab
    report["main"] = asyncio.run(ab.sleep(0.01, "main"))
    report["sub"] = _testcapi.run_in_subinterp(USE)
    report["isolated"] = isolated("import asyncio_bridge")
    report["main_again"] = asyncio.run(ab.sleep(0.01, "again"))
print(json.dumps(report), flush=True)
"""


@pytest.mark.parametrize("order", ["sub-first", "main-first"])
def test_subinterpreters_in_any_order(tmp_path, order, delivery):
    import subprocess
    script = tmp_path / "subinterpreters.py"
    script.write_text(SUBINTERPRETERS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONDEV")}
    env["ASYNCIO_BRIDGE_DELIVERY"] = delivery
    proc = subprocess.run([sys.executable, str(script), "asyncio", order], capture_output=True,
                          text=True, timeout=60, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Fatal" not in proc.stderr and "Segmentation" not in proc.stderr
    [report] = json_lines(proc.stdout)
    if order == "sub-first":
        if PY312:  # whichever interpreter imports first owns the engine while it lives
            assert report == {"sub": 0, "main": "main"}
            assert "sub: sub" in proc.stdout
        else:  # 3.11: the main interpreter only
            assert report == {"sub": -1, "main": "main"}
            assert "asyncio_bridge runs only in the main interpreter on Python 3.11" in proc.stderr
    else:
        assert report["main"] == "main" and report["main_again"] == "again"
        assert report["sub"] == -1
        assert ("already in use by another interpreter" in proc.stderr
                or "runs only in the main interpreter" in proc.stderr)
        # 3.12+ refuses: no per-interpreter GIL support declared.  On 3.11
        # ours refuses too, unless an editable install's loader fails first
        # (it runs subprocess, which 3.11's isolated interpreters lack).
        assert report["isolated"] in (("ImportError",) if PY312
                                      else ("ImportError", "RuntimeError")), report
