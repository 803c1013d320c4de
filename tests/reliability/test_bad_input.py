"""Scenario 9: bad input, generated with hypothesis.

Every public function is called with generated arguments (wrong types,
NaN, infinities, huge and negative numbers, negative, huge and closed fds,
objects whose fileno() lies or raises); what constructs is then awaited
with a short asyncio.timeout so that a hang shows.  Plus: an op awaited
from a different loop than the one it started on, ops used from a thread
with no loop, a Python callback that raises or never finishes, and a C op
that fails with unknown error codes.  The last two use abr_testops.c
(built at test time against the installed header, through the capsule, as
a third-party extension): call_python(fn) is the ab_await_python path that
examples/bridge_example's retry op also uses, and fail_with(code) is an op
that returns any code, which no built-in op does.

Pass: every call either works or raises TypeError, ValueError,
OverflowError (a ValueError subclass for sizes), RuntimeError or OSError
with a message; never another exception, a crash or a hang.
"""

import asyncio
import math
import os
import socket
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncio_bridge as ab

from .conftest import count

SCENARIO = (9, "Bad input")
CLEAR = (TypeError, ValueError, RuntimeError, OSError)
SETTINGS = settings(max_examples=count(150, 1000), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**200, 2**200),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 2**63, 2**1000, True]),
)
junk = st.one_of(st.none(), st.text(max_size=5), st.binary(max_size=5), st.lists(st.integers(), max_size=2),
                 st.just(object()), st.just(b"1"), st.just(1j))


class FakeFile:
    def __init__(self, value):
        self.value = value

    def fileno(self):
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


fds = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([-1, 987, 2**31, 2**31 - 1]),
                junk, numbers.map(FakeFile), st.just(FakeFile(OSError("no fd"))),
                st.just(FakeFile("3")))


_loops = []


@pytest.fixture(autouse=True)
def one_loop_per_test():
    """One loop for all the examples of a test.  (A loop per example, made
    and closed hundreds of times with cancelled ops, crashes the courier:
    that is test_closed_loop.py::test_short_lived_loops_with_cancels, run in
    a subprocess so that the crash does not take this process down.)"""
    _loops.append(asyncio.new_event_loop())
    yield
    loop = _loops.pop()
    loop.run_until_complete(asyncio.sleep(0.05))
    loop.close()


def run(coro_fn, timeout=0.05):
    async def main():
        async with asyncio.timeout(timeout):
            return await coro_fn()
    return _loops[-1].run_until_complete(main())


def check(call, tally):
    """Build the op; then await it briefly.  The outcome must be clear."""
    try:
        op = call()
    except CLEAR as exc:
        assert str(exc), f"{type(exc).__name__} without a message"
        tally["refused"] += 1
        return
    try:
        run(lambda: op)
        tally["ran"] += 1
    except TimeoutError:
        tally["timed_out"] += 1  # a huge delay or an fd that never fires
    except CLEAR as exc:
        assert str(exc) or isinstance(exc, TimeoutError)
        tally["failed_clearly"] += 1


@pytest.fixture(scope="module")
def tally():
    return {"refused": 0, "ran": 0, "timed_out": 0, "failed_clearly": 0}


@SETTINGS
@given(delay=st.one_of(numbers, junk), result=junk)
def test_sleep_arguments(delay, result, tally):
    check(lambda: ab.sleep(delay, result), tally)


@SETTINGS
@given(fd=fds, timeout=st.one_of(st.none(), numbers, junk), readable=st.booleans())
def test_fd_arguments(fd, timeout, readable, tally):
    fn = ab.wait_readable if readable else ab.wait_writable
    if isinstance(fd, FakeFile) and isinstance(fd.value, (int, float)) and 0 <= fd.value < 1024:
        fd = FakeFile(987)
    if isinstance(fd, int) and 0 <= fd < 1024:
        # Never wait on this process's own fds here (stdio, pytest's, the
        # loop's, the library's): test_foreign_fds does, in a subprocess.
        fd = 987
    check(lambda: fn(fd, timeout=timeout), tally)


@SETTINGS
@given(args=st.lists(junk, max_size=3), kwargs=st.dictionaries(st.sampled_from(["value", "x", "delivery", "workers"]), st.one_of(junk, numbers), max_size=2))
def test_other_functions(args, kwargs, tally):
    for fn in (ab.nop, ab.configure, ab.stats):
        before = ab.configure()
        try:
            out = fn(*args, **kwargs)
            if isinstance(out, ab.Op):
                check(lambda: out, tally)
        except CLEAR as exc:
            assert str(exc)
            tally["refused"] += 1
        finally:
            ab.configure(**before)


