"""getaddrinfo without a thread for what needs none.

Which resolver answers a lookup, decided on the loop thread:

1. A numeric host (IPv4, IPv6 with a scope id) or ``None``: the system's
   own ``getaddrinfo`` with ``AI_NUMERICHOST``, at once on the loop thread
   (it never consults anything), so results and errors are the system's.
2. With resolver ``"auto"`` (the default) the system's configuration
   decides.  When ``/etc/nsswitch.conf`` sends ``hosts`` to ``files`` and
   ``dns`` only, a name of the hosts file (and ``localhost``) is answered
   on the loop thread from the file, and other names go to evdns on the
   engine thread, configured from ``/etc/resolv.conf``.  Names that another
   source could answer (``mdns*`` for ``.local``, ``myhostname`` for the
   host's own names, ``resolve``, anything unknown), and lookups evdns
   cannot judge (flags such as ``AI_CANONNAME`` or ``AI_V4MAPPED``, service
   names, other families), go to the system's ``getaddrinfo`` on the
   library's blocking pool, never to asyncio's executor.
3. ``"evdns"``: every name to the hosts file then evdns; ``"system"``:
   every name to the system's ``getaddrinfo`` on the blocking pool.

The files are re-read when they change (their mtime, size or inode),
looked at no more than once a second.  Lookups of one name in flight share
one query; nothing is cached beyond that (TTLs are the DNS server's
business: a caching server such as systemd-resolved or dnsmasq keeps them).

Results are shaped as ``socket.getaddrinfo`` shapes them: one entry per
address and socket type (the system's own expansion of port, type and
proto, taken from a numeric call), ordered by the rules glibc applies
(RFC 3484 with glibc's default tables: usable destinations first, matching
scope, matching label, higher precedence, smaller scope, longest IPv6
prefix), then the server's order.
"""

from __future__ import annotations

import os
import re
import socket
import time
from typing import TYPE_CHECKING, Any, Callable, Tuple, Union, cast

from . import _ext

if TYPE_CHECKING:
    from ._ext import Op

    AddrInfo = Tuple[socket.AddressFamily, socket.SocketKind, int, str,
                     Union[Tuple[str, int], Tuple[str, int, int, int]]]

_EVDNS = 0
_SYSTEM = 1
# Flags evdns answers exactly; others go to the system.
# Plain ints: flags arrive as socket.AddressInfo, whose & runs in Python.
_AI_NUMERICHOST = int(socket.AI_NUMERICHOST)
_AI_NUMERICSERV = int(socket.AI_NUMERICSERV)
_AI_ADDRCONFIG = int(socket.AI_ADDRCONFIG)
_EVDNS_FLAGS = int(socket.AI_PASSIVE) | _AI_NUMERICSERV | _AI_ADDRCONFIG
_CHECK_EVERY = 1.0

_MODES = ("auto", "system", "evdns")


class _Config:
    mode = "auto"
    resolv_conf: str | None = None  # None: /etc/resolv.conf
    hosts = "/etc/hosts"
    nsswitch = "/etc/nsswitch.conf"
    gai_conf = "/etc/gai.conf"  # read for the auto decision only


_config = _Config()


class _Watched:
    """A file parsed again when it changed, looked at once a second at most."""

    def __init__(self, parse: Callable[[str | None], Any]) -> None:
        self._parse = parse
        self._path: str | None = None
        self._stamp: object = ()
        self._checked = -1e9
        self.value: Any = parse(None)

    def get(self, path: str) -> Any:
        now = time.monotonic()
        if path == self._path and now - self._checked < _CHECK_EVERY:
            return self.value
        self._checked = now
        try:
            st = os.stat(path)
            stamp: object = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
        except OSError:
            stamp = None
        if path != self._path or stamp != self._stamp:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except OSError:
                text = None
            self.value = self._parse(text)
            self._path, self._stamp = path, stamp
        return self.value


