"""asyncio_bridge.getaddrinfo where the system's own files decide (issue
10): each test runs a script in a private mount namespace (tests/sysns.py)
whose /etc/resolv.conf points glibc and evdns alike at the tests' DNS
server on 127.53.x.y:53, with its own /etc/hosts and /etc/nsswitch.conf.
The machine's files are never touched.  The script compares our answers
with glibc's socket.getaddrinfo, name by name, and reports which resolver
answered (a thread of the blocking pool started, or not)."""

import json
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from dnsserver import DNSServer  # noqa: E402
from sysns import run_isolated  # noqa: E402

ZONE = {
    # One IPv6 address with a matching source label on this machine (fd00::/8)
    # and one without: glibc's ordering puts them on either side of IPv4.
    "www.example.test": {"A": ["10.1.2.3", "10.1.2.4"], "AAAA": ["fd00::1", "2001:db8::1"]},
    "v4only.example.test": {"A": ["10.9.9.9"]},
    "v6only.example.test": {"AAAA": ["fd00::99"]},
    "alias.example.test": {"CNAME": "www.example.test"},
    "slow.example.test": {"A": ["10.0.0.7"], "delay": 0.4},
    "silent.example.test": {"silent": True},
    "servfail.example.test": {"rcode": "SERVFAIL"},
    "xn--bcher-kva.example.test": {"A": ["10.5.5.5"]},
    "app.example.test": {"A": ["127.0.0.1"]},
    "printer.local": {"A": ["10.66.0.1"]},
}

HOSTS = """\
127.0.0.1 localhost
::1 localhost ip6-localhost
10.4.4.4 fromhosts.example.test
"""

# (host, port, family, type, flags): compared with glibc, outcome by outcome.
CASES = [
    ("www.example.test", 80, 0, 0, 0),
    ("www.example.test", 443, 0, 1, 0),
    ("www.example.test", 443, 2, 1, 0),
    ("www.example.test", 443, 10, 1, 0),
    ("www.example.test", 80, 0, 1, "AI_ADDRCONFIG"),
    ("WWW.Example.Test.", 80, 0, 1, 0),
    ("alias.example.test", 80, 2, 1, 0),
    ("v4only.example.test", 80, 0, 1, 0),
    ("v4only.example.test", 80, 10, 1, 0),
    ("v6only.example.test", 80, 2, 1, 0),
    ("v6only.example.test", "80", 0, 0, 0),
    ("nx.example.test", 80, 0, 0, 0),
    ("servfail.example.test", 80, 0, 1, 0),
    ("bücher.example.test", 80, 0, 1, 0),
    ("fromhosts.example.test", 80, 0, 0, 0),
    ("localhost", 80, 0, 1, 0),
    ("localhost", 8080, 10, 1, 0),
    ("ip6-localhost", 80, 0, 1, 0),
    ("localhost", "http", 0, 0, 0),
    ("www.example.test", "https", 0, 1, 0),
    ("www.example.test", 80, 0, 1, "AI_CANONNAME"),
    ("www.example.test", 80, 10, 1, "AI_V4MAPPED|AI_ALL"),
]

SCRIPT = r"""
import asyncio, json, socket, sys
import uvloop
import asyncio_bridge as ab

CASES = json.loads(sys.argv[1])
MODE = sys.argv[2]
LOOP = sys.argv[3]
if MODE != "default":
    ab.configure(resolver=MODE)

def flags_of(spec):
    if not spec:
        return 0
    f = 0
    for name in spec.split("|"):
        f |= getattr(socket, name)
    return f

def norm(result):
    return [[int(f), int(t), p, c, list(sa)] for f, t, p, c, sa in result]

async def ours(case):
    host, port, family, type_, flags = case
    try:
        return ["ok", norm(await ab.getaddrinfo(host, port, family=family, type=type_,
                                                flags=flags_of(flags)))]
    except OSError as exc:
        return [type(exc).__name__, list(exc.args)]

def glibc(case):
    host, port, family, type_, flags = case
    try:
        return ["ok", norm(socket.getaddrinfo(host, port, family, type_, 0, flags_of(flags)))]
    except OSError as exc:
        return [type(exc).__name__, list(exc.args)]

async def main():
    out = []
    for case in CASES:
        out.append([case, await ours(case), glibc(case)])
    # and all at once, as a service does
    together = await asyncio.gather(*[ours(c) for c in CASES])
    return out, together

loop = uvloop.new_event_loop() if LOOP == "uvloop" else asyncio.SelectorEventLoop()
out, together = loop.run_until_complete(main())
s = ab.stats()
print(json.dumps({"results": out, "together": together, "blocking_threads": s["blocking_threads"],
                  "submitted": s["submitted"]}))
"""


