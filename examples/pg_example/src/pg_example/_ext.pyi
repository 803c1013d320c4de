from typing import final

from asyncio_bridge import Op

Row = tuple[str | None, ...]

class PgError(Exception):
    """An error reported by the PostgreSQL server or by libpq.

    ``str(exc)`` is ``exc.message``, the whole text as libpq reports it
    (any length); ``sqlstate`` is the server's five-character SQLSTATE code,
    or None for an error of the client side (a refused or lost connection).
    A closed connection raises it with SQLSTATE ``08003``.
    """

    @property
    def message(self) -> str: ...
    @property
    def sqlstate(self) -> str | None: ...
    def __init__(self, message: str, sqlstate: str | None = None) -> None: ...

@final
class Connection:
    """A connection made by ``connect``.  One operation at a time: a query or
    close() while another query's awaiter still waits raises RuntimeError;
    after a cancelled query, the next one waits until the server stopped it.
    Dropping a Connection closes it (after the query it runs, if any)."""

    def query(self, sql: str, timeout: float | None = None) -> Op[list[Row]]:
        """Run sql (simple query protocol: one or more statements).

        Returns the rows of the last statement as tuples of str (text format,
        decoded as UTF-8) or None for NULL; [] for a statement without rows.
        Raises PgError for an error of the server (with its SQLSTATE) or of
        the connection.  After `timeout` seconds (or when the awaiting task is
        cancelled) the query is cancelled on the server with PQcancel and
        what the server still sends is read, so that the connection can run
        the next query; then TimeoutError (or CancelledError) is raised.
        """

    def close(self) -> Op[None]:
        """Close the connection; does nothing if it is closed already."""

def connect(conninfo: str, timeout: float | None = None) -> Op[Connection]:
    """Connect to the server that conninfo names (a libpq connection string or URI).

    client_encoding is always UTF8.  Raises PgError when libpq cannot connect
    (a refused connection, a failed authentication), TimeoutError after
    `timeout` seconds.
    """

def open_connections() -> int:
    """libpq connections opened and not closed yet (a test hook)."""