def _parse_hosts(text: str | None) -> dict[str, list[tuple[int, str]]]:
    table: dict[str, list[tuple[int, str]]] = {}
    for line in (text or "").splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        addr = fields[0]
        af = _numeric_family(addr)
        if af is None:
            continue
        for name in fields[1:]:
            entry = (af, addr)
            lst = table.setdefault(name.lower(), [])
            if entry not in lst:
                lst.append(entry)
    return table


def _numeric_family(addr: str) -> int | None:
    for af in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(af, addr.split("%", 1)[0] if af == socket.AF_INET6 else addr)
            return af
        except (OSError, ValueError):
            pass
    return None


_MDNS = {"mdns", "mdns4", "mdns6", "mdns_minimal", "mdns4_minimal", "mdns6_minimal"}
_MYHOSTNAME_NAMES = {"localhost", "_gateway", "_outbound", "_localdnsstub", "_localdnsproxy"}


class _Policy:
    """What /etc/nsswitch.conf's hosts line lets the native paths answer."""

    def __init__(self, sources: list[str]) -> None:
        self.sources = sources
        self.mdns = any(s in _MDNS for s in sources)
        self.myhostname = "myhostname" in sources
        plain = [s for s in sources if s not in _MDNS and s != "myhostname"]
        # The hosts file answers first; then DNS (evdns) or nothing else.
        self.files_first = bool(plain) and plain[0] == "files"
        self.evdns = plain in (["files", "dns"], ["dns"])
        self.files = "files" in plain and (self.evdns or plain == ["files"])

    def system_only(self, name: str) -> bool:
        """True if a source other than files and dns could answer name."""
        n = name.lower().rstrip(".")
        if n.endswith(".local") or n == "local":
            return True
        if self.myhostname and (
            n in _MYHOSTNAME_NAMES or n.endswith(".localhost") or n == _hostname()
        ):
            return True
        return False


def _parse_nsswitch(text: str | None) -> _Policy:
    # glibc's default without the file is "dns [!UNAVAIL=return] files".
    sources = ["dns", "files"]
    for line in (text or "").splitlines():
        line = line.split("#", 1)[0]
        key, sep, rest = line.partition(":")
        if sep and key.strip() == "hosts":
            sources = [t for t in _strip_actions(rest).split()]
    return _Policy(sources)


def _strip_actions(s: str) -> str:
    out, depth = [], 0
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def _parse_gai(text: str | None) -> bool:
    """Whether gai.conf changes glibc's ordering (any line that is not a
    comment): then only the system orders as the machine wants."""
    return any(line.split("#", 1)[0].strip() for line in (text or "").splitlines())


def _parse_resolv_options(text: str | None) -> frozenset[str]:
    options: set[str] = set()
    for line in (text or "").splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if fields and fields[0] == "options":
            options.update(f.split(":", 1)[0] for f in fields[1:])
    return frozenset(options)


# resolv.conf options that change glibc's answers in ways evdns does not
# follow (no-aaaa: glibc 2.36 asks for A records only).
_SYSTEM_ONLY_OPTIONS = frozenset({"no-aaaa"})

_hosts = _Watched(_parse_hosts)
_nsswitch = _Watched(_parse_nsswitch)
_gai = _Watched(_parse_gai)
_resolv_options = _Watched(_parse_resolv_options)
_host_name: tuple[float, str] = (-1e9, "")


def _hostname() -> str:
    global _host_name
    now = time.monotonic()
    if now - _host_name[0] >= _CHECK_EVERY:
        _host_name = (now, socket.gethostname().lower())
    return _host_name[1]


_addrconfig_cache: tuple[float, tuple[bool, bool]] = (-1e9, (True, True))


def _addrconfig() -> tuple[bool, bool]:
    global _addrconfig_cache
    now = time.monotonic()
    if now - _addrconfig_cache[0] >= _CHECK_EVERY:
        _addrconfig_cache = (now, _ext._addrconfig())
    return _addrconfig_cache[1]


