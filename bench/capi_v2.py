"""Benchmarks of C API version 2: waking an op from a foreign thread, and
native streams.

Waking: N ops, C workers each awaiting one op after another, each completed by one thread of the
extension's own (a stand-in for a vendor SDK's callback thread):
  * ab_op_signal      the op retains itself for the thread and awaits
                      ab_await_signal; the thread signals and releases
  * eventfd per op    the workaround before v2: an eventfd per op, written
                      by the thread, awaited with ab_await_fd
  * call_soon_threadsafe
                      the same C thread resolves each op's Future with
                      loop.call_soon_threadsafe(fut.set_result, None),
                      taking the GIL once per batch of requests
  * cst, Python thread
                      for reference: a Python thread doing the same (its
                      requests never leave Python)
Per op: wall time and the process's CPU time; for the native paths also the
engine's and the loop's wake-ups per op (from asyncio_bridge.stats()).

Streams: 100,000 lines written into a pipe by a thread, read by
  * asyncio_bridge stream, buffered (max_buffered=1024) and one at a time
    (max_buffered=1), with `async for`
  * asyncio's StreamReader.readline() on connect_read_pipe
  * a Python async generator fed by a thread that reads the pipe and hands
    each line over with call_soon_threadsafe
Per item: wall time and process CPU time.

Targets, as PASS/MISS lines (nothing asserts): the signal path costs less
per op than the eventfd workaround it replaces; the buffered stream costs
less per item than StreamReader.readline.  call_soon_threadsafe is shown
for reference: it needs the GIL on the library's thread, which then waits
for the loop to let go of it.

  python bench/capi_v2.py [--quick] [--loops asyncio,uvloop]
"""

import argparse
import asyncio
import os
import queue
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import asyncio_bridge as ab

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

HERE = Path(__file__).parent


def build_benchops():
    out = Path(tempfile.mkdtemp(prefix="abr_benchops-"))
    target = out / f"abr_benchops{sysconfig.get_config_var('EXT_SUFFIX')}"
    cmd = [os.environ.get("CC", "cc"), "-shared", "-fPIC", "-O2", "-Wall", "-Werror",
           f"-I{sysconfig.get_paths()['include']}", f"-I{ab.get_include()}",
           str(HERE / "abr_benchops.c"), "-o", str(target), "-pthread"]
    subprocess.run(cmd, check=True)
    sys.path.insert(0, str(out))
    import abr_benchops

    return abr_benchops


def new_loop(name):
    return uvloop.new_event_loop() if name == "uvloop" else asyncio.SelectorEventLoop()


def cpu_seconds():
    return time.process_time()  # every thread of the process


def timed(loop_name, coro_fn, *args):
    loop = new_loop(loop_name)
    try:
        c0, w0 = cpu_seconds(), time.perf_counter()
        result = loop.run_until_complete(coro_fn(*args))
        return time.perf_counter() - w0, cpu_seconds() - c0, result
    finally:
        loop.close()


# ---- waking -------------------------------------------------------------------


