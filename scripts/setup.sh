#!/usr/bin/env bash
# Creates .venv (if missing) with the CPU install path: torch 2.13.0 pinned first, so pip never pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[${extras}]"
