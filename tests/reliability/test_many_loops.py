"""Scenario 5: many loops.

16 threads, each with its own loop (half asyncio, half uvloop), each
running 1,000 ops (nops and zero sleeps, 100 at a time) whose results name
the thread; every result must come back to the coroutine that awaited it,
resumed on its own thread and loop.  Then 50 short-lived loops in a row
(asyncio.run), alternating the two loop kinds, each running a few ops: a new
loop may reuse a dead one's address, which must not find the dead bridge.
Pass: every result right, every thread done within 60 s (no deadlock),
in_flight 0 after.
"""

import asyncio
import threading

import uvloop

import asyncio_bridge as ab

from .conftest import count, wait_in_flight_zero

SCENARIO = (5, "Many loops")


async def worker(tid, n):
    loop = asyncio.get_running_loop()
    wrong = 0
    for base in range(0, n, 100):
        ops = [ab.nop((tid, i)) if i % 2 else ab.sleep(1e-6, result=(tid, i))
               for i in range(base, min(base + 100, n))]
        got = await asyncio.gather(*ops)
        wrong += sum(g != (tid, i) for i, g in zip(range(base, base + 100), got))
        if asyncio.get_running_loop() is not loop or threading.get_ident() != tid:
            wrong += 1
    return wrong


async def short(k):
    return await asyncio.gather(ab.nop(k), ab.sleep(1e-6, k), ab.nop(k))


def test_many_loops(figure):
    threads_n, ops_n, short_n = 16, count(1000, 1000), 50
    results, errors = {}, []

    def run(k):
        tid = threading.get_ident()
        loop = uvloop.new_event_loop() if k % 2 else asyncio.SelectorEventLoop()
        try:
            results[k] = loop.run_until_complete(worker(tid, ops_n))
        except BaseException as exc:  # reported below
            errors.append(repr(exc))
        finally:
            loop.close()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    hung = sum(t.is_alive() for t in threads)

    short_wrong = 0
    for k in range(short_n):
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop if k % 2 else None)
        with runner:
            got = runner.run(short(k))
        short_wrong += got != [k, k, k]
    settled = wait_in_flight_zero()
    wrong = sum(results.values())
    figure(f"{threads_n} threads x {ops_n} ops on their own loops, then {short_n} short-lived "
           f"loops: wrong results {wrong + short_wrong}, errors {len(errors)}, hung {hung}",
           ops=threads_n * ops_n, wrong=wrong + short_wrong, hung=hung)
    assert hung == 0, "deadlock: threads still running after 60 s"
    assert not errors, errors
    assert len(results) == threads_n and wrong == 0 and short_wrong == 0
    assert settled is not None
