#!/usr/bin/env bash
# Set up (tools/setup.sh) and run the short demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python examples/demo.py