async def run_native(make, total, concurrency):
    async def worker():
        for _ in range(total // concurrency):
            await make()

    before = ab.stats()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    after = ab.stats()
    return {"engine_wakeups": after["engine_wakeups"] - before["engine_wakeups"],
            "loop_wakeups": after["wakeups"] - before["wakeups"]}


class ThreadCompleter:
    """A Python thread that resolves Futures with call_soon_threadsafe."""

    def __init__(self):
        self.q = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.main, daemon=True)
        self.thread.start()

    def main(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            loop, fut = item
            loop.call_soon_threadsafe(fut.set_result, None)

    def close(self):
        self.q.put(None)
        self.thread.join()


async def run_threadsafe(completer, total, concurrency):
    loop = asyncio.get_running_loop()
    put = completer.q.put

    async def worker():
        for _ in range(total // concurrency):
            fut = loop.create_future()
            put((loop, fut))
            await fut

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return None


async def run_c_threadsafe(ops, total, concurrency):
    loop = asyncio.get_running_loop()
    submit = ops.sdk_threadsafe

    async def worker():
        for _ in range(total // concurrency):
            fut = loop.create_future()
            submit(loop, fut)
            await fut

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return None


def bench_waking(ops, loops, total, concurrency, rounds):
    results = {}
    completer = ThreadCompleter()
    try:
        contenders = {
            "ab_op_signal": lambda: run_native(ops.sdk_signal, total, concurrency),
            "eventfd per op": lambda: run_native(ops.sdk_eventfd, total, concurrency),
            "call_soon_threadsafe": lambda: run_c_threadsafe(ops, total, concurrency),
            "cst, Python thread": lambda: run_threadsafe(completer, total, concurrency),
        }
        for loop_name in loops:
            for _ in range(rounds):  # interleaved, the best round kept
                for name, fn in contenders.items():
                    wall, cpu, extra = timed(loop_name, fn)
                    key = (loop_name, name)
                    best = results.get(key)
                    if best is None or wall < best["wall"]:
                        results[key] = {"wall": wall, "cpu": cpu, "extra": extra}
    finally:
        completer.close()
    print(f"\nWaking: {total} ops, {concurrency} in flight, completed by a foreign thread "
          f"(best of {rounds})")
    print(f"{'loop':8} {'contender':22} {'us/op':>8} {'cpu us/op':>10} {'engine wakeups/op':>18} "
          f"{'loop wakeups/op':>16}")
    for (loop_name, name), r in results.items():
        extra = r["extra"] or {}
        ew = extra.get("engine_wakeups")
        lw = extra.get("loop_wakeups")
        print(f"{loop_name:8} {name:22} {r['wall'] / total * 1e6:8.2f} "
              f"{r['cpu'] / total * 1e6:10.2f} "
              f"{(f'{ew / total:.4f}' if ew is not None else '-'):>18} "
              f"{(f'{lw / total:.4f}' if lw is not None else '-'):>16}")
    targets = []
    for loop_name in loops:
        sig = results[(loop_name, "ab_op_signal")]["wall"]
        o = results[(loop_name, "eventfd per op")]["wall"]
        targets.append((f"{loop_name}: ab_op_signal faster per op than an eventfd per op "
                        f"({sig / total * 1e6:.2f} vs {o / total * 1e6:.2f} us)", sig < o))
    return targets


# ---- streams ------------------------------------------------------------------


def make_lines(n):
    return b"".join(b"line %08d of the benchmark's stream\n" % i for i in range(n))


def writer(fd, data):
    with os.fdopen(fd, "wb", buffering=0) as f:
        view = memoryview(data)
        while view:
            n = f.write(view[:65536])
            view = view[n:]


def pipe_with_writer(data):
    r, w = os.pipe()
    os.set_blocking(r, False)
    t = threading.Thread(target=writer, args=(w, data), daemon=True)
    t.start()
    return r, t


async def read_native(ops, data, n, max_buffered):
    r, t = pipe_with_writer(data)
    count = 0
    try:
        async for _line in ops.lines(r, max_buffered):
            count += 1
    finally:
        t.join()
        os.close(r)
    return count


async def read_streamreader(data, n):
    r, t = pipe_with_writer(data)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**16)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(r, "rb", buffering=0))
    count = 0
    try:
        while await reader.readline():
            count += 1
    finally:
        t.join()
        transport.close()
    return count


async def read_thread_fed(data, n):
    r, t = pipe_with_writer(data)
    os.set_blocking(r, True)
    loop = asyncio.get_running_loop()
    q = asyncio.Queue()

    def feed():
        with os.fdopen(r, "rb") as f:
            for line in f:
                loop.call_soon_threadsafe(q.put_nowait, line)
        loop.call_soon_threadsafe(q.put_nowait, None)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()

    async def lines():
        while (line := await q.get()) is not None:
            yield line

    count = 0
    async for _line in lines():
        count += 1
    feeder.join()
    t.join()
    return count


def bench_streams(ops, loops, n, rounds):
    data = make_lines(n)
    contenders = {
        "stream, buffered (1024)": lambda: read_native(ops, data, n, 1024),
        "stream, one at a time (1)": lambda: read_native(ops, data, n, 1),
        "StreamReader.readline": lambda: read_streamreader(data, n),
        "async gen fed by a thread": lambda: read_thread_fed(data, n),
    }
    results = {}
    for loop_name in loops:
        for _ in range(rounds):
            for name, fn in contenders.items():
                wall, cpu, count = timed(loop_name, fn)
                if count != n:
                    raise SystemExit(f"{name} on {loop_name}: read {count} lines, not {n}")
                key = (loop_name, name)
                if key not in results or wall < results[key]["wall"]:
                    results[key] = {"wall": wall, "cpu": cpu}
    print(f"\nStreams: {n} lines of {len(data) // n} bytes from a pipe (best of {rounds})")
    print(f"{'loop':8} {'contender':28} {'us/item':>8} {'cpu us/item':>12}")
    for (loop_name, name), r in results.items():
        print(f"{loop_name:8} {name:28} {r['wall'] / n * 1e6:8.3f} {r['cpu'] / n * 1e6:12.3f}")
    targets = []
    for loop_name in loops:
        s = results[(loop_name, "stream, buffered (1024)")]["wall"]
        o = results[(loop_name, "StreamReader.readline")]["wall"]
        targets.append((f"{loop_name}: buffered stream below StreamReader.readline per item "
                        f"({s / n * 1e6:.3f} vs {o / n * 1e6:.3f} us)", s < o))
    return targets


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts, one round")
    parser.add_argument("--loops", default="asyncio,uvloop" if uvloop else "asyncio")
    args = parser.parse_args(argv)
    loops = args.loops.split(",")
    ops = build_benchops()
    ab.configure(delivery="add_reader")
    total = 20000 if args.quick else 100000
    rounds = 1 if args.quick else 3
    targets = bench_waking(ops, loops, total, 1000, rounds)
    targets += bench_streams(ops, loops, 20000 if args.quick else 100000, rounds)
    print()
    for text, ok in targets:
        print(f"{'PASS' if ok else 'MISS'}  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
