"""A small authoritative DNS server for the resolver tests (asyncio; dnspython parses the zone).

The zone is a plain dict (JSON-compatible) of owner name -> entry::

    {
        "www.example.test": {"A": ["10.1.2.3", "10.1.2.4"], "AAAA": ["fd00::1"], "ttl": 30},
        "alias.example.test": {"CNAME": "www.example.test"},
        "slow.example.test": {"A": ["10.0.0.1"], "delay": 0.3},
        "servfail.example.test": {"rcode": "SERVFAIL"},
        "silent.example.test": {"silent": True},
        "*.bench.test": {"A": ["127.0.0.1"], "delay": 0.1},
    }

An entry's upper-case keys are record types whose values are rdata in
presentation format (a string or a list of them); the other keys are
"ttl" (default 30), "delay" (seconds before the reply is sent; other queries
are not held up), "rcode" (e.g. "SERVFAIL", "REFUSED": reply with it and no
records) and "silent" (never reply).  Names are case-insensitive and a
trailing dot is ignored.  "*.parent" answers every name below parent that is
not in the zone itself (the longest matching wildcard wins).

Answers: the records of the asked type; a CNAME and, when its target is in
the zone, the chain up to the target's records; otherwise NODATA (NOERROR, no
answer) for a name that exists (or is an ancestor of one), else NXDOMAIN.
Negative answers carry an SOA in the authority section.

Use it in-process (``with DNSServer(zone) as srv: ...``, served by an asyncio
loop in a daemon thread) or as a subprocess (``spawn_server`` or
``python tests/dnsserver.py --listen 127.0.0.1:0 --zone-json FILE``, which
prints ``READY host port`` once listening and exits cleanly on SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections import Counter

import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype

DEFAULT_TTL = 30
EDNS_PAYLOAD = 1232  # the UDP payload size we advertise
_SOCKET_BUFFER = 8 << 20  # room for thousands of queries arriving at once
_MAX_CNAME_CHAIN = 8
_CONTROL_KEYS = {"ttl", "delay", "rcode", "silent"}
_QNAME_POINTER = b"\xc0\x0c"  # a compressed name: the question's, always at offset 12
_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
# EDNS OPT record: root owner, class = our UDP payload size, ttl = extended rcode/flags 0.
_OPT_RR = b"\x00" + _RR_FIXED.pack(dns.rdatatype.OPT, EDNS_PAYLOAD, 0, 0)
# Header flag bits.
_QR, _OPCODE, _AA, _TC, _RD, _RA, _CD = 0x8000, 0x7800, 0x0400, 0x0200, 0x0100, 0x0080, 0x0010


def _norm(name: str) -> str:
    """Lower-case, without the trailing dot: the form used for zone keys and .queries."""
    return name.lower().rstrip(".")


def _rr(owner: bytes, rdtype: int, ttl: int, rdata: bytes) -> bytes:
    return owner + _RR_FIXED.pack(rdtype, dns.rdataclass.IN, ttl, len(rdata)) + rdata


class _Entry:
    """One owner name of the zone, with its rdata already in wire form."""

    def __init__(self, name: str, spec: dict):
        self.ttl = int(spec.get("ttl", DEFAULT_TTL))
        self.delay = float(spec.get("delay", 0.0))
        self.silent = bool(spec.get("silent", False))
        self.rcode = dns.rcode.from_text(spec["rcode"]) if "rcode" in spec else None
        if self.rcode is not None and self.rcode > 15:
            raise ValueError(f"{name}: extended rcodes (needing EDNS) are not supported")
        self.cname: str | None = None
        self.records: dict[int, list[bytes]] = {}
        for key, value in spec.items():
            if key in _CONTROL_KEYS:
                continue
            rdtype = dns.rdatatype.from_text(key)  # raises on a typo such as "dely"
            values = [value] if isinstance(value, str) else list(value)
            self.records[rdtype] = [
                dns.rdata.from_text(dns.rdataclass.IN, rdtype, v, origin=dns.name.root, relativize=False).to_wire()
                for v in values
            ]
            if rdtype == dns.rdatatype.CNAME:
                if len(values) != 1:
                    raise ValueError(f"{name}: CNAME takes exactly one target")
                self.cname = _norm(values[0])


class Zone:
    """The parsed zone dict; resolve() computes the answer to a question."""

    def __init__(self, zone: dict[str, dict]):
        self.names: dict[str, _Entry] = {}
        self.wildcards: dict[str, _Entry] = {}  # parent name -> entry of "*.parent"
        self.existing: set[str] = set()  # names and their ancestors (for NODATA vs NXDOMAIN)
        for raw, spec in zone.items():
            name = _norm(raw)
            entry = _Entry(name, spec)
            if name.startswith("*."):
                self.wildcards[name[2:]] = entry
            else:
                self.names[name] = entry
            labels = name.split(".")
            self.existing.update(".".join(labels[i:]) for i in range(len(labels)) if labels[i] != "*")

    def find(self, name: str) -> _Entry | None:
        entry = self.names.get(name)
        if entry is None:
            labels = name.split(".")
            for i in range(1, len(labels)):
                entry = self.wildcards.get(".".join(labels[i:]))
                if entry is not None:
                    break
        return entry

    def resolve(self, name: str, rdtype: int) -> tuple[int, list[bytes], list[bytes], float] | None:
        """(rcode, answer RRs, authority RRs, delay) for a normalised name, or None: never reply.

        The RRs are in wire form, the question's name written as a pointer to it.
        """
        entry = self.find(name)
        if entry is None:
            if name in self.existing:  # an empty non-terminal: NODATA
                return dns.rcode.NOERROR, [], [self._soa(name)], 0.0
            return dns.rcode.NXDOMAIN, [], [self._soa(name)], 0.0
        if entry.silent:
            return None
        if entry.rcode is not None:
            return entry.rcode, [], [], entry.delay
        answer = []
        owner, current = _QNAME_POINTER, entry
        for _ in range(_MAX_CNAME_CHAIN):
            if current.cname is None or rdtype == dns.rdatatype.CNAME:
                break
            answer.append(_rr(owner, dns.rdatatype.CNAME, current.ttl, current.records[dns.rdatatype.CNAME][0]))
            target = self.find(current.cname)
            if target is None or target.silent or target.rcode is not None:
                current = None  # out-of-zone (or unusable) target: the chain ends here
                break
            owner, current = dns.name.from_text(current.cname).to_wire(), target
        if current is not None:
            answer += [_rr(owner, rdtype, current.ttl, rd) for rd in current.records.get(rdtype, ())]
        return dns.rcode.NOERROR, answer, [] if answer else [self._soa(name)], entry.delay

    @staticmethod
    def _soa(name: str) -> bytes:
        # Resolvers only need an SOA to be present (it makes a negative answer
        # authoritative); put it at the name's TLD.
        labels = name.split(".")
        return _soa_rr(labels[-1] + "." if len(labels) > 1 else ".")


@functools.lru_cache(maxsize=None)
def _soa_rr(apex: str) -> bytes:
    rdata = dns.rdata.from_text(
        dns.rdataclass.IN, dns.rdatatype.SOA, f"ns.{apex} hostmaster.{apex} 1 3600 600 86400 {DEFAULT_TTL}"
    )
    return _rr(dns.name.from_text(apex).to_wire(), dns.rdatatype.SOA, DEFAULT_TTL, rdata.to_wire())


class _Query:
    """The parts of a query that the response needs.

    Stub resolvers send one question and at most an EDNS OPT record; the
    wire is parsed by hand because dnspython's parser and renderer cost
    ~70 us a query, which would serialise a burst of thousands.
    """

    def __init__(self, data: bytes):
        self.id, self.flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
        if qdcount != 1 or ancount or nscount:
            raise ValueError("not a single-question query")
        pos, labels = 12, []
        while (length := data[pos]) != 0:
            if length & 0xC0:
                raise ValueError("compressed question name")
            labels.append(data[pos + 1 : pos + 1 + length])
            pos += 1 + length
        self.qtype, _qclass = struct.unpack_from("!HH", data, pos + 1)
        pos += 5
        self.question = data[12:pos]
        self.qname = b".".join(labels).lower().decode("latin-1")
        self.payload = None  # the requester's UDP payload size if it uses EDNS
        if arcount and data[pos] == 0 and struct.unpack_from("!H", data, pos + 1)[0] == dns.rdatatype.OPT:
            self.payload = struct.unpack_from("!H", data, pos + 3)[0]

    def response(self, rcode: int, answer=(), authority=(), max_size: int = 512) -> bytes:
        """The response wire; with TC set and no records if it would exceed max_size."""
        opt = [_OPT_RR] if self.payload is not None else []
        flags = _QR | _AA | _RA | (self.flags & (_OPCODE | _RD | _CD)) | rcode
        wire = self._wire(flags, answer, authority, opt)
        if len(wire) > max_size:
            wire = self._wire(flags | _TC, [], [], opt)
        return wire

    def _wire(self, flags, answer, authority, additional) -> bytes:
        header = _HEADER.pack(self.id, flags, 1, len(answer), len(authority), len(additional))
        return b"".join([header, self.question, *answer, *authority, *additional])


def _bind(host: str, port: int, tcp: bool) -> tuple[socket.socket, socket.socket | None]:
    """UDP (and TCP on the same port) sockets bound to host:port; port 0 picks one free for both."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        stream = socket.socket(family, socket.SOCK_STREAM) if tcp else None
        try:
            for force, plain in ((getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
                                 (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF)):
                try:  # *BUFFORCE (root only) may exceed net.core.[rw]mem_max
                    udp.setsockopt(socket.SOL_SOCKET, force or plain, _SOCKET_BUFFER)
                except OSError:
                    udp.setsockopt(socket.SOL_SOCKET, plain, _SOCKET_BUFFER)
            udp.bind((host, port))
            if stream is not None:
                stream.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                stream.bind((host, udp.getsockname()[1]))
                stream.listen(1024)
            return udp, stream
        except OSError:
            udp.close()
            if stream is not None:
                stream.close()
            if port:
                raise
    raise OSError(f"no port free for both UDP and TCP on {host}")


class DNSServer:
    """An authoritative server for `zone` on host:port (UDP and TCP), run by an asyncio loop in a daemon thread."""

    def __init__(self, zone: dict[str, dict], host: str = "127.0.0.1", port: int = 0, *, tcp: bool = True):
        self.zone = Zone(zone)
        self.host = host
        self.port = port
        self._tcp = tcp
        self._lock = threading.Lock()
        self._queries: list[tuple[str, str]] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Future | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._connections: set[asyncio.StreamWriter] = set()  # open TCP connections

    @property
    def address(self) -> str:
        """"host:port" ("[host]:port" for IPv6)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def queries(self) -> list[tuple[str, str]]:
        """Snapshot of the (qname, qtype) received, in order, e.g. ("www.example.test", "AAAA")."""
        with self._lock:
            return list(self._queries)

    def counts(self) -> Counter:
        """Counter of (qname, qtype) received."""
        return Counter(self.queries)

    def reset(self) -> None:
        """Forget the queries received so far."""
        with self._lock:
            self._queries.clear()

    def start(self) -> DNSServer:
        """Bind and start serving; returns self once listening (raises if binding failed)."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name=f"dnsserver-{self.host}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise self._error
        return self

    def stop(self) -> None:
        """Stop serving and join the thread; idempotent."""
        if self._thread is None:
            return
        self._loop.call_soon_threadsafe(lambda: self._stopping.done() or self._stopping.set_result(None))
        self._thread.join()
        self._thread = None

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _handle(self, data: bytes, tcp: bool) -> tuple[bytes | None, float]:
        """(response wire or None, delay) for a query's wire."""
        if len(data) < 12 or data[2] & 0x80:
            return None, 0.0  # too short for a header, or a response: drop it
        try:
            query = _Query(data)
        except (ValueError, IndexError, struct.error):
            return _HEADER.pack(int.from_bytes(data[:2], "big"), _QR | dns.rcode.FORMERR, 0, 0, 0, 0), 0.0
        with self._lock:
            self._queries.append((query.qname, dns.rdatatype.to_text(query.qtype)))
        if query.flags & _OPCODE:
            return query.response(dns.rcode.NOTIMP), 0.0
        result = self.zone.resolve(query.qname, query.qtype)
        if result is None:
            return None, 0.0
        rcode, answer, authority, delay = result
        if tcp:
            max_size = 65535
        else:  # the requester's UDP payload size: 512 without EDNS
            max_size = max(512, query.payload or 0)
        return query.response(rcode, answer, authority, max_size), delay

    def _run(self) -> None:
        # A plain selector loop whatever the installed policy (e.g. uvloop's).
        loop = self._loop = asyncio.SelectorEventLoop()
        try:
            loop.run_until_complete(self._serve())
            # _serve closed the TCP connections: let their handlers see EOF and return.
            loop.run_until_complete(self._finish_tasks())
        finally:
            loop.close()

    @staticmethod
    async def _finish_tasks() -> None:
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        udp = stream = tcp_server = None
        self._stopping = loop.create_future()
        try:
            udp, stream = _bind(self.host, self.port, self._tcp)
            self.port = udp.getsockname()[1]
            udp.setblocking(False)
            loop.add_reader(udp, self._udp_readable, udp)
            if stream is not None:
                tcp_server = await asyncio.start_server(self._tcp_client, sock=stream)
            self._ready.set()
            await self._stopping
        except BaseException as exc:
            if self._ready.is_set():
                raise
            self._error = exc  # start() raises it
        finally:
            self._ready.set()
            if udp is not None:
                loop.remove_reader(udp)
                udp.close()
            if tcp_server is not None:
                tcp_server.close()
            elif stream is not None:
                stream.close()
            for writer in list(self._connections):
                writer.close()

    def _udp_readable(self, sock: socket.socket) -> None:
        # Drain the socket on each wake-up rather than taking one datagram per
        # loop iteration (as asyncio's datagram transport does): that cuts the
        # cost of a query from ~30 to ~12 us, which matters for bursts of thousands.
        loop = asyncio.get_running_loop()
        for _ in range(1000):  # bounded, so that due timers still run
            try:
                data, addr = sock.recvfrom(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. an ICMP error for an earlier reply
                continue
            wire, delay = self._handle(data, tcp=False)
            if wire is None:
                continue
            if delay > 0:
                loop.call_later(delay, self._udp_send, sock, wire, addr)
            else:
                self._udp_send(sock, wire, addr)

    @staticmethod
    def _udp_send(sock: socket.socket, wire: bytes, addr) -> None:
        try:
            sock.sendto(wire, addr)
        except OSError:  # closed by stop(), or no buffer space: as if the datagram were lost
            pass

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()

        def send(wire):
            if not writer.is_closing():
                writer.write(len(wire).to_bytes(2, "big") + wire)

        if self._stopping.done():  # accepted just as the server stopped
            writer.close()
            return
        self._connections.add(writer)
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                wire, delay = self._handle(await reader.readexactly(size), tcp=True)
                if wire is not None:
                    # Pipelined queries are answered independently, each after its own delay.
                    loop.call_later(delay, send, wire)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._connections.discard(writer)
            writer.close()


def _split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _readline(stream, timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline() if ready else ""


@contextlib.contextmanager
def spawn_server(zone: dict[str, dict], host: str = "127.0.0.1", port: int = 0, *,
                 python: str = sys.executable, timeout: float = 10.0):
    """Run the server in a subprocess; yields (Popen, host, port) once it listens, then terminates it."""
    with tempfile.TemporaryDirectory(prefix="dnsserver-") as tmp:
        zone_file = os.path.join(tmp, "zone.json")
        with open(zone_file, "w") as f:
            json.dump(zone, f)
        listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        proc = subprocess.Popen([python, os.path.abspath(__file__), "--listen", listen, "--zone-json", zone_file],
                                stdout=subprocess.PIPE, text=True)
        try:
            line = _readline(proc.stdout, timeout)
            fields = line.split()
            if len(fields) != 3 or fields[0] != "READY":
                raise RuntimeError(f"dnsserver did not start: stdout {line!r}, exit code {proc.poll()}")
            yield proc, fields[1], int(fields[2])
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT ([HOST]:PORT for IPv6); port 0 picks one")
    parser.add_argument("--zone-json", required=True, help="file holding the zone dict as JSON")
    parser.add_argument("--no-tcp", action="store_true", help="serve UDP only")
    args = parser.parse_args(argv)
    with open(args.zone_json) as f:
        zone = json.load(f)
    host, port = _split_listen(args.listen)
    # Block the signals before the server thread starts (it inherits the mask),
    # so that only sigwait() below receives them.
    signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    with DNSServer(zone, host, port, tcp=not args.no_tcp) as server:
        print(f"READY {server.host} {server.port}", flush=True)
        signal.sigwait(signals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
