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

from . import _ext, _resolver
from ._ext import Bridge, ForkError, Op, Stream, nop, sleep, wait_readable, wait_writable
from ._resolver import getaddrinfo, getnameinfo

__all__ = [
    "Bridge",
    "ForkError",
    "Op",
    "Stream",
    "configure",
    "get_include",
    "getaddrinfo",
    "getnameinfo",
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
    resolver: str | None = None,
    resolv_conf: str | os.PathLike[str] | None = None,
    hosts_file: str | os.PathLike[str] | None = None,
    nsswitch_conf: str | os.PathLike[str] | None = None,
) -> dict[str, object]:
    """Set how results reach asyncio loops and how many pool threads run.

    delivery: "auto" (the faster path the loop supports), "add_reader" (an
    eventfd watched by the loop) or "call_soon_threadsafe"; it applies to
    loops that start using asyncio_bridge afterwards.  workers: the size of
    the native worker pool for computing (default: the CPU count).
    blocking_workers: the most threads of the pool for blocking calls
    (default 64; they start as calls wait for one).  drain_budget: how many
    seconds one delivery pass may hold the loop (default 0.002); a larger
    burst of results is delivered over several loop iterations.

    resolver: who answers getaddrinfo's names: "auto" (the default: the
    system's nsswitch.conf decides between the hosts file plus evdns on the
    engine thread, and the system's getaddrinfo on the blocking pool),
    "evdns" or "system".  resolv_conf, hosts_file, nsswitch_conf: the files
    read for it (default: those in /etc); each is re-read when it changes.
    Returns the settings in force.
    """
    _resolver.check(resolver, resolv_conf, hosts_file, nsswitch_conf)
    out = _ext.configure(
        delivery=delivery,
        workers=workers,
        drain_budget=drain_budget,
        blocking_workers=blocking_workers,
    )
    out.update(_resolver.configure(resolver, resolv_conf, hosts_file, nsswitch_conf))
    return out


def stats() -> dict[str, int]:
    """Counters: ops submitted, completed, cancelled and in flight, wake-ups,
    pool queues and threads, and name lookups waiting (by resolver) and
    queries in flight (shared by the lookups of one name)."""
    out = _ext.stats()
    ev_wait, sys_wait, ev_q, sys_q = _ext._dns_stats()
    out["lookups_evdns"] = ev_wait
    out["lookups_system"] = sys_wait
    out["queries_evdns"] = ev_q
    out["queries_system"] = sys_q
    return out


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
os.register_at_fork(after_in_child=_resolver._reset_after_fork)
