"""A real aiohttp service under load: native ops against what asyncio offers.

Run:  python bench/service.py --out bench-results          (full, ~5.5 min)
      python bench/service.py --out bench-results --quick  (smoke run, ~35 s)

Full: 5 rounds of 6 s per route and loop (2 s warm-up); --quick: 1 round of
3 s (1 s warm-up); --rounds, --duration and --connections override.

Needs wrk (Debian's `wrk`, installed by tools/setup.sh), aiohttp, the
example extension (examples/bridge_example) and, for the second loop, uvloop.

Set-up.  The server is this script run again as a child process (`--serve
LOOP`): an aiohttp application on stdlib asyncio or uvloop, bound to
127.0.0.1 on a free port (the kernel picks it; the child reports it on
stdout), access log off.  A fresh server process is started for each loop in
each round and stopped afterwards (SIGTERM, then SIGKILL; the child also
asks the kernel for SIGTERM if this script dies, and once told to stop it
ends within 10 s whatever hangs).  The load generator is wrk, a second
process on 127.0.0.1: `wrk -t1 -c64 -dNs --latency`.  One wrk thread is
plenty on this 2-core machine (it takes 0.1-0.15 of a core); the server and
its threads get the rest.  64 connections keep every route saturated
(closed loop: each connection sends its next request when the previous
answer arrives), so requests/s is the server's capacity and the latency
percentiles are those of a saturated server.

Routes, four contenders in pairs:

  POST /zlib-native     await bridge_example.compress(body)  (zlib level 6 on
                        asyncio_bridge's native worker pool), returns the
                        compressed bytes
  POST /zlib-executor   await loop.run_in_executor(None, zlib.compress,
                                                 body, 6)
                        (the default executor: min(32, cores + 4) threads)
  GET  /sleep-native    await asyncio_bridge.sleep(0.005), returns "slept"
  GET  /sleep-asyncio   await asyncio.sleep(0.005)

The POST body is 16 KiB of random words (deterministic: seeded), which zlib
level 6 compresses to 6,340 bytes (39%): 0.1 ms of CPU for zlib alone,
not a degenerate input.  wrk sends it from a Lua script written to a temporary
file (wrk.method = "POST", wrk.body, Content-Type application/octet-stream).
Before any load, on every server started, each route must answer 200 and
both compression routes must return exactly zlib.compress(body, 6) as this
process computes it; otherwise the script stops with exit code 1.  The
server counts requests per route and the body sizes it received (reported
in the JSON).

Each measured run is preceded by a short warm-up run of wrk on the same
route (discarded).  Per run: wrk's Requests/sec, its latency distribution
(50% and 99%, converted to ms), non-2xx/3xx responses and socket errors
(connect, read, write, timeout: a run with any is flagged), the server's
CPU time per request (all its threads, from /proc/PID/stat, and its event
loop's thread alone, from /proc/PID/task/PID/stat), and the CPU
time that other processes took meanwhile (machine-wide /proc/stat minus the
server, wrk and this script; over 10% of a core, the run is reported as
disturbed: the machine has 2 cores and this benchmark needs both.  The two
sides are counted differently: on a quiet machine the difference reads
about -0.1 of a core, shown as 0%).
Routes are interleaved round by round, the order rotated each round and the
loops alternated, so that a noisy machine slows every contender alike;
ratios are taken within a round and the median over rounds is reported
(5 short rounds rather than 3 long ones: a median of 5 shrugs off two
disturbed rounds).

Targets, printed as PASS/MISS (nothing asserts; MISS does not fail):
native compression serves >= 1.36x (asyncio) and >= 1.65x (uvloop) the
requests/s of run_in_executor, with a lower p99; the native sleep serves at
least 0.97x the requests/s of asyncio.sleep ("no slower", within 3% noise);
and no run has errors.

Writes DIR/service.json (every figure, every run, wrk's own output) and
prints a table.  Exit codes: 0 (whatever the targets say), 1 if a route
check or a server fails, 2 if wrk or a Python prerequisite is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import importlib
import importlib.util
import json
import os
import platform
import random
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from machine import cpu_model  # bench/machine.py: this script's folder is on sys.path

SCRIPT = Path(__file__).resolve()

HOST = "127.0.0.1"
PAYLOAD_BYTES = 16 * 1024
ZLIB_LEVEL = 6
SLEEP_S = 0.005

# Every route, in the order of the table: path -> (method, what it awaits).
ROUTES = {
    "/zlib-native": ("POST", "bridge_example.compress(body)"),
    "/zlib-executor": ("POST", f"run_in_executor(None, zlib.compress, body, "
                               f"{ZLIB_LEVEL})"),
    "/sleep-native": ("GET", f"asyncio_bridge.sleep({SLEEP_S})"),
    "/sleep-asyncio": ("GET", f"asyncio.sleep({SLEEP_S})"),
}
# The pairs compared: (name, native route, reference route).
PAIRS = (("zlib", "/zlib-native", "/zlib-executor"),
         ("sleep", "/sleep-native", "/sleep-asyncio"))

WRK_THREADS = 1
WRK_TIMEOUT_S = 2           # wrk's per-request timeout (its default)
SERVER_START_TIMEOUT_S = 30.0
SERVER_STOP_TIMEOUT_S = 10.0
# asyncio_bridge's threads, by the names it gives them.
BRIDGE_THREADS = ("ab-engine", "ab-worker", "ab-courier", "ab-blocking")
THREAD_GROUPS = ("loop",) + BRIDGE_THREADS + ("other threads",)
# A run during which other processes took more than this share of one core
# is reported as disturbed (in the log, the table and the JSON).
NOISY_OTHERS_CPU_PCT = 10.0

# Targets: native compression over run_in_executor, requests/s, per loop.
TARGET_ZLIB_RPS = {"asyncio": 1.36, "uvloop": 1.65}
# The native sleep must be "no slower" than asyncio.sleep: a ratio of 1.0
# within 3%.  Back-to-back runs of one route on one server vary by about
# +-2% on a quiet machine, so the ratio of two equal routes can read 0.97
# (bench/README.md).
TARGET_SLEEP_RPS = 0.97


# --------------------------------------------------------------------------
# The server (child process: python bench/service.py --serve LOOP)
# --------------------------------------------------------------------------

def die_with_parent(parent_pid: int) -> None:
    """Asks the kernel for SIGTERM when the benchmark process dies, so that
    no server outlives it even if it is killed with SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl
        sys.exit(1)


