#!/usr/bin/env bash
# find-python.sh X.Y: print the path of a CPython X.Y interpreter on this
# machine (pyenv's versions first, the newest patch release, then pythonX.Y
# on PATH), or exit 1 if there is none.
set -uo pipefail
want=$1
candidates=()
if command -v pyenv >/dev/null 2>&1; then
  root=$(pyenv root)
  while IFS= read -r dir; do
    candidates+=("$dir/bin/python$want")
  done < <(ls -d "$root/versions/$want".* 2>/dev/null | grep -E "/$want\.[0-9]+$" | sort -V -r)
fi
on_path=$(command -v "python$want" 2>/dev/null) && candidates+=("$on_path")
for py in "${candidates[@]}"; do
  if [ -x "$py" ] && "$py" -c "import sys, venv; sys.exit(sys.version_info[:2] != tuple(map(int, '$want'.split('.'))))" 2>/dev/null; then
    echo "$py"
    exit 0
  fi
done
exit 1
