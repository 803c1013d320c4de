#!/usr/bin/env python3
"""Run the reliability scenarios (tests/reliability) and regenerate the
results table in docs/reliability.md.

    python tools/reliability.py            # reduced counts (~5 min on 2 cores)
    python tools/reliability.py --full     # the issue's counts (ABR_FULL=1)
    python tools/reliability.py --no-dbg   # without the python3.11-dbg refcount run
    python tools/reliability.py -- -k fork # extra pytest arguments
    python tools/reliability.py --build-dbg  # only make the debug venv; print its python

With --dbg (the default) it first makes /tmp/abr-dbgvenv: a venv of
Debian's debug interpreter python3.11-dbg with asyncio_bridge built for it
(non-editable, its own build dir), so that the refcount scenario runs.
The table replaces what lies between the two marker lines of the doc; the
sanitizer lines come from tools/sanitizers.sh, which this does not run.
"""

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
DBG_VENV = Path("/tmp/abr-dbgvenv")

HOW = {
    1: "fresh debug loop per iteration; sleep(T) cancelled in [0.99T,1.01T]; asyncio.timeout 0.5T/T/2T",
    2: "subprocess; hand-driven ops; loop closed mid-flight and racing completions; calls on the closed loop recorded",
    3: "subprocess per run: 10k ops pending / completions being delivered / delivering from a daemon thread, then exit",
    4: "subprocess, 10 s limit: fork idle, with ops in flight, from a thread; 200 spawns from threads",
    5: "16 threads with their own loops x 1,000 ops, then 50 short-lived loops",
    6: "subprocess: 9 loops (main + 8 threads, each its own loop), 10k in flight, a third cancelled, 2 warm-up + 5 measured rounds",
    7: "3 warm-up + 3 measured rounds per op kind; blocks and fds here, refcounts on python3.11-dbg",
    8: "tasks and Op objects dropped mid-flight in cycles, gc.collect(), weakref of a finished op",
    9: "hypothesis on every public function; other loop, no loop; Python callback raising/hanging; unknown C error codes",
}


def build_dbg_venv():
    dbg = shutil.which("python3.11-dbg")
    if dbg is None:
        print("python3.11-dbg not found (apt-get install python3.11-dbg): no refcount run")
        return None
    py = DBG_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([dbg, "-m", "venv", str(DBG_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "meson-python", "meson", "ninja"],
                       check=True, stdout=sys.stderr)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                    "--force-reinstall", "--config-settings=build-dir=/tmp/abr-dbg-build",
                    str(ROOT)], check=True, stdout=sys.stderr)
    return str(py)


def run(full, dbg, extra):
    results = Path(tempfile.mkstemp(prefix="abr-results-", suffix=".jsonl")[1])
    env = dict(os.environ, ABR_RESULTS=str(results), ABR_FULL="1" if full else "0")
    if dbg:
        env["ABR_DBG_PYTHON"] = dbg
    start = time.monotonic()
    # Each test runs in this pytest process, the subprocess scenarios in
    # their own; a crash of the pytest process itself still leaves the
    # records written so far.
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                           "-o", "timeout=1800", "tests/reliability", *extra], cwd=ROOT, env=env)
    wall = time.monotonic() - start
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    results.unlink()
    return proc.returncode, records, wall


def table(records, full, wall, rc):
    figures = collections.defaultdict(list)
    outcome = {}
    for r in records:
        if "figure" in r:
            figures[r["nodeid"]].append(r)
        else:
            if r["outcome"] != "passed" or r["nodeid"] not in outcome:
                outcome[r["nodeid"]] = r["outcome"]
    by_scenario = collections.defaultdict(list)
    for nodeid in sorted(set(figures) | set(outcome)):
        number = next((f["scenario"][0] for f in figures.get(nodeid, []) if f["scenario"]), None)
        if number is None:
            number = int(next((n for n, name in SCENARIO_FILES.items() if name in nodeid), 0))
        by_scenario[number].append(nodeid)
    lines = [
        f"Run: {'full counts (ABR_FULL=1)' if full else 'reduced counts (default)'}, "
        f"{time.strftime('%Y-%m-%d')}, {wall / 60:.1f} min, pytest exit {rc}.",
        "",
        "| # | scenario | how it is run | test (delivery-loop) | figure | result |",
        "|---|---|---|---|---|---|",
    ]
    for number in sorted(by_scenario):
        name = SCENARIO_NAMES.get(number, "?")
        for nodeid in by_scenario[number]:
            test = nodeid.split("::", 1)[1]
            text = "; ".join(f["figure"] for f in figures.get(nodeid, [])) or "(no figure: see result)"
            result = outcome.get(nodeid, "did not finish (process crashed?)")
            result = "**FAIL**" if result == "failed" else result
            lines.append(f"| {number} | {name} | {HOW.get(number, '')} | `{test}` | "
                         f"{text.replace('|', '/')} | {result} |")
    return "\n".join(lines)


SCENARIO_NAMES = {1: "Cancel races", 2: "Loop closed with work in flight",
                  3: "Interpreter exit", 4: "Fork", 5: "Many loops", 6: "Stress", 7: "Leaks",
                  8: "Garbage collection", 9: "Bad input"}
SCENARIO_FILES = {1: "test_cancel_races", 2: "test_closed_loop", 3: "test_exit", 4: "test_fork",
                  5: "test_many_loops", 6: "test_stress", 7: "test_leaks", 8: "test_gc",
                  9: "test_bad_input"}


def write_doc(text):
    doc = DOC.read_text()
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the issue's full counts")
    ap.add_argument("--no-dbg", action="store_true", help="skip the python3.11-dbg refcount run")
    ap.add_argument("--build-dbg", action="store_true",
                    help="only build the debug-interpreter venv and print its python")
    ap.add_argument("pytest_args", nargs="*")
    args = ap.parse_args()
    if args.build_dbg:
        dbg = build_dbg_venv()
        if dbg is None:
            return 1
        print(dbg)
        return 0
    dbg = None if args.no_dbg else build_dbg_venv()
    rc, records, wall = run(args.full, dbg, args.pytest_args)
    write_doc(table(records, args.full, wall, rc))
    print(f"docs/reliability.md updated; pytest exit {rc}, {wall / 60:.1f} min")
    return rc


if __name__ == "__main__":
    sys.exit(main())