def os_threads() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def make_app(counters: dict):
    """The aiohttp application with the four routes."""
    from aiohttp import web
    import asyncio_bridge
    import bridge_example

    def count(route: str, body_bytes: int | None = None) -> None:
        entry = counters.setdefault(route, {"requests": 0, "body_sizes": {}})
        entry["requests"] += 1
        if body_bytes is not None:
            sizes = entry["body_sizes"]
            sizes[body_bytes] = sizes.get(body_bytes, 0) + 1

    async def zlib_native(request):
        body = await request.read()
        count("/zlib-native", len(body))
        compressed = await bridge_example.compress(body, ZLIB_LEVEL)
        return web.Response(body=compressed,
                            content_type="application/octet-stream")

    async def zlib_executor(request):
        body = await request.read()
        count("/zlib-executor", len(body))
        compressed = await asyncio.get_running_loop().run_in_executor(
            None, zlib.compress, body, ZLIB_LEVEL)
        return web.Response(body=compressed,
                            content_type="application/octet-stream")

    async def sleep_native(request):
        count("/sleep-native")
        await asyncio_bridge.sleep(SLEEP_S)
        return web.Response(text="slept")

    async def sleep_asyncio(request):
        count("/sleep-asyncio")
        await asyncio.sleep(SLEEP_S)
        return web.Response(text="slept")

    app = web.Application()
    app.router.add_post("/zlib-native", zlib_native)
    app.router.add_post("/zlib-executor", zlib_executor)
    app.router.add_get("/sleep-native", sleep_native)
    app.router.add_get("/sleep-asyncio", sleep_asyncio)
    return app


