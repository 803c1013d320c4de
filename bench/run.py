"""Benchmark asyncio_bridge against what users would otherwise do.

Run:  python bench/run.py --out bench-results            (full, a few minutes)
      python bench/run.py --out bench-results --quick    (smoke run, ~1 minute)

Every contender runs in this one process, on stdlib asyncio and on uvloop,
each run on a fresh event loop, contenders interleaved round by round so that
a noisy machine slows all of them alike; ratios are taken within a round and
the median over rounds is reported. Only the memory figures come from child
processes (see measure_memory_in_child): RSS is only honest in a process
whose heap has not been used before.

Writes DIR/results.json (every figure), DIR/chart.png, and prints a table.
Targets are printed as PASS/MISS; nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import importlib
import json
import os
import platform
import queue
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

from machine import cpu_model  # bench/machine.py: this script's folder is on sys.path

try:
    import uvloop
except ImportError:
    uvloop = None

BENCH_DIR = Path(__file__).resolve().parent

# The worker-pool op of the C API example extension (examples/, issue 3).
# This is the only place that names it: (module, awaitable-returning function).
POOL_EXAMPLE = ("bridge_example", "compress")

IN_FLIGHT = 1000
BATCH_LIMIT = 256
RUN_TIMEOUT_S = 120.0

TARGET_FLOOR_RATIO = 1.15
TARGET_EXECUTOR_SPEEDUP = 4.0
TARGET_THREAD_EACH_SPEEDUP = 2.0
TARGET_LATENCY_RATIO = 1.3
TARGET_NATIVE_BYTES = 300
TARGET_LAG_P99_MS = 2.0
# Issue 11, in every placement (as is, one CPU, every core busy).
TARGET_PLACED_RATIO = 1.15
TARGET_PLACED_LATENCY_RATIO = 1.5
# call_soon_threadsafe delivery's latency p50 (us) before issue 11's engine
# work, measured by this script at 3292b9a (--quick, this machine kind),
# per (placement, loop): the target is half of it.
CALL_SOON_THREADSAFE_P50_BEFORE: dict[tuple[str, str], float] = {
    ("as_is", "asyncio"): 40.1, ("as_is", "uvloop"): 37.6,
    ("one_cpu", "asyncio"): 28.3, ("one_cpu", "uvloop"): 26.4,
    ("all_busy", "asyncio"): 41.9, ("all_busy", "uvloop"): 28.1,
}


# --------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------

def bridge_status() -> tuple[object | None, str]:
    """The asyncio_bridge module if it offers nop(), else None and why not."""
    try:
        bridge = importlib.import_module("asyncio_bridge")
        bridge.nop, bridge.sleep, bridge.configure, bridge.stats
    except Exception as exc:  # noqa: BLE001 - any failure means "not built"
        return None, f"not available: asyncio_bridge not importable ({exc!r})"
    return bridge, "available"


def loop_factories() -> dict[str, object]:
    factories = {"asyncio": asyncio.new_event_loop}
    if uvloop is not None:
        factories["uvloop"] = uvloop.new_event_loop
    return factories


def machine_description(bridge) -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "uvloop": getattr(uvloop, "__version__", None),
        "asyncio_bridge": (getattr(bridge, "__version__", "present")
                           if bridge else None),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def percentile(sorted_values: list[float], q: float) -> float:
    index = round(q * (len(sorted_values) - 1))
    return sorted_values[index]


def run_on_fresh_loop(loop_name: str, coroutine_fn, *args):
    """Runs coroutine_fn(*args) on a brand-new loop, closed afterwards."""
    with asyncio.Runner(loop_factory=loop_factories()[loop_name]) as runner:
        return runner.run(
            asyncio.wait_for(coroutine_fn(*args), RUN_TIMEOUT_S))


# --------------------------------------------------------------------------
# Contenders: each turns "one op" into an awaitable for the same harness
# --------------------------------------------------------------------------

def trivial():
    return None


class Contender:
    """One way to await one op. setup/teardown run on the loop thread."""

    key = ""
    label = ""
    bridge = False

    def unavailable(self) -> str | None:
        return None

    async def setup(self, loop) -> None:
        self.loop = loop

    async def teardown(self) -> None:
        pass

    def op(self):
        raise NotImplementedError


class Floor(Contender):
    """The loop resolves the futures itself, all pending in one pass."""

    key, label = "floor", "floor (loop resolves, no thread)"

    async def setup(self, loop):
        self.loop = loop
        self.pending = []

    def op(self):
        future = self.loop.create_future()
        if not self.pending:
            self.loop.call_soon(self._resolve_pending)
        self.pending.append(future)
        return future

    def _resolve_pending(self):
        pending, self.pending = self.pending, []
        for future in pending:
            future.set_result(None)


class RunInExecutor(Contender):
    key, label = "run_in_executor", "loop.run_in_executor(None, f)"

    def op(self):
        return self.loop.run_in_executor(None, trivial)


class ToThread(Contender):
    key, label = "to_thread", "asyncio.to_thread(f)"

    def op(self):
        return asyncio.to_thread(trivial)


class ThreadContender(Contender):
    """A Python thread that takes futures from a queue and resolves them.

    It calls future.set_result directly, without the cancelled check a real
    bridge needs: the benchmark never cancels, and this favours the contender.
    """

    async def setup(self, loop):
        self.loop = loop
        self.queue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    async def teardown(self):
        self.queue.put(None)
        await asyncio.to_thread(self.thread.join)

    def op(self):
        future = self.loop.create_future()
        self.queue.put(future)
        return future


class ThreadEach(ThreadContender):
    key, label = "thread_each", "thread, call_soon_threadsafe per op"

    def serve(self):
        get, call = self.queue.get, self.loop.call_soon_threadsafe
        while (future := get()) is not None:
            call(future.set_result, None)


def resolve_all(futures):
    for future in futures:
        future.set_result(None)


class ThreadBatched(ThreadContender):
    key, label = "thread_batch", f"thread, batches of <={BATCH_LIMIT}"

    def serve(self):
        get, get_nowait = self.queue.get, self.queue.get_nowait
        call = self.loop.call_soon_threadsafe
        while (future := get()) is not None:
            batch = [future]
            while len(batch) < BATCH_LIMIT:
                try:
                    future = get_nowait()
                except queue.Empty:
                    break
                if future is None:
                    self.queue.put(None)
                    break
                batch.append(future)
            call(resolve_all, batch)


class BridgeNop(Contender):
    bridge = True

    def __init__(self, bridge, delivery):
        self.module = bridge
        self.delivery = delivery
        self.key = f"bridge_{delivery}"
        self.label = f"asyncio_bridge.nop ({delivery})"
        self.stats_delta = None

    def unavailable(self):
        return None if self.module else "not available"

    async def setup(self, loop):
        self.loop = loop
        # Delivery applies to bridges created afterwards: this loop is fresh.
        self.module.configure(delivery=self.delivery)
        self.op = self.module.nop


def make_contenders(bridge) -> list[Contender]:
    return [Floor(), RunInExecutor(), ToThread(), ThreadEach(),
            ThreadBatched(), BridgeNop(bridge, "call_soon_threadsafe"),
            BridgeNop(bridge, "add_reader")]


# --------------------------------------------------------------------------
# Throughput and latency
# --------------------------------------------------------------------------

async def drive(op, total: int, in_flight: int) -> None:
    per_task = total // in_flight

    async def worker():
        for _ in range(per_task):
            await op()

    await asyncio.gather(*(worker() for _ in range(in_flight)))


def bridge_counters(contender) -> dict | None:
    return dict(contender.module.stats()) if contender.bridge else None


def counters_delta(before, after) -> dict | None:
    if before is None:
        return None
    return {key: after[key] - before[key] for key in
            ("submitted", "completed", "cancelled", "wakeups",
             "engine_wakeups")
            if key in before and key in after} | {
        "largest_batch": after.get("largest_batch"),
        "in_flight_after": after.get("in_flight")}


async def measure_throughput(contender, total: int) -> dict:
    """Microseconds per op with IN_FLIGHT tasks each awaiting one op."""
    await contender.setup(asyncio.get_running_loop())
    try:
        await drive(contender.op, 2 * IN_FLIGHT, IN_FLIGHT)
        gc.collect()
        before = bridge_counters(contender)
        start, start_cpu = time.perf_counter(), time.thread_time()
        start_proc = time.process_time()
        await drive(contender.op, total, IN_FLIGHT)
        elapsed = time.perf_counter() - start
        loop_cpu = time.thread_time() - start_cpu
        proc_cpu = time.process_time() - start_proc
        after = bridge_counters(contender)
    finally:
        await contender.teardown()
    ops = total // IN_FLIGHT * IN_FLIGHT
    # The loop thread's own CPU time per op: the part of the cost that the
    # loop pays itself, as against waiting for, or sharing a core with,
    # another thread; and the whole process's (every thread: loop, engine,
    # courier, pools), which is what the machine pays.
    return {"us_per_op": elapsed / ops * 1e6,
            "loop_cpu_us_per_op": loop_cpu / ops * 1e6,
            "proc_cpu_us_per_op": proc_cpu / ops * 1e6, "ops": ops,
            "bridge_stats": counters_delta(before, after)}


async def measure_latency(contender, round_trips: int) -> list[float]:
    """Round-trip times in microseconds, one op at a time."""
    await contender.setup(asyncio.get_running_loop())
    clock = time.perf_counter_ns
    samples = []
    try:
        for _ in range(100):
            await contender.op()
        gc.collect()
        for _ in range(round_trips):
            start = clock()
            await contender.op()
            samples.append((clock() - start) / 1000)
    finally:
        await contender.teardown()
    return samples


def interleaved_rounds(contenders, loops, rounds, log, measure,
                       each_round=None):
    """Calls measure(contender, loop_name) for every pair, round by round,
    rotating the order each round, and each_round() once per round;
    returns {(key, loop): [result|error]}."""
    results, failed = {}, set()
    for round_index in range(rounds):
        log(f"  round {round_index + 1}/{rounds}")
        if each_round is not None:
            each_round()
        shift = round_index % len(contenders)
        order = contenders[shift:] + contenders[:shift]
        loop_order = loops if round_index % 2 == 0 else loops[::-1]
        for loop_name in loop_order:
            for contender in order:
                pair = (contender.key, loop_name)
                if contender.unavailable() or pair in failed:
                    continue
                try:
                    outcome = measure(contender, loop_name)
                except Exception as exc:  # noqa: BLE001 - report, go on
                    outcome = {"error": f"{type(exc).__name__}: {exc}"}
                    failed.add(pair)
                    log(f"    {contender.label} on {loop_name}: "
                        f"{outcome['error']}")
                results.setdefault(pair, []).append(outcome)
    return results


def first_error(outcomes) -> str | None:
    for outcome in outcomes:
        if isinstance(outcome, dict) and "error" in outcome:
            return outcome["error"]
    return None


def summarize_throughput(contenders, loops, raw, rounds) -> dict:
    """Per (loop, contender): median us/op and median per-round ratios."""
    summary = {}
    for loop_name in loops:
        per_loop = summary.setdefault(loop_name, {})
        for contender in contenders:
            outcomes = raw.get((contender.key, loop_name))
            if contender.unavailable() or outcomes is None:
                per_loop[contender.key] = {
                    "status": contender.unavailable() or "not run"}
                continue
            if error := first_error(outcomes):
                per_loop[contender.key] = {"status": f"error: {error}"}
                continue
            values = [o["us_per_op"] for o in outcomes]
            per_loop[contender.key] = {
                "status": "ok",
                "us_per_op": statistics.median(values),
                "us_per_op_rounds": values,
                "loop_cpu_us_per_op": statistics.median(
                    o["loop_cpu_us_per_op"] for o in outcomes),
                "proc_cpu_us_per_op_rounds": [o["proc_cpu_us_per_op"]
                                              for o in outcomes],
                "proc_cpu_us_per_op": statistics.median(
                    o["proc_cpu_us_per_op"] for o in outcomes),
                "ops_per_round": outcomes[0]["ops"],
                "bridge_stats_rounds": [o["bridge_stats"] for o in outcomes
                                        if o["bridge_stats"]] or None,
            }
        for contender in contenders:
            row = per_loop[contender.key]
            if row["status"] != "ok":
                continue
            for ref_key, name in (("floor", "x_floor"),
                                  ("thread_batch", "x_thread_batch"),
                                  ("run_in_executor", "x_executor"),
                                  ("thread_each", "x_thread_each")):
                ref = per_loop.get(ref_key, {})
                if ref.get("status") == "ok":
                    ratios = [mine / theirs for mine, theirs in
                              zip(row["us_per_op_rounds"],
                                  ref["us_per_op_rounds"])]
                    row[name] = statistics.median(ratios)
            floor = per_loop.get("floor", {})
            if floor.get("status") == "ok":
                row["cpu_x_floor"] = statistics.median(
                    mine / theirs for mine, theirs in
                    zip(row["proc_cpu_us_per_op_rounds"],
                        floor["proc_cpu_us_per_op_rounds"]))
    return summary


def summarize_latency(contenders, loops, raw, c_rounds) -> dict:
    """Pooled percentiles per (loop, contender); the ratio to the C round
    trip is the median over rounds of (p50 this round / C p50 this round)."""
    c_p50s = [r.get("p50_us") for r in c_rounds]
    summary = {}
    for loop_name in loops:
        per_loop = summary.setdefault(loop_name, {})
        for contender in contenders:
            outcomes = raw.get((contender.key, loop_name))
            if contender.unavailable() or outcomes is None:
                per_loop[contender.key] = {
                    "status": contender.unavailable() or "not run"}
                continue
            if error := first_error(outcomes):
                per_loop[contender.key] = {"status": f"error: {error}"}
                continue
            samples = sorted(s for outcome in outcomes for s in outcome)
            round_p50s = [statistics.median(o) for o in outcomes]
            row = per_loop[contender.key] = {
                "status": "ok", "n": len(samples),
                "p50_us": percentile(samples, 0.50),
                "p99_us": percentile(samples, 0.99),
                "mean_us": statistics.fmean(samples),
                "min_us": samples[0],
                "p50_us_rounds": round_p50s,
            }
            ratios = [mine / c for mine, c in zip(round_p50s, c_p50s) if c]
            if ratios:
                row["p50_x_c_eventfd"] = statistics.median(ratios)
        executor = per_loop.get("run_in_executor", {})
        floor = per_loop.get("floor", {})
        for row in per_loop.values():
            if row["status"] == "ok" and executor.get("status") == "ok":
                row["p50_x_executor"] = row["p50_us"] / executor["p50_us"]
            if row["status"] == "ok" and floor.get("status") == "ok":
                # The floor's own round trip: a loop resolving its own
                # Future (call_soon), the cost no thread can undercut.
                row["p50_x_floor"] = statistics.median(
                    mine / theirs for mine, theirs in
                    zip(row["p50_us_rounds"], floor["p50_us_rounds"]))
    return summary


# --------------------------------------------------------------------------
# The C eventfd ping-pong: the physical floor of a cross-thread round trip
# --------------------------------------------------------------------------

def build_pingpong(build_dir: Path) -> tuple[Path | None, str]:
    """Compiles eventfd_pingpong.c; returns the binary, or None and why."""
    source = BENCH_DIR / "eventfd_pingpong.c"
    binary = build_dir / "eventfd_pingpong"
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None, "not available: no C compiler"
    build = subprocess.run(
        [compiler, "-O2", "-pthread", "-o", str(binary), str(source)],
        capture_output=True, text=True)
    if build.returncode != 0:
        return None, f"not available: build failed: {build.stderr}"
    return binary, "ok"


def run_pingpong(binary: Path, round_trips: int, mode: str = "free") -> dict:
    try:
        run = subprocess.run([str(binary), str(round_trips), mode],
                             capture_output=True, text=True,
                             timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"status": f"error: no answer in {RUN_TIMEOUT_S:.0f} s"}
    if run.returncode != 0:
        return {"status": f"error: {run.stderr.strip()}"}
    return {"status": "ok", **json.loads(run.stdout)}


def summarize_pingpong(free_rounds: list[dict], pinned: dict,
                       status: str) -> dict:
    """The scheduler may put the two threads on one CPU (a context switch,
    a few microseconds) or on two (a cross-CPU wake-up, far slower on a VM),
    and changes its mind from run to run: the free-placement figure is taken
    in every latency round, beside the contenders, and its median reported;
    the pinned variants show the two cases apart."""
    ok = [r for r in free_rounds if r.get("status") == "ok"]
    if not ok:
        return {"status": free_rounds[0]["status"] if free_rounds
                else status}
    return {"status": "ok", "mode": "free",
            "n": sum(r["n"] for r in ok),
            "p50_us": statistics.median(r["p50_us"] for r in ok),
            "p99_us": statistics.median(r["p99_us"] for r in ok),
            "rounds": free_rounds, "pinned": pinned}


# --------------------------------------------------------------------------
# Memory per in-flight op
# --------------------------------------------------------------------------

MEMORY_SLEEP_S = 3600.0


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
        "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_in_use() -> int | None:
    """Bytes the C heap has handed out, all arenas and mmapped blocks
    (glibc mallinfo2), or None where glibc is not the allocator."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _Mallinfo2
    info = mallinfo2()
    return info.uordblks + info.hblkhd


