"""How a loop's submits wake the engine (issue 11).

The first submit after a delivery wakes a sleeping engine at once; the rest
of a burst (every task one iteration resumed) leave the wake to a flush in
the loop's next iteration, so a burst wakes the engine once.  An owed wake
is never lost: the flush, or any other post (a cancel when the loop goes
away), pays it.
"""

import asyncio
import gc
import json
import time

import pytest
import uvloop

import asyncio_bridge as ab

from conftest import LOOP_FACTORIES


@pytest.mark.asyncio
async def test_a_burst_wakes_the_engine_about_once():
    await asyncio.gather(*(ab.nop() for _ in range(100)))  # warm: engine, bridge
    for _ in range(3):
        before = ab.stats()
        await asyncio.gather(*(ab.nop() for _ in range(1000)))
        after = ab.stats()
        assert after["completed"] - before["completed"] == 1000
        # One wake for the first op of the burst, one for the flush of the
        # rest (none if the engine was looking at its inbox); before issue
        # 11 it could be one per op that found the engine asleep.
        assert after["engine_wakeups"] - before["engine_wakeups"] <= 3, (before, after)
        assert after["wakeups"] - before["wakeups"] <= 4, (before, after)


@pytest.mark.asyncio
async def test_spins_that_keep_timing_out_stop():
    """Lone ops 300 us apart: a spin of the engine for the next post (50 us)
    would time out every time.  Before the spinner learnt, the engine spun
    after every op; it now backs off after two misses in a row, up to 64
    waits, and spins again only when a post comes soon (tests/c/test_spin.c
    has the rule itself).  Where no CPU is spare it never spins at all."""
    await ab.nop()
    before = ab.stats()
    n = 400
    for _ in range(n):
        end = time.perf_counter() + 300e-6
        while time.perf_counter() < end:
            pass
        await ab.nop()
    after = ab.stats()
    spins = after["engine_spins"] - before["engine_spins"]
    paid = after["engine_spins_paid"] - before["engine_spins_paid"]
    assert after["completed"] - before["completed"] == n
    assert 0 <= paid <= spins < n // 4, (spins, paid)


@pytest.mark.asyncio
async def test_the_first_op_after_a_delivery_starts_while_the_loop_blocks():
    await ab.nop()  # a delivery: the next submit is the first of its burst
    before = ab.stats()["completed"]
    op = ab.sleep(0.001)
    it = op.__await__()
    it.send(None)  # submitted; this loop now blocks without iterating
    end = time.monotonic() + 3
    while ab.stats()["completed"] == before and time.monotonic() < end:
        time.sleep(0.001)
    assert ab.stats()["completed"] == before + 1
    it.close()
    await asyncio.sleep(0.05)  # the drain finds the closed op and frees it
    del it, op
    gc.collect()


def _stop_before_the_flush(loop_name, results, delay):
    """Tasks submit in one iteration and the loop stops at its end, before
    the iteration that would flush their wake."""
    loop = LOOP_FACTORIES[loop_name]()

    async def one(i):
        results.append(await ab.sleep(delay, i))

    def start():
        tasks = [loop.create_task(one(i)) for i in range(20)]
        loop.call_soon(loop.stop)  # after the tasks' first steps
        start.tasks = tasks

    loop.call_soon(start)
    loop.run_forever()
    return loop, start.tasks


def test_an_owed_wake_survives_a_loop_that_stops_before_its_flush(loop_name):
    results = []
    loop, tasks = _stop_before_the_flush(loop_name, results, 0.01)
    try:
        assert ab.stats()["in_flight"] >= 1
        loop.run_until_complete(asyncio.wait_for(asyncio.gather(*tasks), 5))
        assert sorted(results) == list(range(20))
    finally:
        loop.close()


def test_an_owed_wake_is_paid_when_the_loop_closes_instead(loop_name):
    results = []
    loop, tasks = _stop_before_the_flush(loop_name, results, 0.2)
    assert ab.stats()["in_flight"] == 20
    for task in tasks:
        task._log_destroy_pending = False
    loop.close()  # the bridge lets go: its cancels pay the wake
    del tasks
    gc.collect()
    end = time.monotonic() + 3
    while ab.stats()["in_flight"] and time.monotonic() < end:
        time.sleep(0.01)
    assert ab.stats()["in_flight"] == 0


def _refusing_loop(loop_name, refusal, refusals):
    """A loop whose call_soon raises when asked to schedule the flush."""
    base = type(LOOP_FACTORIES[loop_name]())

    class RefusingFlush(base):
        refused = 0

        def call_soon(self, callback, *args, **kwargs):
            if getattr(callback, "__name__", "") == "_engine_flush" and self.refusals:
                self.refusals -= 1
                self.refused += 1
                raise refusal("no")
            return super().call_soon(callback, *args, **kwargs)

    loop = RefusingFlush()
    loop.refusals = refusals
    return loop


async def _second_submit_owes_the_wake(box):
    """Two submits with no delivery between them, the engine asleep before
    the second: the first wakes it at once, the second asks for a flush."""
    box["it1"] = ab.nop(1).__await__()
    box["f1"] = box["it1"].send(None)
    time.sleep(0.05)  # the engine takes the first op and sleeps again
    box["it2"] = ab.nop(2).__await__()
    box["f2"] = box["it2"].send(None)  # call_soon(flush) refused here
    await asyncio.sleep(0)


def _finish(loop, box):
    """Each op's value, once the loop has run and delivered it (the second
    op's Future may be out of reach: the interrupt came before its store)."""
    values = []
    for it in (box["it1"], box["it2"]):
        end = time.monotonic() + 5
        while True:
            loop.run_until_complete(asyncio.sleep(0.01))
            try:
                it.send(None)
            except StopIteration as stop:
                values.append(stop.value)
                break
            assert time.monotonic() < end, "the op never finished"
    return values


def test_a_loop_that_refuses_the_flush_still_gets_its_ops_done(loop_name):
    loop = _refusing_loop(loop_name, RuntimeError, 1000)
    box = {}
    try:
        loop.run_until_complete(_second_submit_owes_the_wake(box))
        assert loop.refused == 1  # the path was taken
        assert _finish(loop, box) == [1, 2]  # woken at once instead
    finally:
        loop.close()


def test_ctrl_c_inside_the_flush_scheduling_is_not_lost(loop_name):
    loop = _refusing_loop(loop_name, KeyboardInterrupt, 1)  # as one Ctrl-C
    box = {}
    try:
        with pytest.raises(KeyboardInterrupt):  # raised again, not lost
            loop.run_until_complete(_second_submit_owes_the_wake(box))
        assert loop.refused == 1
        assert _finish(loop, box) == [1, 2]
    finally:
        loop.close()
