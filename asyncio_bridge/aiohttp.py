"""An aiohttp resolver on asyncio_bridge.getaddrinfo.

    import aiohttp
    from asyncio_bridge.aiohttp import Resolver

    connector = aiohttp.TCPConnector(resolver=Resolver())
    async with aiohttp.ClientSession(connector=connector) as session:
        ...

It behaves as aiohttp's ThreadedResolver (the same getaddrinfo call, the
same results and the same socket.gaierror, an OSError, for a name that
does not resolve) without the executor: names go to evdns on the engine
thread or to the library's blocking pool (see asyncio_bridge.getaddrinfo),
so a slow DNS server or a burst of lookups never fills the loop's default
executor, and a cancelled connection attempt frees its lookup at once.

This module imports without aiohttp; Resolver needs it (ImportError
otherwise).
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from ._resolver import getaddrinfo

__all__ = ["Resolver"]

_NUMERIC_SOCKET_FLAGS = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
_NAME_SOCKET_FLAGS = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
_AI_ADDRCONFIG = socket.AI_ADDRCONFIG
if hasattr(socket, "AI_MASK"):
    _AI_ADDRCONFIG &= socket.AI_MASK


def _make_resolver() -> type:
    try:
        from aiohttp.abc import AbstractResolver, ResolveResult
    except ImportError as exc:
        raise ImportError(
            "asyncio_bridge.aiohttp.Resolver needs aiohttp (pip install aiohttp)"
        ) from exc

    class Resolver(AbstractResolver):  # type: ignore[misc, valid-type]
        """aiohttp's AbstractResolver on asyncio_bridge.getaddrinfo."""

        async def resolve(
            self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
        ) -> list[ResolveResult]:
            infos = await getaddrinfo(
                host, port, type=socket.SOCK_STREAM, family=family, flags=_AI_ADDRCONFIG
            )
            hosts: list[ResolveResult] = []
            for fam, _, proto, _, address in infos:
                if fam == socket.AF_INET6:
                    if len(address) < 3:
                        continue
                    if address[3]:
                        # Link-local: the scope goes in the host ("fe80::1%eth0").
                        # Numeric, so the system answers at once on this thread.
                        resolved_host, sport = socket.getnameinfo(address, _NAME_SOCKET_FLAGS)
                        port = int(sport)
                    else:
                        resolved_host, port = address[:2]
                else:
                    resolved_host, port = address[:2]
                hosts.append(
                    ResolveResult(
                        hostname=host,
                        host=resolved_host,
                        port=port,
                        family=fam,
                        proto=proto,
                        flags=_NUMERIC_SOCKET_FLAGS,
                    )
                )
            return hosts

        async def close(self) -> None:
            pass

    Resolver.__module__ = __name__
    return Resolver


_cls: type | None = None


def __getattr__(name: str) -> Any:
    global _cls
    if name == "Resolver":
        if _cls is None:
            _cls = _make_resolver()
        return _cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from aiohttp.abc import AbstractResolver, ResolveResult

    class Resolver(AbstractResolver):
        async def resolve(
            self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
        ) -> list[ResolveResult]: ...
        async def close(self) -> None: ...
