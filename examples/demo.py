"""A short tour: native timers, fd waits and a burst of native ops, awaited
from asyncio while a Python ticker shows the loop never blocks."""

import asyncio
import socket
import time

import asyncio_bridge


async def ticker(stop: asyncio.Event) -> int:
    ticks = 0
    while not stop.is_set():
        await asyncio.sleep(0.01)
        ticks += 1
    return ticks


async def main() -> None:
    stop = asyncio.Event()
    tick_task = asyncio.create_task(ticker(stop))

    t0 = time.perf_counter()
    results = await asyncio.gather(*(asyncio_bridge.sleep(0.2, result=i) for i in range(10_000)))
    print(f"10,000 native sleeps of 0.2 s: {time.perf_counter() - t0:.3f} s, sum={sum(results)}")

    a, b = socket.socketpair()
    asyncio.get_running_loop().call_later(0.05, b.send, b"ping")
    await asyncio_bridge.wait_readable(a, timeout=1)
    print("socket became readable:", a.recv(4))
    try:
        await asyncio_bridge.wait_readable(a, timeout=0.05)
    except TimeoutError as exc:
        print("and then timed out, as asked:", exc)
    a.close()
    b.close()

    n = 100_000
    t0 = time.perf_counter()
    await asyncio.gather(*(asyncio_bridge.nop(i) for i in range(n)))
    dt = time.perf_counter() - t0
    print(f"{n:,} native round trips: {dt:.3f} s ({dt / n * 1e6:.2f} us each)")

    try:
        async with asyncio.timeout(0.1):
            await asyncio_bridge.sleep(3600)
    except TimeoutError:
        print("an hour-long native sleep, cancelled by asyncio.timeout after 0.1 s")

    stop.set()
    print("the loop ticked", await tick_task, "times meanwhile; stats:", asyncio_bridge.stats())


asyncio.run(main())