async def hold_sleepers(kind: str, count: int, use_tracemalloc: bool) -> dict:
    """Bytes gained with `count` sleeping tasks in flight.

    Two estimates of the native bytes per op, the larger one judged:
    - RSS counts everything the process touched: Python objects and the
      native side. tracemalloc counts only what goes through Python's
      allocators (the Task, the Future, the op object, coroutine frames). So
      RSS minus tracemalloc is what Python cannot see: the native op, its
      libevent timer, queue slots, plus the allocators' own slack. The same
      residual for plain asyncio.sleep tasks (no native side) measures that
      slack, and subtracting it leaves the native bytes.
    - The C heap in use (mallinfo2): lib/ and libevent allocate with malloc,
      while Python's small objects live in pymalloc arenas outside it. Its
      growth per op, minus the same growth for asyncio.sleep tasks (the list
      that holds the tasks, Python's few large blocks), is the native side.
    RSS and mallinfo come from a first pass, tracemalloc from a second one:
    tracemalloc's own trace records live in RSS and would inflate it.
    """
    bridge = importlib.import_module("asyncio_bridge") if kind == "bridge" \
        else None
    sleep = bridge.sleep if bridge else asyncio.sleep
    await sleep(0)  # start the engine and bridge before the baseline
    await asyncio.sleep(0.05)
    gc.collect()
    if use_tracemalloc:
        tracemalloc.start()
    before_rss, before_traced = rss_bytes(), tracemalloc.get_traced_memory()[0]
    before_malloc = malloc_in_use()
    tasks = [asyncio.ensure_future(sleep(MEMORY_SLEEP_S))
             for _ in range(count)]
    await asyncio.sleep(0)  # every task takes its first step and submits
    await asyncio.sleep(0.2)  # the engine arms every timer
    in_flight = bridge.stats()["in_flight"] if bridge else None
    gc.collect()
    after_rss, after_traced = rss_bytes(), tracemalloc.get_traced_memory()[0]
    after_malloc = malloc_in_use()
    if use_tracemalloc:
        tracemalloc.stop()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"rss_delta": after_rss - before_rss,
            "traced_delta": after_traced - before_traced,
            "malloc_delta": (after_malloc - before_malloc
                             if before_malloc is not None else None),
            "in_flight_seen": in_flight}


