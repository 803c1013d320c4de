"""A real aiohttp server whose handlers await native ops, hit by a real
aiohttp client, including disconnects that cancel handlers mid-await
(issue 2, point 9)."""

import asyncio
import socket
import time

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

import asyncio_bridge as ab


class Server:
    def __init__(self):
        self.started = []
        self.cancelled = []
        self.finished = []
        self.url = None

    async def sleep(self, request):
        delay = float(request.query.get("d", "0.01"))
        return web.Response(text=await ab.sleep(delay, f"slept {delay}"))

    async def nop(self, request):
        return web.json_response(await ab.nop({"v": request.query["v"]}))

    async def readable(self, request):
        a, b = socket.socketpair()
        try:
            asyncio.get_running_loop().call_later(0.005, b.send, b"!")
            result = await ab.wait_readable(a, timeout=5)
            return web.Response(text=f"readable {result} {a.recv(1).decode()}")
        finally:
            a.close()
            b.close()

    async def slow(self, request):
        tag = request.query["tag"]
        self.started.append(tag)
        a, b = socket.socketpair()
        try:
            if request.query.get("kind") == "fd":
                await ab.wait_readable(a)
            else:
                await ab.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.append(tag)
            raise
        finally:
            a.close()
            b.close()
        self.finished.append(tag)
        return web.Response(text="too late")


@pytest_asyncio.fixture
async def server():
    state = Server()
    app = web.Application()
    app.router.add_get("/sleep", state.sleep)
    app.router.add_get("/nop", state.nop)
    app.router.add_get("/readable", state.readable)
    app.router.add_get("/slow", state.slow)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.url = f"http://{host}:{port}"
    yield state
    await runner.cleanup()


async def fetch(session, url):
    async with session.get(url) as response:
        return response.status, await response.text()


@pytest.mark.asyncio
async def test_concurrent_requests(server):
    before = ab.stats()
    urls, expected = [], []
    for i in range(200):
        kind = i % 3
        if kind == 0:
            delay = (i % 10) / 200
            urls.append(f"{server.url}/sleep?d={delay}")
            expected.append(f"slept {delay}")
        elif kind == 1:
            urls.append(f"{server.url}/nop?v={i}")
            expected.append(f'{{"v": "{i}"}}')
        else:
            urls.append(f"{server.url}/readable")
            expected.append("readable None !")
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(fetch(session, url) for url in urls))
    assert results == [(200, body) for body in expected]
    # sleep(0) yields once without the engine, as asyncio.sleep(0) does
    native = sum(1 for url in urls if not url.endswith("d=0.0"))
    assert ab.stats()["submitted"] - before["submitted"] >= native


@pytest.mark.asyncio
async def test_client_disconnect_cancels_handlers_mid_await(server, settled):
    before = ab.stats()
    n = 20
    timeout = aiohttp.ClientTimeout(total=0.3)

    async def abandon(i):
        kind = "fd" if i % 2 else "sleep"
        with pytest.raises(asyncio.TimeoutError):
            async with aiohttp.ClientSession(timeout=timeout) as session:
                await fetch(session, f"{server.url}/slow?tag={i}&kind={kind}")

    start = time.monotonic()
    await asyncio.gather(*(abandon(i) for i in range(n)))
    assert time.monotonic() - start < 5
    deadline = time.monotonic() + 5
    while len(server.cancelled) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert sorted(server.cancelled, key=int) == [str(i) for i in range(n)]
    assert server.finished == []
    stats = await settled()
    assert stats["cancelled"] - before["cancelled"] >= n
    # The server still serves after the disconnects.
    async with aiohttp.ClientSession() as session:
        assert await fetch(session, f"{server.url}/sleep?d=0.01") == (200, "slept 0.01")


@pytest.mark.asyncio
async def test_mixed_load_with_disconnects(server, settled):
    """Completed and abandoned requests interleaved on one session pool."""
    async with aiohttp.ClientSession() as session:

        async def abandoned(i):
            with pytest.raises(asyncio.TimeoutError):
                async with session.get(
                    f"{server.url}/slow?tag={i}", timeout=aiohttp.ClientTimeout(total=0.5)
                ) as response:
                    await response.text()

        tasks = []
        for i in range(60):
            if i % 4 == 0:
                tasks.append(abandoned(i))
            else:
                tasks.append(fetch(session, f"{server.url}/nop?v={i}"))
        results = await asyncio.gather(*tasks)
    for i, result in enumerate(results):
        if i % 4:
            assert result == (200, f'{{"v": "{i}"}}')
    # A request abandoned before its handler ran cancels nothing; every
    # handler that was awaiting an op must see the cancellation.
    assert len(server.started) >= 10, server.started
    deadline = time.monotonic() + 5
    while len(server.cancelled) < len(server.started) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert sorted(server.cancelled) == sorted(server.started)
    assert server.finished == []
    await settled()
