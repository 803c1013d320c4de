"""Scenario 4: fork.

Each case is a subprocess with a 10 s limit (a hang fails it).  Cases:

  idle        ops ran (engine, courier, bridge started), the loop is closed,
              then os.fork(): the child runs new ops on a new loop, and no
              thread of the library is left to fork (3.12+ would warn)
  in_flight   hand-driven ops (sleeps of 0.3 s, inf, an fd wait) in flight on
              a loop that is not running at the moment of the fork; the
              child finds each inherited Future failed with ForkError,
              sending to an inherited op raises ForkError, and new ops work
              on a new loop (in a new thread: the fork happened between two
              runs of the old loop, whose selector the child shares with the
              parent and must not use); the parent's ops finish normally
  thread      a non-main thread with its own running loop and ops in flight
              forks from inside a loop callback; the child (which has only
              that thread) runs new ops on a new loop in a new thread
  spawn       200 subprocesses spawned from 4 threads while the main loop
              runs a stream of ops: half plain subprocess.run (posix_spawn or
              vfork: no at-fork hooks), half with a preexec_fn (a real fork
              whose child runs the at-fork hooks in a multi-threaded process)

Pass: exit 0, the child's checks and the parent's all hold, under 10 s.
"""

import json

import pytest

from .conftest import count

SCENARIO = (4, "Fork")

SOURCE = """
import warnings
CASE = sys.argv[2]
# A fork with ops in flight forks a process that runs the library's threads:
# 3.12+ warns, and rightly.  An idle library leaves none ("idle" checks it).
if CASE != "idle":
    warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)

async def new_work():
    r, w = socket.socketpair()
    w.send(b"x")
    await ab.wait_readable(r, timeout=2)
    got = await asyncio.gather(*(ab.nop(i) for i in range(100)), ab.sleep(0.01, "slept"))
    r.close(); w.close()
    return got == list(range(100)) + ["slept"]

def run_new_loop_in_thread():
    box = []
    def target():
        loop = new_loop()
        try:
            box.append(loop.run_until_complete(new_work()))
        finally:
            loop.close()
    t = threading.Thread(target=target); t.start(); t.join(5)
    return bool(box and box[0])

def wait_child(pid, limit=8.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    return "hung"

def start_ops(a):
    ops = [ab.sleep(0.3, result="late"), ab.sleep(float("inf")), ab.wait_readable(a)]
    return [(op, op.send(None)) for op in ops]

report = {}
a, b = socket.socketpair()

if CASE == "idle":
    loop = new_loop(); loop.run_until_complete(new_work()); loop.close()
    pid = os.fork()
    if pid == 0:
        os._exit(0 if run_new_loop_in_thread() and settle() == 0 else 3)
    report["child"] = wait_child(pid)
    loop = new_loop(); report["parent_ok"] = loop.run_until_complete(new_work()); loop.close()

elif CASE == "in_flight":
    loop = new_loop()
    async def start():
        return start_ops(a)
    held = loop.run_until_complete(start())
    pid = os.fork()
    if pid == 0:
        ok = all(f.done() and isinstance(f.exception(), ab.ForkError) for _, f in held)
        for op, _ in held:
            try:
                op.send(None)
                ok = False
            except ab.ForkError:
                pass
            except BaseException:
                ok = False
        ok = ok and run_new_loop_in_thread()
        os._exit(0 if ok else 3)
    report["child"] = wait_child(pid)
    # The parent is unaffected: its sleep finishes, the others are cancelled.
    async def finish():
        await asyncio.wait([held[0][1]], timeout=2)
        for op, f in held[1:]:
            op.close()
        return held[0][1].result()
    report["parent_ok"] = loop.run_until_complete(finish()) == "late"
    del held
    loop.run_until_complete(asyncio.sleep(0.05))
    loop.close()

elif CASE == "thread":
    box = {}
    def forker():
        loop = new_loop()
        async def main():
            held = start_ops(a)
            await asyncio.sleep(0.01)
            pid = os.fork()
            if pid == 0:
                ok = all(isinstance(f.exception(), ab.ForkError) for _, f in held)
                os._exit(0 if ok and run_new_loop_in_thread() else 3)
            box["child"] = await loop.run_in_executor(None, wait_child, pid)
            await asyncio.wait([held[0][1]], timeout=2)
            box["parent_ok"] = held[0][1].result() == "late"
            for op, _ in held[1:]:
                op.close()
        loop.run_until_complete(main())
        loop.run_until_complete(asyncio.sleep(0.05))
        loop.close()
    t = threading.Thread(target=forker); t.start(); t.join(9)
    report.update(box)

elif CASE == "spawn":
    import subprocess
    N = int(sys.argv[3])
    failures = []
    def spawner(k):
        for i in range(N // 4):
            kw = {"preexec_fn": lambda: None} if i % 2 else {}
            p = subprocess.run([sys.executable, "-c", "pass"] if i % 10 == 0 else ["true"], **kw)
            if p.returncode:
                failures.append(p.returncode)
    async def main():
        stop = False
        async def stream():
            n = 0
            while not stop:
                assert await ab.nop(n) == n
                await ab.sleep(0.001)
                n += 1
            return n
        streams = [asyncio.ensure_future(stream()) for _ in range(20)]
        threads = [threading.Thread(target=spawner, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            await asyncio.sleep(0.01)
        stop = True
        return sum(await asyncio.gather(*streams))
    loop = new_loop()
    report["ops"] = loop.run_until_complete(main())
    loop.close()
    report["child"] = 0 if not failures else failures
    report["parent_ok"] = True

report["in_flight"] = settle()
print(json.dumps(report))
"""


@pytest.mark.parametrize("case", ["idle", "in_flight", "thread", "spawn"])
@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_fork(loop_name, case, script, run_script, figure):
    spawns = count(40, 200)
    proc = run_script(script(SOURCE), loop_name, case, spawns, timeout=10 if case != "spawn" else 30)
    lines = proc.stdout.strip().splitlines()
    out = json.loads(lines[-1]) if lines else {}
    extra = f"{spawns} spawns, {out.get('ops')} ops meanwhile; " if case == "spawn" else ""
    figure(f"{case}: {extra}child {out.get('child')}, parent ok {out.get('parent_ok')}, "
           f"{proc.wall:.2f} s, exit {proc.returncode}, stderr {len(proc.stderr)} chars",
           wall=round(proc.wall, 2))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert out["child"] == 0, out
    assert out["parent_ok"] is True, out
    assert out["in_flight"] == 0, out
    assert proc.wall < 10 if case != "spawn" else True
