"""asyncio_bridge.getaddrinfo (issue 10), against a real DNS server of the
tests' own (tests/dnsserver.py) on 127.0.0.1, evdns pointed at it through a
private resolv.conf.  The system resolver's paths, which read /etc, are
tested in a private mount namespace in test_resolver_system.py."""

import asyncio
import gc
import os
import socket
import sys
import time

import pytest

import asyncio_bridge as ab

sys.path.insert(0, os.path.dirname(__file__))
from dnsserver import DNSServer  # noqa: E402

ZONE = {
    "www.example.test": {"A": ["10.1.2.3", "10.1.2.4"], "AAAA": ["fd00::1"], "ttl": 30},
    "v4only.example.test": {"A": ["10.9.9.9"]},
    "v6only.example.test": {"AAAA": ["fd00::99"]},
    "alias.example.test": {"CNAME": "www.example.test"},
    "slow.example.test": {"A": ["10.0.0.7"], "delay": 0.3},
    "slower.example.test": {"A": ["10.0.0.8"], "delay": 0.6},
    "servfail.example.test": {"rcode": "SERVFAIL"},
    "silent.example.test": {"silent": True},
    "empty.example.test": {"A": [], "AAAA": []},
    "xn--bcher-kva.example.test": {"A": ["10.5.5.5"]},
    "short.search.test": {"A": ["10.7.7.7"]},
    "hosts-and-dns.example.test": {"A": ["10.3.3.3"]},
    "*.wild.test": {"A": ["10.8.8.8"]},
}

HOSTS = """\
127.0.0.1 localhost
10.4.4.4 fromhosts.example.test FromHostsAlias
fd00::44 fromhosts.example.test
10.6.6.6 hosts-and-dns.example.test
"""


@pytest.fixture(scope="module")
def dns():
    with DNSServer(ZONE) as srv:
        yield srv


