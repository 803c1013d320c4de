"""Run Python code with private /etc/resolv.conf, /etc/hosts and /etc/nsswitch.conf.

run_isolated() starts the code in a new mount namespace (unshare(1)) in which
the three files are bind-mounted over the machine's, so glibc's resolver and
NSS in that process (and its children) read ours.  The machine's files are
never written and the mounts vanish with the namespace.  It needs root (or
CAP_SYS_ADMIN) and util-linux; when that is missing run_isolated raises
IsolationError, so a test using it fails rather than skips.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile

_ETC_FILES = ("resolv.conf", "hosts", "nsswitch.conf")

# Environment variables through which glibc's resolver would bypass our files;
# dropped from an inherited environment.
_RESOLVER_ENV = ("LOCALDOMAIN", "RES_OPTIONS", "HOSTALIASES")

# Runs as root of the new mount namespace:
#   sh -c _SETUP sysns DIR TARGET... PYTHON SCRIPT
# DIR holds our files; each TARGET is the file (symlinks resolved) that our
# file of the same position in _ETC_FILES covers.  Nothing is interpolated.
_SETUP = r"""
set -e
dir=$1; shift
for name in resolv.conf hosts nsswitch.conf; do
    mount --bind "$dir/$name" "$1"
    cmp -s "$dir/$name" "/etc/$name" || { echo "sysns: /etc/$name does not show the bind mount" >&2; exit 1; }
    shift
done
# A running nscd would answer from the machine's configuration: hide its socket.
if [ -d /run/nscd ]; then mount -t tmpfs none /run/nscd; fi
: > "$dir/mounted"
exec "$1" "$2"
"""


class IsolationError(RuntimeError):
    """The private mount namespace could not be set up."""


def _mount_target(name: str) -> str:
    path = os.path.realpath(f"/etc/{name}")  # bind over a symlink's target
    if not os.path.isfile(path):
        raise IsolationError(f"/etc/{name} resolves to {path}, which is not a file to bind-mount over")
    return path


def run_isolated(code: str, *, resolv_conf: str, hosts: str, nsswitch: str = "hosts: files dns\n",
                 python: str = sys.executable, env: dict[str, str] | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` with `python` seeing the given /etc files; returns its exit code and stdout/stderr text.

    env defaults to this process's environment minus the resolver variables
    (LOCALDOMAIN, RES_OPTIONS, HOSTALIASES).  Raises IsolationError if the
    namespace or a mount could not be set up, subprocess.TimeoutExpired on timeout.
    """
    if shutil.which("unshare") is None:
        raise IsolationError("unshare(1) (util-linux) is not installed")
    targets = [_mount_target(name) for name in _ETC_FILES]
    if env is None:
        env = {k: v for k, v in os.environ.items() if k not in _RESOLVER_ENV}
    with tempfile.TemporaryDirectory(prefix="sysns-") as tmp:
        for name, text in zip(_ETC_FILES, (resolv_conf, hosts, nsswitch)):
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        script = os.path.join(tmp, "main.py")
        with open(script, "w") as f:
            f.write(code)
        argv = ["unshare", "--mount", "--propagation", "private",
                "sh", "-c", _SETUP, "sysns", tmp, *targets, python, script]
        proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)
        if not os.path.exists(os.path.join(tmp, "mounted")):
            raise IsolationError(f"could not set up the mount namespace (exit code {proc.returncode}): "
                                 f"{proc.stderr.strip()}")
    return proc


@functools.cache
def namespaces_available() -> bool:
    """Whether run_isolated works here (checked once, by running it)."""
    try:
        proc = run_isolated("print(open('/etc/hosts').read(), end='')", resolv_conf="", hosts="# sysns\n",
                            timeout=30)
    except (IsolationError, OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0 and proc.stdout == "# sysns\n"