def memory_child(kind: str, loop_name: str, count: int) -> None:
    rss_pass = run_on_fresh_loop(loop_name, hold_sleepers, kind, count, False)
    traced_pass = run_on_fresh_loop(loop_name, hold_sleepers, kind, count,
                                    True)
    print(json.dumps({
        "count": count,
        "rss_bytes_per_op": rss_pass["rss_delta"] / count,
        "traced_bytes_per_op": traced_pass["traced_delta"] / count,
        "malloc_bytes_per_op": (rss_pass["malloc_delta"] / count
                                if rss_pass["malloc_delta"] is not None
                                else None),
        "in_flight_seen": rss_pass["in_flight_seen"],
    }))


def measure_memory_in_child(kind: str, loop_name: str, count: int) -> dict:
    """A fresh process per measurement: in this one, freed arenas from the
    earlier runs would absorb the new objects and RSS would not move."""
    try:
        child = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--memory-child",
             kind, loop_name, str(count)],
            capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"status": f"error: no answer in {RUN_TIMEOUT_S:.0f} s"}
    try:
        figures = json.loads(child.stdout)
    except ValueError:
        return {"status": f"error: exit {child.returncode}: "
                          f"{child.stderr.strip()[-500:]}"}
    if child.returncode != 0:
        # The figures were taken; the crash came later, and it is reported.
        figures["child_exit_code"] = child.returncode
    return {"status": "ok", **figures}