@pytest.fixture
def files(tmp_path, dns):
    """evdns pointed at the test server; the default configuration after."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {dns.address}\noptions timeout:1 attempts:1\n")
    hosts = tmp_path / "hosts"
    hosts.write_text(HOSTS)
    ab.configure(resolver="evdns", resolv_conf=str(resolv), hosts_file=str(hosts))
    dns.reset()
    yield {"resolv": resolv, "hosts": hosts}
    ab.configure(resolver="auto", resolv_conf="/etc/resolv.conf", hosts_file="/etc/hosts")


def entries(result):
    return [(f, t, p, sa) for f, t, p, _, sa in result]


def addrs(result):
    return [sa[0] for _, _, _, _, sa in result]


# ---- numeric hosts: the system's own answer, on the loop thread ------------------------

KW = ("family", "type", "proto", "flags")


def split(args):
    """(host, port, family, ...) as loop.getaddrinfo takes them."""
    return args[:2], dict(zip(KW, args[2:]))


NUMERIC = [
    ("127.0.0.1", 80),
    ("127.0.0.1", None),
    ("127.0.0.1", "443"),
    ("::1", 8080, socket.AF_INET6),
    ("::1", 0, 0, socket.SOCK_STREAM),
    ("fe80::1%lo", 80),
    ("10.0.0.1", 53, socket.AF_INET, socket.SOCK_DGRAM),
    (None, 80),
    (None, 80, 0, 0, 0, socket.AI_PASSIVE),
    ("127.0.0.1", 80, 0, 0, socket.IPPROTO_TCP),
    ("0.0.0.0", 70000),
    ("127.1", 80),  # inet_aton's forms are numeric to the system too
    ("0x7f.0.0.1", 80),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("args", NUMERIC, ids=repr)
async def test_numeric_hosts_match_the_system_without_a_thread(args):
    before = ab.stats()
    pos, kw = split(args)
    got = await ab.getaddrinfo(*pos, **kw)
    assert got == socket.getaddrinfo(*args)
    if type(asyncio.get_running_loop()).__module__.startswith("asyncio"):
        assert got == await asyncio.get_running_loop().getaddrinfo(*pos, **kw)
    after = ab.stats()
    # No op went to the engine or a pool: answered on the loop thread.
    assert after["submitted"] == before["submitted"]


BAD = [
    (None, None),
    (b"\xff\xfe", 80),
    ("a" * 300 + ".example.test", 80),
    ("x." + "b" * 64 + ".test", 80),
    ("localhost", -1),
    ("localhost", "no-such-service"),
    ("localhost", 1.5),
    ("localhost", 80, 12345),
    ("localhost", 80, 0, 12345),
    ("localhost", 2**70),
    ("localhost", 80, "x"),
    (12, 80),
    ("127.0.0.1", 80, socket.AF_INET6),
    ("www.example.test", 80, 0, 0, 0, socket.AI_NUMERICHOST),
    ("", 80),
    # names: what the system checks before it looks one up
    ("www.example.test", -1),
    ("www.example.test", b"\xff"),
    ("www.example.test", 80, 0, 12345),
    ("www.example.test", 80, 0, socket.SOCK_STREAM, socket.IPPROTO_UDP),
    ("www.example.test", 80, 0, 0, "x"),
    ("deadbeef", 80, 0, 12345),
]


def outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except BaseException as exc:  # noqa: BLE001 - compared below
        return (type(exc), exc.args)


@pytest.mark.asyncio
async def aoutcome(aw):
    try:
        return ("ok", await aw)
    except BaseException as exc:  # noqa: BLE001
        return (type(exc), exc.args)


@pytest.mark.asyncio
@pytest.mark.parametrize("args", BAD, ids=repr)
async def test_bad_input_raises_as_loop_getaddrinfo(args, files):
    # What stdlib asyncio's loop.getaddrinfo raises (socket.getaddrinfo in
    # its executor), on either loop: uvloop's own getaddrinfo differs.
    loop = asyncio.get_running_loop()
    pos, kw = split(args)
    expected = await aoutcome(loop.run_in_executor(None, lambda: socket.getaddrinfo(*args)))
    assert expected[0] != "ok"
    assert await aoutcome(ab.getaddrinfo(*pos, **kw)) == expected


@pytest.mark.asyncio
async def test_a_name_ends_at_a_nul_as_in_c(files):
    got = await ab.getaddrinfo("www.example.test\x00junk", 80, family=socket.AF_INET,
                               type=socket.SOCK_STREAM)
    assert addrs(got) == ["10.1.2.3", "10.1.2.4"]


@pytest.mark.asyncio
async def test_errors_come_at_await_as_with_a_coroutine():
    op = ab.getaddrinfo("localhost", "no-such-service")  # no exception yet
    with pytest.raises(socket.gaierror) as info:
        await op
    assert info.value.errno == socket.EAI_SERVICE


# ---- evdns against the test server -------------------------------------------------------


@pytest.mark.asyncio
async def test_a_and_aaaa_are_asked_at_once(files, dns):
    t = time.monotonic()
    got = await ab.getaddrinfo("slow.example.test", 80, type=socket.SOCK_STREAM)
    took = time.monotonic() - t
    assert entries(got) == [(socket.AF_INET, socket.SOCK_STREAM, 6, ("10.0.0.7", 80))]
    # A (0.3 s) and AAAA (0.3 s, no data) in parallel, not one after the other.
    assert 0.28 < took < 0.55, took
    assert dns.counts()[("slow.example.test", "A")] == 1
    assert dns.counts()[("slow.example.test", "AAAA")] >= 1


@pytest.mark.asyncio
async def test_families_and_expansion(files):
    got = await ab.getaddrinfo("www.example.test", 443)
    # Per address: stream, datagram and raw, as the system expands it.
    assert [(f, t, p) for f, t, p, _, _ in got[:3]] == [
        (got[0][0], socket.SOCK_STREAM, 6), (got[0][0], socket.SOCK_DGRAM, 17),
        (got[0][0], socket.SOCK_RAW, 0)]
    assert sorted(set(addrs(got))) == ["10.1.2.3", "10.1.2.4", "fd00::1"]
    assert all(isinstance(f, socket.AddressFamily) and isinstance(t, socket.SocketKind)
               for f, t, _, _, _ in got)
    v6 = await ab.getaddrinfo("www.example.test", 443, family=socket.AF_INET6, type=socket.SOCK_STREAM)
    assert v6 == [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd00::1", 443, 0, 0))]
    v4 = await ab.getaddrinfo("www.example.test", "443", family=socket.AF_INET, type=socket.SOCK_DGRAM)
    assert [sa for *_, sa in v4] == [("10.1.2.3", 443), ("10.1.2.4", 443)]
    # The server's order within a family.
    assert addrs(await ab.getaddrinfo("www.example.test", 1, family=socket.AF_INET, type=socket.SOCK_STREAM)) \
        == ["10.1.2.3", "10.1.2.4"]


@pytest.mark.asyncio
async def test_cname_is_followed(files):
    got = await ab.getaddrinfo("alias.example.test", 80, family=socket.AF_INET, type=socket.SOCK_STREAM)
    assert addrs(got) == ["10.1.2.3", "10.1.2.4"]


@pytest.mark.asyncio
async def test_idn_names_go_out_as_punycode(files, dns):
    got = await ab.getaddrinfo("bücher.example.test", 80, family=socket.AF_INET, type=socket.SOCK_STREAM)
    assert addrs(got) == ["10.5.5.5"]
    assert ("xn--bcher-kva.example.test", "A") in dns.counts()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "name, family, code",
    [
        ("nx.example.test", 0, socket.EAI_NONAME),
        ("v4only.example.test", socket.AF_INET6, socket.EAI_NODATA),
        ("v6only.example.test", socket.AF_INET, socket.EAI_NODATA),
        ("empty.example.test", 0, socket.EAI_NODATA),
        ("servfail.example.test", 0, socket.EAI_AGAIN),
    ],
)
async def test_dns_errors_are_gaierror_as_glibc_gives_them(files, name, family, code):
    with pytest.raises(socket.gaierror) as info:
        await ab.getaddrinfo(name, 80, family=family)
    assert info.value.errno == code
    assert info.value.args == (code, ab._ext._gai_strerror(code))


@pytest.mark.asyncio
async def test_a_name_that_never_answers_times_out_as_configured(files):
    # resolv.conf says timeout:1 attempts:1.
    t = time.monotonic()
    with pytest.raises(socket.gaierror) as info:
        await ab.getaddrinfo("silent.example.test", 80)
    took = time.monotonic() - t
    assert info.value.errno == socket.EAI_AGAIN
    assert 0.9 < took < 2.5, took


@pytest.mark.asyncio
async def test_asyncio_timeout_cancels_the_wait(files, settled):
    t = time.monotonic()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ab.getaddrinfo("silent.example.test", 80), 0.1)
    assert time.monotonic() - t < 0.5
    stats = await settled()
    assert stats["lookups_evdns"] == 0


@pytest.mark.asyncio
async def test_search_domains_and_ndots(files, dns):
    files["resolv"].write_text(
        f"nameserver {dns.address}\nsearch nowhere.test search.test\n"
        "options ndots:2 timeout:1 attempts:1\n")
    ab.configure(resolv_conf=str(files["resolv"]))  # at once, not after a second
    got = await ab.getaddrinfo("short", 80, family=socket.AF_INET, type=socket.SOCK_STREAM)
    assert addrs(got) == ["10.7.7.7"]
    asked = [q for q, t in dns.queries if t == "A"]
    assert asked.index("short.nowhere.test") < asked.index("short.search.test")
    # Two dots >= ndots: asked as given first.
    dns.reset()
    assert addrs(await ab.getaddrinfo("www.example.test", 80, family=socket.AF_INET,
                                      type=socket.SOCK_STREAM)) == ["10.1.2.3", "10.1.2.4"]
    assert [q for q, t in dns.queries if t == "A"][0] == "www.example.test"
    # A trailing dot: absolute, no search list.
    dns.reset()
    with pytest.raises(socket.gaierror):
        await ab.getaddrinfo("short.", 80, family=socket.AF_INET)
    assert [q for q, _ in dns.queries] == ["short"]


@pytest.mark.asyncio
async def test_resolv_conf_changes_are_picked_up(files, dns):
    zone2 = {"www.example.test": {"A": ["10.200.0.1"]}}
    with DNSServer(zone2) as other:
        assert addrs(await ab.getaddrinfo("www.example.test", 1, family=socket.AF_INET,
                                          type=socket.SOCK_STREAM))[0] == "10.1.2.3"
        files["resolv"].write_text(f"nameserver {other.address}\noptions timeout:1 attempts:1\n")
        # Re-read when its mtime changes, looked at once a second at most.
        end = time.monotonic() + 3
        seen = None
        while time.monotonic() < end:
            seen = addrs(await ab.getaddrinfo("www.example.test", 1, family=socket.AF_INET,
                                              type=socket.SOCK_STREAM))
            if seen == ["10.200.0.1"]:
                break
            await asyncio.sleep(0.1)
        assert seen == ["10.200.0.1"]


# ---- the hosts file ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_hosts_file_names_never_reach_dns_or_a_thread(files, dns):
    before = ab.stats()
    got = await ab.getaddrinfo("fromhosts.example.test", 80, type=socket.SOCK_STREAM)
    assert sorted(addrs(got)) == ["10.4.4.4", "fd00::44"]
    got = await ab.getaddrinfo("FROMHOSTSALIAS", 80, family=socket.AF_INET, type=socket.SOCK_STREAM)
    assert addrs(got) == ["10.4.4.4"]
    # The hosts file wins over DNS, as with "hosts: files dns".
    got = await ab.getaddrinfo("hosts-and-dns.example.test", 80, family=socket.AF_INET,
                               type=socket.SOCK_STREAM)
    assert addrs(got) == ["10.6.6.6"]
    assert dns.queries == []
    assert ab.stats()["submitted"] == before["submitted"]


@pytest.mark.asyncio
async def test_hosts_entries_of_another_family_fall_through_to_dns(files, dns):
    # hosts-and-dns has only an IPv4 entry: for IPv6, DNS is asked (glibc does).
    with pytest.raises(socket.gaierror) as info:
        await ab.getaddrinfo("hosts-and-dns.example.test", 80, family=socket.AF_INET6)
    assert info.value.errno == socket.EAI_NODATA
    assert ("hosts-and-dns.example.test", "AAAA") in dns.counts()


@pytest.mark.asyncio
async def test_localhost_is_answered_here(files, dns):
    got = await ab.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)
    assert addrs(got) == ["127.0.0.1"]  # the hosts file's entry
    # No IPv6 entry: loopback anyway (RFC 6761), never a DNS query.
    got = await ab.getaddrinfo("localhost", 80, family=socket.AF_INET6, type=socket.SOCK_STREAM)
    assert addrs(got) == ["::1"]
    files["hosts"].write_text("")
    ab.configure(hosts_file=str(files["hosts"]))
    await asyncio.sleep(1.1)
    got = await ab.getaddrinfo("LocalHost", 80, family=socket.AF_INET, type=socket.SOCK_STREAM)
    assert addrs(got) == ["127.0.0.1"]
    assert dns.queries == []


@pytest.mark.asyncio
async def test_hosts_file_changes_are_picked_up(files, dns):
    got = None
    files["hosts"].write_text(HOSTS + "10.77.0.1 new.example.test\n")
    end = time.monotonic() + 3
    while time.monotonic() < end:
        try:
            got = await ab.getaddrinfo("new.example.test", 80, family=socket.AF_INET, type=socket.SOCK_STREAM)
            break
        except socket.gaierror:
            await asyncio.sleep(0.1)
    assert got is not None and addrs(got) == ["10.77.0.1"]


# ---- sharing, cancellation, bookkeeping ---------------------------------------------------------


@pytest.mark.asyncio
async def test_lookups_of_one_name_share_one_query(files, dns, settled):
    t = time.monotonic()
    results = await asyncio.gather(*[ab.getaddrinfo("slow.example.test", 80 + i)
                                     for i in range(200)])
    assert time.monotonic() - t < 0.6
    assert all(addrs(r)[0] == "10.0.0.7" for r in results)
    assert results[5][0][4] == ("10.0.0.7", 85)
    assert dns.counts()[("slow.example.test", "A")] == 1
    # Case does not matter to DNS names.
    dns.reset()
    await asyncio.gather(ab.getaddrinfo("slow.example.test", 1), ab.getaddrinfo("SLOW.Example.TEST", 1))
    assert sum(n for (q, t), n in dns.counts().items() if t == "A") == 1


@pytest.mark.asyncio
async def test_each_waiter_cancels_alone(files, dns, settled):
    tasks = [asyncio.ensure_future(ab.getaddrinfo("slower.example.test", 80)) for _ in range(10)]
    await asyncio.sleep(0.1)
    assert ab.stats()["lookups_evdns"] == 10
    assert ab.stats()["queries_evdns"] == 1
    for t in tasks[:5]:
        t.cancel()
    await asyncio.sleep(0.01)
    assert all(t.cancelled() for t in tasks[:5])  # freed at once, not at the answer
    assert ab.stats()["lookups_evdns"] == 5
    results = await asyncio.gather(*tasks[5:])
    assert all(addrs(r)[0] == "10.0.0.8" for r in results)
    assert dns.counts()[("slower.example.test", "A")] == 1
    stats = await settled()
    assert (stats["lookups_evdns"], stats["queries_evdns"]) == (0, 0)


@pytest.mark.asyncio
async def test_a_query_left_by_every_waiter_runs_on_and_is_dropped(files, dns, settled):
    task = asyncio.ensure_future(ab.getaddrinfo("slower.example.test", 80))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stats = await settled()
    assert stats["lookups_evdns"] == 0
    assert stats["queries_evdns"] == 1  # not cancelled in evdns: runs on
    # A new lookup of the name (and family) meanwhile joins it.
    got = await ab.getaddrinfo("slower.example.test", 80, type=socket.SOCK_STREAM)
    assert addrs(got) == ["10.0.0.8"]
    assert dns.counts()[("slower.example.test", "A")] == 1
    await asyncio.sleep(0.05)
    assert ab.stats()["queries_evdns"] == 0


@pytest.mark.asyncio
async def test_cancel_races_with_the_answer(files, settled):
    # Cancels at every point around the answer's arrival: never a crash, a
    # result on a cancelled future, or a leak.
    for delay in [0.0, 0.0001, 0.001, 0.005]:
        for _ in range(20):
            task = asyncio.ensure_future(ab.getaddrinfo(f"n{_}.wild.test", 80))
            await asyncio.sleep(delay)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
    stats = await settled()
    assert stats["lookups_evdns"] == 0
    end = time.monotonic() + 2
    while ab.stats()["queries_evdns"] and time.monotonic() < end:
        await asyncio.sleep(0.01)
    assert ab.stats()["queries_evdns"] == 0


@pytest.mark.asyncio
async def test_many_distinct_names_in_flight(files, dns):
    names = [f"host{i}.wild.test" for i in range(500)]
    t = time.monotonic()
    results = await asyncio.gather(*[ab.getaddrinfo(n, 80, family=socket.AF_INET, type=socket.SOCK_STREAM)
                                     for n in names])
    assert time.monotonic() - t < 3
    assert all(addrs(r) == ["10.8.8.8"] for r in results)


@pytest.mark.asyncio
async def test_repr_says_what_it_is(files):
    op = ab.getaddrinfo("slow.example.test", 80)
    assert "getaddrinfo" in repr(op)
    task = asyncio.ensure_future(op)
    await asyncio.sleep(0.05)
    assert "getaddrinfo" in repr(op)
    await task


@pytest.mark.asyncio
async def test_no_reference_is_left(files, settled):
    def live():
        gc.collect()
        finishers = sum(isinstance(o, ab._resolver._FinishDNS) for o in gc.get_objects())
        refs = sys.getrefcount(ab._resolver._finish_system)
        return finishers, refs

    before = live()
    for _ in range(3):
        await ab.getaddrinfo("www.example.test", 80)
        with pytest.raises(socket.gaierror):
            await ab.getaddrinfo("nx.example.test", 80)
        task = asyncio.ensure_future(ab.getaddrinfo("slow.example.test", 80))
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        del task  # a Task keeps its coroutine, the Op
    await settled()
    await asyncio.sleep(0.01)  # let the loop drop the handles it ran
    after = live()
    assert after == before


# ---- configuration -------------------------------------------------------------------------


def test_configure_checks_its_arguments():
    before = ab.configure()
    assert before["resolver"] in ("auto", "system", "evdns")
    with pytest.raises(ValueError):
        ab.configure(resolver="c-ares")
    with pytest.raises(ValueError):
        ab.configure(resolver="evdns", delivery="nope")
    assert ab.configure()["resolver"] == before["resolver"]  # nothing half-applied
    with pytest.raises(TypeError):
        ab.configure(hosts_file=3)
    with pytest.raises(ValueError):
        ab.configure(resolver=None or "")


# ---- lifecycle ------------------------------------------------------------------------------


def test_closed_loop_quietly_drops_lookups(dns, run_script, tmp_path):
    resolv = tmp_path / "r.conf"
    resolv.write_text(f"nameserver {dns.address}\noptions timeout:1 attempts:1\n")
    proc = run_script(f"""
        ab.configure(resolver="evdns", resolv_conf={str(resolv)!r})
        loop = new_loop()
        async def main():
            asyncio.ensure_future(ab.getaddrinfo("slower.example.test", 80))
            await asyncio.sleep(0.05)
        loop.run_until_complete(main())
        loop.close()
        time.sleep(0.8)
        s = settle()
        print("in_flight", s["in_flight"], s["lookups_evdns"])
        loop2 = new_loop()
        print(loop2.run_until_complete(ab.getaddrinfo("slow.example.test", 80, family=socket.AF_INET,
                                                       type=socket.SOCK_STREAM))[0][4])
    """)
    assert proc.returncode == 0, proc.stderr
    assert "in_flight 0 0" in proc.stdout
    assert "('10.0.0.7', 80)" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_exit_with_lookups_in_flight_is_prompt_and_quiet(dns, run_script, tmp_path):
    resolv = tmp_path / "r.conf"
    resolv.write_text(f"nameserver {dns.address}\noptions timeout:5 attempts:2\n")
    proc = run_script(f"""
        ab.configure(resolver="evdns", resolv_conf={str(resolv)!r})
        async def main():
            for i in range(50):
                asyncio.ensure_future(ab.getaddrinfo("silent.example.test", 80 + i))
            asyncio.ensure_future(ab.getaddrinfo("slower.example.test", 80))
            await asyncio.sleep(0.1)
            print("started", ab.stats()["lookups_evdns"], flush=True)
        loop = new_loop()
        loop.run_until_complete(main())
    """)
    assert proc.returncode == 0, proc.stderr
    assert "started 51" in proc.stdout
    assert proc.wall < 2.0, proc.wall  # interpreter start and imports included
    # Nothing but asyncio's own note on the tasks the script left pending
    # (asyncio.sleep tasks left so get the same).
    lines = [line for line in proc.stderr.splitlines()
             if line.strip() and not line.startswith(("Task was destroyed but it is pending!",
                                                      "task: <Task pending"))]
    assert lines == [], proc.stderr


def test_fork_child_gets_a_fresh_resolver(dns, run_script, tmp_path):
    resolv = tmp_path / "r.conf"
    resolv.write_text(f"nameserver {dns.address}\noptions timeout:1 attempts:1\n")
    proc = run_script(f"""
        ab.configure(resolver="evdns", resolv_conf={str(resolv)!r})
        loop = new_loop()
        async def lookup(name):
            return (await ab.getaddrinfo(name, 80, family=socket.AF_INET, type=socket.SOCK_STREAM))[0][4][0]
        print("parent", loop.run_until_complete(lookup("www.example.test")), flush=True)
        pid = os.fork()
        if pid == 0:
            child = new_loop()
            try:
                print("child", child.run_until_complete(lookup("slow.example.test")),
                      ab.stats()["queries_evdns"], flush=True)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        print("parent again", loop.run_until_complete(lookup("v4only.example.test")))
    """)
    assert proc.returncode == 0, proc.stderr
    assert "parent 10.1.2.3" in proc.stdout
    assert "child 10.0.0.7 0" in proc.stdout
    assert "parent again 10.9.9.9" in proc.stdout


# ---- the C API (version 3): ab_await_dns from a third-party op, built for version 3 ---------


@pytest.mark.asyncio
async def test_c_api_lookups(v3ops, files, dns, settled):
    assert await v3ops.lookup("www.example.test") == [
        (socket.AF_INET, "10.1.2.3"), (socket.AF_INET, "10.1.2.4"), (socket.AF_INET6, "fd00::1")]
    assert await v3ops.lookup("www.example.test", family=socket.AF_INET6) == [
        (socket.AF_INET6, "fd00::1")]
    with pytest.raises(OSError) as info:
        await v3ops.lookup("nx.example.test")
    assert info.value.errno == socket.EAI_NONAME
    # The system's getaddrinfo, on the blocking pool.
    assert (socket.AF_INET, "127.0.0.1") in await v3ops.lookup("localhost", system=True)
    # One query for many waiters, shared with asyncio_bridge.getaddrinfo's own.
    dns.reset()
    got = await asyncio.gather(*[v3ops.lookup("slow.example.test") for _ in range(20)],
                               ab.getaddrinfo("slow.example.test", 80))
    assert all(g == [(socket.AF_INET, "10.0.0.7")] for g in got[:-1])
    assert addrs(got[-1]) == ["10.0.0.7"] * 3
    assert dns.counts()[("slow.example.test", "A")] == 1
    task = asyncio.ensure_future(v3ops.lookup("slower.example.test"))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stats = await settled()
    assert stats["lookups_evdns"] == 0


def test_module_built_for_version_2_runs_with_a_later_library(v2ops):
    # abr_v2ops.c is built against the released version-2 headers.
    assert asyncio.run(v2ops.signal_later(0.01, 7)) == 7


# ---- getnameinfo -----------------------------------------------------------------------------

NAMEINFO = [
    (("127.0.0.1", 80), 0),
    (("127.0.0.1", 80), socket.NI_NUMERICHOST),
    (("127.0.0.1", 443), socket.NI_NUMERICSERV),
    (("127.0.0.1", 80), socket.NI_NUMERICHOST | socket.NI_NUMERICSERV),
    (("127.0.0.1", 80), socket.NI_NAMEREQD),
    (("127.0.0.1", 53), socket.NI_DGRAM),
    (("::1", 80, 0, 0), socket.NI_NUMERICHOST),
    (("fe80::1%lo", 80, 0, 1), socket.NI_NUMERICHOST),
    (("fe80::1", 80, 0, 1), socket.NI_NUMERICHOST | socket.NI_NUMERICSERV),
    # bad input, as socket.getnameinfo refuses it
    (("127.0.0.1",), 0),
    (("127.0.0.1", 80, 0, 0), 0),
    (("localhost", 80), 0),
    (("127.0.0.1", "80"), 0),
    ("127.0.0.1", 0),
    (("127.0.0.1", 80), "x"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("sockaddr, flags", NAMEINFO, ids=repr)
async def test_getnameinfo_matches_the_system(sockaddr, flags):
    expected = await aoutcome(asyncio.get_running_loop().run_in_executor(
        None, lambda: socket.getnameinfo(sockaddr, flags)))
    before = ab.stats()
    assert await aoutcome(ab.getnameinfo(sockaddr, flags)) == expected
    numeric = isinstance(flags, int) and \
        flags & (socket.NI_NUMERICHOST | socket.NI_NUMERICSERV) == \
        (socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
    if numeric or expected[0] != "ok":
        assert ab.stats()["submitted"] == before["submitted"]  # answered here


@pytest.mark.asyncio
async def test_getnameinfo_runs_on_the_blocking_pool_and_cancels(settled):
    before = ab.stats()
    assert (await ab.getnameinfo(("127.0.0.1", 80)))[1] == "http"
    after = ab.stats()
    assert after["submitted"] == before["submitted"] + 1
    assert after["blocking_threads"] >= 1
    task = asyncio.ensure_future(ab.getnameinfo(("127.0.0.1", 80)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settled()


# ---- auto: what only glibc follows goes to glibc -------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("tuning", ["none", "gai.conf", "no-aaaa"])
async def test_auto_leaves_tuned_machines_to_the_system(tmp_path, dns, tuning):
    nsswitch = tmp_path / "nsswitch.conf"
    nsswitch.write_text("hosts: files dns\n")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {dns.address}\n"
                      + ("options no-aaaa\n" if tuning == "no-aaaa" else ""))
    gai = tmp_path / "gai.conf"
    gai.write_text("# comments only\n" + ("precedence ::ffff:0:0/96 100\n"
                                          if tuning == "gai.conf" else ""))
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    saved = ab._resolver._config.gai_conf
    ab.configure(resolver="auto", resolv_conf=str(resolv), hosts_file=str(hosts),
                 nsswitch_conf=str(nsswitch))
    ab._resolver._config.gai_conf = str(gai)
    try:
        before = ab.stats()["submitted"]
        got = await ab.getaddrinfo("localhost", 80, family=socket.AF_INET,
                                   type=socket.SOCK_STREAM)
        assert got == socket.getaddrinfo("localhost", 80, socket.AF_INET, socket.SOCK_STREAM)
        went_to_system = ab.stats()["submitted"] > before
        assert went_to_system == (tuning != "none")
    finally:
        ab._resolver._config.gai_conf = saved
        ab.configure(resolver="auto", resolv_conf="/etc/resolv.conf", hosts_file="/etc/hosts",
                     nsswitch_conf="/etc/nsswitch.conf")
