#!/usr/bin/env bash
# Sets up the CPU environment and runs the test suite (CI runs exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
. .venv/bin/activate
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1
ruff check recaption tests
python -m pytest -m "not slow and not gpu" "$@"
