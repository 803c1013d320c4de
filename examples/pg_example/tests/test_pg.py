"""pg_example against a real PostgreSQL server (conftest's pg_server)."""

import asyncio
import gc
import os
import socket
import time

import pytest

import pg_example as pg

SLEEP_QUERY = "select pg_sleep(30)"


def open_fds():
    """{fd: what it is}; the fd that listdir itself used is gone by now."""
    gc.collect()
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            pass
    return fds


async def backend_pid(conn):
    return int((await conn.query("select pg_backend_pid()"))[0][0])


async def backend_activity(monitor, pid):
    """(state, query) of a backend in pg_stat_activity, or None if it is gone."""
    rows = await monitor.query(f"select state, query from pg_stat_activity where pid = {pid}")
    return rows[0] if rows else None


async def wait_until_running(monitor, pid, query, within=2.0):
    end = time.monotonic() + within
    while (activity := await backend_activity(monitor, pid)) != ("active", query):
        assert time.monotonic() < end, f"the query never ran on the server: {activity}"
        await asyncio.sleep(0.01)


async def seconds_until_stopped(monitor, pid, within=2.0):
    """Poll pg_stat_activity until the backend no longer runs a query; the time it took."""
    start = time.monotonic()
    while (activity := await backend_activity(monitor, pid)) and activity[0] == "active":
        assert time.monotonic() - start < within, f"still running on the server: {activity}"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


class Connections:
    """`async with Connections(dsn, n) as conns`: n connections, closed at the end."""

    def __init__(self, dsn, n=1):
        self.dsn, self.n = dsn, n

    async def __aenter__(self):
        self.conns = await asyncio.gather(*(pg.connect(self.dsn) for _ in range(self.n)))
        return self.conns

    async def __aexit__(self, *exc):
        await asyncio.gather(*(c.close() for c in self.conns))


# ---- results -----------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("via", ["unix", "tcp"])
async def test_select_one(pg_server, via):
    dsn = pg_server.unix_dsn if via == "unix" else pg_server.tcp_dsn
    async with Connections(dsn) as (conn,):
        assert await conn.query("select 1") == [("1",)]


@pytest.mark.asyncio
async def test_rows_columns_and_null(pg_server):
    async with Connections(pg_server.unix_dsn) as (conn,):
        rows = await conn.query(
            "select g, g * 2, case when g % 2 = 0 then null else 'odd' end, 'été ✓'"
            " from generate_series(1, 4) g order by g")
        assert rows == [
            ("1", "2", "odd", "été ✓"),
            ("2", "4", None, "été ✓"),
            ("3", "6", "odd", "été ✓"),
            ("4", "8", None, "été ✓"),
        ]
        assert await conn.query("select null::int, ''") == [(None, "")]
        assert await conn.query("select 1 where false") == []
        big = await conn.query("select repeat('y', 100000), g from generate_series(1, 50) g")
        assert len(big) == 50 and all(len(r[0]) == 100000 for r in big)


@pytest.mark.asyncio
async def test_commands_without_rows_return_empty_list(pg_server):
    async with Connections(pg_server.unix_dsn) as (conn,):
        assert await conn.query("create temp table t (x int, y text)") == []
        assert await conn.query("insert into t values (1, 'a'), (2, null)") == []
        assert await conn.query("") == []
        # Several statements: the rows of the last one.
        assert await conn.query("update t set y = 'b' where x = 2; select * from t order by x") == [
            ("1", "a"), ("2", "b")]


@pytest.mark.asyncio
async def test_large_query_text_is_flushed(pg_server):
    """A query larger than the socket's buffer leaves PQsendQuery unsent: the
    PQflush loop sends the rest."""
    values = ",".join(f"({i})" for i in range(200_000))
    async with Connections(pg_server.unix_dsn) as (conn,):
        assert await conn.query(f"select count(*) from (values {values}) v") == [("200000",)]


# ---- errors --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_syntax_error(pg_server):
    async with Connections(pg_server.unix_dsn) as (conn,):
        with pytest.raises(pg.PgError) as info:
            await conn.query("selec 1")
        exc = info.value
        assert exc.sqlstate == "42601"
        assert exc.message == str(exc)
        assert exc.message == 'ERROR:  syntax error at or near "selec"\nLINE 1: selec 1\n        ^'
        assert await conn.query("select 1") == [("1",)]


