"""Fixtures for bridge_example's tests, after asyncio_bridge's own suite.

Every async test runs on stdlib asyncio and on uvloop (pytest-asyncio's
loop-factory hook) and under both of asyncio_bridge's delivery paths, with a
debug-mode loop whose exception handler fails the test on anything it
reports.  After every test no native op is in flight and fetch holds no
socket open (for async tests checked while their loop still runs, since a
cancelled op's outcome travels back to its loop before it is freed).  Tests
that ask for `no_leaks` also find every op freed, every reference handed to
a foreign thread returned, and no fd left open.
"""

import asyncio
import collections
import gc
import os
import time

import pytest
import pytest_asyncio
import uvloop

import asyncio_bridge
import bridge_example

LOOP_FACTORIES = {
    "asyncio": asyncio.SelectorEventLoop,
    "uvloop": uvloop.new_event_loop,
}
DELIVERIES = ("call_soon_threadsafe", "add_reader")
SETTLE_SECONDS = 3.0


def pytest_asyncio_loop_factories(config, item):
    return LOOP_FACTORIES


@pytest.fixture(autouse=True, params=DELIVERIES)
def delivery(request):
    """The delivery path of the bridge this test's loop gets on its first op."""
    before = asyncio_bridge.configure()
    asyncio_bridge.configure(delivery=request.param)
    yield request.param
    asyncio_bridge.configure(delivery=before["delivery"])


def wait_settled(deadline=SETTLE_SECONDS):
    end = time.monotonic() + deadline
    stats = asyncio_bridge.stats()
    while stats["in_flight"] != 0 and time.monotonic() < end:
        time.sleep(0.01)
        stats = asyncio_bridge.stats()
    return stats


def assert_no_leaks(stats):
    assert stats["in_flight"] == 0, f"native ops leaked past the test: {stats}"
    assert bridge_example.open_sockets() == 0


@pytest.fixture(autouse=True)
def _guard(request):
    """Async tests: loop_errors checks for leaks while their loop still
    runs (a cancelled op's outcome travels back to its loop).  Sync tests:
    checked here."""
    if pytest_asyncio.is_async_test(request.node):
        request.getfixturevalue("loop_errors")
        yield
    else:
        yield
        assert_no_leaks(wait_settled())


@pytest_asyncio.fixture
async def loop_errors():
    """Debug mode and a recording exception handler; any report fails the test."""
    loop = asyncio.get_running_loop()
    errors = []
    loop.set_debug(True)
    loop.set_exception_handler(lambda loop, context: errors.append(context))
    # The loop's bridge (and its eventfd) exists from here on, so that fd
    # counts taken in the test see only what the test itself opens.
    await asyncio_bridge.nop()
    yield errors
    end = time.monotonic() + SETTLE_SECONDS
    while asyncio_bridge.stats()["in_flight"] and time.monotonic() < end:
        await asyncio.sleep(0.01)
    assert_no_leaks(asyncio_bridge.stats())
    await asyncio.sleep(0.01)
    assert not errors, f"the loop reported errors: {errors}"


@pytest.fixture
def settled():
    """Yield to the loop until no op is in flight; returns the stats."""

    async def settle(deadline=SETTLE_SECONDS):
        end = time.monotonic() + deadline
        stats = asyncio_bridge.stats()
        while stats["in_flight"] != 0 and time.monotonic() < end:
            await asyncio.sleep(0.01)
            stats = asyncio_bridge.stats()
        assert stats["in_flight"] == 0, f"ops still in flight: {stats}"
        return stats

    return settle


# ---- ops completed by foreign threads, streams: nothing held after a test ------

# Counters of bridge_example.counters() that are 0 when nothing is held: ops
# not yet freed, references held for glibc's callbacks, the SDK's queue.
HELD = ("resolve_live", "resolve_unreleased", "sdk_live", "sdk_queued", "sdk_busy", "lines_live")


def held():
    counters = bridge_example.counters()
    return {name: counters[name] for name in HELD if counters[name]}


def open_fds():
    """{fd: its kind ("socket", "pipe", "anon_inode:[eventfd]", a path)}.
    Without the inode: uvloop makes a new self-pipe socketpair for each run
    of the loop (a fixture's, the test's).  The fd that listdir itself used
    is gone by now."""
    gc.collect()  # sockets and iterators left as garbage close now, not later
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue
        fds[fd] = target.split(":[")[0] if target.startswith(("socket:", "pipe:")) else target
    return fds


def new_fds_since(before):
    """{fd: kind} of the kinds open more often now than in `before`.  Counted
    by kind, not by number: uvloop's new self-pipe for the teardown's run of
    the loop takes the lowest free fds, which move while another thread
    (glibc's getaddrinfo_a workers, finishing a cancelled lookup) holds a
    transient fd; then the same two sockets show up on new numbers."""
    now = open_fds()
    extra = collections.Counter(now.values()) - collections.Counter(before.values())
    return {fd: kind for fd, kind in now.items() if kind in extra}


@pytest_asyncio.fixture
async def no_leaks(loop_errors):
    """After the test, once its ops settled (a foreign thread may still hold
    a cancelled op for a while): no op in flight, none unfreed, no reference
    held for a callback, the SDK idle, and no new fd."""
    fds = open_fds()
    yield
    end = time.monotonic() + SETTLE_SECONDS
    while True:
        in_flight = asyncio_bridge.stats()["in_flight"]
        still_held = held()
        new_fds = new_fds_since(fds)
        if not (in_flight or still_held or new_fds) or time.monotonic() > end:
            break
        await asyncio.sleep(0.01)
    assert in_flight == 0, f"native ops in flight after the test: {in_flight}"
    assert not still_held, f"held after the test: {still_held}"
    assert not new_fds, f"fds left open: {new_fds}"


@pytest.fixture
def guard_v2(request):
    """Autouse it in a test module: `no_leaks` for async tests, the same
    counters (without a loop) for sync ones."""
    if pytest_asyncio.is_async_test(request.node):
        request.getfixturevalue("no_leaks")
        yield
        return
    yield
    end = time.monotonic() + SETTLE_SECONDS
    while held() and time.monotonic() < end:
        gc.collect()
        time.sleep(0.01)
    assert not held(), f"held after the test: {held()}"