# ---- configuration ----------------------------------------------------------------


def check(
    resolver: object = None,
    resolv_conf: object = None,
    hosts_file: object = None,
    nsswitch_conf: object = None,
) -> None:
    """Raise as configure() would, changing nothing."""
    if resolver is not None:
        if not isinstance(resolver, str) or resolver not in _MODES:
            raise ValueError(f"resolver must be one of {', '.join(map(repr, _MODES))}, not {resolver!r}")
    for what, value in (("resolv_conf", resolv_conf), ("hosts_file", hosts_file),
                        ("nsswitch_conf", nsswitch_conf)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"{what} must be a path, not {type(value).__name__}")


def configure(
    resolver: str | None = None,
    resolv_conf: str | os.PathLike[str] | None = None,
    hosts_file: str | os.PathLike[str] | None = None,
    nsswitch_conf: str | os.PathLike[str] | None = None,
) -> dict[str, object]:
    check(resolver, resolv_conf, hosts_file, nsswitch_conf)
    if resolver is not None:
        _config.mode = resolver
    if resolv_conf is not None:
        _config.resolv_conf = os.fspath(resolv_conf)
        _ext._resolv_conf(_config.resolv_conf)
    if hosts_file is not None:
        _config.hosts = os.fspath(hosts_file)
    if nsswitch_conf is not None:
        _config.nsswitch = os.fspath(nsswitch_conf)
    return settings()


def settings() -> dict[str, object]:
    return {
        "resolver": _config.mode,
        "resolv_conf": _config.resolv_conf or "/etc/resolv.conf",
        "hosts_file": _config.hosts,
        "nsswitch_conf": _config.nsswitch,
    }


def _reset_after_fork() -> None:
    """The child's resolver starts afresh: its files are read again."""
    global _hosts, _nsswitch, _gai, _resolv_options, _addrconfig_cache, _host_name
    _hosts = _Watched(_parse_hosts)
    _nsswitch = _Watched(_parse_nsswitch)
    _gai = _Watched(_parse_gai)
    _resolv_options = _Watched(_parse_resolv_options)
    _addrconfig_cache = (-1e9, (True, True))
    _host_name = (-1e9, "")
    _templates.clear()
    _sources.clear()


# ---- shaping results as socket.getaddrinfo does -------------------------------------

_templates: dict[tuple[int, object, int, int, int], list[tuple[Any, Any, int, str, tuple]]] = {}


def _template(af: int, port: Any, type: int, proto: int, flags: int) -> list[tuple]:
    """socket.getaddrinfo's entries for a numeric address of family af (its
    errors for a bad port, type or proto as well), kept."""
    key = (af, port, type, proto, flags)
    tmpl = _templates.get(key)
    if tmpl is None:
        probe = "127.0.0.1" if af == socket.AF_INET else "::1"
        tmpl = socket.getaddrinfo(probe, port, af, type, proto, flags | socket.AI_NUMERICHOST)
        if len(_templates) > 256:
            _templates.clear()
        _templates[key] = tmpl
    return tmpl


def _expand(af: int, addr: str, port: object, type: int, proto: int, flags: int) -> list[tuple]:
    """The entries socket.getaddrinfo gives for one address."""
    tmpl = _template(af, port, type, proto, flags)
    if af == socket.AF_INET:
        return [(f, k, p, c, (addr, sa[1])) for f, k, p, c, sa in tmpl]
    return [(f, k, p, c, (addr, sa[1], 0, 0)) for f, k, p, c, sa in tmpl]


def _v6_bytes(af: int, addr: str) -> bytes:
    if af == socket.AF_INET:
        return b"\0" * 10 + b"\xff\xff" + socket.inet_aton(addr)
    return socket.inet_pton(socket.AF_INET6, addr.split("%", 1)[0])


