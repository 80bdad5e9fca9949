#!/usr/bin/env bash
# Every GPU-side check of the fused sampling steps in one run, for a machine with one CUDA GPU
# (docs/benchmarks.md, "Fused kernels"): the fused-step tests, which compile the Triton kernels
# for the card instead of interpreting them, then benchmarks/kernels.py. The results land in
# OUT_DIR (default: $OUT, else benchmarks/results), named by the card, ready to copy into
# docs/benchmarks.md.
#
#   bash scripts/gpu-check.sh [OUT_DIR]         # from the repository root; about 5 minutes
#
# It uses the machine's own Python with torch and triton ($PYTHON, else python3) and installs
# fundiff into it from this checkout without fetching anything (--no-index --no-deps: torch,
# triton, pluggy, attrs, pyyaml, safetensors and hypothesis must be there already).
set -uo pipefail

out=${1:-${OUT:-benchmarks/results}}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$out"

if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu-check: no CUDA device visible to $py; run this on a machine with a GPU" >&2
    exit 2
fi
if ! "$py" -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1; then
    echo "gpu-check: installing fundiff from this checkout failed; see $out/install.log" >&2
    exit 2
fi

card=$("$py" -c 'import torch; print(torch.cuda.get_device_name(0))')
slug=$(printf '%s' "$card" | tr -c 'A-Za-z0-9._-' '-')
{
    echo "card: $card"
    "$py" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>/dev/null || true
} | tee "$out/machine-$slug.txt"

status=0
"$py" -m pytest -q -p no:cacheprovider tests/test_fused_gpu.py tests/test_fused_kernels.py tests/test_fused_samplers.py \
    2>&1 | tee "$out/fused-tests-$slug.txt" || status=1
"$py" benchmarks/kernels.py --out "$out/kernels-$slug.md" 2>&1 | tee "$out/kernels-$slug.txt" || status=1
exit $status