async def serve(loop_name: str) -> None:
    """Serves until SIGTERM/SIGINT. Protocol on stdout: one line
    `READY {json}` once listening, one line `STATS {json}` on the way out."""
    import aiohttp
    from aiohttp import web
    import asyncio_bridge

    counters: dict = {}
    runner = web.AppRunner(make_app(counters), access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))  # the kernel picks a free port
    site = web.SockSite(runner, sock, backlog=1024)
    await site.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    info = {
        "port": sock.getsockname()[1], "pid": os.getpid(), "loop": loop_name,
        "loop_class": f"{type(loop).__module__}.{type(loop).__name__}",
        "aiohttp": aiohttp.__version__,
        "asyncio_bridge": asyncio_bridge.__file__,
        "asyncio_bridge_settings": asyncio_bridge.configure(),
        "default_executor_threads": min(32, (os.cpu_count() or 1) + 4),
    }
    print("READY " + json.dumps(info), flush=True)
    await stop.wait()
    # A watchdog: whatever hangs from here on (a handler whose op never
    # completes keeps aiohttp's graceful shutdown waiting), SIGALRM's
    # default action ends the process.
    signal.alarm(int(SERVER_STOP_TIMEOUT_S))
    stats = {"routes": counters, "threads": os_threads(),
             "bridge": dict(asyncio_bridge.stats())}
    await runner.cleanup()
    print("STATS " + json.dumps(stats), flush=True)


def server_main(loop_name: str, parent_pid: int) -> int:
    die_with_parent(parent_pid)
    factory = asyncio.new_event_loop
    if loop_name == "uvloop":
        import uvloop
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(loop_name))
    return 0


class Server:
    """A server child process on one loop; a context manager that always
    stops it (SIGTERM, then SIGKILL), whatever happens in between."""

    def __init__(self, loop_name: str):
        self.loop_name = loop_name
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}
        self.exit_code: int | None = None
        self.stats: dict | None = None

    def __enter__(self):
        # bufsize=0 and os.read one byte at a time: reading the READY line
        # never reads ahead into what communicate() collects at the end.
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--serve", self.loop_name,
             "--parent", str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, bufsize=0)
        self.pid = self.proc.pid
        try:
            line = self._read_line(self.proc, SERVER_START_TIMEOUT_S)
            if not line.startswith("READY "):
                try:  # an empty line: the child exited, say how
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                raise RuntimeError(f"server on {self.loop_name} did not start "
                                   f"(exit code {self.proc.poll()}, said "
                                   f"{line!r})")
            self.info = json.loads(line[len("READY "):])
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.info['port']}"

    def _read_line(self, proc: subprocess.Popen, timeout: float) -> str:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        data = b""
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise RuntimeError(f"server on {self.loop_name}: no answer "
                                   f"within {timeout:.0f} s")
            chunk = os.read(fd, 1)
            if not chunk:  # the child exited
                break
            data += chunk
        return data.decode(errors="replace").strip()

    def cpu_seconds(self, loop_thread: bool = False) -> float | None:
        """User + system CPU time of the server process, all its threads,
        or of its main thread alone: the one that runs the event loop."""
        path = (f"/proc/{self.pid}/task/{self.pid}/stat" if loop_thread
                else f"/proc/{self.pid}/stat")
        try:
            stat = Path(path).read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()
        # fields[0] is field 3 (state): utime is field 14, stime field 15.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def cpu_by_thread(self) -> dict[str, float]:
        """CPU time of the server's live threads, grouped: the loop's (the
        main thread), asyncio_bridge's by their names (ab-engine, ab-worker
        for the worker pool, ab-courier, ab-blocking), and all others
        (on Python 3.11 the default executor's threads are among them)."""
        groups: dict[str, float] = {}
        tick = os.sysconf("SC_CLK_TCK")
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return groups
        for tid in tids:
            try:
                stat = Path(f"/proc/{self.pid}/task/{tid}/stat").read_text()
            except OSError:  # the thread ended meanwhile
                continue
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat.rsplit(")", 1)[1].split()
            group = ("loop" if int(tid) == self.pid else
                     name if name in BRIDGE_THREADS else "other threads")
            groups[group] = (groups.get(group, 0.0)
                             + (int(fields[11]) + int(fields[12])) / tick)
        return groups

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        out = b""
        try:
            if proc.poll() is None:
                proc.terminate()
            out, _ = proc.communicate(timeout=SERVER_STOP_TIMEOUT_S + 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        finally:
            if proc.poll() is None:  # an exception above: never leave it
                proc.kill()
                proc.wait()
        for line in out.decode(errors="replace").splitlines():
            if line.startswith("STATS "):
                self.stats = json.loads(line[len("STATS "):])
        self.exit_code = proc.returncode


# --------------------------------------------------------------------------
# Payload, route checks
# --------------------------------------------------------------------------

def make_payload() -> bytes:
    """16 KiB of random words from a 500-word vocabulary (seeded): zlib
    finds repeats to compress, but not a trivial pattern."""
    rng = random.Random(16)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz",
                               k=rng.randint(2, 10))) for _ in range(500)]
    text = b" ".join(rng.choice(words) for _ in range(4000))
    assert len(text) >= PAYLOAD_BYTES
    return text[:PAYLOAD_BYTES]