def _match(table: list[tuple[bytes, int, int]], a: bytes) -> int:
    for prefix, bits, value in table:
        full, rest = divmod(bits, 8)
        if a[:full] != prefix[:full]:
            continue
        if rest and (a[full] ^ prefix[full]) >> (8 - rest):
            continue
        return value
    return table[-1][2]


def _p(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


# glibc's default tables (sysdeps/posix/getaddrinfo.c), longest prefix first.
_LABELS = [(_p("::1"), 128, 0), (_p("2002::"), 16, 2), (_p("::"), 96, 3),
           (_p("::ffff:0:0"), 96, 4), (_p("fec0::"), 10, 5), (_p("fc00::"), 7, 6),
           (_p("2001::"), 32, 7), (_p("::"), 0, 1)]
_PRECEDENCE = [(_p("::1"), 128, 50), (_p("2002::"), 16, 30), (_p("::"), 96, 20),
               (_p("::ffff:0:0"), 96, 10), (_p("::"), 0, 40)]


def _scope(a: bytes) -> int:
    if a[0] == 0xFF:  # multicast
        return a[1] & 0x0F
    if a == _p("::1") or (a[0] == 0xFE and a[1] & 0xC0 == 0x80):
        return 2
    if a[0] == 0xFE and a[1] & 0xC0 == 0xC0:
        return 5
    if a[:12] == b"\0" * 10 + b"\xff\xff":
        if a[12] == 127 or (a[12] == 169 and a[13] == 254):
            return 2
    return 14


_sources: dict[tuple[int, str], tuple[float, bytes | None]] = {}


def _source(af: int, addr: str) -> bytes | None:
    """The source address the kernel would use to reach addr (glibc's
    connect() probe), or None if it is unreachable; kept for a second."""
    now = time.monotonic()
    hit = _sources.get((af, addr))
    if hit is not None and now - hit[0] < _CHECK_EVERY:
        return hit[1]
    src: bytes | None = None
    try:
        with socket.socket(af, socket.SOCK_DGRAM) as s:
            s.connect((addr, 9) if af == socket.AF_INET else (addr, 9, 0, 0))
            src = _v6_bytes(af, s.getsockname()[0])
    except OSError:
        src = None
    if len(_sources) > 1024:
        _sources.clear()
    _sources[(af, addr)] = (now, src)
    return src


def _common_bits(a: bytes, b: bytes) -> int:
    n = 0
    for x, y in zip(a, b):
        d = x ^ y
        if d:
            return n + 8 - d.bit_length()
        n += 8
    return n


def _order(addrs: list[tuple[int, str]]) -> list[tuple[int, str]]:
    if len(addrs) < 2:
        return addrs

    def key(item: tuple[int, tuple[int, str]]) -> tuple:
        i, (af, addr) = item
        d = _v6_bytes(af, addr)
        s = _source(af, addr)
        ds = _scope(d)
        if s is None:
            return (1, 0, 0, 0, 0, 0, i)
        prefix = -_common_bits(d, s) if af == socket.AF_INET6 else 0
        return (0, ds != _scope(s), _match(_LABELS, d) != _match(_LABELS, s),
                -_match(_PRECEDENCE, d), ds, prefix, i)

    return [a for _, a in sorted(enumerate(addrs), key=key)]


def _shape(addrs: list[tuple[int, str]], port: object, type: int, proto: int,
           flags: int) -> list[tuple]:
    out: list[tuple] = []
    tflags = flags & _AI_NUMERICSERV
    for af, addr in _order(addrs):
        out.extend(_expand(af, addr, port, type, proto, tflags))
    return out


def _enum(value: int, cls: Any) -> Any:
    try:
        return cls(value)
    except ValueError:
        return value


def _finish_system(raw: list[tuple]) -> list[tuple]:
    return [(_enum(af, socket.AddressFamily), _enum(k, socket.SocketKind), p, c, sa)
            for af, k, p, c, sa in raw]


class _FinishDNS:
    __slots__ = ("port", "type", "proto", "flags")

    def __init__(self, port: object, type: int, proto: int, flags: int) -> None:
        self.port, self.type, self.proto, self.flags = port, type, proto, flags

    def __call__(self, addrs: list[tuple[int, str]]) -> list[tuple]:
        return _shape(addrs, self.port, self.type, self.proto, self.flags)


# ---- the op --------------------------------------------------------------------------


def _gaierror(code: int) -> socket.gaierror:
    """As socketmodule raises it: (code, gai_strerror(code))."""
    return socket.gaierror(code, _ext._gai_strerror(code))


# What glibc may read as a numeric address (inet_aton's forms such as
# "127.1" or "0x7f.1", IPv6 with a scope): only such hosts need its
# AI_NUMERICHOST call to tell.
_maybe_numeric = re.compile(r"[0-9a-fA-FxX.]*\Z|.*:").match
_INT = int


def getaddrinfo(host: str | bytes | None, port: str | bytes | int | None, *, family: int = 0,
                type: int = 0, proto: int = 0, flags: int = 0) -> Op[list[AddrInfo]]:
    """Resolve host and port as loop.getaddrinfo does, without its executor."""
    if (
        host.__class__ is str
        and not _maybe_numeric(host)
        and (port is None or port.__class__ is _INT
             or (port.__class__ is str and port.isascii() and port.isdigit()))
        and family in (0, socket.AF_INET, socket.AF_INET6)
        and isinstance(type, _INT) and isinstance(proto, _INT) and isinstance(flags, _INT)
        and not (flags := _INT(flags)) & _AI_NUMERICHOST
    ):
        # A name: what the system's numeric call would check (port, type,
        # proto), its expansion template checks (cached), as glibc checks
        # the service before it looks a name up.
        try:
            _template(socket.AF_INET6 if family == socket.AF_INET6 else socket.AF_INET,
                      port, type, proto, flags & _AI_NUMERICSERV)
            raw = host.encode("idna")
        except Exception as exc:
            return _ext._settled_error(exc)
        return _resolve(raw, port, family, type, proto, flags)
    try:
        numeric = socket.getaddrinfo(host, port, family, type, proto,
                                     flags | socket.AI_NUMERICHOST)
    except socket.gaierror as exc:
        if exc.errno != socket.EAI_NONAME or host is None or flags & socket.AI_NUMERICHOST:
            return _ext._settled_error(exc)
    except Exception as exc:  # TypeError, UnicodeError, OverflowError...: as given
        return _ext._settled_error(exc)
    else:
        # (typeshed allows sockaddrs of other families, which it never gives here)
        return _ext._settled(cast("list[AddrInfo]", numeric))
    # The name as the system gets it: str through the idna codec, bytes as given.
    return _resolve(host.encode("idna") if isinstance(host, str) else bytes(host),
                    port, family, type, proto, flags)


def _resolve(raw: bytes, port: Any, family: int, type: int, proto: int, flags: int) -> Any:
    if b"\0" in raw:
        raw = raw.split(b"\0", 1)[0]  # where C's getaddrinfo stops reading
    if not raw:
        return _ext._settled_error(_gaierror(socket.EAI_NONAME))
    try:
        name: str | None = raw.decode("ascii")
    except UnicodeDecodeError:
        name = None
    mode = _config.mode
    policy: _Policy | None = None
    if mode == "auto":
        policy = _nsswitch.get(_config.nsswitch)
        if _gai.get(_config.gai_conf) or (
            _resolv_options.get(_config.resolv_conf or "/etc/resolv.conf") & _SYSTEM_ONLY_OPTIONS
        ):
            mode = "system"  # the machine tuned glibc in ways only glibc follows
    native = (
        mode != "system"
        and name
        and family in (0, socket.AF_INET, socket.AF_INET6)
        and not flags & ~_EVDNS_FLAGS
        and _numeric_port(port)
        and (policy is None or not policy.system_only(name))
    )
    if not native or name is None:
        return _system(raw, port, family, type, proto, flags)
    if flags & _AI_ADDRCONFIG:
        v4, v6 = _addrconfig()
        if family == 0 and (v4 or v6):
            if v4 != v6:
                family = socket.AF_INET if v4 else socket.AF_INET6
        elif (family == socket.AF_INET and not v4) or (family == socket.AF_INET6 and not v6):
            return _ext._settled_error(_gaierror(socket.EAI_NONAME))
    files = policy is None or policy.files
    if files or name.lower() == "localhost":
        local = _from_hosts(name, family) if files else None
        if local is None and name.lower() == "localhost":
            local = _LOOPBACK[family]
        if local is not None:
            try:
                return _ext._settled(_shape(local, port, type, proto, flags))
            except Exception as exc:
                return _ext._settled_error(exc)
    if policy is not None and not policy.evdns:
        return _system(raw, port, family, type, proto, flags)
    return _ext._lookup(_EVDNS, name, None, family, 0, 0, 0,
                        _FinishDNS(port, type, proto, flags))


_LOOPBACK: dict[int, list[tuple[int, str]]] = {
    0: [(socket.AF_INET6, "::1"), (socket.AF_INET, "127.0.0.1")],
    socket.AF_INET: [(socket.AF_INET, "127.0.0.1")],
    socket.AF_INET6: [(socket.AF_INET6, "::1")],
}


def _numeric_port(port: Any) -> bool:
    if port is None or (isinstance(port, int) and not isinstance(port, bool)):
        return True
    return isinstance(port, (str, bytes)) and port.isascii() and port.isdigit()


def _from_hosts(name: str, family: int) -> list[tuple[int, str]] | None:
    entries = _hosts.get(_config.hosts).get(name.lower())
    if not entries:
        return None
    if family:
        entries = [e for e in entries if e[0] == family]
    return entries or None


def _system(raw: bytes, port: Any, family: int, type: int, proto: int, flags: int) -> Any:
    if port is None:
        serv = None
    elif isinstance(port, int):
        serv = b"%d" % port
    elif isinstance(port, str):
        serv = port.encode("utf-8")
    else:
        serv = bytes(port)
    return _ext._lookup(_SYSTEM, raw, serv, family, type, proto, flags, _finish_system)


def getnameinfo(sockaddr: tuple[str, int] | tuple[str, int, int, int],
                flags: int = 0) -> Op[tuple[str, str]]:
    """Resolve sockaddr as loop.getnameinfo does: the system's getnameinfo,
    at once on the loop thread when flags ask for numbers only, else on the
    library's blocking pool (a reverse DNS lookup can take seconds), never
    on asyncio's executor."""
    numeric_flags = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
    try:
        if not isinstance(flags, int):
            socket.getnameinfo(sockaddr, flags)  # raises its own TypeError
        # Checks the arguments as the system does, and never looks anything
        # up (NI_NAMEREQD would make a number an error).
        numeric = socket.getnameinfo(sockaddr, (flags & ~socket.NI_NAMEREQD) | numeric_flags)
    except Exception as exc:
        return _ext._settled_error(exc)
    if flags & numeric_flags == numeric_flags:
        return _ext._settled(numeric)
    host = numeric[0].split("%", 1)[0]
    if ":" in host:
        family, packed = socket.AF_INET6, socket.inet_pton(socket.AF_INET6, host)
        flowinfo = sockaddr[2] if len(sockaddr) > 2 else 0
        scope_id = sockaddr[3] if len(sockaddr) > 3 else 0
    else:
        family, packed = socket.AF_INET, socket.inet_pton(socket.AF_INET, host)
        flowinfo = scope_id = 0
    return _ext._nameinfo(family, packed, int(numeric[1]), flowinfo, scope_id, int(flags))
