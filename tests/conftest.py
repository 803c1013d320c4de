"""Fixtures shared by the Python tests.

Every async test runs on stdlib asyncio and on uvloop (through
pytest-asyncio's loop-factory hook) and under both delivery paths (the
autouse `delivery` fixture), with a debug-mode loop whose exception handler
fails the test on anything it reports.  After every test no native op may
remain in flight.
"""

import asyncio
import os
import socket
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import pytest
import pytest_asyncio
import uvloop

import asyncio_bridge

LOOP_FACTORIES = {
    "asyncio": asyncio.SelectorEventLoop,
    "uvloop": uvloop.new_event_loop,
}
DELIVERIES = ("call_soon_threadsafe", "add_reader")

# The native release of a cancelled op travels engine -> bridge, and after a
# loop closed with call_soon_threadsafe delivery it waits for the courier's
# poll (every 0.25 s).
SETTLE_SECONDS = 3.0

# Put at the top of every subprocess script: the loop named by argv[1].
SCRIPT_PRELUDE = """\
import asyncio, json, os, socket, sys, time
import uvloop
import asyncio_bridge as ab

LOOP_NAME = sys.argv[1]

def new_loop():
    if LOOP_NAME == "uvloop":
        return uvloop.new_event_loop()
    return asyncio.SelectorEventLoop()

def settle(deadline=3.0):
    end = time.monotonic() + deadline
    while ab.stats()["in_flight"] and time.monotonic() < end:
        time.sleep(0.01)
    return ab.stats()
"""


def pytest_asyncio_loop_factories(config, item):
    return LOOP_FACTORIES


@pytest.fixture(autouse=True, params=DELIVERIES)
def delivery(request, monkeypatch):
    """The delivery path for bridges created during this test.

    A test's loop is created after this fixture and its bridge on the first
    op it awaits, so that bridge uses this path.  Subprocesses inherit it
    through the environment variable.
    """
    before = asyncio_bridge.configure()
    asyncio_bridge.configure(delivery=request.param)
    monkeypatch.setenv("ASYNCIO_BRIDGE_DELIVERY", request.param)
    yield request.param
    asyncio_bridge.configure(delivery=before["delivery"])


@pytest.fixture(autouse=True)
def no_ops_in_flight():
    """Nothing leaks: every op a test started is freed after it.

    in_flight must return to 0.  If an earlier test already leaked (and
    failed for it), this one only fails if it leaks more, so that one leak
    is reported once rather than by every later test.
    """
    leaked_before = asyncio_bridge.stats()["in_flight"]
    yield
    end = time.monotonic() + SETTLE_SECONDS
    stats = asyncio_bridge.stats()
    while stats["in_flight"] > 0 and time.monotonic() < end:
        if leaked_before and stats["in_flight"] <= leaked_before:
            break
        time.sleep(0.01)
        stats = asyncio_bridge.stats()
    assert stats["in_flight"] <= leaked_before, f"native ops leaked past the test: {stats}"


@pytest.fixture(autouse=True)
def _guard_async_tests(request):
    if pytest_asyncio.is_async_test(request.node):
        request.getfixturevalue("loop_errors")


@pytest_asyncio.fixture
async def loop_errors():
    """Debug mode (it raises on calls from a wrong thread) and a loop
    exception handler that records; the test fails if anything was recorded.
    A test that expects reports may pop them from the returned list."""
    loop = asyncio.get_running_loop()
    errors = []
    loop.set_debug(True)
    loop.set_exception_handler(lambda loop, context: errors.append(context))
    yield errors
    await asyncio.sleep(0.01)
    assert not errors, f"the loop reported errors: {errors}"


@pytest.fixture
def settled():
    """Async poll, yielding to the loop, until in_flight returns to 0 (or to
    what an earlier, already failed, test leaked)."""
    leaked_before = asyncio_bridge.stats()["in_flight"]

    async def settle(deadline=SETTLE_SECONDS):
        end = time.monotonic() + deadline
        stats = asyncio_bridge.stats()
        while stats["in_flight"] > leaked_before and time.monotonic() < end:
            await asyncio.sleep(0.01)
            stats = asyncio_bridge.stats()
        assert stats["in_flight"] <= leaked_before, f"ops still in flight: {stats}"
        return stats

    return settle


@pytest.fixture(params=sorted(LOOP_FACTORIES))
def loop_name(request):
    """For sync tests that run loops themselves."""
    return request.param


@pytest.fixture
def new_loop(loop_name):
    return LOOP_FACTORIES[loop_name]


@pytest.fixture
def run_script(tmp_path, delivery, loop_name):
    """Run SCRIPT_PRELUDE + source in a fresh interpreter (no -X dev) with
    this test's loop and delivery; returns the CompletedProcess with a
    `wall` attribute (seconds).  prelude=False runs source alone (for
    what must happen before asyncio_bridge is imported)."""

    def run(source, *, timeout=15.0, env=None, prelude=True):
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONDEV")}
        environ.pop("PYTHONWARNINGS", None)
        environ["ASYNCIO_BRIDGE_DELIVERY"] = delivery
        environ.update(env or {})
        script = tmp_path / "script.py"
        script.write_text((SCRIPT_PRELUDE if prelude else "") + textwrap.dedent(source))
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, str(script), loop_name],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=environ,
            cwd=tmp_path,
        )
        proc.wall = time.monotonic() - start
        return proc

    return run


@pytest.fixture
def sock_pair():
    """A connected socket pair, closed after the test."""
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def build_extension(out, name, source, include):
    """Compile one test extension as a third-party module is built (only
    the headers of `include`, nothing of asyncio_bridge linked) and import
    it."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    target = out / f"{name}{suffix}"
    cc = os.environ.get("CC", "cc")
    cmd = [cc, "-shared", "-fPIC", "-O1", "-g", "-Wall", "-Werror",
           f"-I{sysconfig.get_paths()['include']}", f"-I{include}",
           str(source), "-o", str(target), "-pthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"cannot build {name}: {' '.join(cmd)}\n{proc.stderr}"
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    return __import__(name)


@pytest.fixture(scope="session")
def testops(tmp_path_factory):
    """The abr_testops extension (abr_testops.c), compiled against the
    installed headers exactly as a third-party extension is."""
    return build_extension(tmp_path_factory.mktemp("testops"), "abr_testops",
                           Path(__file__).parent / "reliability" / "abr_testops.c",
                           asyncio_bridge.get_include())


@pytest.fixture(scope="session")
def v2ops(tmp_path_factory):
    """tests/capi/abr_v2ops.c, against a copy of the version-2 headers: a
    module built for version 2 runs unchanged with a later library."""
    here = Path(__file__).parent / "capi"
    return build_extension(tmp_path_factory.mktemp("v2ops"), "abr_v2ops",
                           here / "abr_v2ops.c", here / "v2_include")


@pytest.fixture(scope="session")
def v3ops(tmp_path_factory):
    """tests/capi/abr_v3ops.c, against a copy of the version-3 headers: a
    module built for version 3 runs unchanged with a later library."""
    here = Path(__file__).parent / "capi"
    return build_extension(tmp_path_factory.mktemp("v3ops"), "abr_v3ops",
                           here / "abr_v3ops.c", here / "v3_include")


@pytest.fixture(scope="session")
def v1ops(tmp_path_factory):
    """tests/capi/abr_v1ops.c, against a copy of the version-1 headers."""
    here = Path(__file__).parent / "capi"
    return build_extension(tmp_path_factory.mktemp("v1ops"), "abr_v1ops",
                           here / "abr_v1ops.c", here / "v1_include")