def measure_memory(loops, count, bridge_ok, log) -> dict:
    """Per loop: both kinds of sleeper, and the native bytes per op.

    The C-heap baseline is asyncio.sleep on the stdlib loop: uvloop's own
    timers live in the C heap (PyMem_RawMalloc), while asyncio_bridge.sleep
    uses none of the loop's timers on either loop."""
    summary = {}
    for loop_name in loops:
        log(f"  memory on {loop_name}")
        plain = measure_memory_in_child("asyncio", loop_name, count)
        if bridge_ok:
            native = measure_memory_in_child("bridge", loop_name, count)
        else:
            native = {"status": "not available"}
        summary[loop_name] = {"asyncio.sleep": plain,
                              "asyncio_bridge.sleep": native}
    stdlib_plain = summary.get("asyncio", {}).get("asyncio.sleep", {})
    for loop_name, entry in summary.items():
        plain, native = entry["asyncio.sleep"], entry["asyncio_bridge.sleep"]
        heap_base = stdlib_plain if stdlib_plain.get("status") == "ok" \
            else plain
        if plain["status"] == "ok" and native["status"] == "ok":
            slack = plain["rss_bytes_per_op"] - plain["traced_bytes_per_op"]
            residual = (native["rss_bytes_per_op"]
                        - native["traced_bytes_per_op"])
            entry["native_residual_bytes_per_op"] = residual
            entry["allocator_slack_bytes_per_op"] = slack
            entry["native_bytes_per_op_rss"] = residual - slack
            estimates = [residual - slack]
            if native.get("malloc_bytes_per_op") is not None:
                entry["native_bytes_per_op_malloc"] = (
                    native["malloc_bytes_per_op"]
                    - heap_base["malloc_bytes_per_op"])
                estimates.append(entry["native_bytes_per_op_malloc"])
            entry["native_bytes_per_op"] = max(estimates)
    return summary


# --------------------------------------------------------------------------
# Timers
# --------------------------------------------------------------------------

async def many_sleepers(sleep, count: int, delay: float) -> dict:
    clock = time.perf_counter
    await sleep(0)

    async def one():
        start = clock()
        await sleep(delay)
        return start, clock()

    gc.collect()
    begin = clock()
    pairs = await asyncio.gather(*(one() for _ in range(count)))
    wall = clock() - begin
    lateness = sorted(end - start - delay for start, end in pairs)
    last_start, last_end = max(pairs, key=lambda pair: pair[1])
    return {"wall_s": wall,
            "last_fired_late_ms": (last_end - last_start - delay) * 1e3,
            "worst_late_ms": lateness[-1] * 1e3,
            "p50_late_ms": percentile(lateness, 0.5) * 1e3,
            "early": sum(1 for late in lateness if late < 0)}


def measure_timers(loops, count, delay, rounds, bridge, log) -> dict:
    sleepers = {"asyncio.sleep": asyncio.sleep}
    if bridge:
        sleepers["asyncio_bridge.sleep"] = bridge.sleep
    raw = {}
    for round_index in range(rounds):
        for loop_name in loops:
            names = list(sleepers)
            if round_index % 2:
                names.reverse()
            for name in names:
                log(f"  timers round {round_index + 1}: {name} on {loop_name}")
                try:
                    outcome = run_on_fresh_loop(loop_name, many_sleepers,
                                                sleepers[name], count, delay)
                except Exception as exc:  # noqa: BLE001
                    outcome = {"error": f"{type(exc).__name__}: {exc}"}
                raw.setdefault((loop_name, name), []).append(outcome)
    summary = {}
    for loop_name in loops:
        per_loop = summary.setdefault(loop_name, {})
        for name in ("asyncio.sleep", "asyncio_bridge.sleep"):
            outcomes = raw.get((loop_name, name))
            if outcomes is None:
                per_loop[name] = {"status": "not available"}
            elif error := first_error(outcomes):
                per_loop[name] = {"status": f"error: {error}"}
            else:
                per_loop[name] = {"status": "ok", "count": count,
                                  "delay_s": delay, "rounds": outcomes} | {
                    key: statistics.median(o[key] for o in outcomes)
                    for key in outcomes[0]}
    return summary


# --------------------------------------------------------------------------
# Worker pool and loop lag
# --------------------------------------------------------------------------

def pool_payload() -> bytes:
    """64 KiB of word-like text: zlib takes about a millisecond on it."""
    rng = random.Random(1)
    words = [bytes(rng.choices(b"abcdefghijklmnop", k=rng.randint(2, 9)))
             for _ in range(500)]
    text = b" ".join(rng.choice(words) for _ in range(12000))
    return text[:65536]


def pool_example():
    """The example extension's compress op, or None and why it is missing."""
    module_name, function_name = POOL_EXAMPLE
    try:
        return getattr(importlib.import_module(module_name),
                       function_name), "available"
    except (ImportError, AttributeError) as exc:
        return None, (f"not measured: example extension not built "
                      f"({module_name}.{function_name}: {exc})")


async def ticker(stop: asyncio.Event, lags_ms: list) -> None:
    clock = time.perf_counter
    while not stop.is_set():
        start = clock()
        await asyncio.sleep(0.001)
        lags_ms.append((clock() - start - 0.001) * 1e3)


async def saturate(submit, total: int, in_flight: int) -> dict:
    """Runs `total` ops `in_flight` at a time while a 1 ms ticker runs."""
    stop, lags = asyncio.Event(), []
    tick_task = asyncio.create_task(ticker(stop, lags))
    await asyncio.sleep(0.01)
    lags.clear()
    start = time.perf_counter()
    if submit is not None:
        await drive(submit, total, in_flight)
    else:
        await asyncio.sleep(1.0)
    elapsed = time.perf_counter() - start
    stop.set()
    await tick_task
    lags.sort()
    return {"ops_per_s": total / elapsed if submit else None,
            "seconds": elapsed, "ticks": len(lags),
            "lag_p50_ms": percentile(lags, 0.5),
            "lag_p99_ms": percentile(lags, 0.99),
            "lag_max_ms": lags[-1]}


def measure_pool(loops, total, bridge, log) -> dict:
    payload = pool_payload()
    compress, example_status = pool_example()
    in_flight = 4 * (os.cpu_count() or 1)
    expected = zlib.compress(payload)

    def executor_zlib():
        return asyncio.get_running_loop().run_in_executor(
            None, zlib.compress, payload)

    def native_zlib():
        return compress(payload)

    workloads = {"idle (ticker alone)": None,
                 "run_in_executor(zlib.compress)": executor_zlib}
    summary = {"example": example_status, "payload_bytes": len(payload),
               "in_flight": in_flight, "total_ops": total}
    if compress is not None:
        workloads["asyncio_bridge pool (example zlib)"] = native_zlib
    for loop_name in loops:
        per_loop = summary.setdefault(loop_name, {})
        for name, submit in workloads.items():
            log(f"  pool: {name} on {loop_name}")
            try:
                per_loop[name] = {"status": "ok"} | run_on_fresh_loop(
                    loop_name, saturate, submit, total, in_flight)
            except Exception as exc:  # noqa: BLE001
                per_loop[name] = {"status": f"error: {type(exc).__name__}: "
                                            f"{exc}"}
        if compress is None:
            per_loop["asyncio_bridge pool (example zlib)"] = {
                "status": example_status}
    if compress is not None:
        summary["example_output_matches_zlib"] = _same_output(
            compress, payload, expected)
    return summary


# --------------------------------------------------------------------------
# Drain budget: how long one delivery pass may hold the loop
# --------------------------------------------------------------------------

DRAIN_BUDGETS = {"unbounded": 60.0, "8 ms": 0.008, "2 ms (default)": 0.002,
                 "0.5 ms": 0.0005}


