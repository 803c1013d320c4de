"""Lifecycle (issue 2, point 7): many loops and threads, closed loops,
interpreter exit and fork.  The process-level cases run in a subprocess so
that stderr, exit code and wall time can be checked."""

import asyncio
import json
import threading
import time

import pytest
import uvloop

import asyncio_bridge as ab


def json_lines(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON result in stdout: {stdout!r}"
    return [json.loads(line) for line in lines]


def assert_clean(proc, budget=10.0):
    assert proc.stderr == "", proc.stderr
    assert proc.returncode == 0, (proc.returncode, proc.stdout)
    assert proc.wall < budget, proc.wall


# ---- many loops at once --------------------------------------------------------


def test_many_loops_in_threads_get_their_own_results(new_loop):
    n_threads, n_ops = 8, 300
    factories = [new_loop, asyncio.SelectorEventLoop, uvloop.new_event_loop]

    async def work(tag):
        loop_thread = threading.get_ident()
        values = [(tag, i) for i in range(n_ops)]
        got = await asyncio.gather(
            *(ab.nop(v) if i % 2 else ab.sleep(0.001 * (i % 7), v) for i, v in enumerate(values))
        )
        assert threading.get_ident() == loop_thread
        return got == values

    results = {}

    def thread_main(tag):
        loop = factories[tag % len(factories)]()
        loop.set_debug(True)
        errors = []
        loop.set_exception_handler(lambda loop, ctx: errors.append(ctx))
        try:
            results[tag] = (loop.run_until_complete(work(tag)), errors)
        finally:
            loop.close()

    threads = [threading.Thread(target=thread_main, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {t: (True, []) for t in range(n_threads)}


def test_loops_one_after_another_in_one_thread(new_loop):
    for i in range(20):
        loop = new_loop()
        try:
            assert loop.run_until_complete(ab.sleep(0.001, i)) == i
            assert loop.run_until_complete(ab.nop(-i)) == -i
        finally:
            loop.close()


def test_the_running_loop_is_found_again_after_every_change(new_loop):
    """An op belongs to whatever loop runs when it starts, however often the
    running loop changed before: ended, replaced while one runs, or cleared
    (on 3.11 the last holder found is kept while the thread's dict keeps its
    version)."""
    first, other = new_loop(), new_loop()

    def start(loop_expected):
        it = ab.nop("x").__await__()
        fut = it.send(None)
        assert fut.get_loop() is loop_expected
        return it

    async def inside():
        it = start(first)
        it.close()
        asyncio.events._set_running_loop(None)
        try:
            with pytest.raises(RuntimeError, match="no running event loop"):
                ab.nop().__await__().send(None)
            asyncio.events._set_running_loop(other)
            start(other).close()
        finally:
            asyncio.events._set_running_loop(None)
            asyncio.events._set_running_loop(first)
        start(first).close()
        return await ab.nop("back")

    try:
        assert first.run_until_complete(inside()) == "back"
        with pytest.raises(RuntimeError, match="no running event loop"):
            ab.nop().__await__().send(None)
        assert other.run_until_complete(ab.nop("other")) == "other"
        assert first.run_until_complete(ab.nop("first")) == "first"
    finally:
        first.close()
        other.close()


# ---- a loop closed with ops in flight ------------------------------------------

CLOSED_LOOP = """
import gc, threading
a, b = socket.socketpair()

async def start():
    await ab.nop()
    makers = (
        [lambda: ab.sleep(30)] * 50
        + [lambda: ab.sleep(0.05)] * 50
        + [lambda: ab.wait_readable(a)] * 20
        + [lambda: ab.wait_readable(a, timeout=0.05)] * 20
        + [lambda i=i: ab.nop(i) for i in range(200)]
    )
    pairs = []
    for make in makers:
        it = make().__await__()
        pairs.append((it, it.send(None)))
    return pairs

def close_with_ops_in_flight():
    loop = new_loop()
    pairs = loop.run_until_complete(start())
    in_flight = ab.stats()["in_flight"]
    done_at_close = [fut.done() for _, fut in pairs]
    loop.close()
    b.send(b"x")          # the fd waits become ready after the close
    time.sleep(0.3)       # the short sleeps and timeouts expire after it
    return pairs, in_flight, done_at_close

if sys.argv[2] == "thread":
    box = []
    t = threading.Thread(target=lambda: box.append(close_with_ops_in_flight()))
    t.start(); t.join()
    pairs, in_flight_at_close, done_at_close = box[0]
else:
    pairs, in_flight_at_close, done_at_close = close_with_ops_in_flight()
resolved = sum(fut.done() and not was for (_, fut), was in zip(pairs, done_at_close))
stats = settle()
loop = new_loop()
after = loop.run_until_complete(ab.sleep(0.01, "new loop works"))
loop.close()
del pairs
gc.collect()
print(json.dumps({"in_flight_at_close": in_flight_at_close, "resolved": resolved,
                  "in_flight": stats["in_flight"], "after": after,
                  "final_in_flight": settle()["in_flight"]}))
"""


@pytest.mark.parametrize("where", ["main", "thread"])
def test_closed_loop_cancels_and_frees_its_ops(run_script, where, tmp_path):
    script = CLOSED_LOOP.replace('sys.argv[2] == "thread"', repr(where == "thread"))
    proc = run_script(script)
    assert_clean(proc)
    [result] = json_lines(proc.stdout)
    assert result["in_flight_at_close"] >= 100, result
    assert result["resolved"] == 0, f"a Future was resolved on a closed loop: {result}"
    assert result["in_flight"] == 0, f"ops of the closed loop not freed within 3 s: {result}"
    assert result["after"] == "new loop works", result
    assert result["final_in_flight"] == 0, result


# ---- interpreter exit ------------------------------------------------------------

EXIT_MAIN_THREAD = """
a, b = socket.socketpair()
makers = (
    lambda i: ab.sleep(30),
    lambda i: ab.sleep(0.0005 * (i % 1000)),
    lambda i: ab.wait_readable(a),
    lambda i: ab.nop(i),
    lambda i: ab.wait_readable(a, timeout=0.2),
)

async def start():
    pairs = []
    for i in range(5000):
        it = makers[i % len(makers)](i).__await__()
        pairs.append((it, it.send(None)))
    return pairs

loop = new_loop()
KEEP = loop.run_until_complete(start())
print(json.dumps({"in_flight": ab.stats()["in_flight"], "ready": time.time()}), flush=True)
"""

EXIT_DAEMON_THREAD = """
import random, threading
ready = threading.Event()

def run():
    a, b = socket.socketpair()
    async def guarded(op):
        try:
            await op
        except TimeoutError:
            pass
    async def main():
        for i in range(5000):
            kind = i % 4
            if kind == 0:
                op = ab.sleep(30)
            elif kind == 1:
                op = ab.sleep(random.random())
            elif kind == 2:
                op = ab.wait_readable(a, timeout=random.random())
            else:
                op = ab.nop(i)
            asyncio.ensure_future(guarded(op))
        await asyncio.sleep(0.05)
        ready.set()
        while True:
            await ab.sleep(0.001)
    loop = new_loop()
    loop.run_until_complete(main())

threading.Thread(target=run, daemon=True).start()
assert ready.wait(10)
print(json.dumps({"in_flight": ab.stats()["in_flight"], "ready": time.time()}), flush=True)
time.sleep(0.05)
"""


@pytest.mark.parametrize("script", [EXIT_MAIN_THREAD, EXIT_DAEMON_THREAD], ids=["main", "daemon"])
def test_exit_with_thousands_of_ops_in_flight(run_script, script):
    proc = run_script(script)
    exited = time.time()
    assert_clean(proc)
    [result] = json_lines(proc.stdout)
    assert result["in_flight"] >= 2500, result
    assert exited - result["ready"] < 2.0, f"exit took {exited - result['ready']:.2f} s"


# ---- fork ------------------------------------------------------------------------

FORK_PRELUDE = """
import traceback, warnings
warnings.filterwarnings("ignore", "This process", DeprecationWarning)

def finish(it):
    try:
        it.send(None)
    except StopIteration as stop:
        return ["value", stop.value]
    except BaseException as exc:
        return [type(exc).__name__, str(exc), isinstance(exc, ab.ForkError)]
    return ["no StopIteration"]

async def start_in_flight(result="parent"):
    assert await ab.nop(1) == 1
    it = ab.sleep(0.3, result).__await__()
    return it, it.send(None)

async def new_ops():
    a, b = socket.socketpair()
    b.send(b"x")
    return [
        await ab.nop("n"),
        await ab.sleep(0.01, "s"),
        await asyncio.gather(*(ab.nop(i) for i in range(100))) == list(range(100)),
        await asyncio.wait_for(ab.wait_readable(a), 5),
    ]

def child(body):
    code = 1
    try:
        print(json.dumps(body()), flush=True)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

def wait_child(pid, deadline=5.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return "hung"

async def parent_after(it, fut):
    await asyncio.wait_for(asyncio.shield(fut), 5)
    return [finish(it), await new_ops()]
"""

FORK_NEW_LOOP = FORK_PRELUDE + """
loop = new_loop()
it, fut = loop.run_until_complete(start_in_flight())
pid = os.fork()
if pid == 0:
    child(lambda: {"child": new_loop().run_until_complete(new_ops())})
code = wait_child(pid)
parent = loop.run_until_complete(parent_after(it, fut))
loop.close()
print(json.dumps({"child_exit": code, "parent": parent, "in_flight": settle()["in_flight"]}))
"""

FORK_INHERITED_LOOP = FORK_PRELUDE + """
loop = new_loop()
it, fut = loop.run_until_complete(start_in_flight())

def in_child():
    loop.run_until_complete(asyncio.wait([fut], timeout=2.0))
    return {"fut_done": fut.done(), "inherited": finish(it),
            "child": loop.run_until_complete(new_ops())}

pid = os.fork()
if pid == 0:
    child(in_child)
code = wait_child(pid)
parent = loop.run_until_complete(parent_after(it, fut))
loop.close()
print(json.dumps({"child_exit": code, "parent": parent, "in_flight": settle()["in_flight"]}))
"""

FORK_STRESS = FORK_PRELUDE + """
import random

async def start_many():
    pairs = []
    for i in range(2000):
        it = ab.sleep(random.random() * 0.1, i).__await__()
        pairs.append((it, it.send(None)))
    return pairs

loop = new_loop()
pairs = loop.run_until_complete(start_many())
codes = []
for _ in range(5):
    time.sleep(random.random() * 0.01)
    pid = os.fork()
    if pid == 0:
        child(lambda: {"child": new_loop().run_until_complete(new_ops())})
    codes.append(wait_child(pid))

async def collect():
    await asyncio.wait([f for _, f in pairs], timeout=5)
    return [finish(it) for it, _ in pairs]

values = loop.run_until_complete(collect())
ok = values == [["value", i] for i in range(2000)]
more = loop.run_until_complete(new_ops())
loop.close()
print(json.dumps({"codes": codes, "parent_ok": ok, "more": more, "in_flight": settle()["in_flight"]}))
"""

NEW_OPS = ["n", "s", True, None]


def test_fork_child_runs_new_ops_and_parent_is_unaffected(run_script):
    proc = run_script(FORK_NEW_LOOP)
    assert_clean(proc)
    child, parent = json_lines(proc.stdout)
    assert child == {"child": NEW_OPS}
    assert parent == {"child_exit": 0, "parent": [["value", "parent"], NEW_OPS], "in_flight": 0}


@pytest.mark.parametrize("loop_name", ["asyncio"])
def test_fork_inherited_op_fails_with_fork_error_in_child(run_script):
    proc = run_script(FORK_INHERITED_LOOP)
    assert_clean(proc)
    child, parent = json_lines(proc.stdout)
    assert child["fut_done"] is True, "the inherited op never failed in the child"
    name, message, is_fork_error = child["inherited"]
    assert is_fork_error, child["inherited"]
    assert "fork" in message.lower(), message
    assert child["child"] == NEW_OPS
    assert parent == {"child_exit": 0, "parent": [["value", "parent"], NEW_OPS], "in_flight": 0}


def test_fork_while_the_engine_is_busy(run_script):
    proc = run_script(FORK_STRESS, timeout=60)
    assert_clean(proc, budget=40)
    *children, parent = json_lines(proc.stdout)
    assert children == [{"child": NEW_OPS}] * 5
    assert parent == {"codes": [0] * 5, "parent_ok": True, "more": NEW_OPS, "in_flight": 0}


def test_fork_error_is_a_runtime_error():
    assert issubclass(ab.ForkError, RuntimeError)
