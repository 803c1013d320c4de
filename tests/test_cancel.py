"""Cancellation goes both ways (issue 2, point 5)."""

import asyncio
import random
import time

import pytest

import asyncio_bridge as ab


async def submitted(task, before):
    """Yield until the task's op reached the engine."""
    for _ in range(100):
        if ab.stats()["submitted"] > before["submitted"]:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"{task} never submitted its op")


def op_factories(sock):
    return {
        "sleep": lambda: ab.sleep(30, "late"),
        "wait_readable": lambda: ab.wait_readable(sock),
        "wait_readable_timeout": lambda: ab.wait_readable(sock, timeout=30),
    }


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["sleep", "wait_readable", "wait_readable_timeout"])
async def test_task_cancel_cancels_the_native_op(kind, sock_pair, settled):
    a, b = sock_pair
    before = ab.stats()
    task = asyncio.create_task(op_factories(a)[kind]())
    await submitted(task, before)
    task.cancel("stop")
    with pytest.raises(asyncio.CancelledError) as info:
        await task
    assert info.value.args == ("stop",)
    stats = await settled()
    assert stats["cancelled"] >= before["cancelled"] + 1
    # Nothing is delivered afterwards: its fd event is gone.
    b.send(b"x")
    await asyncio.sleep(0.1)
    assert ab.stats()["completed"] == stats["completed"]
    # And the fd works with a fresh op.
    assert await asyncio.wait_for(ab.wait_readable(a), 5) is None


@pytest.mark.asyncio
async def test_cancelled_timer_never_fires(settled):
    before = ab.stats()
    task = asyncio.create_task(ab.sleep(0.1, "late"))
    await submitted(task, before)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stats = await settled()
    await asyncio.sleep(0.2)
    after = ab.stats()
    assert after["completed"] == stats["completed"]
    assert after["submitted"] == stats["submitted"]


@pytest.mark.asyncio
async def test_cancel_then_await_another_op_in_the_same_task():
    async def stubborn():
        try:
            await ab.sleep(30)
        except asyncio.CancelledError:
            return await ab.nop("after cancel")
        return "not cancelled"

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0.02)
    task.cancel()
    assert await asyncio.wait_for(task, 5) == "after cancel"


@pytest.mark.asyncio
async def test_cancel_after_completion_is_harmless():
    task = asyncio.create_task(ab.nop(1))
    assert await task == 1
    assert task.cancel() is False
    assert task.result() == 1
    assert await ab.nop(2) == 2


@pytest.mark.asyncio
async def test_cancel_between_native_completion_and_delivery(settled, loop_errors):
    """The engine finished the op, the drain has not run yet, the task is
    cancelled: the drain must skip the cancelled Future (no set_result on
    it, nothing reported) and the task ends cancelled."""
    before = ab.stats()
    tasks = [asyncio.create_task(ab.nop(i)) for i in range(100)]
    await asyncio.sleep(0)  # every task ran its first step and submitted
    assert ab.stats()["submitted"] == before["submitted"] + 100
    deadline = time.monotonic() + 1
    while ab.stats()["completed"] < before["completed"] + 100 and time.monotonic() < deadline:
        time.sleep(0.005)  # block the loop so that no drain can run
    # No drain ran since the submits, so every task still waits on its Future.
    assert [t.cancel() for t in tasks[::2]] == [True] * 50
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for i, r in enumerate(results):
        if i % 2:
            assert r == i
        else:
            assert isinstance(r, asyncio.CancelledError), (i, r)
    await settled()
    await asyncio.sleep(0.05)
    assert loop_errors == []


@pytest.mark.asyncio
async def test_cancel_future_of_a_finished_op_by_hand(settled, loop_errors):
    before = ab.stats()
    it = ab.nop("v").__await__()
    fut = it.send(None)
    deadline = time.monotonic() + 1
    while ab.stats()["completed"] == before["completed"] and time.monotonic() < deadline:
        time.sleep(0.005)
    assert fut.cancel()
    await asyncio.sleep(0.05)
    with pytest.raises(asyncio.CancelledError):
        it.send(None)
    await settled()
    assert loop_errors == []


@pytest.mark.asyncio
async def test_cancel_storm(settled):
    """Many ops, half cancelled at random moments: the others return the
    right values, and every op is freed."""
    before = ab.stats()
    n = 1000
    tasks = [asyncio.create_task(ab.sleep(random.random() * 0.1, i)) for i in range(n)]
    victims = set(random.sample(range(n), n // 2))
    for i in victims:
        tasks[i].get_loop().call_later(random.random() * 0.1, tasks[i].cancel)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for i, r in enumerate(results):
        if isinstance(r, asyncio.CancelledError):
            assert i in victims
        else:
            assert r == i
    stats = await settled()
    # A task cancelled before its first step never submits its op.
    assert n - len(victims) <= stats["submitted"] - before["submitted"] <= n


@pytest.mark.asyncio
async def test_timeout_cancels_fd_wait(sock_pair, settled):
    a, b = sock_pair
    before = ab.stats()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await ab.wait_readable(a)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ab.wait_readable(a), 0.05)
    stats = await settled()
    assert stats["cancelled"] >= before["cancelled"] + 2
    b.send(b"x")
    await asyncio.sleep(0.1)
    assert ab.stats()["completed"] == stats["completed"]


@pytest.mark.asyncio
async def test_wait_for_outer_cancel(settled):
    before = ab.stats()

    async def outer():
        return await asyncio.wait_for(ab.sleep(30), timeout=10)

    task = asyncio.create_task(outer())
    await submitted(task, before)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stats = await settled()
    assert stats["cancelled"] >= before["cancelled"] + 1