FOREIGN_FDS = """
import asyncio, os, sys
import asyncio_bridge as ab
async def go(fn, fd, t):
    async with asyncio.timeout(0.05):
        await fn(fd, timeout=t)
for fd in range(3, 40):
    for fn in (ab.wait_readable, ab.wait_writable):
        for t in (None, 0, 1e308, 0.01):
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(go(fn, fd, t))
            except (TimeoutError, OSError, ValueError):
                pass
            finally:
                loop.close()
print("survived")
"""


def test_foreign_fds(tmp_path, delivery):
    """Wait on every fd 3..39 of a process, whoever owns it (the loop's
    selector and self-pipe, the library's own eventfds), with loops made and
    closed in between: misuse, but it must fail clearly, not crash."""
    import subprocess
    import sys

    from .conftest import clean_env
    path = tmp_path / "foreign.py"
    path.write_text(FOREIGN_FDS)
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                          timeout=60, env=clean_env(delivery))
    assert proc.returncode == 0 and "survived" in proc.stdout, (
        f"exit {proc.returncode} (-11 is SIGSEGV): {proc.stderr[-2000:]}")


def test_closed_and_odd_fds(figure, tally, tmp_path):
    a, b = socket.socketpair()
    closed = a.fileno()
    a.close()
    with pytest.raises(OSError):
        run(lambda: ab.wait_readable(987))
    regular = open(tmp_path / "f", "w")
    outcomes = []
    for fd in (regular.fileno(),):
        try:
            run(lambda: ab.wait_writable(fd), timeout=0.5)
            outcomes.append("ready")
        except TimeoutError:
            outcomes.append("timeout")
        except OSError as exc:
            outcomes.append(f"OSError({exc.errno})")
    regular.close()
    b.close()
    figure(f"hypothesis: {SETTINGS.max_examples} examples per function group; "
           f"{tally}; wait_writable on a regular file: {outcomes}", **tally)


def test_other_loop_and_no_loop():
    loop_a = _loops[-1]
    op = ab.sleep(0.01, "a")
    fut = loop_a.run_until_complete(_send_first(op))
    loop_b = asyncio.new_event_loop()
    with pytest.raises(RuntimeError):
        loop_b.run_until_complete(_await(op))  # started on loop_a
    loop_b.close()
    loop_a.run_until_complete(asyncio.wait([fut]))

    seen = []

    def no_loop():
        op = ab.nop(1)
        try:
            op.send(None)
        except RuntimeError as exc:
            seen.append(str(exc))
        seen.append(asyncio.run(_await(ab.nop(2))))  # fine in a thread with its own loop

    t = threading.Thread(target=no_loop)
    t.start()
    t.join(5)
    assert len(seen) == 2 and seen[1] == 2, seen


async def _send_first(op):
    return op.send(None)


async def _await(op):
    return await op


def test_python_callback(testops):
    class Boom(Exception):
        pass

    def raises():
        raise Boom("sync")

    async def raises_later():
        raise Boom("async")

    forever = []

    async def never():
        forever.append(1)
        await asyncio.Event().wait()

    with pytest.raises(Boom):
        run(lambda: testops.call_python(raises))
    with pytest.raises(Boom):
        run(lambda: testops.call_python(raises_later))
    with pytest.raises(TypeError):
        run(lambda: testops.call_python(lambda: 42))  # not awaitable
    with pytest.raises(TypeError):
        run(lambda: testops.call_python(42))  # not callable
    with pytest.raises(TimeoutError):
        run(lambda: testops.call_python(never), timeout=0.1)
    assert forever == [1]
    assert run(lambda: testops.call_python(lambda: asyncio.sleep(0, "ok"))) == "ok"


@pytest.mark.parametrize("code,expected", [
    (-29999, RuntimeError), (-30100, RuntimeError), (-30500, RuntimeError),
    (-2**31, RuntimeError), (5, RuntimeError), (0, RuntimeError), (-1, PermissionError),
    (-4095, OSError), (-4096, RuntimeError), (-30001, ab.ForkError),
])
def test_unknown_error_codes(testops, code, expected):
    """ab_fail with 0 or a positive code is a misuse: AB_ESTATE, a RuntimeError."""
    with pytest.raises(expected) as info:
        run(lambda: testops.fail_with(code))
    assert str(info.value)