@pytest.fixture(scope="module")
def server():
    # glibc's resolv.conf takes no port: a loopback address of our own, port 53.
    for _ in range(20):
        host = f"127.53.{random.randint(1, 250)}.{random.randint(1, 250)}"
        try:
            srv = DNSServer(ZONE, host=host, port=53).start()
            break
        except OSError:
            continue
    else:
        raise RuntimeError("no free 127.53.x.y:53")
    yield srv
    srv.stop()


def run(server, code, *args, nsswitch="hosts: files dns\n", resolv_extra="", timeout=60):
    """Run code (with sys.argv[1:] = args) in the private namespace."""
    resolv = f"nameserver {server.host}\noptions timeout:1 attempts:1\n{resolv_extra}"
    code = f"import sys\nsys.argv[1:] = {list(args)!r}\n" + code
    proc = run_isolated(code, resolv_conf=resolv, hosts=HOSTS, nsswitch=nsswitch,
                        timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc


def compare(server, mode, loop, nsswitch="hosts: files dns\n", cases=CASES):
    proc = run(server, SCRIPT, json.dumps(cases), mode, loop, nsswitch=nsswitch)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    mismatches = [(case, ours, theirs) for case, ours, theirs in report["results"]
                  if ours != theirs]
    assert mismatches == [], "\n".join(map(repr, mismatches))
    assert [r[1] for r in report["results"]] == report["together"]
    return report


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_auto_with_files_and_dns_matches_glibc_natively(server, loop):
    report = compare(server, "default", loop)
    assert any(r[1][0] == "ok" for r in report["results"])
    # Only what evdns cannot judge (a service name, AI_CANONNAME,
    # AI_V4MAPPED) went to the blocking pool.
    only_native = [c for c in CASES if not isinstance(c[1], str) or c[1].isdigit()]
    only_native = [c for c in only_native if c[4] in (0, "AI_ADDRCONFIG")]
    report = compare(server, "default", loop, cases=only_native)
    assert report["blocking_threads"] == 0


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_system_resolver_matches_glibc_on_the_blocking_pool(server, loop):
    report = compare(server, "system", loop)
    assert report["blocking_threads"] >= 1


def test_evdns_resolver_matches_glibc(server):
    compare(server, "evdns", "asyncio",
            cases=[c for c in CASES if (not isinstance(c[1], str) or c[1].isdigit())
                   and c[4] in (0, "AI_ADDRCONFIG")])


@pytest.mark.parametrize(
    "nsswitch, name, native",
    [
        # A source we do not know could answer anything: the system decides.
        ("hosts: files mymachines dns\n", "www.example.test", False),
        ("hosts: files resolve [!UNAVAIL=return] dns\n", "www.example.test", False),
        ("hosts: dns files\n", "www.example.test", False),
        # mdns only answers .local names; myhostname the host's own names.
        ("hosts: files mdns4_minimal [NOTFOUND=return] dns\n", "www.example.test", True),
        ("hosts: files mdns4_minimal [NOTFOUND=return] dns\n", "printer.local", False),
        ("hosts: files dns myhostname\n", "www.example.test", True),
        ("hosts: files dns myhostname\n", "_gateway", False),
        ("hosts: files dns\n", "printer.local", False),
    ],
)
def test_auto_follows_nsswitch(server, nsswitch, name, native):
    cases = [(name, 80, 0, 1, 0)]
    proc = run(server, SCRIPT, json.dumps(cases), "default", "asyncio", nsswitch=nsswitch)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    case, ours, theirs = report["results"][0]
    assert ours == theirs
    assert (report["blocking_threads"] == 0) == native, report


CANCEL = r"""
import asyncio, json, socket, time
import asyncio_bridge as ab
ab.configure(resolver="system")

async def main():
    out = {}
    tasks = [asyncio.ensure_future(ab.getaddrinfo("slow.example.test", 80)) for _ in range(20)]
    await asyncio.sleep(0.1)
    out["waiting"] = ab.stats()["lookups_system"]
    out["queries"] = ab.stats()["queries_system"]
    for t in tasks[:10]:
        t.cancel()
    await asyncio.sleep(0)
    out["cancelled_at_once"] = all(t.cancelled() for t in tasks[:10])
    await asyncio.sleep(0.05)  # the engine's turn that detaches them
    out["left"] = ab.stats()["lookups_system"]
    res = await asyncio.gather(*tasks[10:])
    out["others"] = sorted({r[0][4][0] for r in res})
    # Everyone leaves a lookup that never answers: the thread finishes its
    # call and the answer is dropped.
    t0 = time.monotonic()
    task = asyncio.ensure_future(ab.getaddrinfo("silent.example.test", 80))
    await asyncio.sleep(0.1)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        out["cancel_took"] = time.monotonic() - t0
    out["orphan_queries"] = ab.stats()["queries_system"]
    while ab.stats()["in_flight"] and time.monotonic() - t0 < 10:
        await asyncio.sleep(0.05)
    out["drained"] = ab.stats()["in_flight"] == 0 and ab.stats()["queries_system"] == 0
    return out

print(json.dumps(asyncio.run(main())))
"""


def test_system_lookups_share_and_cancel_alone(server):
    server.reset()
    proc = run(server, CANCEL)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["waiting"] == 20 and out["queries"] == 1, out
    assert out["cancelled_at_once"] and out["left"] == 10, out
    assert out["others"] == ["10.0.0.7"], out
    assert out["cancel_took"] < 0.5, out
    assert out["orphan_queries"] == 1, out
    assert out["drained"], out
    assert server.counts()[("slow.example.test", "A")] == 1


AIOHTTP = r"""
import asyncio, json, socket, sys
import aiohttp
from aiohttp import web
import uvloop
from asyncio_bridge.aiohttp import Resolver

async def main():
    app = web.Application()
    app.router.add_get("/", lambda request: web.Response(text="hello " + request.host))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    out = {}
    resolver = Resolver()
    out["resolve"] = await resolver.resolve("app.example.test", port)
    connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(f"http://app.example.test:{port}/") as resp:
            out["status"] = resp.status
            out["body"] = await resp.text()
        try:
            await session.get(f"http://nx.example.test:{port}/")
        except aiohttp.ClientConnectorError as exc:
            out["error"] = [type(exc).__name__, type(exc.os_error).__name__, exc.os_error.errno]
    await resolver.close()
    await runner.cleanup()
    return out

loop = uvloop.new_event_loop() if sys.argv[1] == "uvloop" else asyncio.SelectorEventLoop()
print(json.dumps(loop.run_until_complete(main())))
"""


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_aiohttp_client_reaches_a_server_by_name(server, loop):
    proc = run(server, AIOHTTP, loop)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"] == 200
    assert out["body"].startswith("hello app.example.test")
    port = out["resolve"][0]["port"]
    assert out["resolve"] == [{
        "hostname": "app.example.test", "host": "127.0.0.1", "port": port, "family": 2,
        "proto": 6, "flags": 1028}]
    assert out["error"][1] == "gaierror" and out["error"][2] == -2, out
