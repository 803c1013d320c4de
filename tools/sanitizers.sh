#!/usr/bin/env bash
# Sanitizer runs (issue 5, scenario 10).  Each step builds in its own
# directory under $ABR_SAN_DIR (default /tmp/abr-san), never in build/:
#
#   asan      lib/ + the C tests with -Db_sanitize=address,undefined; meson test
#   tsan      lib/ + the C tests with -Db_sanitize=thread; meson test
#             (tests/c/test_lifecycle.c skips its fork tests when GCC
#             defines __SANITIZE_THREAD__)
#   valgrind  a plain debug build of the C tests (ops not cached for reuse:
#             AB_OP_CACHE=0); meson test --setup=valgrind
#   pyasan    the extension built with ASan+UBSan into its own venv
#             ($ABR_SAN_DIR/venv), then the Python suite (tests/, reliability
#             scenarios included at their reduced counts) under it, with
#             gcc's libasan preloaded into the uninstrumented interpreter
#
#   bash tools/sanitizers.sh                 # all four, in that order
#   bash tools/sanitizers.sh asan valgrind   # some of them
#   ABR_SAN_PYTEST_ARGS="tests/reliability" bash tools/sanitizers.sh pyasan
#
# Pass: every step exits 0 and no sanitizer prints a report (each one is
# set to fail its process on the first report).  A summary line per step
# is printed at the end, and the exit code is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${ABR_SAN_DIR:-/tmp/abr-san}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"

UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export UBSAN_OPTIONS
declare -A RESULT

c_build() { # dir, extra meson args...
  local dir=$1
  shift
  rm -rf "$dir"
  meson setup "$dir" -Dpython=false -Dlib_tests=true -Dbuildtype=debug -Db_lundef=false "$@" \
    >"$dir.setup.log" 2>&1 || { cat "$dir.setup.log"; return 1; }
  ninja -C "$dir" >"$dir.build.log" 2>&1 || { tail -50 "$dir.build.log"; return 1; }
}

step_asan() {
  c_build "$OUT/asan" -Db_sanitize=address,undefined || return 1
  ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1" \
    meson test -C "$OUT/asan" --print-errorlogs
}

step_tsan() {
  c_build "$OUT/tsan" -Db_sanitize=thread || return 1
  # setarch -R: TSan's shadow layout needs the default mmap randomisation
  # or less; without ASLR it never trips "unexpected memory mapping".
  TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:history_size=4" \
    setarch "$(uname -m)" -R meson test -C "$OUT/tsan" --print-errorlogs
}

step_valgrind() {
  command -v valgrind >/dev/null || { echo "valgrind not installed (apt-get install valgrind)"; return 1; }
  # Ops are each their own malloc here (AB_OP_CACHE=0: lib/src/opmem.c), so
  # that memcheck sees a use of a freed op; asan builds do so by themselves.
  c_build "$OUT/valgrind" -Dc_args=-DAB_OP_CACHE=0 || return 1
  meson test -C "$OUT/valgrind" --setup=valgrind --print-errorlogs
}

step_pyasan() {
  local venv=$OUT/venv libasan
  libasan=$(gcc -print-file-name=libasan.so)
  [ -f "$libasan" ] || { echo "no libasan.so for gcc"; return 1; }
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv" || return 1
  "$venv/bin/python" -m pip install -q "meson-python>=0.15" "meson>=1.1" ninja \
    pytest pytest-asyncio pytest-timeout uvloop aiohttp hypothesis dnspython mypy || return 1
  rm -rf "$OUT/pyasan-build"
  # Non-editable, its own build dir: never /work/main/build.
  "$venv/bin/python" -m pip install -q --no-build-isolation --no-deps --force-reinstall \
    --config-settings=build-dir="$OUT/pyasan-build" \
    --config-settings=setup-args=-Db_sanitize=address,undefined --config-settings=setup-args=-Db_lundef=false \
    --config-settings=setup-args=-Dbuildtype=debug "$ROOT" || return 1
  # PYTHONMALLOC=malloc: every Python object goes through ASan's allocator,
  # so a use-after-free of an object is seen too.  detect_leaks=0: CPython
  # keeps interned strings, static types and module state until exit by
  # design; LeakSanitizer reports thousands of those, none from us
  # (lib/'s own leaks are checked by the asan and valgrind steps).
  (cd "$OUT" && env LD_PRELOAD="$libasan" PYTHONMALLOC=malloc \
    ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:detect_stack_use_after_return=0" \
    ABR_SANITIZER=asan \
    "$venv/bin/python" -m pytest -q -p no:cacheprovider -c "$ROOT/pyproject.toml" \
      --rootdir "$ROOT" ${ABR_SAN_PYTEST_ARGS:-$ROOT/tests})
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(asan tsan valgrind pyasan)
rc=0
for s in "${steps[@]}"; do
  echo "== $s"
  start=$SECONDS
  if "step_$s"; then
    RESULT[$s]="pass ($((SECONDS - start)) s)"
  else
    RESULT[$s]="FAIL ($((SECONDS - start)) s)"
    rc=1
  fi
done
echo "== summary"
for s in "${steps[@]}"; do
  echo "$s: ${RESULT[$s]}"
done
exit $rc
