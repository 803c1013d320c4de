"""Scenario 1: cancellation racing completion.

Each iteration gets a fresh loop in debug mode, with an exception handler
that records.  On it, a native sleep of T is cancelled at a random moment in
[0.99 T, 1.01 T] (measured from when the awaiting task starts, so the cancel
lands where the timer fires and the result is delivered), then the same
sleep runs under asyncio.timeout at 0.5 T, T and 2 T.  Pass: the handler
never fires, no InvalidStateError anywhere, in_flight == 0 after each
iteration.  Both outcomes of the race must be seen, or the race was not hit.
"""

import asyncio
import collections
import random

import pytest
import uvloop

import asyncio_bridge as ab

from .conftest import count, in_flight

SCENARIO = (1, "Cancel races")
T = 0.004
LOOPS = {"asyncio": asyncio.SelectorEventLoop, "uvloop": uvloop.new_event_loop}


async def settle(deadline=2.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while in_flight() and loop.time() < end:
        await asyncio.sleep(0.001)
    return in_flight()


async def cancel_race(rng, tally):
    loop = asyncio.get_running_loop()

    async def victim():
        loop.call_later(rng.uniform(0.99 * T, 1.01 * T), task.cancel)
        return await ab.sleep(T, result="done")

    before = ab.stats()["completed"]
    task = loop.create_task(victim())
    try:
        assert await task == "done"
        tally["cancel_lost"] += 1
    except asyncio.CancelledError:
        assert task.cancelled()
        tally["cancel_won"] += 1
        await settle()
        # The timer had fired on the engine when the cancel arrived: the
        # result was on its way and must have been dropped.
        if ab.stats()["completed"] > before:
            tally["cancel_won_native_done"] += 1


async def timeout_race(factor, tally):
    try:
        async with asyncio.timeout(factor * T):
            assert await ab.sleep(T, result="done") == "done"
        tally[f"timeout_{factor:g}T_completed"] += 1
    except TimeoutError:
        tally[f"timeout_{factor:g}T_fired"] += 1


async def iteration(rng, tally):
    await cancel_race(rng, tally)
    for factor in (0.5, 1.0, 2.0):
        await timeout_race(factor, tally)
    return await settle()


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_cancel_races(loop_name, figure):
    iterations = count(100, 1000)
    rng = random.Random(1)
    tally = collections.Counter()
    reports, leaks = [], []
    for i in range(iterations):
        loop = LOOPS[loop_name]()
        loop.set_debug(True)
        loop.slow_callback_duration = 1.0  # a 2-core CI box is slow; not an error
        loop.set_exception_handler(lambda loop, ctx: reports.append(ctx))
        try:
            left = loop.run_until_complete(iteration(rng, tally))
        finally:
            loop.close()
        if left:
            leaks.append((i, left))
    figure(
        f"{iterations} iterations x 4 races (cancel at [0.99T,1.01T]; timeout 0.5T, T, 2T), "
        f"T={T * 1e3:g} ms: {dict(sorted(tally.items()))}; "
        f"handler reports {len(reports)}, in_flight leaks {len(leaks)}",
        iterations=iterations, **tally, reports=len(reports),
    )
    assert not reports, f"the loop exception handler fired: {reports[:3]}"
    assert not leaks, f"in_flight != 0 after iterations (index, in_flight): {leaks[:10]}"
    # The race was hit: cancels that arrived after the native timer fired.
    assert tally["cancel_won_native_done"] > 0, tally
