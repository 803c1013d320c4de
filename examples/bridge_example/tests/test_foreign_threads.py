"""resolve and sdk_call: ops that a thread of someone else's completes
(C API v2: ab_op_retain, ab_op_signal from any thread, ab_await_signal).

resolve's callback runs on a thread glibc creates; sdk_call's on the one
thread of a simulated vendor SDK.  Each test ends with every op freed and
every reference handed to those threads returned (guard_v2 in conftest)."""

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time

import pytest

import asyncio_bridge
import bridge_example as bx

pytestmark = pytest.mark.usefixtures("guard_v2")


def count(name):
    return bx.counters()[name]


async def until(predicate, deadline=5.0):
    """Yield to the loop until predicate() holds; fails after deadline."""
    end = time.monotonic() + deadline
    while not predicate():
        assert time.monotonic() < end, "timed out waiting"
        await asyncio.sleep(0.001)


def block_loop_until(predicate, deadline=5.0):
    """Block the loop (nothing is delivered meanwhile) until predicate()."""
    end = time.monotonic() + deadline
    while not predicate():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.001)


# ---- resolve --------------------------------------------------------------------


def stdlib_lookup(host, port=None):
    return [
        (family, sockaddr[0], sockaddr[1])
        for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    ]


@pytest.mark.asyncio
async def test_resolve_localhost():
    got = await bx.resolve("localhost")
    assert got
    assert {address for _, address, _ in got} <= {"127.0.0.1", "::1"}, got
    assert all(family in (socket.AF_INET, socket.AF_INET6) for family, _, _ in got)
    assert all(port == 0 for _, _, port in got)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "host, port",
    [
        ("localhost", None),
        ("localhost", "80"),
        ("127.0.0.1", "8080"),
        ("::1", "0"),
        ("10.1.2.3", None),
    ],
)
async def test_resolve_matches_socket_getaddrinfo(host, port):
    assert await bx.resolve(host, port) == stdlib_lookup(host, port)
    assert await bx.resolve(host, port=port, timeout=5) == stdlib_lookup(host, port)


@pytest.mark.asyncio
async def test_resolve_invalid_name_raises_gaierror_as_socket_does():
    name = "no-such-host.invalid"  # RFC 6761: never resolves
    with pytest.raises(socket.gaierror) as stdlib:
        socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    with pytest.raises(socket.gaierror) as ours:
        await bx.resolve(name)
    assert ours.value.errno == stdlib.value.errno
    assert ours.value.args == stdlib.value.args


@pytest.mark.asyncio
async def test_resolve_unknown_service_raises_gaierror():
    with pytest.raises(socket.gaierror) as info:
        await bx.resolve("localhost", "no-such-service")
    assert info.value.errno == socket.EAI_SERVICE
    assert info.value.strerror


def test_resolve_checks_arguments():
    with pytest.raises(TypeError):
        bx.resolve(b"localhost")
    with pytest.raises(ValueError):
        bx.resolve("local\0host")
    with pytest.raises(ValueError, match="host is longer"):
        bx.resolve("a" * 2000)
    with pytest.raises(ValueError, match="port is longer"):
        bx.resolve("localhost", "p" * 100)
    with pytest.raises(TypeError):
        bx.resolve("localhost", 80)
    with pytest.raises(ValueError, match="NaN"):
        bx.resolve("localhost", None, float("nan"))
    assert count("resolve_live") == 0


def test_resolve_never_awaited_starts_no_lookup():
    callbacks = count("resolve_callbacks")
    with pytest.warns(RuntimeWarning, match="bridge_example.resolve' was never awaited"):
        op = bx.resolve("localhost")
        del op
    assert count("resolve_live") == 0
    time.sleep(0.05)
    assert count("resolve_callbacks") == callbacks


@pytest.mark.asyncio
async def test_many_lookups_at_once():
    expected = stdlib_lookup("localhost", "443")
    start = time.monotonic()
    results = await asyncio.gather(*(bx.resolve("localhost", "443") for _ in range(200)))
    elapsed = time.monotonic() - start
    assert results == [expected] * 200
    print(f"200 concurrent resolves: {elapsed * 1000:.1f} ms")


@pytest.mark.asyncio
async def test_resolve_cancelled_before_it_starts():
    callbacks = count("resolve_callbacks")
    task = asyncio.ensure_future(bx.resolve("localhost"))
    task.cancel()  # before the task's first step: the op is never submitted
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert count("resolve_callbacks") == callbacks