async def burst_with_ticker(sleep, count: int) -> dict:
    """`count` tasks whose ops all finish at one moment (a shared deadline),
    with a 1 ms ticker on the loop: how long the burst takes to deliver and
    how late the ticker runs meanwhile."""
    loop = asyncio.get_running_loop()
    stop, lags = asyncio.Event(), []
    tick_task = asyncio.create_task(ticker(stop, lags))
    deadline = loop.time() + 0.3 + count * 20e-6  # every task made before it

    async def one(i):
        return await sleep(deadline - loop.time(), i)

    tasks = [asyncio.ensure_future(one(i)) for i in range(count)]
    await asyncio.sleep(max(deadline - loop.time() - 0.05, 0))
    lags.clear()
    results = await asyncio.gather(*tasks)
    delivered = loop.time() - deadline
    stop.set()
    await tick_task
    lags.sort()
    return {"ok": results == list(range(count)), "burst_ms": delivered * 1e3,
            "lag_p99_ms": percentile(lags, 0.99), "lag_max_ms": lags[-1],
            "ticks": len(lags)}


async def budget_throughput(nop, total: int) -> dict:
    start = time.perf_counter()
    await drive(nop, total, IN_FLIGHT)
    return {"us_per_op": (time.perf_counter() - start) / total * 1e6}


def measure_drain_budget(loops, bridge, rounds, burst, total, log) -> dict:
    if bridge is None:
        return {"status": "not available"}
    default = bridge.configure()["drain_budget"]
    raw = {}
    try:
        for round_index in range(rounds):
            names = list(DRAIN_BUDGETS)
            if round_index % 2:
                names.reverse()
            for loop_name in loops:
                for name in names:
                    bridge.configure(drain_budget=DRAIN_BUDGETS[name])
                    log(f"  drain budget round {round_index + 1}: {name} on {loop_name}")
                    row = run_on_fresh_loop(loop_name, burst_with_ticker, bridge.sleep,
                                            burst)
                    row |= run_on_fresh_loop(loop_name, budget_throughput, bridge.nop,
                                             total)
                    raw.setdefault((loop_name, name), []).append(row)
    finally:
        bridge.configure(drain_budget=default)
    summary = {"status": "ok", "burst": burst, "throughput_ops": total, "rounds": rounds}
    for (loop_name, name), rows in raw.items():
        summary.setdefault(loop_name, {})[name] = {
            "all_delivered": all(r["ok"] for r in rows),
            **{key: statistics.median(r[key] for r in rows)
               for key in ("burst_ms", "lag_p99_ms", "lag_max_ms", "us_per_op")}}
    return summary


def _same_output(compress, payload, expected) -> bool | str:
    try:
        produced = asyncio.run(_await(compress(payload)))
    except Exception as exc:  # noqa: BLE001
        return f"error: {exc!r}"
    return bytes(produced) == expected or zlib.decompress(produced) == payload


async def _await(awaitable):
    return await awaitable


# --------------------------------------------------------------------------
# Targets, table, chart
# --------------------------------------------------------------------------

def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def evaluate_targets(results) -> list[dict]:
    targets = []
    tput, lat = results["throughput"], results["latency"]

    def add(name, loop_name, figure, limit, ok):
        targets.append({"target": name, "loop": loop_name,
                        "figure": figure, "limit": limit,
                        "result": verdict(ok)})

    for loop_name, rows in tput.items():
        for key, row in rows.items():
            if not key.startswith("bridge_"):
                continue
            ok = row.get("status") == "ok"
            ratio = row.get("x_floor")
            add(f"{key}: throughput within {TARGET_FLOOR_RATIO}x of floor",
                loop_name, ratio, TARGET_FLOOR_RATIO,
                ratio <= TARGET_FLOOR_RATIO if ok and ratio else None)
            speedup = 1 / row["x_executor"] if ok and row.get(
                "x_executor") else None
            add(f"{key}: >= {TARGET_EXECUTOR_SPEEDUP}x faster than "
                f"run_in_executor", loop_name, speedup,
                TARGET_EXECUTOR_SPEEDUP,
                speedup >= TARGET_EXECUTOR_SPEEDUP if speedup else None)
            if loop_name == "asyncio":
                speedup = 1 / row["x_thread_each"] if ok and row.get(
                    "x_thread_each") else None
                add(f"{key}: >= {TARGET_THREAD_EACH_SPEEDUP}x faster than "
                    f"thread call_soon_threadsafe per op", loop_name, speedup,
                    TARGET_THREAD_EACH_SPEEDUP,
                    speedup >= TARGET_THREAD_EACH_SPEEDUP
                    if speedup else None)
    for loop_name, rows in lat.items():
        for key, row in rows.items():
            if not key.startswith("bridge_"):
                continue
            ratio = row.get("p50_x_c_eventfd")
            add(f"{key}: latency p50 within {TARGET_LATENCY_RATIO}x of C "
                f"eventfd round trip", loop_name, ratio, TARGET_LATENCY_RATIO,
                ratio <= TARGET_LATENCY_RATIO if ratio else None)
    for placement, entry in results.get("placements", {}).items():
        evaluate_placement(add, placement, entry)
    for loop_name, entry in results.get("memory", {}).items():
        native = entry.get("native_bytes_per_op")
        add(f"native bytes per in-flight op < {TARGET_NATIVE_BYTES}",
            loop_name, native, TARGET_NATIVE_BYTES,
            native < TARGET_NATIVE_BYTES if native is not None else None)
    for loop_name, rows in results.get("pool", {}).items():
        if not isinstance(rows, dict) or loop_name not in tput:
            continue
        row = rows.get("asyncio_bridge pool (example zlib)", {})
        p99 = row.get("lag_p99_ms") if row.get("status") == "ok" else None
        add(f"loop lag p99 < {TARGET_LAG_P99_MS} ms, pool saturated",
            loop_name, p99, TARGET_LAG_P99_MS,
            p99 < TARGET_LAG_P99_MS if p99 is not None else None)
    return targets


def evaluate_placement(add, placement, entry) -> None:
    """Issue 11's targets, in one placement, for each loop."""
    if entry.get("status") != "ok":
        return
    where = f"[{placement}] "
    for loop_name, rows in entry["throughput"].items():
        lrows = entry["latency"].get(loop_name, {})
        for key in ("bridge_add_reader", "bridge_call_soon_threadsafe"):
            row, lrow = rows.get(key, {}), lrows.get(key, {})
            ok = row.get("status") == "ok"
            ratio = row.get("x_floor") if ok else None
            add(f"{where}{key}: wall/op within {TARGET_PLACED_RATIO}x of "
                f"floor", loop_name, ratio, TARGET_PLACED_RATIO,
                None if ratio is None else ratio <= TARGET_PLACED_RATIO)
            if key == "bridge_add_reader":
                cpu = row.get("cpu_x_floor") if ok else None
                add(f"{where}{key}: process CPU/op within "
                    f"{TARGET_PLACED_RATIO}x of floor's", loop_name, cpu,
                    TARGET_PLACED_RATIO,
                    None if cpu is None else cpu <= TARGET_PLACED_RATIO)
                batch = row.get("x_thread_batch") if ok else None
                add(f"{where}{key}: never slower than the batching thread "
                    f"(wall ratio)", loop_name, batch, 1.0,
                    None if batch is None else batch <= 1.0)
                lat = (lrow.get("p50_x_floor")
                       if lrow.get("status") == "ok" else None)
                add(f"{where}{key}: latency p50 within "
                    f"{TARGET_PLACED_LATENCY_RATIO}x of floor's", loop_name,
                    lat, TARGET_PLACED_LATENCY_RATIO,
                    None if lat is None else
                    lat <= TARGET_PLACED_LATENCY_RATIO)
            else:
                before = CALL_SOON_THREADSAFE_P50_BEFORE.get(
                    (placement, loop_name))
                p50 = lrow.get("p50_us") if lrow.get("status") == "ok" \
                    else None
                limit = before / 2 if before else None
                add(f"{where}{key}: latency p50 at most half of "
                    f"{before} us (before issue 11)", loop_name, p50, limit,
                    None if p50 is None or limit is None else p50 <= limit)


