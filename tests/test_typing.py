"""The package's type information holds: mypy checks asyncio_bridge itself
(its stubs included) and a user's code that uses the resolver API, and
finds the types a user expects."""

import subprocess
import sys
import textwrap
from pathlib import Path

USER_CODE = """
import asyncio, socket
import asyncio_bridge
from asyncio_bridge.aiohttp import Resolver

async def main() -> None:
    infos = await asyncio_bridge.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)
    family, kind, proto, canon, sockaddr = infos[0]
    reveal_type(family)
    host, port = (await asyncio_bridge.getnameinfo(("127.0.0.1", 80)))
    reveal_type(host)
    asyncio_bridge.configure(resolver="evdns", resolv_conf="/etc/resolv.conf")
    r = Resolver()
    hosts = await r.resolve("localhost", 80)
    reveal_type(hosts[0]["port"])
"""


# The sources (and the extension's stub, _ext.pyi) of this checkout: mypy is
# run from the checkout, so that it reads them whether the package is
# installed editable or not.  (Pointed into site-packages instead, mypy
# takes that folder for a source root and complains about its neighbours.)
ROOT = Path(__file__).resolve().parent.parent


def test_mypy(tmp_path):
    assert (ROOT / "asyncio_bridge" / "_ext.pyi").is_file()
    user = tmp_path / "user.py"
    user.write_text(textwrap.dedent(USER_CODE))
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental",
                           "--cache-dir", str(tmp_path / "cache"), "asyncio_bridge", str(user)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    out = proc.stdout
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert errors == [], out
    assert 'Revealed type is "socket.AddressFamily"' in out, out
    # mypy names builtins "builtins.str" or "str", by version
    assert ('Revealed type is "str"' in out or 'Revealed type is "builtins.str"' in out), out
    assert ('Revealed type is "int"' in out or 'Revealed type is "builtins.int"' in out), out
