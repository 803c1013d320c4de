"""Delivery paths, batching and stats (issue 2, points 2 and 8)."""

import asyncio
import threading

import pytest

import asyncio_bridge as ab

STATS_KEYS = ("submitted", "completed", "cancelled", "in_flight", "wakeups", "largest_batch",
              "engine_wakeups", "engine_spins", "engine_spins_paid", "op_memory_kept")


def readers(loop):
    """fds a stdlib selector loop watches for reading."""
    return {key.fd for key in loop._selector.get_map().values() if key.events & 1}


def run_in_thread(fn):
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    if "error" in box:
        raise box["error"]
    return box["result"]


def test_configure_reports_current_settings(delivery):
    settings = ab.configure()
    assert settings["delivery"] == delivery
    assert "workers" in settings
    assert ab.configure() == settings


def test_configure_accepts_every_delivery():
    for name in ("auto", "call_soon_threadsafe", "add_reader"):
        ab.configure(delivery=name)
        assert ab.configure()["delivery"] == name


@pytest.mark.parametrize("name", ["call_soon_threadsafe", "add_reader", "auto"])
def test_environment_variable_chooses_delivery(run_script, name):
    proc = run_script(
        """
        print(ab.configure()["delivery"])
        print(asyncio.run(ab.nop("ok")))
        """,
        env={"ASYNCIO_BRIDGE_DELIVERY": name},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.split() == [name, "ok"]


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_add_reader_delivery_registers_one_reader(delivery):
    loop = asyncio.get_running_loop()
    watched = readers(loop)
    assert await ab.nop(1) == 1
    added = readers(loop) - watched
    if delivery == "add_reader":
        assert len(added) == 1, added
    else:
        assert added == set(), added
    await ab.nop(2)
    assert readers(loop) - watched == added


@pytest.mark.asyncio
async def test_a_bridge_keeps_its_delivery_when_configure_changes(delivery):
    assert await ab.nop(1) == 1
    other = "add_reader" if delivery == "call_soon_threadsafe" else "call_soon_threadsafe"
    ab.configure(delivery=other)
    assert await ab.sleep(0.01, 2) == 2
    assert await asyncio.gather(*(ab.nop(i) for i in range(100))) == list(range(100))


def test_configure_applies_to_bridges_created_afterwards():
    def watched_after_first_op(name):
        ab.configure(delivery=name)
        loop = asyncio.SelectorEventLoop()
        try:
            before = readers(loop)
            assert loop.run_until_complete(ab.nop(name)) == name
            return len(readers(loop) - before)
        finally:
            loop.close()

    assert run_in_thread(lambda: watched_after_first_op("add_reader")) == 1
    assert run_in_thread(lambda: watched_after_first_op("call_soon_threadsafe")) == 0


class NoReaderLoop(asyncio.SelectorEventLoop):
    def add_reader(self, fd, callback, *args):
        raise NotImplementedError


def test_auto_falls_back_without_add_reader():
    ab.configure(delivery="auto")
    with asyncio.Runner(loop_factory=NoReaderLoop) as runner:
        assert runner.run(ab.sleep(0.01, "fallback")) == "fallback"
        assert runner.run(ab.nop("again")) == "again"


def test_auto_works_on_each_loop(new_loop):
    ab.configure(delivery="auto")
    with asyncio.Runner(loop_factory=new_loop) as runner:
        assert runner.run(ab.sleep(0.01, "auto")) == "auto"


def test_stats_keys_and_types():
    stats = ab.stats()
    assert isinstance(stats, dict)
    for key in STATS_KEYS:
        assert type(stats[key]) is int, key
        assert stats[key] >= 0, key
    stats["submitted"] = -1
    assert ab.stats()["submitted"] >= 0


@pytest.mark.asyncio
async def test_stats_count_ops(settled):
    before = ab.stats()
    tasks = [asyncio.create_task(ab.sleep(0.2, i)) for i in range(10)]
    await asyncio.sleep(0.05)
    during = ab.stats()
    assert during["in_flight"] >= 10
    assert during["submitted"] == before["submitted"] + 10
    assert await asyncio.gather(*tasks) == list(range(10))
    after = await settled()
    assert after["completed"] >= before["completed"] + 10
    assert after["cancelled"] == before["cancelled"]
    assert after["wakeups"] > before["wakeups"]


@pytest.mark.asyncio
async def test_a_burst_completes_with_few_wakeups():
    n = 1000
    await ab.nop()
    before = ab.stats()
    results = await asyncio.gather(*(ab.nop(i) for i in range(n)))
    after = ab.stats()
    assert results == list(range(n))
    assert after["submitted"] - before["submitted"] == n
    assert after["completed"] - before["completed"] == n
    wakeups = after["wakeups"] - before["wakeups"]
    assert 0 < wakeups <= n // 10, f"{wakeups} wake-ups for {n} ops"
    assert after["largest_batch"] > 1


def test_configure_workers():
    before = ab.configure()
    try:
        ab.configure(workers=3)
        assert ab.configure()["workers"] == 3
        assert ab.configure()["delivery"] == before["delivery"]
        with pytest.raises((TypeError, ValueError)):
            ab.configure(workers="many")
        with pytest.raises(ValueError):
            ab.configure(workers=-1)
        assert ab.configure()["workers"] == 3
    finally:
        ab.configure(workers=before["workers"])
    assert ab.configure() == before
