"""Throughput with 1, 2, 4, 8 and 16 asyncio loops sharing the one engine.

Run:  python bench/loops.py --quick --out bench-results    (about 40 s)
      python bench/loops.py --out bench-results            (about 70 s)
      python bench/loops.py --loop both ...                (stdlib asyncio and uvloop: twice as long)

Each loop runs in its own thread, with its own event loop; all of them share
asyncio_bridge's engine, which is process-wide. Every loop keeps the same
load, 256 tasks each awaiting asyncio_bridge.nop() over and over, so that N
loops offer N times the load of one. The loops start together
(threading.Barrier), warm up, and are then measured for a fixed wall time.
Both delivery paths are measured (configure(delivery=...) before the loops
are made).

Reported per row: total ops/s, ops/s per loop, scaling against 1 loop, the
whole process's CPU per op (time.process_time), the loop threads' and the
engine thread's own CPU per op (/proc/self/task/<tid>/schedstat), and the
stats() deltas per op (engine wake-ups; sink wake-ups, i.e. loop wake-ups).

The GIL: loops in threads of one process take turns holding it, so the
Python side of every loop together runs on at most one core; total ops/s
cannot grow with the loop count however many cores there are. What more
loops show is what sharing costs (GIL hand-offs, the engine, the wake-ups).

At the end the figure of one loop (Y ops/s) is set against what one engine
thread sustains (X ops/s, from bench/engine_bench.c, built and run here
unless --engine-json or --no-engine-bench says otherwise): X/Y is how many
loops running at full speed on cores of their own one engine thread would
serve before it is the bottleneck.

Writes DIR/loops.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

try:
    import uvloop
except ImportError:
    uvloop = None

import asyncio_bridge

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent

LOOP_COUNTS = (1, 2, 4, 8, 16)
IN_FLIGHT = 256
DELIVERIES = ("add_reader", "call_soon_threadsafe")
JOIN_TIMEOUT_S = 60.0

GIL_NOTE = ("GIL: the loops are threads of one process and take turns holding "
            "the GIL, so their Python side runs on at most one core together: "
            "total ops/s is bounded by one core and does not grow with the loop "
            "count")


# --------------------------------------------------------------------------
# Per-thread CPU from /proc: the engine and the loop threads
# --------------------------------------------------------------------------

CLOCK_TICK_NS = 1e9 / os.sysconf("SC_CLK_TCK")


def thread_cpu_ns(tid: int | None) -> float | None:
    """CPU time of one thread of this process, in ns (None if gone)."""
    if tid is None:
        return None
    try:
        # First field: time spent on a CPU, ns (needs schedstats, usually on).
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * CLOCK_TICK_NS  # utime + stime
    except (OSError, ValueError, IndexError):
        return None


def threads_named(prefix: str) -> list[int]:
    tids = []
    for entry in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{entry}/comm") as f:
                if f.read().strip().startswith(prefix):
                    tids.append(int(entry))
        except OSError:
            pass
    return tids


def sum_cpu_ns(tids) -> float | None:
    values = [thread_cpu_ns(t) for t in tids]
    values = [v for v in values if v is not None]
    return sum(values) if values else None


# --------------------------------------------------------------------------
# One measurement: N loops, each in its own thread
# --------------------------------------------------------------------------

class LoopState:
    __slots__ = ("index", "ops", "tid", "error")

    def __init__(self, index: int):
        self.index = index
        self.ops = 0
        self.tid = None
        self.error = None


class Run:
    __slots__ = ("stop",)

    def __init__(self):
        self.stop = False


def loop_factory(name: str):
    return uvloop.new_event_loop if name == "uvloop" else asyncio.new_event_loop


def loop_thread(state: LoopState, run: Run, barrier: threading.Barrier,
                factory, in_flight: int) -> None:
    state.tid = threading.get_native_id()
    nop = asyncio_bridge.nop

    async def worker():
        while not run.stop:
            await nop()
            state.ops += 1

    async def main():
        await asyncio.gather(*(worker() for _ in range(in_flight)))

    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            barrier.wait()
            runner.run(main())
    except BaseException as exc:  # noqa: BLE001 - reported by the main thread
        state.error = exc
        barrier.abort()


def snapshot(states) -> dict:
    engine = threads_named("ab-engine")
    courier = threads_named("ab-courier")
    return {
        "t": time.perf_counter(),
        "cpu": time.process_time(),
        "ops": [s.ops for s in states],
        "stats": asyncio_bridge.stats(),
        "engine_tids": engine,
        "engine_ns": sum_cpu_ns(engine),
        "courier_ns": sum_cpu_ns(courier),
        "loops_ns": sum_cpu_ns(s.tid for s in states),
    }


def delta(a, b, key):
    if a.get(key) is None or b.get(key) is None:
        return None
    return b[key] - a[key]


def measure(loop_name: str, delivery: str, nloops: int, in_flight: int,
            warmup: float, seconds: float) -> dict:
    asyncio_bridge.configure(delivery=delivery)  # before the loops are made
    factory = loop_factory(loop_name)
    run = Run()
    states = [LoopState(i) for i in range(nloops)]
    barrier = threading.Barrier(nloops + 1)
    threads = [threading.Thread(target=loop_thread, name=f"loop-{i}",
                                args=(states[i], run, barrier, factory, in_flight))
               for i in range(nloops)]
    for t in threads:
        t.start()
    try:
        barrier.wait()  # every loop is made and starts now
        time.sleep(warmup)
        a = snapshot(states)
        time.sleep(seconds)
        b = snapshot(states)
    finally:
        run.stop = True
        for t in threads:
            t.join(JOIN_TIMEOUT_S)
    for s in states:
        if s.error is not None:
            raise RuntimeError(f"loop {s.index}: {s.error!r}") from s.error
    if any(t.is_alive() for t in threads):
        raise RuntimeError("a loop did not stop")

    wall = b["t"] - a["t"]
    per_loop = [(y - x) / wall for x, y in zip(a["ops"], b["ops"])]
    ops = sum(y - x for x, y in zip(a["ops"], b["ops"]))
    if ops <= 0:
        raise RuntimeError("no op finished")
    sa, sb = a["stats"], b["stats"]

    def per_op_us(ns):
        return None if ns is None else ns / ops / 1e3

    engine_ns = (delta(a, b, "engine_ns")
                 if a["engine_tids"] == b["engine_tids"] else None)
    return {
        "loop": loop_name,
        "delivery": delivery,
        "loops": nloops,
        "in_flight_per_loop": in_flight,
        "seconds": wall,
        "ops": ops,
        "ops_per_s": ops / wall,
        "per_loop_ops_per_s": per_loop,
        "per_loop_mean": ops / wall / nloops,
        "per_loop_min": min(per_loop),
        "per_loop_max": max(per_loop),
        "process_cpu_us_per_op": (b["cpu"] - a["cpu"]) / ops * 1e6,
        "process_cpu_cores": (b["cpu"] - a["cpu"]) / wall,
        "loops_cpu_us_per_op": per_op_us(delta(a, b, "loops_ns")),
        "engine_cpu_us_per_op": per_op_us(engine_ns),
        "engine_util": None if engine_ns is None else engine_ns / 1e9 / wall,
        "courier_cpu_us_per_op": per_op_us(delta(a, b, "courier_ns")),
        "engine_wakeups_per_op": (sb["engine_wakeups"] - sa["engine_wakeups"]) / ops,
        "sink_wakeups_per_op": (sb["wakeups"] - sa["wakeups"]) / ops,
        "largest_batch": sb["largest_batch"],
    }


# --------------------------------------------------------------------------
# The engine's side: bench/engine_bench.c
# --------------------------------------------------------------------------

def build_engine_bench(build_dir: Path) -> tuple[Path | None, str]:
    """Compiles engine_bench.c with lib/ into build_dir, as run.py does the
    ping-pong: a C compiler and libevent's pkg-config files are needed."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    pkg = shutil.which("pkg-config")
    if cc is None or pkg is None:
        return None, "no C compiler or pkg-config"
    try:
        flags = subprocess.run([pkg, "--cflags", "--libs", "libevent_core", "libevent_extra"],
                               check=True, capture_output=True, text=True).stdout.split()
    except subprocess.CalledProcessError as exc:
        return None, f"pkg-config: {exc.stderr.strip()}"
    binary = build_dir / "engine_bench"
    sources = [str(BENCH_DIR / "engine_bench.c")] + sorted(
        str(p) for p in (ROOT / "lib" / "src").glob("*.c"))
    cmd = [cc, "-O3", "-std=c11", "-D_GNU_SOURCE", "-DNDEBUG", "-fvisibility=hidden",
           "-pthread", f"-I{ROOT / 'lib' / 'include'}", *sources, "-o", str(binary),
           *flags, "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return None, "build failed: " + proc.stderr.strip()[-500:]
    return binary, "built"


def engine_capacity(args, out_dir: Path, log) -> dict:
    """X: the ops/s one engine thread sustains at 100% of one core."""
    if args.engine_json is not None:
        data = json.loads(Path(args.engine_json).read_text())
        return {"source": str(args.engine_json), **data["capacity"], "rows": data["rows"]}
    if args.no_engine_bench:
        return {"source": None, "why": "--no-engine-bench"}
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(args.engine_bench) if args.engine_bench else None
        if binary is None:
            binary, why = build_engine_bench(Path(tmp))
            if binary is None:
                return {"source": None, "why": why}
        json_path = out_dir / "engine_bench.json"
        cmd = [str(binary), "--quick", "--threads", "4", "--json", str(json_path)]
        log(f"engine: {' '.join(cmd[1:])}")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return {"source": None, "why": proc.stderr.strip()[-500:]}
        print(proc.stdout, end="")
        data = json.loads(json_path.read_text())
        return {"source": "engine_bench --quick --threads 4 (run now)", **data["capacity"],
                "rows": data["rows"]}


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------

def fmt(value, spec=".2f") -> str:
    return "-" if value is None else format(value, spec)


def render(rows) -> str:
    head = (f"{'loop':<8} {'delivery':<21} {'loops':>5} {'total ops/s':>12} "
            f"{'per loop':>10} {'min..max per loop':>19} {'x 1 loop':>8} "
            f"{'cpu us/op':>9} {'cores':>5} {'loops us':>8} {'engine us':>9} "
            f"{'eng cpu':>7} {'eng wk/op':>9} {'sink wk/op':>10}")
    lines = [head, "-" * len(head)]
    base = {}
    for r in rows:
        key = (r["loop"], r["delivery"])
        if r["loops"] == 1:
            base[key] = r["ops_per_s"]
        scale = r["ops_per_s"] / base[key] if key in base else None
        r["scaling"] = scale
        lines.append(
            f"{r['loop']:<8} {r['delivery']:<21} {r['loops']:>5} {r['ops_per_s']:>12.0f} "
            f"{r['per_loop_mean']:>10.0f} "
            f"{r['per_loop_min']:>9.0f}..{r['per_loop_max']:<8.0f}"
            f"{fmt(scale):>9}x "
            f"{r['process_cpu_us_per_op']:>8.2f} {r['process_cpu_cores']:>5.2f} "
            f"{fmt(r['loops_cpu_us_per_op']):>8} {fmt(r['engine_cpu_us_per_op'], '.3f'):>9} "
            f"{fmt(None if r['engine_util'] is None else r['engine_util'] * 100, '.0f'):>6}% "
            f"{r['engine_wakeups_per_op']:>9.4f} {r['sink_wakeups_per_op']:>10.4f}")
    lines.append(
        "(total ops/s: every loop together; per loop: its mean, and the slowest and "
        "fastest loop; x 1 loop: total against 1 loop; cpu us/op: the whole process "
        "(time.process_time), every thread; cores: process CPU / wall time; loops us, "
        "engine us: the loop threads' and the engine thread's own CPU per op; eng cpu: "
        "the engine thread's CPU / wall time, its polling included; wk/op: stats() "
        "engine_wakeups and wakeups (sink wake-ups, one per loop wake-up) per op)")
    return "\n".join(lines)


def estimate(rows, capacity: dict) -> tuple[list[str], dict]:
    """X/Y: how many loops at full speed one engine thread serves."""
    lines, out = [], {}
    x_high = capacity.get("ops_per_s")
    ones = [r for r in rows if r["loops"] == 1]
    if not ones:
        return lines, out
    lines.append("One loop at full speed (1-loop rows):")
    for r in ones:
        lines.append(f"  {r['loop']:<8} {r['delivery']:<21} Y = {r['ops_per_s']:>9.0f} ops/s "
                     f"({1e6 / r['ops_per_s']:.2f} us/op; the engine's own CPU: "
                     f"{fmt(r['engine_cpu_us_per_op'], '.2f')} us per op, mostly polling "
                     f"and wake-ups that a busier engine amortises)")
    if x_high is None:
        lines.append(f"No engine capacity (X) measured: {capacity.get('why')}; "
                     "run bench/engine_bench.c and pass --engine-json.")
        return lines, out
    # The lower X: the loop-like rows of engine_bench (owners sleeping on an
    # eventfd, the engine's polling counted in its CPU per op).
    wait_rows = [r for r in capacity.get("rows", []) if r.get("mode") == "wait"]
    x_low = max((r["capacity_ops_per_s"] for r in wait_rows), default=x_high)
    x_low = min(x_low, x_high)
    y_max = max(r["ops_per_s"] for r in ones)
    y_min = min(r["ops_per_s"] for r in ones)
    lines.append(f"One engine thread (bench/engine_bench.c, {capacity.get('source')}): "
                 f"X = {x_high / 1e6:.1f} Mops/s at 100% of one core "
                 f"({capacity.get('engine_ns_per_op', 0):.0f} ns of engine CPU per op, "
                 f"its busiest rows)"
                 + (f"; {x_low / 1e6:.1f} Mops/s in its loop-like rows, polling included"
                    if x_low < x_high else ""))
    for r in ones:
        out[f"{r['loop']}/{r['delivery']}"] = [x_low / r["ops_per_s"], x_high / r["ops_per_s"]]
    lo, hi = x_low / y_max, x_high / y_min
    lines.append(
        f"X/Y: one engine thread would become the bottleneck at about {lo:.0f}-{hi:.0f} "
        f"loops, each on a core of its own running at full speed ({x_low / 1e6:.1f} Mops/s "
        f"/ the fastest 1-loop row, {y_max / 1e3:.0f}k ops/s, to {x_high / 1e6:.1f} Mops/s / "
        f"the slowest, {y_min / 1e3:.0f}k ops/s).")
    if hi < 64:
        verdict = "within reach of a 64-core server"
    elif lo >= 64:
        verdict = "beyond a 64-core server"
    else:
        verdict = "around what a 64-core server offers (the low end within, the high end beyond)"
    lines.append(
        f"That is {verdict} - but only for loops that run in parallel in ONE process "
        f"(the engine is per process), which the GIL forbids: here the loops share one "
        f"core of Python. With one process per core each process has its own engine; "
        f"the bound would matter for a free-threaded CPython running {lo:.0f}+ loops in "
        f"one process.")
    return lines, {"x_ops_per_s": [x_low, x_high], "y_ops_per_s": [y_min, y_max],
                   "cores_at_bottleneck": out, "cores_range": [lo, hi]}


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine() -> dict:
    return {
        "loadavg_start": loadavg(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "uvloop": getattr(uvloop, "__version__", None),
        "switch_interval_s": sys.getswitchinterval(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="0.5 s warm-up and 2 s per row (default: 1 s and 5 s)")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="folder for loops.json (default: bench-results)")
    p.add_argument("--loop", choices=("asyncio", "uvloop", "both"), default="asyncio")
    p.add_argument("--delivery", choices=(*DELIVERIES, "both"), default="both")
    p.add_argument("--loops", default=",".join(map(str, LOOP_COUNTS)),
                   help="loop counts (default: 1,2,4,8,16)")
    p.add_argument("--in-flight", type=int, default=IN_FLIGHT,
                   help="tasks in flight per loop (default: 256)")
    p.add_argument("--seconds", type=float, help="measured wall time per row")
    p.add_argument("--warmup", type=float, help="warm-up per row")
    p.add_argument("--engine-json", help="engine_bench --json output to take X from")
    p.add_argument("--engine-bench", help="a built engine_bench binary to run")
    p.add_argument("--no-engine-bench", action="store_true",
                   help="do not build and run bench/engine_bench.c")
    args = p.parse_args(argv)
    if args.seconds is None:
        args.seconds = 2.0 if args.quick else 5.0
    if args.warmup is None:
        args.warmup = 0.5 if args.quick else 1.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    loops = ["asyncio", "uvloop"] if args.loop == "both" else [args.loop]
    if "uvloop" in loops and uvloop is None:
        print("uvloop is not installed", file=sys.stderr)
        return 2
    deliveries = list(DELIVERIES) if args.delivery == "both" else [args.delivery]
    counts = [int(c) for c in args.loops.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    info = machine()
    print(f"Machine: {info['cores']} cores ({info['cores_usable']} usable), Linux "
          f"{info['kernel']}, Python {info['python']}, uvloop {info['uvloop']}, "
          f"load average {fmt(info['loadavg_start'])}")
    print(f"{IN_FLIGHT if args.in_flight == IN_FLIGHT else args.in_flight} tasks in flight "
          f"per loop, each awaiting asyncio_bridge.nop() in turn; {args.warmup:g} s warm-up, "
          f"{args.seconds:g} s measured per row; loops in threads of this one process")
    print(f"Note: {GIL_NOTE}.")
    print()
    rows = []
    for loop_name in loops:
        for delivery in deliveries:
            for n in counts:
                log(f"{loop_name} {delivery} {n} loop(s) ...")
                rows.append(measure(loop_name, delivery, n, args.in_flight,
                                    args.warmup, args.seconds))
    asyncio_bridge.configure(delivery="auto")
    info["loadavg_end"] = loadavg()
    table = render(rows)
    print(table)
    print(f"load average at the end: {fmt(info['loadavg_end'])} (other work on the machine "
          f"lowers ops/s, and a loop thread that shares its CPU with the engine makes the "
          f"engine sleep and wake more often)")
    print()
    capacity = engine_capacity(args, args.out, log)
    print()
    lines, est = estimate(rows, capacity)
    print("\n".join(lines))
    print(f"\nNote: {GIL_NOTE}.")
    took = time.perf_counter() - started
    print(f"Took {took:.0f} s.")
    result = {
        "machine": info,
        "settings": {"in_flight_per_loop": args.in_flight, "seconds": args.seconds,
                     "warmup": args.warmup, "loop_counts": counts},
        "gil_note": GIL_NOTE,
        "rows": rows,
        "engine_capacity": capacity,
        "estimate": est,
        "took_s": took,
    }
    (args.out / "loops.json").write_text(json.dumps(result, indent=2))
    log(f"wrote {args.out / 'loops.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
