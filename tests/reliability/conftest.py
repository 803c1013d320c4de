"""Shared pieces of the reliability scenarios (issue 5).

Every test here is marked `reliability` and runs at a reduced count by
default, inside the main suite (`pytest tests`); ABR_FULL=1 runs the full
counts of the issue.  The fixtures of tests/conftest.py apply here too: each
test runs under both delivery paths, and in_flight must be 0 after it.

Each test reports its figure (iterations, ops, runs, what was seen) through
the `figure` fixture; with ABR_RESULTS=<file> set (tools/reliability.py sets
it) the figures and the outcomes are appended there as JSON lines, from
which the table in docs/reliability.md is made.
"""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import asyncio_bridge

FULL = os.environ.get("ABR_FULL", "") not in ("", "0")
HERE = Path(__file__).parent
RESULTS = os.environ.get("ABR_RESULTS")


def count(reduced, full):
    """The iteration count of a scenario: full with ABR_FULL=1."""
    return full if FULL else reduced


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "reliability(number, name): a scenario of the reliability suite (issue 5)"
    )


def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in Path(item.fspath).parents and item.get_closest_marker("reliability") is None:
            module_mark = getattr(item.module, "SCENARIO", None)
            if module_mark is not None:
                item.add_marker(pytest.mark.reliability(*module_mark))


def _append(record):
    if RESULTS:
        with open(RESULTS, "a") as f:
            f.write(json.dumps(record) + "\n")


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        _append({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                 "duration": round(report.duration, 2),
                 "longrepr": str(report.longrepr)[-1500:] if report.failed else None})


@pytest.fixture
def figure(request):
    """figure(text, **numbers): what this test measured, for the table."""
    marker = request.node.get_closest_marker("reliability")

    def record(text, **numbers):
        print(f"[figure] {request.node.nodeid}: {text}")
        _append({"nodeid": request.node.nodeid, "figure": text, "numbers": numbers,
                 "scenario": list(marker.args) if marker else None, "full": FULL})

    return record


def in_flight():
    return asyncio_bridge.stats()["in_flight"]


def wait_in_flight_zero(deadline=3.0):
    """Seconds it took for in_flight to reach 0 (polling), or None."""
    start = time.monotonic()
    while time.monotonic() - start < deadline:
        if in_flight() == 0:
            return time.monotonic() - start
        time.sleep(0.005)
    return None


# Put at the top of every subprocess script.
PRELUDE = """\
import asyncio, gc, json, os, random, socket, sys, threading, time
import uvloop
import asyncio_bridge as ab

LOOP_NAME = sys.argv[1]

def new_loop():
    return uvloop.new_event_loop() if LOOP_NAME == "uvloop" else asyncio.SelectorEventLoop()

def settle(deadline=3.0):
    end = time.monotonic() + deadline
    while ab.stats()["in_flight"] and time.monotonic() < end:
        time.sleep(0.005)
    return ab.stats()["in_flight"]
"""


def clean_env(delivery, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONDEV")}
    env.pop("PYTHONWARNINGS", None)
    env["ASYNCIO_BRIDGE_DELIVERY"] = delivery
    env.update(extra)
    return env


@pytest.fixture
def script(tmp_path, delivery):
    """script(source) -> path of PRELUDE + source; run it with run_script."""
    n = [0]

    def make(source):
        n[0] += 1
        path = tmp_path / f"scenario_{n[0]}.py"
        path.write_text(PRELUDE + textwrap.dedent(source))
        return path

    return make


@pytest.fixture
def run_script(tmp_path, delivery):
    """run_script(path, loop_name, *args, timeout) -> CompletedProcess with
    .wall (seconds); the subprocess uses this test's delivery path."""

    def run(path, loop_name, *args, timeout=30.0, env=None):
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, str(path), loop_name, *map(str, args)],
            capture_output=True, text=True, timeout=timeout,
            env=clean_env(delivery, **(env or {})), cwd=tmp_path,
        )
        proc.end = time.monotonic()
        proc.wall = proc.end - start
        return proc

    return run
