"""asyncio_bridge: await native C work from asyncio without blocking the loop.

Native ops run as state machines on one libevent thread; a finished op
resolves its asyncio Future on the loop's own thread, with one wake-up per
burst of completions.  See README.md for the tour and docs/c-api.md for
writing ops in C.
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path

from . import _ext
from ._ext import Bridge, ForkError, Op, Stream, nop, sleep, stats, wait_readable, wait_writable

__all__ = [
    "Bridge",
    "ForkError",
    "Op",
    "Stream",
    "configure",
    "get_include",
    "nop",
    "sleep",
    "stats",
    "wait_readable",
    "wait_writable",
]

__version__ = "0.1.0"


def configure(
    *,
    delivery: str | None = None,
    workers: int | None = None,
    drain_budget: float | None = None,
    blocking_workers: int | None = None,
) -> dict[str, object]:
    """Set how results reach asyncio loops and how many pool threads run.

    delivery: "auto" (the faster path the loop supports), "add_reader" (an
    eventfd watched by the loop) or "call_soon_threadsafe"; it applies to
    loops that start using asyncio_bridge afterwards.  workers: the size of
    the native worker pool for computing (default: the CPU count).
    blocking_workers: the most threads of the pool for blocking calls
    (default 64; they start as calls wait for one).  drain_budget: how many
    seconds one delivery pass may hold the loop (default 0.002); a larger
    burst of results is delivered over several loop iterations.  Returns
    the settings in force.
    """
    return _ext.configure(
        delivery=delivery,
        workers=workers,
        drain_budget=drain_budget,
        blocking_workers=blocking_workers,
    )


def get_include() -> str:
    """The folder holding asyncio_bridge.h, for building extensions against it."""
    return str(Path(__file__).parent / "include")


def _configure_from_environment() -> None:
    delivery = os.environ.get("ASYNCIO_BRIDGE_DELIVERY")
    if delivery:
        try:
            _ext.configure(delivery=delivery)
        except ValueError as exc:
            raise ImportError(f"ASYNCIO_BRIDGE_DELIVERY: {exc}") from None


_configure_from_environment()
# Stop the engine before finalization: no native thread may call into
# Python once the interpreter starts tearing down.
atexit.register(_ext._shutdown)
# An idle library leaves no thread behind to fork (3.12+ warns about
# forking a multi-threaded process); the child gets a fresh engine.
os.register_at_fork(before=_ext._before_fork, after_in_child=_ext._after_fork_child)
