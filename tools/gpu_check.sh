#!/usr/bin/env bash
# tools/gpu_check.sh -- everything one GPU machine should check, in one go, writing under one folder:
# the CUDA tests, then the gpu preset end to end from nothing, then the default preset on CUDA.
# Each step prints its wall time; results.json of both runs records the device, driver-visible
# name, torch version and per-stage times. RESULTS.md, "On one GPU", says what to copy from it.
#
#     bash tools/gpu_check.sh [OUT]          # OUT defaults to out_gpu_check
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out_gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"

step() {   # step NAME COMMAND...: run it, keep its output, print its wall time
    local name=$1; shift
    local t0=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc, $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
    tail -n 25 "$OUT/$name.log"
}

step cuda_tests python -m pytest -q tests/test_cuda.py
step gpu_preset python train.py --preset gpu --device=cuda --out="$OUT/gpu"
step default_on_cuda python train.py --device=cuda --out="$OUT/default"
cat "$OUT/steps.txt"
