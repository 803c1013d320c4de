#!/usr/bin/env bash
# Set up a fresh machine (Debian, Python >= 3.11): system packages, a venv
# in .venv, and asyncio_bridge installed in it (editable) with its test
# dependencies.  Safe to run again.  EXTRA_DEBIAN_PACKAGES adds packages
# (tools/test.sh asks for the debug interpreter and valgrind).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in libevent-dev pkg-config gcc zlib1g-dev ${EXTRA_DEBIAN_PACKAGES:-}; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "meson-python>=0.15" "meson>=1.1" ninja
.venv/bin/python -m pip install -q --no-build-isolation -e ".[test,bench]"
