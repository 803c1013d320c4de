"""Self-tests of the DNS test server (dnsserver.py) and the private-/etc runner (sysns.py)."""

import json
import random
import selectors
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest

from dnsserver import DNSServer, spawn_server
from sysns import namespaces_available, run_isolated

ZONE = {
    "www.example.test": {"A": ["10.1.2.3", "10.1.2.4"], "AAAA": ["fd00::1"], "ttl": 30},
    "v4only.example.test": {"A": ["10.1.2.5"]},
    "alias.example.test": {"CNAME": "www.example.test"},
    "slow.example.test": {"A": ["10.1.2.6"], "delay": 0.3},
    "servfail.example.test": {"rcode": "SERVFAIL"},
    "silent.example.test": {"silent": True},
    "big.example.test": {"A": [f"10.2.0.{i}" for i in range(1, 101)]},
    "*.bench.test": {"A": ["127.0.0.1"], "delay": 0.1},
}


@pytest.fixture(autouse=True)
def delivery():
    """Overrides conftest's: nothing here uses asyncio_bridge, so run each test once."""


@pytest.fixture(scope="module")
def server():
    with DNSServer(ZONE) as srv:
        yield srv


def ask(srv, name, qtype="A", timeout=2.0, **kw):
    return dns.query.udp(dns.message.make_query(name, qtype, **kw), srv.host, port=srv.port, timeout=timeout)


def addresses(response):
    return {rd.to_text() for rrset in response.answer for rd in rrset if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)}


def resolver(srv):
    res = dns.resolver.Resolver(configure=False)
    res.nameservers, res.port, res.lifetime = [srv.host], srv.port, 2.0
    return res


def test_a_aaaa_case_and_trailing_dot(server):
    r = ask(server, "www.example.test")
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
    assert addresses(r) == {"10.1.2.3", "10.1.2.4"}
    assert r.answer[0].ttl == 30
    assert addresses(ask(server, "WWW.Example.TEST.", "AAAA")) == {"fd00::1"}
    assert addresses(ask(server, "www.example.test", use_edns=0)) == {"10.1.2.3", "10.1.2.4"}


def test_nxdomain_nodata_servfail(server):
    res = resolver(server)
    r = ask(server, "missing.example.test")
    assert r.rcode() == dns.rcode.NXDOMAIN and r.authority[0].rdtype == dns.rdatatype.SOA
    with pytest.raises(dns.resolver.NXDOMAIN):
        res.resolve("missing.example.test", "A")
    r = ask(server, "v4only.example.test", "AAAA")
    assert r.rcode() == dns.rcode.NOERROR and not r.answer and r.authority
    with pytest.raises(dns.resolver.NoAnswer):
        res.resolve("v4only.example.test", "AAAA")
    assert ask(server, "example.test").rcode() == dns.rcode.NOERROR  # an empty non-terminal
    assert ask(server, "servfail.example.test").rcode() == dns.rcode.SERVFAIL


def test_cname_and_wildcard(server):
    answer = resolver(server).resolve("alias.example.test", "A")
    assert answer.canonical_name.to_text() == "www.example.test."
    assert {rd.to_text() for rd in answer} == {"10.1.2.3", "10.1.2.4"}
    r = ask(server, "a.b.bench.test")
    assert addresses(r) == {"127.0.0.1"} and r.answer[0].name.to_text() == "a.b.bench.test."
    assert ask(server, "bench.test").rcode() == dns.rcode.NOERROR


def test_truncation_then_tcp(server):
    assert ask(server, "big.example.test").flags & dns.flags.TC
    r = dns.query.tcp(dns.message.make_query("big.example.test", "A"), server.host, port=server.port, timeout=2)
    assert len(addresses(r)) == 100


def test_delay_and_silent(server):
    start = time.monotonic()
    assert addresses(ask(server, "slow.example.test")) == {"10.1.2.6"}
    assert 0.3 <= time.monotonic() - start < 0.6
    start = time.monotonic()
    with pytest.raises(dns.exception.Timeout):
        ask(server, "silent.example.test", timeout=0.3)
    assert time.monotonic() - start >= 0.3


def test_queries_recorded(server):
    server.reset()
    ask(server, "WWW.example.test.", "AAAA")
    ask(server, "missing.example.test", "A")
    assert server.queries == [("www.example.test", "AAAA"), ("missing.example.test", "A")]
    server.reset()
    assert server.queries == []


