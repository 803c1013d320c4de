"""Op objects behave like coroutine objects (issue 2, point 3)."""

import asyncio
import collections.abc
import gc
import inspect
import warnings
import weakref

import pytest

import asyncio_bridge as ab


def make_ops(sock):
    return {
        "sleep": ab.sleep(0.01, "slept"),
        "nop": ab.nop("nopped"),
        "wait_readable": ab.wait_readable(sock),
        "wait_writable": ab.wait_writable(sock),
    }


OP_NAMES = ["sleep", "nop", "wait_readable", "wait_writable"]


def test_ops_have_the_coroutine_protocol(sock_pair):
    for name, op in make_ops(sock_pair[0]).items():
        assert type(op) is ab.Op, name
        for method in ("send", "throw", "close", "__await__"):
            assert callable(getattr(op, method)), (name, method)
        assert isinstance(op, collections.abc.Coroutine), name
        assert inspect.isawaitable(op), name
        assert asyncio.iscoroutine(op), name
        op.close()


@pytest.mark.asyncio
async def test_creating_ops_starts_nothing(sock_pair):
    a, b = sock_pair
    before = ab.stats()
    ops = make_ops(a)
    b.send(b"x")
    await asyncio.sleep(0.05)
    assert ab.stats()["submitted"] == before["submitted"]
    assert ab.stats()["completed"] == before["completed"]
    assert await ops.pop("nop") == "nopped"
    assert ab.stats()["submitted"] == before["submitted"] + 1
    for op in ops.values():
        op.close()
    await asyncio.sleep(0.02)
    assert ab.stats()["submitted"] == before["submitted"] + 1


@pytest.mark.asyncio
async def test_await():
    assert await ab.nop(5) == 5
    assert await ab.sleep(0.001, "r") == "r"


@pytest.mark.asyncio
async def test_create_task_and_ensure_future():
    t1 = asyncio.create_task(ab.sleep(0.01, "task"))
    t2 = asyncio.ensure_future(ab.nop("future"))
    assert isinstance(t1, asyncio.Task) and isinstance(t2, asyncio.Task)
    assert await t1 == "task"
    assert await t2 == "future"


@pytest.mark.asyncio
async def test_gather(sock_pair):
    a, b = sock_pair
    b.send(b"x")
    results = await asyncio.gather(
        ab.nop(1), ab.sleep(0.02, 2), ab.wait_readable(a), ab.wait_writable(a), ab.nop(5)
    )
    assert results == [1, 2, None, None, 5]


@pytest.mark.asyncio
async def test_gather_propagates_the_native_failure(sock_pair):
    a, _ = sock_pair
    with pytest.raises(TimeoutError):
        await asyncio.gather(ab.sleep(0.01), ab.wait_readable(a, timeout=0.02))


@pytest.mark.asyncio
async def test_taskgroup():
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(ab.sleep(0.001 * i, i)) for i in range(20)]
        tasks.append(tg.create_task(ab.nop("n")))
    assert [t.result() for t in tasks] == list(range(20)) + ["n"]


@pytest.mark.asyncio
async def test_taskgroup_failure_cancels_native_siblings(sock_pair, settled):
    a, _ = sock_pair
    before = ab.stats()
    with pytest.raises(ExceptionGroup) as info:
        async with asyncio.TaskGroup() as tg:
            sleepers = [tg.create_task(ab.sleep(30)) for _ in range(5)]
            tg.create_task(ab.wait_readable(a, timeout=0.05))
    assert [type(e) for e in info.value.exceptions] == [TimeoutError]
    assert all(t.cancelled() for t in sleepers)
    stats = await settled()
    assert stats["cancelled"] >= before["cancelled"] + 5


@pytest.mark.asyncio
async def test_wait_for_result():
    assert await asyncio.wait_for(ab.nop(7), timeout=5) == 7
    assert await asyncio.wait_for(ab.sleep(0.01, 8), timeout=5) == 8


@pytest.mark.asyncio
async def test_wait_for_timeout_cancels_the_native_op(settled):
    before = ab.stats()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ab.sleep(30), timeout=0.05)
    stats = await settled()
    assert stats["cancelled"] >= before["cancelled"] + 1


@pytest.mark.asyncio
async def test_asyncio_timeout(settled):
    async with asyncio.timeout(5):
        assert await ab.sleep(0.01, "in time") == "in time"
    before = ab.stats()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await ab.sleep(30)
    stats = await settled()
    assert stats["cancelled"] >= before["cancelled"] + 1


def test_asyncio_run():
    assert asyncio.run(ab.nop("ran")) == "ran"
    assert asyncio.run(ab.sleep(0.01, "slept")) == "slept"


def test_runner_with_each_loop(new_loop):
    with asyncio.Runner(loop_factory=new_loop) as runner:
        assert runner.run(ab.sleep(0.01, "a")) == "a"
        assert runner.run(ab.nop("b")) == "b"


@pytest.mark.parametrize("name", OP_NAMES)
def test_dropped_unawaited_op_warns(name, sock_pair):
    ops = make_ops(sock_pair[0])
    for other, op in ops.items():
        if other != name:
            op.close()
    with pytest.warns(RuntimeWarning, match=rf"coroutine '[^']*{name}[^']*' was never awaited"):
        del ops, op
        gc.collect()


