#!/usr/bin/env bash
# Sets up the CPU environment and runs the demo: generated images → tiny local LLaVA on local Ray → Parquet.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
. .venv/bin/activate
export HF_HUB_OFFLINE=1
recaption demo "$@"