@pytest.mark.asyncio
async def test_resolve_cancelled_right_after_submit():
    task = asyncio.ensure_future(bx.resolve("localhost"))
    await asyncio.sleep(0)  # the task ran its first step: the op is submitted
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.asyncio
async def test_resolve_cancelled_after_the_callback_before_delivery():
    callbacks = count("resolve_callbacks")
    task = asyncio.ensure_future(bx.resolve("localhost"))
    await asyncio.sleep(0)  # submitted
    # The loop is blocked: glibc's callback fires, the op finishes on the
    # engine, and its outcome waits for the loop.
    block_loop_until(lambda: count("resolve_callbacks") == callbacks + 1)
    time.sleep(0.05)
    assert asyncio_bridge.stats()["in_flight"] >= 1  # not delivered yet
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The result is dropped; guard_v2 checks that the op (and its addrinfo
    # list, freed by dispose) went.


@pytest.mark.asyncio
async def test_zero_timeout_cancels_lookups_in_glibc():
    """A zero timeout fires before most lookups end: the step then calls
    gai_cancel, and every lookup either calls back or was dequeued."""
    before = bx.counters()
    expected = stdlib_lookup("localhost")
    n = 100
    outcomes = await asyncio.gather(
        *(bx.resolve("localhost", None, 0) for _ in range(n)), return_exceptions=True
    )
    timeouts = [o for o in outcomes if isinstance(o, TimeoutError)]
    assert all(o == expected or isinstance(o, TimeoutError) for o in outcomes), outcomes
    assert timeouts, "a zero timeout never beat a lookup"
    assert all("timed out" in str(o) for o in timeouts)
    await until(lambda: count("resolve_unreleased") == 0)
    after = bx.counters()
    answers = sum(after[k] - before[k] for k in ("gai_canceled", "gai_notcanceled", "gai_alldone"))
    assert answers == len(timeouts)
    callbacks = after["resolve_callbacks"] - before["resolve_callbacks"]
    canceled = after["gai_canceled"] - before["gai_canceled"]
    assert callbacks + canceled == n, (callbacks, canceled)
    print(
        f"{len(timeouts)}/{n} timed out; gai_cancel: {canceled} canceled, "
        f"{after['gai_notcanceled'] - before['gai_notcanceled']} running, "
        f"{after['gai_alldone'] - before['gai_alldone']} done"
    )


@pytest.mark.asyncio
async def test_resolve_cancelled_at_random_points():
    loop = asyncio.get_running_loop()
    rng = random.Random(5)
    expected = stdlib_lookup("localhost")
    tasks = [asyncio.ensure_future(bx.resolve("localhost")) for _ in range(200)]
    await asyncio.sleep(0)
    for task in tasks:
        loop.call_later(rng.random() * 0.004, task.cancel)
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(
        o == expected or isinstance(o, asyncio.CancelledError) for o in outcomes
    ), outcomes


@pytest.mark.asyncio
async def test_resolve_under_asyncio_timeout():
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0):
            await bx.resolve("localhost")


# ---- sdk_call ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_sdk_call_returns_value_after_delay():
    start = time.monotonic()
    assert await bx.sdk_call(0.1, 42) == 42
    assert 0.095 <= time.monotonic() - start < 1.0
    assert await bx.sdk_call(-1, -(2**63)) == -(2**63)  # a negative delay counts as 0
    assert await bx.sdk_call(0, 2**63 - 1) == 2**63 - 1


@pytest.mark.asyncio
async def test_sdk_serves_requests_in_order_on_one_thread():
    done = {}

    async def call(delay, value):
        result = await bx.sdk_call(delay, value)
        done[value] = time.monotonic()
        return result

    start = time.monotonic()
    assert await asyncio.gather(call(0.2, 1), call(0, 2)) == [1, 2]
    assert done[2] - start >= 0.19  # waited behind the first request
    assert done[1] <= done[2]


@pytest.mark.asyncio
async def test_1000_concurrent_sdk_calls():
    completed = count("sdk_completed")
    start = time.monotonic()
    results = await asyncio.gather(*(bx.sdk_call(0, i) for i in range(1000)))
    elapsed = time.monotonic() - start
    assert results == list(range(1000))
    assert count("sdk_completed") == completed + 1000
    print(f"1000 concurrent sdk_calls: {elapsed * 1000:.1f} ms")


def test_sdk_call_checks_arguments():
    with pytest.raises(ValueError, match="NaN"):
        bx.sdk_call(float("nan"), 1)
    with pytest.raises(TypeError):
        bx.sdk_call("soon", 1)
    with pytest.raises(ValueError, match="at most"):
        bx.sdk_call(4000, 1)
    with pytest.raises(OverflowError):
        bx.sdk_call(0, 2**63)
    assert count("sdk_live") == 0


@pytest.mark.asyncio
async def test_sdk_call_cancelled_before_it_starts():
    completed = count("sdk_completed")
    task = asyncio.ensure_future(bx.sdk_call(0, 1))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert count("sdk_completed") == completed


@pytest.mark.asyncio
async def test_sdk_call_cancelled_while_queued_leaves_the_queue():
    first = asyncio.ensure_future(bx.sdk_call(0.3, 1))
    await until(lambda: count("sdk_busy") == 1)
    second = asyncio.ensure_future(bx.sdk_call(0, 2))
    await until(lambda: count("sdk_queued") == 1)
    before = bx.counters()
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    # The task is cancelled at once; the engine resumes the step with the
    # cancel a moment later, and the step takes the request out.
    await until(lambda: count("sdk_removed") == before["sdk_removed"] + 1)
    after = bx.counters()
    assert after["sdk_queued"] == 0
    assert after["sdk_busy"] == 1  # the first is still being worked on
    del second
    # The step dropped the queue's reference: the cancelled op is freed now,
    # before the SDK thread is free again.
    await until(lambda: count("sdk_live") == 1)
    assert count("sdk_busy") == 1
    assert await first == 1
    assert count("sdk_completed") == before["sdk_completed"] + 1  # never ran the second