@pytest.mark.asyncio
async def test_awaited_or_closed_ops_do_not_warn(sock_pair):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await ab.nop()
        await ab.sleep(0)
        ab.sleep(1).close()
        ab.nop().close()
        gc.collect()
    assert [w for w in caught if "never awaited" in str(w.message)] == []


@pytest.mark.asyncio
async def test_awaiting_a_finished_op_again_raises():
    op = ab.nop(1)
    assert await op == 1
    with pytest.raises(RuntimeError):
        await op
    op = ab.sleep(0, "s")
    assert await op == "s"
    with pytest.raises(RuntimeError):
        await op


@pytest.mark.asyncio
async def test_awaiting_a_failed_op_again_raises(sock_pair):
    op = ab.wait_readable(sock_pair[0], timeout=0.01)
    with pytest.raises(TimeoutError):
        await op
    with pytest.raises(RuntimeError):
        await op


@pytest.mark.asyncio
async def test_awaiting_a_closed_op_raises():
    op = ab.sleep(1)
    op.close()
    with pytest.raises(RuntimeError):
        await op


@pytest.mark.asyncio
async def test_second_awaiter_raises_and_first_is_unaffected():
    op = ab.sleep(0.1, "first")

    async def first():
        return await op

    task = asyncio.create_task(first())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError):
        await op
    assert await asyncio.wait_for(task, 5) == "first"


@pytest.mark.asyncio
async def test_driving_the_protocol_by_hand():
    loop = asyncio.get_running_loop()
    it = ab.sleep(0.01, "v").__await__()
    fut = it.send(None)
    assert asyncio.isfuture(fut)
    assert fut.get_loop() is loop
    # What a Task does with what a coroutine yields.
    assert fut._asyncio_future_blocking is True
    fut._asyncio_future_blocking = False
    await fut
    with pytest.raises(StopIteration) as stop:
        it.send(None)
    assert stop.value.value == "v"
    with pytest.raises(RuntimeError):
        it.send(None)


def test_send_a_value_to_an_unstarted_op_is_a_type_error():
    op = ab.nop()
    with pytest.raises(TypeError):
        op.send(1)
    op.close()


@pytest.mark.asyncio
async def test_throw_into_an_unstarted_op_raises_it_and_starts_nothing():
    before = ab.stats()
    op = ab.sleep(10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(KeyError, match="k"):
            op.throw(KeyError("k"))
        del op
        gc.collect()
    assert ab.stats()["submitted"] == before["submitted"]
    assert [w for w in caught if "never awaited" in str(w.message)] == []


@pytest.mark.asyncio
async def test_throw_into_a_suspended_op_cancels_the_native_op(settled):
    before = ab.stats()
    it = ab.sleep(30).__await__()
    it.send(None)
    assert ab.stats()["submitted"] == before["submitted"] + 1
    with pytest.raises(ValueError, match="boom"):
        it.throw(ValueError("boom"))
    stats = await settled()
    assert stats["cancelled"] >= before["cancelled"] + 1
    with pytest.raises(RuntimeError):
        it.send(None)


@pytest.mark.asyncio
async def test_close_a_suspended_op_cancels_the_native_op(settled):
    before = ab.stats()
    it = ab.sleep(30).__await__()
    it.send(None)
    it.close()
    stats = await settled()
    assert stats["cancelled"] >= before["cancelled"] + 1
    with pytest.raises(RuntimeError):
        it.send(None)


@pytest.mark.asyncio
async def test_dropping_a_suspended_op_cancels_the_native_op(settled):
    before = ab.stats()
    it = ab.sleep(30).__await__()
    it.send(None)
    del it
    gc.collect()
    stats = await settled()
    assert stats["cancelled"] >= before["cancelled"] + 1


@pytest.mark.asyncio
async def test_dropping_an_op_whose_result_arrived_frees_it(settled):
    it = ab.nop("v").__await__()
    fut = it.send(None)
    fut._asyncio_future_blocking = False
    assert await fut == "v"
    del it
    gc.collect()
    await settled()


class Holder:
    pass


@pytest.mark.asyncio
async def test_ops_in_reference_cycles_are_collected():
    refs = []
    for make in (ab.nop, lambda value: ab.sleep(0, value)):
        holder = Holder()
        holder.op = make(holder)
        refs.append(weakref.ref(holder))
        holder.op.close()
        del holder
        holder = Holder()
        holder.op = make(holder)
        refs.append(weakref.ref(holder))
        assert await holder.op is holder
        del holder
    await asyncio.sleep(0)
    gc.collect()
    assert [r() for r in refs] == [None] * 4


@pytest.mark.asyncio
async def test_cancelled_task_and_its_op_are_freed(settled):
    holder = Holder()
    task = asyncio.create_task(ab.sleep(30, holder))
    holder.task = task
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    refs = [weakref.ref(task), weakref.ref(holder)]
    del task, holder
    await settled()
    await asyncio.sleep(0)
    gc.collect()
    assert [r() for r in refs] == [None, None]
