#!/usr/bin/env bash
# Creates .venv (if missing) with the CPU install path: torch 2.13.0 pinned first, so pip never pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
# pip's warnings about this machine's local index layout are noise; real errors still show (and fail the script).
pip_install() { python -m pip install -q --disable-pip-version-check "$@" 2>&1 | sed '/is ignored: it is neither a file nor a directory/d'; }
pip_install --upgrade pip
pip_install "torch==2.13.0"
pip_install -e ".[${extras}]"
echo "setup: .venv ready ($(python -c 'import torch; print("torch", torch.__version__)'))"