def check_routes(url: str, payload: bytes, expected: bytes) -> dict:
    """One request per route before any load: status codes, and both
    compression routes returning exactly `expected`."""
    check: dict = {"routes": {}}
    for route, (method, _) in ROUTES.items():
        request = urllib.request.Request(
            url + route, method=method,
            data=payload if method == "POST" else None,
            headers={"Content-Type": "application/octet-stream"}
            if method == "POST" else {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, b""
        except OSError as exc:
            status, body = f"error: {exc!r}", b""
        check["routes"][route] = {"status": status, "bytes": len(body)}
        if route.startswith("/zlib"):
            check["routes"][route]["identical_to_zlib"] = body == expected
    check["all_200"] = all(r["status"] == 200
                           for r in check["routes"].values())
    check["zlib_identical"] = all(
        r.get("identical_to_zlib", True) for r in check["routes"].values())
    check["ok"] = check["all_200"] and check["zlib_identical"]
    return check


# --------------------------------------------------------------------------
# wrk
# --------------------------------------------------------------------------

def write_lua_script(path: Path, payload: bytes) -> None:
    """wrk's POST script, the body inlined as a Lua long string."""
    if not all(32 <= b < 127 for b in payload) or b"]==]" in payload:
        raise ValueError("the payload must be printable ASCII without ]==]")
    path.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/octet-stream"\n'
        f"wrk.body = [==[{payload.decode('ascii')}]==]\n")


UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def to_ms(value: str, unit: str) -> float:
    return float(value) * UNIT_MS[unit]


def parse_wrk(text: str) -> dict:
    """The figures of `wrk --latency` output; missing ones stay None."""
    result: dict = {"requests_per_s": None, "p50_ms": None, "p75_ms": None,
                    "p90_ms": None, "p99_ms": None, "requests": None,
                    "non_2xx": 0, "socket_errors": {}}
    if match := re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M):
        result["requests_per_s"] = float(match.group(1))
    for pct, value, unit in re.findall(
            r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M):
        result[f"p{pct}_ms"] = to_ms(value, unit)
    if match := re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", text):
        result["requests"] = int(match.group(1))
        result["seconds"] = to_ms(match.group(2), match.group(3)) / 1e3
    if match := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text):
        result["non_2xx"] = int(match.group(1))
    if match := re.search(r"Socket errors: connect (\d+), read (\d+), "
                          r"write (\d+), timeout (\d+)", text):
        result["socket_errors"] = dict(zip(
            ("connect", "read", "write", "timeout"),
            map(int, match.groups())))
    result["errors"] = result["non_2xx"] + sum(
        result["socket_errors"].values())
    return result


def run_wrk(wrk: str, url: str, route: str, seconds: int, connections: int,
            lua: Path) -> dict:
    method = ROUTES[route][0]
    command = [wrk, f"-t{WRK_THREADS}", f"-c{connections}", f"-d{seconds}s",
               f"--timeout={WRK_TIMEOUT_S}s", "--latency"]
    if method == "POST":
        command += ["-s", str(lua)]
    command.append(url + route)
    # subprocess.run kills wrk on a timeout or any exception (Ctrl-C too).
    done = subprocess.run(command, capture_output=True, text=True,
                          timeout=seconds + 30)
    result = parse_wrk(done.stdout)
    result["wrk_exit_code"] = done.returncode
    result["wrk_output"] = done.stdout + done.stderr
    if done.returncode != 0 or result["requests_per_s"] is None:
        result["errors"] = result.get("errors", 0) + 1
        result["wrk_failed"] = True
    return result


# --------------------------------------------------------------------------
# Rounds
# --------------------------------------------------------------------------