@pytest.mark.asyncio
async def test_message_longer_than_200_bytes_survives(pg_server):
    async with Connections(pg_server.unix_dsn) as (conn,):
        await conn.query(
            "create function pg_temp.raise_long() returns int language plpgsql as $$"
            " begin raise exception '%', 'start-' || repeat('x', 1000) || '-end'"
            " using errcode = '22023'; end $$")
        with pytest.raises(pg.PgError) as info:
            await conn.query("select pg_temp.raise_long()")
        assert info.value.sqlstate == "22023"
        assert "start-" + "x" * 1000 + "-end" in info.value.message
        assert info.value.message.startswith("ERROR:  start-")
        # The first error of several statements, and the connection goes on.
        with pytest.raises(pg.PgError) as info:
            await conn.query("select 1; select 1/0; select 2")
        assert info.value.sqlstate == "22012"
        assert await conn.query("select 3") == [("3",)]


def test_pg_error_type():
    exc = pg.PgError("boom", "XX000")
    assert isinstance(exc, Exception)
    assert (str(exc), exc.message, exc.sqlstate, exc.args) == ("boom", "boom", "XX000", ("boom",))
    assert pg.PgError("x").sqlstate is None
    with pytest.raises(TypeError):
        pg.PgError("x", 5)

    class Mine(pg.PgError):
        pass

    assert Mine("y", sqlstate="00000").sqlstate == "00000"


