"""pg_example: PostgreSQL through libpq's non-blocking API, on asyncio_bridge's C API.

``connect``, ``Connection.query`` and ``Connection.close`` return lazy
awaitables (``asyncio_bridge.Op``) whose work runs natively on
asyncio_bridge's engine thread; the calls that block in libpq (the first
host name lookup, PQcancel) run on its blocking pool.  A query that is
cancelled or times out is cancelled on the server too, and the connection
stays usable.
"""

from ._ext import Connection, PgError, connect, open_connections

__all__ = ["Connection", "PgError", "connect", "open_connections"]