def measure_round(wrk, loop_name, round_index, config, lua, payload,
                  expected, log) -> dict:
    """One server on `loop_name`: route check, then every route (order
    rotated by round), each a warm-up and a measured wrk run."""
    routes = list(ROUTES)
    shift = round_index % len(routes)
    order = routes[shift:] + routes[:shift]
    runs = {}
    with Server(loop_name) as server:
        check = check_routes(server.url, payload, expected)
        if not check["ok"]:
            raise RouteCheckFailed(loop_name, check)
        for route in order:
            log(f"    {loop_name:8} {route}")
            run_wrk(wrk, server.url, route, config["warmup_s"],
                    config["connections"], lua)
            before = cpu_snapshot(server)
            run = run_wrk(wrk, server.url, route, config["duration_s"],
                          config["connections"], lua)
            run |= cpu_figures(before, cpu_snapshot(server),
                               run.get("requests"))
            if disturbed(run):
                log(f"      other processes took "
                    f"{run['others_cpu_pct']:.0f}% of a core meanwhile")
            runs[route] = run
        info = server.info
    return {"server": info, "route_check": check, "order": order,
            "runs": runs, "server_stats": server.stats,
            "server_exit_code": server.exit_code}


def machine_busy_seconds() -> float:
    """CPU time spent in processes, machine-wide: user + nice + system of
    /proc/stat (not idle, iowait, interrupts or steal)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return sum(int(v) for v in fields[1:4]) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(server: Server) -> dict:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall": time.monotonic(), "server": server.cpu_seconds(),
            "loop": server.cpu_seconds(loop_thread=True),
            "threads": server.cpu_by_thread(),
            "machine": machine_busy_seconds(),
            # wrk is this process's only child reaped in between
            "children": children.ru_utime + children.ru_stime,
            "self": me.ru_utime + me.ru_stime}


def cpu_figures(before: dict, after: dict, requests: int | None) -> dict:
    """The server's CPU per request and the CPU that other processes took
    meanwhile (machine-wide minus server, wrk and this script), as a
    percentage of one core: a run beside someone else's work shows it."""
    if None in (before["server"], after["server"], before["loop"],
                after["loop"]):
        return {}
    delta = {key: after[key] - before[key] for key in before
             if key != "threads"}
    # Each figure is counted in clock ticks: the difference may come out
    # a few ticks below zero.
    others = (delta["machine"] - delta["server"] - delta["children"]
              - delta["self"])
    figures = {"server_cpu_s": delta["server"], "loop_cpu_s": delta["loop"],
               "wrk_cpu_s": delta["children"],
               "machine_busy_s": delta["machine"], "others_cpu_s": others,
               "others_cpu_pct": max(others, 0.0) / delta["wall"] * 100}
    if requests:
        figures["server_cpu_us_per_request"] = delta["server"] / requests * 1e6
        figures["loop_cpu_us_per_request"] = delta["loop"] / requests * 1e6
        figures["thread_cpu_us_per_request"] = {
            group: (seconds - before["threads"].get(group, 0.0))
            / requests * 1e6
            for group, seconds in after["threads"].items()}
    return figures


class RouteCheckFailed(Exception):
    def __init__(self, loop_name, check):
        super().__init__(f"route check failed on {loop_name}: "
                         f"{json.dumps(check['routes'])}")
        self.check = check


def run_rounds(wrk, loops, config, lua, payload, expected, log) -> list:
    rounds = []
    for round_index in range(config["rounds"]):
        log(f"  round {round_index + 1}/{config['rounds']}")
        loop_order = loops if round_index % 2 == 0 else loops[::-1]
        rounds.append({loop_name: measure_round(
            wrk, loop_name, round_index, config, lua, payload, expected, log)
            for loop_name in loop_order})
    return rounds


