#!/usr/bin/env bash
# The checks that need a CUDA GPU, for a machine that has one with torch and transformers (no vLLM, no internet):
#   1. the `gpu`-marked tests (the hf engine in bf16 on CUDA against float32 on the CPU, a GPU caption actor in the
#      Ray job where Ray is installed),
#   2. `recaption bench engine --engine hf` in bf16 on CUDA (our engine vs bare model.generate, interleaved repeats).
# Everything runs from this checkout (no install), tiny random-weight models built locally, in well under 8 minutes.
# Writes OUT (default gpu-check-out/): gpu-tests.xml (JUnit), bench-hf.json (the bench's figures),
# gpu-check.json (summary: GPU, versions, tests run/failed/skipped, the bench's figures, seconds). README.md
# ("The GPU check") says how to read them. Exit status: non-zero when no GPU is visible, a test failed, no gpu test
# ran, or the bench failed.
#   bash scripts/gpu-check.sh [OUT]        PYTHON=/path/to/python to choose the interpreter
# GPU_CHECK_ON_CPU=1 tries the script's own plumbing on a CPU machine (bench --quick in float32 on the CPU; the gpu
# tests skip, so it ends with "no gpu test ran").
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-check-out}"
py="${PYTHON:-python3}"
budget_s=480
mkdir -p "$out"
out="$(cd "$out" && pwd)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 TOKENIZERS_PARALLELISM=false
export RECAPTION_CACHE="${RECAPTION_CACHE:-$out/cache}"
bench_args=(--device cuda --dtype bfloat16)
if [ "${GPU_CHECK_ON_CPU:-0}" = "1" ]; then
  bench_args=(--device cpu --dtype float32 --quick)
fi
start=$(date +%s)

"$py" - <<'EOF'
import importlib.util
import os
import sys

missing = [m for m in ("torch", "transformers", "pydantic", "yaml", "PIL", "pyarrow", "psutil", "pytest")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu-check: missing Python packages: {', '.join(missing)} (pip install them, or PYTHON=another python)")
import torch

if not torch.cuda.is_available() and os.environ.get("GPU_CHECK_ON_CPU") != "1":
    sys.exit(f"gpu-check: torch {torch.__version__} sees no CUDA GPU (CUDA build: {torch.version.cuda})")
names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print(f"gpu-check: torch {torch.__version__} (CUDA {torch.version.cuda}), {', '.join(names) or 'no GPU'}")
if importlib.util.find_spec("ray") is None:
    print("gpu-check: ray is not installed: the GPU actor test skips, the engine tests run")
EOF

left() { echo $((budget_s - ($(date +%s) - start))); }
rc_tests=0
timeout "$(left)" "$py" -m pytest -m gpu -p no:cacheprovider -q --durations=5 --junitxml="$out/gpu-tests.xml" \
  tests/captioners/engines/test_hf_gpu.py || rc_tests=$?
rc_bench=0
timeout "$(left)" "$py" -m recaption.cli bench engine --engine hf "${bench_args[@]}" \
  --workdir "$out/bench-work" --json "$out/bench-hf.json" || rc_bench=$?

"$py" - "$out" "$rc_tests" "$rc_bench" "$(($(date +%s) - start))" "$budget_s" <<'EOF'
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, rc_tests, rc_bench, seconds, budget = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
tests = {"run": 0, "failed": 0, "skipped": 0}
if (out / "gpu-tests.xml").is_file():
    suite = ET.parse(out / "gpu-tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    tests = {"run": total - skipped, "failed": failed, "skipped": skipped}
bench = json.loads((out / "bench-hf.json").read_text()) if (out / "bench-hf.json").is_file() else None
problems = []
if rc_tests or tests["failed"]:
    problems.append(f"gpu tests exited {rc_tests} with {tests['failed']} failed")
if tests["run"] == 0:
    problems.append("no gpu test ran (all skipped or none collected)")
if rc_bench or bench is None:
    problems.append(f"the hf bench exited {rc_bench}" + (" (124: over the time budget)" if rc_bench == 124 else ""))
if seconds > budget:
    problems.append(f"took {seconds} s, over the {budget} s budget")
summary = {
    "ok": not problems,
    "problems": problems,
    "seconds": seconds,
    "tests": tests,
    "machine": bench["machine"] if bench else None,
    "bench": bench["measurements"] if bench else None,
}
(out / "gpu-check.json").write_text(json.dumps(summary, indent=1))
for m in summary["bench"] or []:
    line = f"gpu-check: {m['name']}: {m['value']:.4g} {m['unit']}"
    if m["baseline"] is not None and m["ratio"] is not None:
        line += f" vs bare {m['baseline']:.4g}, ratio {m['ratio']:.3f}"
    if m["spread"]:
        line += f" (spread {m['spread'][0]:.3f}-{m['spread'][1]:.3f} over {m['repeats']})"
    print(line + (f", target {m['target']}: {m['verdict']}" if m["target"] else ""))
print(f"gpu-check: {tests['run']} gpu tests ran, {tests['failed']} failed, {tests['skipped']} skipped; {seconds} s; {out / 'gpu-check.json'}")
if problems:
    sys.exit("gpu-check: FAILED: " + "; ".join(problems))
print("gpu-check: ok")
EOF
