"""Fixtures for bridge_example's tests, after asyncio_bridge's own suite.

Every async test runs on stdlib asyncio and on uvloop (pytest-asyncio's
loop-factory hook) and under both of asyncio_bridge's delivery paths, with a
debug-mode loop whose exception handler fails the test on anything it
reports.  After every test no native op is in flight and fetch holds no
socket open (for async tests checked while their loop still runs, since a
cancelled op's outcome travels back to its loop before it is freed).
"""

import asyncio
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