def median_of(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def disturbed(run: dict) -> bool:
    return run.get("others_cpu_pct", 0) > NOISY_OTHERS_CPU_PCT


def spread(values) -> float | None:
    """(max - min) / median over rounds: how much one route's figure moves
    from round to round on this machine."""
    values = [v for v in values if v]
    if len(values) < 2:
        return None
    return (max(values) - min(values)) / statistics.median(values)


def summarize(rounds, loops) -> dict:
    """Per loop and route, medians over rounds; per pair, the median of the
    per-round ratios."""
    summary: dict = {}
    for loop_name in loops:
        per_loop = summary.setdefault(loop_name, {"routes": {},
                                                  "ratios": {}})
        runs = {route: [r[loop_name]["runs"][route] for r in rounds]
                for route in ROUTES}
        for route, route_runs in runs.items():
            per_loop["routes"][route] = {
                "requests_per_s": median_of(
                    r["requests_per_s"] for r in route_runs),
                "p50_ms": median_of(r["p50_ms"] for r in route_runs),
                "p99_ms": median_of(r["p99_ms"] for r in route_runs),
                "server_cpu_us_per_request": median_of(
                    r.get("server_cpu_us_per_request") for r in route_runs),
                "loop_cpu_us_per_request": median_of(
                    r.get("loop_cpu_us_per_request") for r in route_runs),
                "thread_cpu_us_per_request": {
                    group: median_of(
                        r.get("thread_cpu_us_per_request", {}).get(group, 0.0)
                        for r in route_runs)
                    for group in THREAD_GROUPS},
                "others_cpu_pct": median_of(
                    r.get("others_cpu_pct") for r in route_runs),
                "disturbed_runs": sum(disturbed(r) for r in route_runs),
                "errors": sum(r["errors"] for r in route_runs),
                "flagged": any(r["errors"] for r in route_runs),
                "requests_per_s_rounds": [r["requests_per_s"]
                                          for r in route_runs],
                "requests_per_s_spread": spread(
                    [r["requests_per_s"] for r in route_runs]),
                "p99_ms_rounds": [r["p99_ms"] for r in route_runs],
            }
        for name, native, reference in PAIRS:
            pairs = list(zip(runs[native], runs[reference]))
            # Rounds in which neither run of the pair was disturbed.
            quiet = [(mine, theirs) for mine, theirs in pairs
                     if not disturbed(mine) and not disturbed(theirs)]

            def ratios(key, pairs):
                return median_of(
                    mine[key] / theirs[key]
                    if mine[key] and theirs[key] else None
                    for mine, theirs in pairs)
            per_loop["ratios"][name] = {
                "native": native, "reference": reference,
                "requests_per_s": ratios("requests_per_s", pairs),
                "p50_ms": ratios("p50_ms", pairs),
                "p99_ms": ratios("p99_ms", pairs),
                "quiet_rounds": len(quiet),
                "quiet_requests_per_s": ratios("requests_per_s", quiet),
                "quiet_p99_ms": ratios("p99_ms", quiet),
            }
    return summary


# --------------------------------------------------------------------------
# Targets, table
# --------------------------------------------------------------------------

def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def evaluate_targets(summary) -> list[dict]:
    targets = []

    def add(name, loop_name, figure, limit, ok):
        targets.append({"target": name, "loop": loop_name, "figure": figure,
                        "limit": limit, "result": verdict(ok)})

    for loop_name, entry in summary.items():
        zlib_ratio = entry["ratios"]["zlib"]
        limit = TARGET_ZLIB_RPS.get(loop_name)
        figure = zlib_ratio["requests_per_s"]
        if limit is not None:
            add(f"/zlib-native requests/s >= {limit}x /zlib-executor's",
                loop_name, figure, limit,
                figure >= limit if figure is not None else None)
        figure = zlib_ratio["p99_ms"]
        add("/zlib-native p99 below /zlib-executor's (ratio < 1)",
            loop_name, figure, 1.0,
            figure < 1.0 if figure is not None else None)
        figure = entry["ratios"]["sleep"]["requests_per_s"]
        add(f"/sleep-native requests/s >= {TARGET_SLEEP_RPS}x "
            f"/sleep-asyncio's (no slower, within 3% noise)", loop_name,
            figure, TARGET_SLEEP_RPS,
            figure >= TARGET_SLEEP_RPS if figure is not None else None)
        errors = sum(r["errors"] for r in entry["routes"].values())
        add("no non-2xx responses or socket errors in any run", loop_name,
            errors, 0, errors == 0)
    return targets


def fmt(value, spec=".2f", suffix="") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def pct(value):
    return None if value is None else value * 100


def render_table(results) -> str:
    lines: list[str] = []
    out = lines.append
    machine, config = results["machine"], results["config"]
    out(f"Machine: {machine['cpu']}, {machine['cores']} cores "
        f"({machine['cores_usable']} usable), Linux {machine['kernel']}, "
        f"Python {machine['python']}, aiohttp {machine['aiohttp']}, "
        f"uvloop {machine['uvloop']}, {machine['wrk']}")
    source = machine["source"]
    out(f"asyncio_bridge: {source['package']}"
        + (f", commit {source['commit']}" if source["commit"] else "")
        + (f", modified: {', '.join(source['modified'])}"
           if source["modified"] else ""))
    out(f"wrk -t{WRK_THREADS} -c{config['connections']} "
        f"-d{config['duration_s']}s --latency on {HOST} (after a "
        f"{config['warmup_s']} s warm-up), median of {config['rounds']} "
        f"interleaved round(s); POST body {config['payload_bytes']} bytes "
        f"(zlib level {ZLIB_LEVEL}: {config['compressed_bytes']} bytes); "
        f"sleeps of {SLEEP_S * 1e3:g} ms")
    out("")
    header = (f"{'loop':8} {'route':15} {'awaits':46} {'req/s':>8} "
              f"{'spread':>6} {'p50 ms':>7} {'p99 ms':>7} {'cpu/req':>7} "
              f"{'loop':>5} {'others':>6} {'errors':>6}")
    out(header)
    out("-" * len(header))
    for loop_name, entry in results["summary"].items():
        for route, row in entry["routes"].items():
            out(f"{loop_name:8} {route:15} {ROUTES[route][1]:46} "
                f"{fmt(row['requests_per_s'], '.0f'):>8} "
                f"{fmt(pct(row['requests_per_s_spread']), '.0f', '%'):>6} "
                f"{fmt(row['p50_ms']):>7} {fmt(row['p99_ms']):>7} "
                f"{fmt(row['server_cpu_us_per_request'], '.0f'):>7} "
                f"{fmt(row['loop_cpu_us_per_request'], '.0f'):>5} "
                f"{fmt(row['others_cpu_pct'], '.0f', '%'):>6} "
                f"{row['errors']:>6}"
                + (f"  {row['disturbed_runs']} disturbed"
                   if row["disturbed_runs"] else "")
                + ("  FLAGGED" if row["flagged"] else ""))
    out("(req/s, p50, p99: wrk's figures; spread: (max - min) / median of "
        "req/s over the rounds; cpu/req: the server process's "
        "CPU time per request in us, all threads; loop: the same for the "
        "loop's thread alone; others: CPU time other processes took "
        f"meanwhile, % of one core (a run over {NOISY_OTHERS_CPU_PCT:.0f}% "
        "is counted as disturbed); errors: non-2xx/3xx responses "
        "plus socket errors over all rounds, a run with any is FLAGGED)")
    out("")
    out("Server CPU per request by thread, us (median of rounds; groups "
        "that took none left out):")
    rows = [(loop_name, route, row["thread_cpu_us_per_request"])
            for loop_name, entry in results["summary"].items()
            for route, row in entry["routes"].items()]
    groups = [group for group in THREAD_GROUPS
              if any(threads.get(group) for _, _, threads in rows)]
    out(f"  {'loop':8} {'route':15} "
        + " ".join(f"{group:>13}" for group in groups))
    for loop_name, route, threads in rows:
        out(f"  {loop_name:8} {route:15} " + " ".join(
            f"{fmt(threads.get(group), '.0f'):>13}" for group in groups))
    out("")
    out("Ratios, native / reference, median of per-round ratios:")
    for loop_name, entry in results["summary"].items():
        for name, ratio in entry["ratios"].items():
            out(f"  {loop_name:8} {ratio['native']:14} / "
                f"{ratio['reference']:15} requests/s "
                f"{fmt(ratio['requests_per_s'], suffix='x'):>6}   "
                f"p50 {fmt(ratio['p50_ms'], suffix='x'):>6}   "
                f"p99 {fmt(ratio['p99_ms'], suffix='x'):>6}")
            out(f"  {'':8} {'':33} undisturbed rounds only "
                f"({ratio['quiet_rounds']} of {results['config']['rounds']}):"
                f" requests/s {fmt(ratio['quiet_requests_per_s'], suffix='x')}"
                f", p99 {fmt(ratio['quiet_p99_ms'], suffix='x')}")
    out("")
    out("Targets:")
    for target in results["targets"]:
        out(f"  {target['result']:4} {target['loop']:8} {target['target']}"
            f"  ({fmt(target['figure'])}, limit {target['limit']})")
    disturbed = sum(row["disturbed_runs"]
                    for entry in results["summary"].values()
                    for row in entry["routes"].values())
    if disturbed:
        total = (len(results["summary"]) * len(ROUTES)
                 * results["config"]["rounds"])
        out(f"  note: {disturbed} of {total} measured runs were disturbed "
            f"(other processes took over {NOISY_OTHERS_CPU_PCT:.0f}% of a "
            f"core meanwhile): run again on a quiet machine")
    out("")
    out(f"Took {results['elapsed_s']:.0f} s.")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def version_of(module_name: str) -> str | None:
    try:
        return getattr(importlib.import_module(module_name), "__version__",
                       "present")
    except ImportError:
        return None


def source_tree() -> dict:
    """Where asyncio_bridge is imported from and, when that is a git
    checkout (an editable install), its commit and the tracked files
    modified in it: what is measured is the checkout as it stands.
    Read-only: --no-optional-locks keeps git status from writing the index."""
    spec = importlib.util.find_spec("asyncio_bridge")
    origin = spec.origin if spec else None
    folder = Path(origin).parent if origin else SCRIPT.parent

    def git(*args):
        try:
            done = subprocess.run(
                ["git", "--no-optional-locks", "-C", str(folder), *args],
                capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None
    commit = git("rev-parse", "--short", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"package": origin, "commit": commit.strip() if commit else None,
            "modified": [line[3:] for line in status.splitlines()]
            if status is not None else None}


def machine_description(wrk: str) -> dict:
    done = subprocess.run([wrk, "-v"], capture_output=True, text=True,
                          timeout=10)
    first = (done.stdout or done.stderr).splitlines()[:1]
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "aiohttp": version_of("aiohttp"),
        "uvloop": version_of("uvloop"),
        "wrk": " ".join(first[0].split()[:2]) if first else "wrk",
        "source": source_tree(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="folder for service.json")
    parser.add_argument("--quick", action="store_true",
                        help="short smoke run (1 round of 3 s per route)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds")
    parser.add_argument("--duration", type=int,
                        help="seconds per measured wrk run")
    parser.add_argument("--connections", type=int, default=64,
                        help="wrk's connections (default 64)")
    parser.add_argument("--serve", choices=("asyncio", "uvloop"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--parent", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def sigterm_to_exit(signum, frame):
    # SystemExit unwinds through every finally: the server is stopped.
    sys.exit(128 + signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.serve:
        return server_main(args.serve, args.parent or os.getppid())

    def log(message):
        print(message, file=sys.stderr, flush=True)

    wrk = shutil.which("wrk")
    if wrk is None:
        log("wrk is not installed: this benchmark needs it as its load "
            "generator. Install it with `apt-get install wrk` (Debian), or "
            "run `bash tools/setup.sh`, which installs it.")
        return 2
    missing = [name for name in ("aiohttp", "asyncio_bridge", "bridge_example")
               if importlib.util.find_spec(name) is None]
    if missing:
        log(f"missing Python packages: {', '.join(missing)} (pip install "
            f"aiohttp; the example extension: pip install "
            f"examples/bridge_example)")
        return 2
    loops = ["asyncio"]
    if importlib.util.find_spec("uvloop") is not None:
        loops.append("uvloop")
    else:
        log("uvloop is not installed: stdlib asyncio only")
    signal.signal(signal.SIGTERM, sigterm_to_exit)

    started = time.perf_counter()
    payload = make_payload()
    expected = zlib.compress(payload, ZLIB_LEVEL)
    quick = args.quick
    config = {
        "quick": quick,
        "rounds": args.rounds or (1 if quick else 5),
        "duration_s": args.duration or (3 if quick else 6),
        "warmup_s": 1 if quick else 2,
        "connections": args.connections,
        "wrk_threads": WRK_THREADS,
        "wrk_timeout_s": WRK_TIMEOUT_S,
        "payload_bytes": len(payload),
        "compressed_bytes": len(expected),
        "zlib_level": ZLIB_LEVEL,
        "sleep_s": SLEEP_S,
        "loops": loops,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_description(wrk)
    log(f"service benchmark: {len(loops)} loop(s) x {len(ROUTES)} routes x "
        f"{config['rounds']} round(s) of {config['warmup_s']} + "
        f"{config['duration_s']} s")

    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        lua = Path(tmp) / "post.lua"
        write_lua_script(lua, payload)
        try:
            rounds = run_rounds(wrk, loops, config, lua, payload, expected,
                                log)
        except RouteCheckFailed as exc:
            log(str(exc))
            return 1
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            log(f"benchmark failed: {exc}")
            return 1

    summary = summarize(rounds, loops)
    results = {"machine": machine, "config": config,
               "routes": {route: {"method": method, "awaits": awaits}
                          for route, (method, awaits) in ROUTES.items()},
               "rounds": rounds, "summary": summary,
               "targets": evaluate_targets(summary),
               "elapsed_s": time.perf_counter() - started}
    table = render_table(results)
    print(table)
    (args.out / "service.json").write_text(json.dumps(results, indent=2))
    log(f"wrote {args.out / 'service.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