def fmt(value, spec=".2f", suffix="") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def render_table(results, contenders) -> str:
    lines = []
    out = lines.append
    machine = results["machine"]
    out(f"Machine: {machine['cpu']}, {machine['cores']} cores "
        f"({machine['cores_usable']} usable), Linux {machine['kernel']}, "
        f"Python {machine['python']}, uvloop {machine['uvloop']}")
    cfg = results["config"]
    out(f"Throughput: {cfg['throughput_ops']} ops, {IN_FLIGHT} in flight, "
        f"median of {cfg['rounds']} interleaved rounds; latency: "
        f"{cfg['latency_round_trips']} round trips one at a time.")
    c = results["eventfd_pingpong"]
    if c.get("status") == "ok":
        out(f"C eventfd ping-pong round trip (free placement, median of "
            f"rounds): p50 {c['p50_us']:.1f} us, p99 {c['p99_us']:.1f} us")
        for mode, row in c["pinned"].items():
            if row.get("status") == "ok":
                out(f"  pinned {mode:5}: p50 {row['p50_us']:.1f} us, "
                    f"p99 {row['p99_us']:.1f} us")
    else:
        out(f"C eventfd ping-pong: {c['status']}")
    out("")
    header = (f"{'loop':8} {'contender':42} {'us/op':>8} {'cpu/op':>7} "
              f"{'x floor':>8} "
              f"{'vs exec':>8} {'p50 us':>8} {'p99 us':>8} {'p50/C':>6}")
    out(header)
    out("-" * len(header))
    for loop_name, rows in results["throughput"].items():
        for contender in contenders:
            row = rows[contender.key]
            lrow = results["latency"][loop_name][contender.key]
            if row.get("status") != "ok" and lrow.get("status") != "ok":
                out(f"{loop_name:8} {contender.label:42} "
                    f"{row.get('status', '')[:60]}")
                continue
            speedup = 1 / row["x_executor"] if row.get("x_executor") else None
            c_ratio = lrow.get("p50_x_c_eventfd")
            out(f"{loop_name:8} {contender.label:42} "
                f"{fmt(row.get('us_per_op')):>8} "
                f"{fmt(row.get('loop_cpu_us_per_op')):>7} "
                f"{fmt(row.get('x_floor'), suffix='x'):>8} "
                f"{fmt(speedup, suffix='x'):>8} "
                f"{fmt(lrow.get('p50_us'), '.1f'):>8} "
                f"{fmt(lrow.get('p99_us'), '.1f'):>8} "
                f"{fmt(c_ratio, suffix='x'):>6}")
    out("(us/op: wall time per op; cpu/op: the loop thread's own CPU time "
        "per op; x floor: wall time relative to the floor; vs exec: how many "
        "times faster than run_in_executor; p50/C: latency p50 relative to "
        "the C ping-pong of the same round)")
    for loop_name, rows in results["throughput"].items():
        for key, row in rows.items():
            batches = [b for b in row.get("bridge_stats_rounds") or ()
                       if b.get("wakeups")]
            if batches:
                per_wakeup = statistics.median(
                    b.get("completed", 0) / b["wakeups"] for b in batches)
                out(f"{loop_name:8} {key}: {per_wakeup:.1f} ops per wake-up,"
                    f" largest batch {batches[-1].get('largest_batch')}")
    render_placements(results, contenders, out)
    if "memory" not in results:
        render_targets(results, out)
        return "\n".join(lines)
    out("")
    out("Memory per in-flight sleep task "
        f"({cfg['memory_ops']} in flight; bytes per op):")
    for loop_name, entry in results["memory"].items():
        for name in ("asyncio.sleep", "asyncio_bridge.sleep"):
            row = entry[name]
            if row["status"] != "ok":
                out(f"  {loop_name:8} {name:22} {row['status'][:70]}")
                continue
            out(f"  {loop_name:8} {name:22} RSS {row['rss_bytes_per_op']:7.0f}"
                f"   tracemalloc {row['traced_bytes_per_op']:7.0f}"
                f"   C heap {fmt(row.get('malloc_bytes_per_op'), '7.0f')}"
                + (f"   (child exit code {row['child_exit_code']})"
                   if "child_exit_code" in row else ""))
        if "native_bytes_per_op" in entry:
            out(f"  {loop_name:8} native bytes beyond the Python objects: "
                f"{entry['native_bytes_per_op']:.0f}, the larger of "
                f"RSS-tracemalloc-slack "
                f"({entry['native_residual_bytes_per_op']:.0f}-"
                f"{entry['allocator_slack_bytes_per_op']:.0f}="
                f"{entry['native_bytes_per_op_rss']:.0f}) and C heap growth "
                f"beyond stdlib asyncio.sleep's "
                f"({fmt(entry.get('native_bytes_per_op_malloc'), '.0f')})")
    out("")
    out(f"Timers: {cfg['timer_count']} concurrent sleep({cfg['timer_delay']})"
        ", median of rounds:")
    for loop_name, rows in results["timers"].items():
        for name, row in rows.items():
            if row["status"] != "ok":
                out(f"  {loop_name:8} {name:22} {row['status'][:70]}")
                continue
            out(f"  {loop_name:8} {name:22} wall {row['wall_s']:.3f} s   "
                f"last fired {row['last_fired_late_ms']:6.1f} ms late   "
                f"worst {row['worst_late_ms']:6.1f} ms   "
                f"p50 {row['p50_late_ms']:5.1f} ms")
    out("")
    pool = results["pool"]
    out(f"Pool: zlib of {pool['payload_bytes']} bytes, {pool['in_flight']} in "
        f"flight, {pool['total_ops']} ops; 1 ms ticker lag. {pool['example']}")
    for loop_name in results["throughput"]:
        for name, row in pool.get(loop_name, {}).items():
            if row["status"] != "ok":
                out(f"  {loop_name:8} {name:36} {row['status'][:60]}")
                continue
            out(f"  {loop_name:8} {name:36} "
                f"{fmt(row['ops_per_s'], '.0f', ' ops/s'):>11}   "
                f"lag p50 {row['lag_p50_ms']:.2f} ms  "
                f"p99 {row['lag_p99_ms']:.2f} ms")
    out("")
    drain = results.get("drain_budget", {})
    if drain.get("status") == "ok":
        out(f"Drain budget: a burst of {drain['burst']} tasks whose ops finish at "
            f"one moment, with a 1 ms ticker; throughput as above "
            f"({drain['throughput_ops']} ops, {IN_FLIGHT} in flight); median of "
            f"{drain['rounds']} rounds:")
        for loop_name in results["throughput"]:
            for name, row in drain.get(loop_name, {}).items():
                out(f"  {loop_name:8} {name:15} burst delivered in "
                    f"{row['burst_ms']:6.1f} ms   ticker lag p99 "
                    f"{row['lag_p99_ms']:5.2f} ms  max {row['lag_max_ms']:5.2f} ms   "
                    f"{row['us_per_op']:.2f} us/op"
                    + ("" if row["all_delivered"] else "   WRONG RESULTS"))
    else:
        out(f"Drain budget: {drain.get('status', 'not measured')}")
    render_targets(results, out)
    return "\n".join(lines)