def test_burst_is_concurrent(server):
    """500 queries at once to a 0.1 s name are answered together, not one after another."""
    n = 500
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    with selectors.DefaultSelector() as sel:
        start = time.monotonic()
        for i, s in enumerate(socks):
            s.setblocking(False)
            s.sendto(dns.message.make_query(f"q{i}.bench.test", "A").to_wire(), (server.host, server.port))
            sel.register(s, selectors.EVENT_READ)
        pending = n
        while pending and time.monotonic() - start < 2:
            for key, _ in sel.select(0.5):
                assert addresses(dns.message.from_wire(key.fileobj.recv(512))) == {"127.0.0.1"}
                sel.unregister(key.fileobj)
                pending -= 1
        elapsed = time.monotonic() - start
    for s in socks:
        s.close()
    assert pending == 0
    assert 0.1 <= elapsed < 1.0


def test_subprocess_server_and_sigterm():
    with spawn_server(ZONE) as (proc, host, port):
        r = dns.query.udp(dns.message.make_query("www.example.test", "A"), host, port=port, timeout=2)
        assert addresses(r) == {"10.1.2.3", "10.1.2.4"}
        proc.terminate()
        assert proc.wait(5) == 0


def _server_on_port_53():
    """A server on a random 127.53.x.y:53 (retrying if that one is taken)."""
    for _ in range(5):
        host = f"127.53.{random.randint(1, 254)}.{random.randint(1, 254)}"
        try:
            return DNSServer(ZONE, host, 53).start()
        except OSError:
            continue
    raise RuntimeError("no free 127.53.x.y:53")


ETC = [Path("/etc/resolv.conf"), Path("/etc/hosts"), Path("/etc/nsswitch.conf")]

GETADDRINFO = textwrap.dedent("""
    import json, socket
    def lookup(name):
        try:
            return sorted({ai[4][0] for ai in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)})
        except socket.gaierror as exc:
            return exc.errno
    print(json.dumps({name: lookup(name) for name in
                      ["www.example.test", "v4only.example.test", "private.test", "missing.example.test"]}))
""")


def test_glibc_getaddrinfo_in_private_namespace():
    assert namespaces_available()  # must work here: fail, don't skip
    before = [p.read_bytes() for p in ETC]
    srv = _server_on_port_53()
    try:
        proc = run_isolated(GETADDRINFO, resolv_conf=f"nameserver {srv.host}\noptions timeout:1 attempts:1\n",
                            hosts="127.0.0.1 localhost\n10.9.9.9 private.test\n", timeout=20)
        queries = srv.counts()
    finally:
        srv.stop()
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "www.example.test": ["10.1.2.3", "10.1.2.4", "fd00::1"],
        "v4only.example.test": ["10.1.2.5"],
        "private.test": ["10.9.9.9"],
        "missing.example.test": socket.EAI_NONAME,
    }
    assert queries[("www.example.test", "A")] >= 1 and queries[("www.example.test", "AAAA")] >= 1
    assert not any(name == "private.test" for name, _ in queries)  # answered from the hosts file
    assert [p.read_bytes() for p in ETC] == before


def test_isolation_over_symlinked_resolv_conf(tmp_path):
    """With /etc/resolv.conf a symlink (systemd-resolved style), the mount covers its target.

    Staged in an outer private namespace whose /etc is a copy with such a symlink.
    """
    stage = textwrap.dedent(f"""
        set -e
        cp -a /etc "$1/etc"
        echo 'nameserver 192.0.2.1' > "$1/stub-resolv.conf"
        ln -sf "$1/stub-resolv.conf" "$1/etc/resolv.conf"
        mount --bind "$1/etc" /etc
        exec {sys.executable} -c "$2"
    """)
    check = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from sysns import run_isolated
        assert os.path.islink("/etc/resolv.conf")
        proc = run_isolated("print(open('/etc/resolv.conf').read(), end='')",
                            resolv_conf="nameserver 127.53.0.1\\n", hosts="", timeout=20)
        print(proc.stdout + open("/etc/resolv.conf").read(), end="")
    """)
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", stage, "sh",
                           str(tmp_path), check], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "nameserver 127.53.0.1\nnameserver 192.0.2.1\n"
