"""Scenario 2: a loop closed with work in flight.

Run in a subprocess so that stderr can be checked.  The ops are driven by
hand (op.send(None) in a loop callback, the returned Futures kept), not by
tasks: asyncio itself prints "Task was destroyed but it is pending!" for any
task still pending when its closed loop is dropped, with asyncio.sleep as
well, and that is asyncio talking, not this library.  With no task at all,
anything on stderr comes from asyncio_bridge (or from a Future it resolved
with an exception nobody retrieved).

The loop is a subclass that records every scheduling call made once it is
closed and did not raise (call_soon, call_soon_threadsafe, call_later,
call_at, add_reader, remove_reader: asyncio and uvloop raise RuntimeError on
a closed loop, which schedules nothing, and the library may rely on that
rather than on a racy is_closed() check); each Future gets a done callback, so resolving one after
close would also schedule.  Modes:

  inflight  100 ops (sleeps of 50-500 ms and inf, a wait_readable that never
            fires, nops) started, then the loop stopped and closed at once
  race      100 sleeps of 20 ms, the loop closed at a random moment within
            +-2 ms of their expiry, so that close races with completions

Before the rounds the script runs one op to completion and waits 0.3 s, as
a program that used the bridge earlier would: the courier is then idle.

Pass: exit 0, empty stderr, no call on the closed loop, no Future changes
state after close, in_flight back to 0 within 1.5 s of close (with
add_reader delivery close() frees the bridge's anchor at once; with
call_soon_threadsafe the courier looks for closed loops every 250 ms).
"""

import json

import pytest

from .conftest import count

SCENARIO = (2, "Loop closed with work in flight")

SOURCE = """
MODE, ROUNDS = sys.argv[2], int(sys.argv[3])
Base = uvloop.Loop if LOOP_NAME == "uvloop" else asyncio.SelectorEventLoop
after_close = []

class Watched(Base):
    pass

for _name in ("call_soon", "call_soon_threadsafe", "call_later", "call_at",
              "add_reader", "remove_reader"):
    def _wrap(name=_name):
        base = getattr(Base, name)
        def method(self, *args, **kwargs):
            closed = self.is_closed()
            result = base(self, *args, **kwargs)  # raises on a closed loop: nothing scheduled
            if closed:
                after_close.append(name)
            return result
        return method
    setattr(Watched, _name, _wrap())

rng = random.Random(int(os.environ.get("SEED", "0")))
# A program that used the bridge before: the engine and the courier thread
# are running, and idle, when the loop under test starts its ops.
asyncio.run(ab.nop())
time.sleep(0.3)
a, b = socket.socketpair()
freed_after, changed, started = [], 0, 0

def start(loop, ops, futs):
    for i in range(100):
        if MODE == "race":
            op = ab.sleep(0.02, result=i)
        else:
            op = [lambda: ab.sleep(rng.uniform(0.05, 0.5), result=i),
                  lambda: ab.sleep(float("inf")),
                  lambda: ab.wait_readable(a),
                  lambda: ab.nop(i)][i % 4]()
        fut = op.send(None)
        fut.add_done_callback(lambda f: None)
        ops.append(op)
        futs.append(fut)
    if MODE == "race":
        loop.call_later(0.02 + rng.uniform(-0.002, 0.002), loop.stop)
    else:
        loop.stop()

for r in range(ROUNDS):
    loop = Watched()
    loop.set_debug(True)
    ops, futs = [], []
    loop.call_soon(start, loop, ops, futs)
    loop.run_forever()
    loop.close()
    closed_at = time.monotonic()
    at_close = [(f.done(), f.cancelled()) for f in futs]
    started += len(futs)
    left = settle(3.0)
    freed_after.append(time.monotonic() - closed_at if left == 0 else None)
    time.sleep(0.05)  # anything late would show now
    changed += sum((f.done(), f.cancelled()) != s for f, s in zip(futs, at_close))
    del ops, futs, loop
    gc.collect()

print(json.dumps({"after_close": after_close, "changed": changed, "started": started,
                  "freed_after": freed_after, "in_flight": ab.stats()["in_flight"]}))
"""


@pytest.mark.parametrize("mode,rounds", [("inflight", 1), ("race", None)])
@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_closed_loop(loop_name, mode, rounds, script, run_script, figure):
    rounds = rounds or count(5, 20)
    proc = run_script(script(SOURCE), loop_name, mode, rounds, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    frees = [t for t in out["freed_after"] if t is not None]
    worst = max(frees) if frees else None
    figure(
        f"{mode}: {rounds} round(s) x 100 ops ({out['started']} ops); calls on closed loop "
        f"{len(out['after_close'])}, Futures changed after close {out['changed']}, "
        f"rounds never freed {out['freed_after'].count(None)}, "
        f"slowest free {worst if worst is None else round(worst, 3)} s, "
        f"stderr {len(proc.stderr)} chars",
        rounds=rounds, ops=out["started"], slowest_free=worst,
    )
    assert proc.stderr == ""
    assert out["after_close"] == [], "scheduled on a closed loop"
    assert out["changed"] == 0, "a Future was resolved after its loop closed"
    assert None not in out["freed_after"], f"ops never freed: {out}"
    assert worst < 1.5, f"ops freed only {worst:.2f} s after close"


SHORT_LOOPS = """
N = int(sys.argv[2])
async def main():
    try:
        async with asyncio.timeout(0.001):
            await ab.sleep(float("inf"))
    except TimeoutError:
        pass
for i in range(N):
    loop = new_loop()
    loop.run_until_complete(main())
    loop.close()
print(json.dumps({"in_flight": settle()}))
"""


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_short_lived_loops_with_cancels(loop_name, script, run_script, figure):
    """Loops made, used for one op that asyncio.timeout cancels, and closed,
    one after another: the cancelled op comes back after its loop closed,
    and the loop is collected while the courier looks at its bridge."""
    n = count(1000, 3000)
    proc = run_script(script(SHORT_LOOPS), loop_name, n, timeout=120)
    figure(f"{n} loops in a row, each closed right after a cancelled op: exit "
           f"{proc.returncode}{' (SIGSEGV)' if proc.returncode == -11 else ''}, "
           f"stderr {len(proc.stderr)} chars", loops=n, exit=proc.returncode)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stderr == ""
    assert json.loads(proc.stdout.strip().splitlines()[-1])["in_flight"] == 0