def render_targets(results, out) -> None:
    out("")
    out("Targets:")
    for target in results["targets"]:
        figure = fmt(target["figure"])
        limit = fmt(target["limit"]) if isinstance(target["limit"], float) \
            else target["limit"]
        out(f"  {target['result']:4} {target['loop']:8} {target['target']}"
            f"  ({figure}, limit {limit})")


def render_placements(results, contenders, out) -> None:
    placements = results.get("placements")
    if not placements:
        return
    out("")
    out("Placements: throughput (1000 in flight) and latency (one at a time)"
        " where services run")
    header = (f"{'placement':9} {'loop':8} {'contender':42} {'us/op':>7} "
              f"{'x floor':>8} {'proc cpu':>8} {'x floor':>8} "
              f"{'p50 us':>7} {'x floor':>8}")
    out(header)
    out("-" * len(header))
    for placement in PLACEMENTS:
        entry = placements.get(placement, {})
        if entry.get("status") != "ok":
            out(f"{placement:9} {entry.get('status', 'not measured')[:100]}")
            continue
        for loop_name, rows in entry["throughput"].items():
            for contender in contenders:
                row = rows.get(contender.key, {})
                lrow = entry["latency"].get(loop_name, {}).get(
                    contender.key, {})
                if row.get("status") != "ok":
                    out(f"{placement:9} {loop_name:8} {contender.label:42} "
                        f"{row.get('status', '')[:50]}")
                    continue
                out(f"{placement:9} {loop_name:8} {contender.label:42} "
                    f"{fmt(row.get('us_per_op')):>7} "
                    f"{fmt(row.get('x_floor'), suffix='x'):>8} "
                    f"{fmt(row.get('proc_cpu_us_per_op')):>8} "
                    f"{fmt(row.get('cpu_x_floor'), suffix='x'):>8} "
                    f"{fmt(lrow.get('p50_us'), '.1f'):>7} "
                    f"{fmt(lrow.get('p50_x_floor'), suffix='x'):>8}")
    out("(us/op: wall time per op; proc cpu: the whole process's CPU time "
        "per op, every thread; x floor: each relative to the floor's, "
        "median of per-round ratios; every core busy: "
        f"{placements.get('all_busy', {}).get('cpus', '?')} processes, "
        "the median one)")


