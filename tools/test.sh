#!/usr/bin/env bash
# Set up (tools/setup.sh) and run every test: the C tests of lib/, the
# Python suite on stdlib asyncio and uvloop under both delivery paths, and
# the example extension built against the installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
. .venv/bin/activate

echo "== C tests of lib/ (meson test)"
rm -rf build-ctest
meson setup build-ctest -Dpython=false -Dlib_tests=true -Dbuildtype=debug >/dev/null
meson test -C build-ctest --print-errorlogs

echo "== Python tests"
python -m pytest tests -q -p no:cacheprovider

if [ -f examples/build_and_test.sh ]; then
  echo "== Example extension (third-party build against the installed header)"
  bash examples/build_and_test.sh
fi
