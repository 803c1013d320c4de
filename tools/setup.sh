#!/usr/bin/env bash
# Set up a fresh machine (Debian, Python >= 3.11): system packages, a venv
# and asyncio_bridge installed in it (editable) with its test dependencies.
# Safe to run again.
#
#   PYTHON                  the interpreter (default: python3)
#   VENV                    the venv's folder (default: .venv)
#   EXTRA_DEBIAN_PACKAGES   more Debian packages (tools/test.sh asks for the
#                           debug interpreter and valgrind)
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in libevent-dev pkg-config gcc zlib1g-dev wrk ${EXTRA_DEBIAN_PACKAGES:-}; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "meson-python>=0.15" "meson>=1.1" ninja
"$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[test,bench]"