@pytest.mark.asyncio
async def test_connect_to_closed_port(pg_server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: refused
        with pytest.raises(pg.PgError) as info:
            await pg.connect(f"host=127.0.0.1 port={port} user=postgres connect_timeout=5")
    assert info.value.sqlstate is None
    assert "Connection refused" in info.value.message
    assert f"port {port} failed" in info.value.message


@pytest.mark.asyncio
async def test_connect_timeout_and_cancel(pg_server):
    """A listener that never answers: libpq waits for its reply."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        dsn = f"host=127.0.0.1 port={silent.getsockname()[1]} user=postgres"
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="connect timed out after 0.3 s"):
            await pg.connect(dsn, timeout=0.3)
        assert 0.3 <= time.monotonic() - start < 1.5
        task = asyncio.create_task(pg.connect(dsn))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.asyncio
async def test_connection_lost_mid_query(pg_server):
    async with Connections(pg_server.unix_dsn, 2) as (victim, monitor):
        pid = await backend_pid(victim)
        task = asyncio.create_task(victim.query(SLEEP_QUERY))
        await wait_until_running(monitor, pid, SLEEP_QUERY)
        assert await monitor.query(f"select pg_terminate_backend({pid})") == [("t",)]
        with pytest.raises(pg.PgError) as info:
            await task
        assert info.value.sqlstate == "57P01"  # admin_shutdown
        assert "terminating connection" in info.value.message
        with pytest.raises(pg.PgError):
            await victim.query("select 1")


# ---- one operation at a time -------------------------------------------------------


@pytest.mark.asyncio
async def test_second_concurrent_query_raises(pg_server):
    async with Connections(pg_server.unix_dsn) as (conn,):
        first = asyncio.create_task(conn.query("select pg_sleep(0.2), 'first'"))
        await asyncio.sleep(0.05)
        with pytest.raises(RuntimeError, match="another operation is in progress"):
            await conn.query("select 'second'")
        with pytest.raises(RuntimeError, match="close.. while another operation"):
            await conn.close()
        assert await first == [("", "first")]
        assert await conn.query("select 'third'") == [("third",)]


@pytest.mark.asyncio
async def test_closed_connection(pg_server):
    conn = await pg.connect(pg_server.unix_dsn)
    await conn.close()
    assert pg.open_connections() == 0
    await conn.close()  # closing again does nothing
    with pytest.raises(pg.PgError, match="the connection is closed") as info:
        await conn.query("select 1")
    assert info.value.sqlstate == "08003"


@pytest.mark.asyncio
async def test_dropped_connection_closes_after_its_query(pg_server):
    conn = await pg.connect(pg_server.unix_dsn)
    query = conn.query("select pg_sleep(0.1), 'done'")
    del conn  # the op keeps the libpq connection until it is done
    assert await query == [("", "done")]
    assert pg.open_connections() == 0


@pytest.mark.asyncio
async def test_arguments(pg_server):
    async with Connections(pg_server.unix_dsn) as (conn,):
        with pytest.raises(ValueError, match="NUL"):
            conn.query("select 1\0")
        with pytest.raises(TypeError):
            conn.query(b"select 1")
        with pytest.raises(TypeError, match="timeout"):
            conn.query("select 1", timeout="soon")
        with pytest.raises(ValueError, match="NUL"):
            pg.connect("host=x\0")
        with pytest.raises(TypeError):
            pg.Connection()
        with pytest.warns(RuntimeWarning, match="never awaited"):
            conn.query("select 1")
            gc.collect()
        assert await conn.query("select 1", timeout=5) == [("1",)]


# ---- concurrency -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_fifty_sleeps_on_fifty_connections_overlap(pg_server, capsys, request):
    async with Connections(pg_server.unix_dsn, 50) as conns:
        start = time.monotonic()
        results = await asyncio.gather(*(c.query("select pg_sleep(0.5), 'ok'") for c in conns))
        took = time.monotonic() - start
    with capsys.disabled():
        print(f"\n[{request.node.callspec.id}] 50 x pg_sleep(0.5) on 50 connections: {took:.3f} s")
    assert results == [[("", "ok")]] * 50
    assert took < 1.5


# ---- cancellation stops the query on the server ------------------------------------------


@pytest.mark.asyncio
async def test_timeout_cancels_on_server(pg_server, capsys, request):
    async with Connections(pg_server.unix_dsn, 2) as (conn, monitor):
        pid = await backend_pid(conn)
        deadline = time.monotonic() + 0.2
        task = asyncio.create_task(conn.query(SLEEP_QUERY, timeout=0.2))
        await wait_until_running(monitor, pid, SLEEP_QUERY)
        with pytest.raises(TimeoutError, match="timed out after 0.2 s; it was cancelled") as info:
            await task
        assert isinstance(info.value, asyncio.TimeoutError)
        raised = time.monotonic() - deadline
        await seconds_until_stopped(monitor, pid)
        gone = time.monotonic() - deadline
        with capsys.disabled():
            print(f"\n[{request.node.callspec.id}] timeout=0.2: TimeoutError {raised * 1000:.1f} ms "
                  f"after the deadline, query gone from pg_stat_activity {gone * 1000:.1f} ms after it")
        assert raised < 1.0
        assert await conn.query("select 1") == [("1",)]


@pytest.mark.asyncio
async def test_cancelling_the_task_cancels_on_server(pg_server, capsys, request):
    async with Connections(pg_server.unix_dsn, 2) as (conn, monitor):
        pid = await backend_pid(conn)
        task = asyncio.create_task(conn.query(SLEEP_QUERY))
        await wait_until_running(monitor, pid, SLEEP_QUERY)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gone = await seconds_until_stopped(monitor, pid)
        with capsys.disabled():
            print(f"\n[{request.node.callspec.id}] cancelled query left pg_stat_activity "
                  f"{gone * 1000:.1f} ms after the CancelledError")
        assert await conn.query("select 1") == [("1",)]


@pytest.mark.asyncio
async def test_query_right_after_a_cancel_waits_for_the_server(pg_server):
    """The cancelled query still stops on the server when the next one is
    sent: that one waits for it instead of failing."""
    async with Connections(pg_server.unix_dsn) as (conn,):
        for _ in range(3):
            task = asyncio.create_task(conn.query(SLEEP_QUERY))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            start = time.monotonic()
            assert await conn.query("select 'next'") == [("next",)]
            assert time.monotonic() - start < 2.0
        # wait_for cancels the same way.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(conn.query(SLEEP_QUERY), 0.1)
        await conn.close()  # waits for the stop as well


@pytest.mark.asyncio
async def test_cancel_at_every_stage(pg_server):
    """Cancel after 0..N loop turns: before the start, while waiting to send,
    while waiting for rows; the connection keeps working every time."""
    async with Connections(pg_server.unix_dsn) as (conn,):
        for turns in range(12):
            task = asyncio.create_task(conn.query("select pg_sleep(0.01), 'x'"))
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()
            try:
                assert await task == [("", "x")]
            except asyncio.CancelledError:
                pass
            assert await conn.query("select 1") == [("1",)]


# ---- no leaks --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_no_fd_leak(pg_server):
    before = open_fds()
    for dsn in (pg_server.unix_dsn, pg_server.tcp_dsn):
        for _ in range(5):
            conn = await pg.connect(dsn)
            assert await conn.query("select 1") == [("1",)]
            await conn.close()
        async with Connections(dsn, 10) as conns:
            await asyncio.gather(*(c.query("select 1") for c in conns))
        # Dropped without close(), with a timed-out query, with a failed connect.
        conn = await pg.connect(dsn)
        with pytest.raises(TimeoutError):
            await conn.query(SLEEP_QUERY, timeout=0.05)
        del conn
        with pytest.raises(pg.PgError):
            await pg.connect(dsn + " user=nobody_here")
    assert pg.open_connections() == 0
    new = open_fds().items() - before.items()
    assert not new, new
