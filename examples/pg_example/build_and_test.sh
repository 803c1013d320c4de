#!/usr/bin/env bash
# Build examples/pg_example against the asyncio_bridge installed in the
# current Python (editable or not), install it, and run its tests, which
# start a PostgreSQL server of their own.  PYTHON picks the interpreter
# (default: python).  Needs meson-python, meson, ninja, pytest,
# pytest-asyncio and uvloop in that Python (the build runs without build
# isolation so that it sees the installed asyncio_bridge); installs libpq's
# headers and Debian's PostgreSQL server if they are missing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PYTHON=${PYTHON:-python}

if ! pkg-config --exists libpq 2>/dev/null || ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql libpq-dev
fi

# Work from the example's folder: its pyproject configures pytest, and no
# source folder named asyncio_bridge (the repository root's) shadows the
# installed package.
cd "$here"
include=$("$PYTHON" -c 'import asyncio_bridge; print(asyncio_bridge.get_include())')
if [ ! -f "$include/asyncio_bridge.h" ]; then
  echo "asyncio_bridge.get_include() = $include holds no asyncio_bridge.h" >&2
  exit 1
fi
echo "building pg_example against $include"

build_dir=$(mktemp -d "${TMPDIR:-/tmp}/pg_example-build.XXXXXX")
trap 'rm -rf "$build_dir"' EXIT
"$PYTHON" -m pip install -q --root-user-action=ignore --no-build-isolation --force-reinstall --no-deps \
  -Cbuild-dir="$build_dir" .
"$PYTHON" -m pytest -q -p no:cacheprovider tests "$@"