def draw_chart(results, contenders, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loops = list(results["throughput"])
    fig, (ax_tput, ax_lat) = plt.subplots(1, 2, figsize=(14, 6))
    width = 0.8 / max(len(loops), 1)
    positions = range(len(contenders))
    for index, loop_name in enumerate(loops):
        offsets = [p + index * width for p in positions]
        tput = [results["throughput"][loop_name][c.key].get("us_per_op", 0)
                for c in contenders]
        lat_rows = [results["latency"][loop_name][c.key] for c in contenders]
        p50 = [row.get("p50_us", 0) for row in lat_rows]
        p99_err = [row.get("p99_us", 0) - row.get("p50_us", 0)
                   for row in lat_rows]
        ax_tput.bar(offsets, tput, width, label=loop_name)
        ax_lat.bar(offsets, p50, width, yerr=[[0] * len(p50), p99_err],
                   capsize=3, label=f"{loop_name} (p50, bar to p99)")
    c = results["eventfd_pingpong"]
    if c.get("p50_us"):
        ax_lat.axhline(c["p50_us"], color="black", linestyle="--",
                       label=f"C eventfd round trip p50 {c['p50_us']:.1f} us")
        for (mode, row), style in zip(c["pinned"].items(), (":", "-.")):
            if row.get("p50_us"):
                ax_lat.axhline(row["p50_us"], color="gray", linestyle=style,
                               label=f"C, pinned {mode} CPU(s), p50 "
                                     f"{row['p50_us']:.1f} us")
    labels = [c.label.replace(" (", "\n(").replace(", ", ",\n")
              + ("\nNOT AVAILABLE" if c.unavailable() else "")
              for c in contenders]
    for axis, title, unit in (
            (ax_tput, f"Throughput ({IN_FLIGHT} in flight), lower is better",
             "microseconds per op"),
            (ax_lat, "Latency, one op at a time, lower is better",
             "microseconds per round trip")):
        axis.set_title(title)
        axis.set_ylabel(unit)
        axis.set_xticks([p + width * (len(loops) - 1) / 2 for p in positions])
        axis.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        axis.set_yscale("log")
        low, high = axis.get_ylim()
        axis.set_ylim(low, high * 10)  # headroom so the legend hides no bar
        axis.legend(fontsize=8, loc="upper right", ncol=2)
    machine = results["machine"]
    fig.suptitle(f"asyncio_bridge vs alternatives - {machine['cpu']}, "
                 f"{machine['cores']} cores, Python {machine['python']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="folder for results.json and chart.png")
    parser.add_argument("--quick", action="store_true",
                        help="short smoke run (about a minute)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds")
    parser.add_argument("--ops", type=int, help="throughput ops per run")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--placement-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=("round-trips",),
                        help="measure only throughput and latency, in every "
                             "placement")
    return parser.parse_args(argv)


def measure_round_trips(results, contenders, loops, build_dir, log) -> None:
    """Throughput, then latency with the C ping-pong run in every round."""
    config = results["config"]
    log("throughput")
    raw = interleaved_rounds(
        contenders, loops, config["rounds"], log,
        lambda c, loop_name: run_on_fresh_loop(
            loop_name, measure_throughput, c, config["throughput_ops"]))
    results["throughput"] = summarize_throughput(contenders, loops, raw,
                                                 config["rounds"])
    log("latency, with the C eventfd ping-pong in every round")
    binary, status = build_pingpong(build_dir)
    c_trips = config["c_round_trips_per_round"]
    c_rounds = []
    per_round = max(config["latency_round_trips"] // config["rounds"], 1)
    raw = interleaved_rounds(
        contenders, loops, config["rounds"], log,
        lambda c, loop_name: run_on_fresh_loop(
            loop_name, measure_latency, c, per_round),
        each_round=(lambda: c_rounds.append(run_pingpong(binary, c_trips)))
        if binary else None)
    pinned = ({mode: run_pingpong(binary, c_trips, mode)
               for mode in ("same", "split")} if binary else {})
    results["eventfd_pingpong"] = summarize_pingpong(c_rounds, pinned, status)
    results["latency"] = summarize_latency(contenders, loops, raw, c_rounds)
    for rows in results["latency"].values():
        for row in rows.values():
            for mode, c_row in pinned.items():
                if row.get("status") == "ok" and c_row.get("p50_us"):
                    row[f"p50_x_c_pinned_{mode}"] = (row["p50_us"]
                                                     / c_row["p50_us"])


# --------------------------------------------------------------------------
# Placements: the machine as it is, one CPU, every core busy
# --------------------------------------------------------------------------

PLACEMENTS = ("as_is", "one_cpu", "all_busy")
PLACEMENT_LABELS = {
    "as_is": "the machine as it is",
    "one_cpu": "one CPU (the whole process pinned to it)",
    "all_busy": "every core busy (one benchmark process per CPU, median)",
}


def placement_child(placement: str, config_json: str) -> None:
    """Throughput and latency in a process of its own: pinned to one CPU
    (before any thread exists, so every thread inherits it), or one of as
    many processes as CPUs, started together (the parent releases them all
    at once through stdin).  Writes the results as JSON to stdout."""
    config = json.loads(config_json)
    if placement == "one_cpu":
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    bridge, _ = bridge_status()
    loops = list(loop_factories())
    contenders = make_contenders(bridge)
    results = {"config": config}
    if placement == "all_busy":
        sys.stdin.readline()  # the start signal: every process is ready
    with tempfile.TemporaryDirectory() as build_dir:
        measure_round_trips(results, contenders, loops, Path(build_dir),
                            lambda message: None)
    json.dump({key: results[key] for key in
               ("throughput", "latency", "eventfd_pingpong")}, sys.stdout)


def run_placement_children(placement: str, count: int, config: dict,
                           log) -> list[dict]:
    """Starts `count` children of placement_child together; their results
    (or {"error": ...} for a child that failed)."""
    argv = [sys.executable, str(Path(__file__).resolve()),
            "--placement-child", placement, json.dumps(config)]
    children = [subprocess.Popen(argv, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
                for _ in range(count)]
    try:
        for child in children:  # all started: let them go at once
            child.stdin.write("go\n")
            child.stdin.close()
            child.stdin = None  # communicate() must not flush it again
        outcomes = []
        for child in children:
            out, err = child.communicate(timeout=30 * RUN_TIMEOUT_S)
            if child.returncode != 0:
                tail = err.strip().splitlines()[-1:] or ["no output"]
                outcomes.append({"error": f"exit {child.returncode}: "
                                          f"{tail[0]}"})
                log(f"  {placement} child failed: {err[-2000:]}")
            else:
                outcomes.append(json.loads(out))
        return outcomes
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


def median_of_processes(outcomes: list[dict]) -> dict:
    """Per (section, loop, contender): the median process's figures."""
    good = [o for o in outcomes if "error" not in o]
    if not good:
        return {"status": "error: " + "; ".join(o["error"] for o in outcomes)}
    merged = {"status": "ok", "processes": len(good),
              "failed_processes": len(outcomes) - len(good)}
    for section in ("throughput", "latency"):
        merged[section] = {}
        for loop_name, rows in good[0][section].items():
            merged[section][loop_name] = {}
            for key in rows:
                per_process = [o[section][loop_name][key] for o in good]
                if any(r.get("status") != "ok" for r in per_process):
                    merged[section][loop_name][key] = next(
                        r for r in per_process if r.get("status") != "ok")
                    continue
                row = {"status": "ok"}
                for field, value in per_process[0].items():
                    if isinstance(value, (int, float)) and not isinstance(
                            value, bool):
                        row[field] = statistics.median(
                            r[field] for r in per_process)
                row["per_process"] = per_process
                merged[section][loop_name][key] = row
    return merged


def measure_placements(results, log) -> None:
    """results["placements"][name] = {"throughput", "latency"} for each
    placement; "as_is" is this process's own run."""
    config = results["config"]
    child_config = {key: config[key] for key in
                    ("rounds", "throughput_ops", "latency_round_trips",
                     "c_round_trips_per_round")}
    placements = {"as_is": {"status": "ok",
                            "throughput": results["throughput"],
                            "latency": results["latency"]}}
    cpus = len(os.sched_getaffinity(0))
    log("placement: one CPU")
    placements["one_cpu"] = median_of_processes(
        run_placement_children("one_cpu", 1, child_config, log))
    placements["one_cpu"]["cpus"] = 1
    log(f"placement: every core busy ({cpus} processes)")
    placements["all_busy"] = median_of_processes(
        run_placement_children("all_busy", cpus, child_config, log))
    placements["all_busy"]["cpus"] = cpus
    results["placements"] = placements


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        kind, loop_name, count = args.memory_child
        memory_child(kind, loop_name, int(count))
        return 0
    if args.placement_child:
        placement_child(*args.placement_child)
        return 0

    quick = args.quick
    config = {
        "quick": quick,
        "rounds": args.rounds or (3 if quick else 7),
        "throughput_ops": args.ops or (20_000 if quick else 100_000),
        "latency_round_trips": 2_000 if quick else 10_000,
        "c_round_trips_per_round": 5_000 if quick else 10_000,
        "memory_ops": 100_000,
        "timer_count": 100_000,
        "timer_delay": 0.05,
        "timer_rounds": 1 if quick else 3,
        "pool_ops": 300 if quick else 1500,
        "drain_rounds": 1 if quick else 3,
        "drain_burst": 10_000,
    }
    args.out.mkdir(parents=True, exist_ok=True)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    bridge, status = bridge_status()
    machine = machine_description(bridge)
    print(f"Machine: {machine['cpu']}, {machine['cores']} cores, Python "
          f"{machine['python']}, uvloop {machine['uvloop']}; "
          f"asyncio_bridge: {status}", flush=True)
    loops = list(loop_factories())
    contenders = make_contenders(bridge)
    results = {"machine": machine, "config": config,
               "asyncio_bridge_status": status,
               "contenders": {c.key: c.label for c in contenders}}

    with tempfile.TemporaryDirectory() as build_dir:
        measure_round_trips(results, contenders, loops, Path(build_dir),
                            log)
    measure_placements(results, log)
    if args.only == "round-trips":
        results["targets"] = evaluate_targets(results)
        table = render_table(results, contenders)
        print(table)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        return 0
    log("memory")
    results["memory"] = measure_memory(loops, config["memory_ops"],
                                       bridge is not None, log)
    log("timers")
    results["timers"] = measure_timers(
        loops, config["timer_count"], config["timer_delay"],
        config["timer_rounds"], bridge, log)
    log("pool")
    results["pool"] = measure_pool(loops, config["pool_ops"], bridge, log)
    log("drain budget")
    results["drain_budget"] = measure_drain_budget(
        loops, bridge, config["drain_rounds"], config["drain_burst"],
        config["throughput_ops"], log)
    if bridge is not None:
        results["bridge_stats_at_end"] = dict(bridge.stats())

    results["targets"] = evaluate_targets(results)
    table = render_table(results, contenders)
    print(table)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "table.txt").write_text(table + "\n")
    draw_chart(results, contenders, args.out / "chart.png")
    log(f"wrote {args.out / 'results.json'}, {args.out / 'chart.png'}, "
        f"{args.out / 'table.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
