#!/usr/bin/env bash
# Set up (tools/setup.sh) and run every test: the C tests of lib/, the
# Python suite on stdlib asyncio and uvloop under both delivery paths (with
# the reliability scenarios at reduced counts, refcounts checked on
# python3.11-dbg) once for each of Python 3.11, 3.12 and 3.13 found on the
# machine, the example extensions built against the installed package (the
# libpq one tested against a real PostgreSQL server), a
# benchmark smoke run, and the sanitizer runs (tools/sanitizers.sh).
#
# Each Python gets its own venv (.venv for the default python3, .venv-X.Y
# for the others).  A Python that is missing is reported and skipped; when
# CI is set, a missing one fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSIONS=(3.11 3.12 3.13)
EXTRA_DEBIAN_PACKAGES="python3.11-dbg valgrind" bash tools/setup.sh
. .venv/bin/activate

echo "== C tests of lib/ (meson test)"
rm -rf build-ctest
meson setup build-ctest -Dpython=false -Dlib_tests=true -Dbuildtype=debug >/dev/null
meson test -C build-ctest --print-errorlogs

echo "== Debug interpreter (python3.11-dbg) for the refcount scenario"
ABR_DBG_PYTHON=$(python tools/reliability.py --build-dbg)
export ABR_DBG_PYTHON

default_version=$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
ran=()
missing=()
for v in "${VERSIONS[@]}"; do
  if [ "$v" = "$default_version" ]; then
    venv=.venv
  else
    py=$(bash tools/find-python.sh "$v") || { missing+=("$v"); echo "== Python $v: not found"; continue; }
    venv=.venv-$v
    PYTHON=$py VENV=$venv bash tools/setup.sh
  fi
  full=$("$venv/bin/python" -c 'import platform; print(platform.python_version())')
  echo "== Python tests on $full (the core suite, then the reliability scenarios at reduced counts)"
  "$venv/bin/python" -m pytest tests -q -p no:cacheprovider
  if [ -f examples/build_and_test.sh ]; then
    echo "== Example extension on $full (third-party build against the installed header)"
    PYTHON="$PWD/$venv/bin/python" bash examples/build_and_test.sh
    echo "== libpq example on $full, against a PostgreSQL server its tests start"
    PYTHON="$PWD/$venv/bin/python" bash examples/pg_example/build_and_test.sh
  fi
  ran+=("$full")
done
echo "== Python suite ran on: ${ran[*]:-none}${missing:+; missing: ${missing[*]}}"
if [ ${#missing[@]} -gt 0 ] && [ -n "${CI:-}" ]; then
  echo "CI is set and Python ${missing[*]} is missing: failing" >&2
  exit 1
fi

echo "== Benchmark smoke run (figures printed, nothing asserted; the full run is bench/run.py without --quick)"
python bench/run.py --quick --out "$(mktemp -d)"
python bench/capi_v2.py --quick
python bench/resolve.py --quick
python bench/service.py --quick --out "$(mktemp -d)"
python bench/loops.py --quick --out "$(mktemp -d)"

echo "== Sanitizers: ASan+UBSan, TSan and valgrind on the C tests; the Python suite under ASan+UBSan"
bash tools/sanitizers.sh
