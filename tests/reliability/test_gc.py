"""Scenario 8: garbage collection.

Ops and their tasks dropped mid-flight, in reference cycles, and collected
with gc.collect(); ops driven by hand whose Op object is dropped while the
native side runs; a finished op's weakref.  Pass: no crash, nothing in
gc.garbage, no "Task was destroyed but it is pending" (the loop's exception
handler records everything; a running loop owns its ops in flight, as it
owns its timers, so a task awaiting one is never collected under it), the dropped
tasks still finish, the native side freed (in_flight back to 0), and the
finished op's weakref dead after collection.
"""

import asyncio
import gc
import weakref

import pytest
import uvloop

import asyncio_bridge as ab

from .conftest import count

SCENARIO = (8, "Garbage collection")
LOOPS = {"asyncio": asyncio.SelectorEventLoop, "uvloop": uvloop.new_event_loop}


async def scenario(n):
    done = []
    # Tasks dropped mid-flight, each in a cycle with its own coroutine.
    for i in range(n):
        async def body(i=i):
            holder = {}
            holder["self"] = holder  # a cycle the collector must walk
            done.append(await ab.sleep(0.01, result=i))
        asyncio.ensure_future(body())
    gc.collect()
    # Hand-driven ops whose Op object is dropped while in flight.
    futs = []
    for i in range(n):
        op = ab.sleep(0.001 + 0.01 * (i % 3), result=i)
        futs.append(op.send(None))
        del op
    gc.collect()
    # A finished op: its weakref dies with it.
    op = ab.nop("x")
    ref = weakref.ref(op)
    assert await op == "x"
    del op
    gc.collect()
    refs_dead = ref() is None
    loop = asyncio.get_running_loop()
    end = loop.time() + 3
    while (len(done) < n or ab.stats()["in_flight"]) and loop.time() < end:
        await asyncio.sleep(0.005)
    gc.collect()
    return sorted(done) == list(range(n)), refs_dead, futs


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_gc(loop_name, figure):
    n = count(300, 3000)
    loop = LOOPS[loop_name]()
    reports = []
    loop.set_exception_handler(lambda loop, ctx: reports.append(ctx.get("message")))
    gc.collect()
    try:
        all_done, ref_dead, futs = loop.run_until_complete(scenario(n))
        dropped_states = {"cancelled" if f.cancelled() else "done" if f.done() else "pending"
                          for f in futs}
        del futs
        loop.run_until_complete(asyncio.sleep(0.05))
    finally:
        loop.close()
    gc.collect()
    left = ab.stats()["in_flight"]
    figure(f"{n} tasks dropped mid-flight in cycles + {n} Op objects dropped in flight + a "
           f"finished op's weakref: all tasks finished {all_done}, weakref dead {ref_dead}, "
           f"dropped ops' Futures {sorted(dropped_states)}, loop reports {len(reports)}, "
           f"gc.garbage {len(gc.garbage)}, in_flight {left}", ops=2 * n)
    assert not reports, reports[:5]
    assert all_done and ref_dead
    assert not gc.garbage
    assert left == 0