@pytest.mark.asyncio
async def test_sdk_call_cancelled_while_running_drops_the_result():
    before = bx.counters()
    task = asyncio.ensure_future(bx.sdk_call(0.3, 1))
    await until(lambda: count("sdk_busy") == 1)
    start = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - start < 0.2  # did not wait for the SDK
    await until(lambda: asyncio_bridge.stats()["in_flight"] == 0)
    del task
    # Only the SDK thread's reference is left: the op is freed on that
    # thread, by its ab_op_release, once the request is done.
    assert count("sdk_live") == 1
    await until(lambda: count("sdk_live") == 0)
    after = bx.counters()
    assert after["sdk_dropped"] == before["sdk_dropped"] + 1
    assert after["sdk_completed"] == before["sdk_completed"] + 1
    assert await bx.sdk_call(0, 7) == 7


@pytest.mark.asyncio
async def test_sdk_call_cancelled_after_completion_before_delivery():
    before = bx.counters()
    task = asyncio.ensure_future(bx.sdk_call(0, 5))
    await asyncio.sleep(0)  # submitted
    block_loop_until(lambda: count("sdk_completed") == before["sdk_completed"] + 1)
    time.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert count("sdk_dropped") == before["sdk_dropped"]  # it was done before the cancel


@pytest.mark.asyncio
async def test_sdk_call_under_wait_for():
    dropped = count("sdk_dropped")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(bx.sdk_call(0.2, 1), 0.05)
    await until(lambda: count("sdk_dropped") == dropped + 1)


@pytest.mark.asyncio
async def test_sdk_calls_cancelled_at_random_points():
    """Each request is completed by the SDK or removed from its queue."""
    loop = asyncio.get_running_loop()
    rng = random.Random(3)
    before = bx.counters()
    n = 300
    tasks = [asyncio.ensure_future(bx.sdk_call(0.001, i)) for i in range(n)]

    def submitted():
        c = bx.counters()
        return c["sdk_queued"] + c["sdk_busy"] + c["sdk_completed"] - before["sdk_completed"] == n

    await until(submitted)
    for task in tasks[::3]:
        loop.call_later(rng.random() * 0.3, task.cancel)
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(o == i or isinstance(o, asyncio.CancelledError) for i, o in enumerate(outcomes))
    await until(lambda: count("sdk_queued") == 0 and count("sdk_busy") == 0)
    after = bx.counters()
    removed = after["sdk_removed"] - before["sdk_removed"]
    completed = after["sdk_completed"] - before["sdk_completed"]
    assert removed + completed == n
    assert removed > 0
    cancelled = sum(isinstance(o, asyncio.CancelledError) for o in outcomes)
    assert cancelled >= removed


# ---- fork ------------------------------------------------------------------------

FORK_SCRIPT = r"""
import asyncio, json, os, signal, time, traceback, warnings
import asyncio_bridge
import bridge_example as bx
warnings.filterwarnings("ignore", "This process", DeprecationWarning)

def outcome(it):
    try:
        it.send(None)
    except StopIteration as stop:
        return ["value", stop.value]
    except BaseException as exc:
        return [type(exc).__name__, isinstance(exc, asyncio_bridge.ForkError)]
    return ["pending"]

async def start():
    it = bx.sdk_call(0.5, 1).__await__()
    return it, it.send(None)

async def new_calls():
    return await asyncio.gather(*(bx.sdk_call(0.01, i) for i in range(3)))

loop = asyncio.new_event_loop()
it, fut = loop.run_until_complete(start())
while bx.counters()["sdk_busy"] == 0:  # the SDK thread works on it
    time.sleep(0.001)
pid = os.fork()
if pid == 0:
    code = 1
    try:
        signal.alarm(10)  # a child whose SDK thread never comes back hangs
        loop.run_until_complete(asyncio.wait([fut], timeout=3))
        inherited = outcome(it)
        new = asyncio.new_event_loop().run_until_complete(new_calls())
        print(json.dumps({"inherited": inherited, "new": new}), flush=True)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)
_, status = os.waitpid(pid, 0)
loop.run_until_complete(asyncio.wait([fut], timeout=3))
print(json.dumps({"child_exit": os.waitstatus_to_exitcode(status), "parent": outcome(it),
                  "after": loop.run_until_complete(bx.sdk_call(0, 9))}))
"""


def test_fork_child_gets_a_fresh_sdk_thread(delivery):
    env = dict(os.environ, ASYNCIO_BRIDGE_DELIVERY=delivery)
    proc = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.stderr == "", proc.stderr
    assert proc.returncode == 0, proc.stdout
    child, parent = (json.loads(line) for line in proc.stdout.splitlines())
    assert child == {"inherited": ["ForkError", True], "new": [0, 1, 2]}
    assert parent == {"child_exit": 0, "parent": ["value", 1], "after": 9}
