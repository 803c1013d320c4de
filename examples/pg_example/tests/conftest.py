"""Fixtures for pg_example's tests: a real PostgreSQL server, and
bridge_example's guards.

The session starts a private server of its own: Debian's binaries
(/usr/lib/postgresql/*/bin) initialise a cluster in a temporary folder,
which then holds its Unix socket too, and it listens on a free TCP port of
127.0.0.1, with trust authentication.  Postgres refuses to run as root: as
root, the cluster belongs to the `postgres` user that Debian's package
creates, and its commands run through runuser.  Without the binaries the
tests fail (CI installs them; build_and_test.sh does too).

Every async test runs on stdlib asyncio and on uvloop and under both of
asyncio_bridge's delivery paths, with a debug-mode loop whose exception
handler fails the test on anything it reports.  After every test no native
op is in flight and no libpq connection is open (checked while the loop
still runs: a cancelled query's teardown ends after its awaiter moved on).
"""

import asyncio
import gc
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass

import pytest
import pytest_asyncio
import uvloop

import asyncio_bridge
import pg_example

LOOP_FACTORIES = {
    "asyncio": asyncio.SelectorEventLoop,
    "uvloop": uvloop.new_event_loop,
}
DELIVERIES = ("call_soon_threadsafe", "add_reader")
SETTLE_SECONDS = 5.0
SERVER_USER = "postgres"  # the cluster's superuser, and its owner when we are root


def pytest_asyncio_loop_factories(config, item):
    return LOOP_FACTORIES


# ---- the server ----------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    folder: str
    port: int

    @property
    def unix_dsn(self):
        return f"host={self.folder} port={self.port} user={SERVER_USER} dbname=postgres"

    @property
    def tcp_dsn(self):
        return f"host=127.0.0.1 port={self.port} user={SERVER_USER} dbname=postgres"


def find_bin_dir():
    """The newest /usr/lib/postgresql/<version>/bin that has the server's tools."""

    def version(path):
        return [int(part) for part in re.findall(r"\d+", path.split("/")[-3])]

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    found = [os.path.dirname(p) for p in found]
    found = [d for d in found if all(os.access(f"{d}/{t}", os.X_OK) for t in ("pg_ctl", "postgres"))]
    if not found:
        pytest.fail(
            "PostgreSQL's server binaries are missing: no /usr/lib/postgresql/*/bin with initdb, "
            "pg_ctl and postgres.  Install them (apt-get install postgresql libpq-dev), or run "
            "examples/pg_example/build_and_test.sh, which does.",
            pytrace=False,
        )
    return found[-1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_server_user():
    """The command prefix that runs a server tool: postgres refuses root."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        pytest.fail(f"running as root and there is no {SERVER_USER!r} user to run PostgreSQL as",
                    pytrace=False)
    return ["runuser", "-u", SERVER_USER, "--"]


def run(cmd, what):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        pytest.fail(f"{what} failed ({done.returncode}): {' '.join(cmd)}\n{done.stdout}{done.stderr}",
                    pytrace=False)


@pytest.fixture(scope="session")
def pg_server():
    bin_dir = find_bin_dir()
    prefix = as_server_user()
    # /tmp rather than $TMPDIR: the postgres user must reach it; the socket
    # path must stay under 108 bytes.
    folder = tempfile.mkdtemp(prefix="pg_example-", dir="/tmp" if prefix else None)
    if prefix:
        user = pwd.getpwnam(SERVER_USER)
        os.chown(folder, user.pw_uid, user.pw_gid)
    data, log = f"{folder}/data", f"{folder}/server.log"
    port = free_port()
    run(prefix + [f"{bin_dir}/initdb", "-D", data, "-U", SERVER_USER, "--auth=trust",
                  "--encoding=UTF8", "--locale=C", "--no-sync"], "initdb")
    options = (f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={folder} "
               "-c max_connections=200 -c fsync=off -c synchronous_commit=off")
    started = False
    try:
        # -w: pg_ctl returns once the server accepts connections.
        done = subprocess.run(prefix + [f"{bin_dir}/pg_ctl", "-D", data, "-l", log, "-o", options,
                                        "-w", "-t", "60", "start"],
                              capture_output=True, text=True, timeout=120)
        started = done.returncode == 0
        if not started:
            with open(log) as f:
                pytest.fail(f"the PostgreSQL server did not start:\n{done.stdout}{done.stderr}"
                            f"\n{f.read()}", pytrace=False)
        run([f"{bin_dir}/pg_isready", "-h", folder, "-p", str(port), "-t", "30"], "pg_isready")
        yield Server(folder, port)
    finally:
        if started:
            subprocess.run(prefix + [f"{bin_dir}/pg_ctl", "-D", data, "-m", "immediate", "-w",
                                     "stop"], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


# ---- bridge_example's guards -----------------------------------------------------


@pytest.fixture(autouse=True, params=DELIVERIES)
def delivery(request):
    """The delivery path of the bridge this test's loop gets on its first op."""
    before = asyncio_bridge.configure()
    asyncio_bridge.configure(delivery=request.param)
    yield request.param
    asyncio_bridge.configure(delivery=before["delivery"])


def assert_no_leaks(stats):
    assert stats["in_flight"] == 0, f"native ops leaked past the test: {stats}"
    gc.collect()  # a Connection left in a cycle closes now, not later
    assert pg_example.open_connections() == 0, "libpq connections left open"


@pytest.fixture(autouse=True)
def _guard(request):
    """Async tests: loop_errors checks for leaks while their loop still
    runs.  Sync tests: checked here."""
    if pytest_asyncio.is_async_test(request.node):
        request.getfixturevalue("loop_errors")
        yield
    else:
        yield
        end = time.monotonic() + SETTLE_SECONDS
        while asyncio_bridge.stats()["in_flight"] and time.monotonic() < end:
            time.sleep(0.01)
        assert_no_leaks(asyncio_bridge.stats())


@pytest_asyncio.fixture
async def loop_errors():
    """Debug mode and a recording exception handler; any report fails the test."""
    loop = asyncio.get_running_loop()
    errors = []
    loop.set_debug(True)
    loop.set_exception_handler(lambda loop, context: errors.append(context))
    # The loop's bridge (and its eventfd) exists from here on, so that fd
    # counts taken in the test see only what the test itself opens.
    await asyncio_bridge.nop()
    yield errors
    end = time.monotonic() + SETTLE_SECONDS
    while asyncio_bridge.stats()["in_flight"] and time.monotonic() < end:
        await asyncio.sleep(0.01)
    assert_no_leaks(asyncio_bridge.stats())
    await asyncio.sleep(0.01)
    assert not errors, f"the loop reported errors: {errors}"
