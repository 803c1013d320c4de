#!/usr/bin/env bash
# Set up (tools/setup.sh) and run every test: the C tests of lib/, the
# Python suite on stdlib asyncio and uvloop under both delivery paths (with
# the reliability scenarios at reduced counts, refcounts checked on
# python3.11-dbg), the example extension built against the installed
# package, and the sanitizer runs (tools/sanitizers.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA_DEBIAN_PACKAGES="python3.11-dbg valgrind" bash tools/setup.sh
. .venv/bin/activate

echo "== C tests of lib/ (meson test)"
rm -rf build-ctest
meson setup build-ctest -Dpython=false -Dlib_tests=true -Dbuildtype=debug >/dev/null
meson test -C build-ctest --print-errorlogs

echo "== Debug interpreter (python3.11-dbg) for the refcount scenario"
ABR_DBG_PYTHON=$(python tools/reliability.py --build-dbg)
export ABR_DBG_PYTHON

echo "== Python tests (the core suite, then the reliability scenarios at reduced counts)"
python -m pytest tests -q -p no:cacheprovider

if [ -f examples/build_and_test.sh ]; then
  echo "== Example extension (third-party build against the installed header)"
  bash examples/build_and_test.sh
fi

echo "== Benchmark smoke run (figures printed, nothing asserted; the full run is bench/run.py without --quick)"
python bench/run.py --quick --out "$(mktemp -d)"

echo "== Sanitizers: ASan+UBSan, TSan and valgrind on the C tests; the Python suite under ASan+UBSan"
bash tools/sanitizers.sh
