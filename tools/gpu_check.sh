#!/usr/bin/env bash
# tools/gpu_check.sh -- what one GPU machine should check, fitted to a short allocation (9 minutes in
# all by default). Steps, in order of priority, each under its own time limit (`timeout`), within one
# total budget; a step that cannot fit in what is left is skipped, and says so:
#
#   1. cuda_tests       python3 -m pytest tests/test_cuda.py              (limit 150 s)
#   2. default_on_cuda  train.py on CUDA, the default preset, from nothing (limit 240 s)
#   3. gpu_preset       train.py --preset=gpu on CUDA, from nothing, its pretraining shortened to
#                       GPU_PRETRAIN_STEPS_TINY / _LLM steps (default 1500 of 6000, 3000 of 12000);
#                       the table extrapolates the full run from the pretraining steps/s it measured:
#                       seconds + (full - ran) / (steps/s), per model        (what is left, <= 600 s)
#
# It ends with ONE table: stage, status, seconds, pretraining steps/s, peak GPU memory (from each
# run's results.json: provenance.peak_memory_bytes). The runs' caches (checkpoints, ~200 MB) live in
# GPU_CHECK_CACHE, outside OUT; OUT keeps the logs (no progress bars: TQDM_DISABLE=1), each run's
# results.json and config.json and the table: well under 20 MB. RESULTS.md, "On one GPU", says what to
# copy from it.
#
#     bash tools/gpu_check.sh [OUT]              # OUT defaults to out_gpu_check
#     BUDGET_S=540 PYTHON=python3 GPU_PRETRAIN_STEPS_LLM=3000 bash tools/gpu_check.sh OUT
#     GPU_CHECK_FAKE=1 bash tools/gpu_check.sh OUT   # on a CPU: the CUDA tests skipped, the two runs
#                                                    # replaced by the smoke preset on the CPU
#     bash tools/gpu_check.sh --table OUT        # print the table again, from OUT/steps.tsv
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

table() {   # table OUT: one row per line of OUT/steps.tsv (name, status, seconds, full steps)
    "$PYTHON" - "$1" <<'EOF'
import json, os, re, sys
out = sys.argv[1]
logged = re.compile(r"pretrain  : (tiny|llm) \(.*?\), [\d,]+ params, (\d+) steps, ([\d.]+)s")
rows = []
notes = []
with open(os.path.join(out, "steps.tsv")) as f:
    for line in f:   # full steps: "-", or the preset's "tiny_steps,llm_steps" for a shortened run
        name, status, seconds, full_steps = line.rstrip("\n").split("\t")
        log = os.path.join(out, name + ".log")
        text = open(log).read() if os.path.exists(log) else ""
        ran = {who: (int(n), float(s)) for who, n, s in logged.findall(text)}
        rate = {who: n / s for who, (n, s) in ran.items()}
        full = {}
        if full_steps != "-":
            full = dict(zip(("tiny", "llm"), map(int, full_steps.split(","))))
        if full and set(ran) == {"tiny", "llm"}:   # each pretraining at its full length
            estimate = float(seconds) + sum(full[w] / rate[w] - ran[w][1] for w in ran)
            ran_text = ", ".join(f"{w} {ran[w][0]} of {full[w]} steps at {rate[w]:.1f} steps/s"
                                 for w in ran)
            terms = " ".join(f"+ {full[w]} / {rate[w]:.1f} - {ran[w][1]:.0f}" for w in ran)
            notes.append(f"{name}: pretraining ran {ran_text}; at full length the run "
                         f"extrapolates to {seconds} {terms} = {estimate:.0f} s ({status})")
        peak = "-"
        results = os.path.join(out, name, "results.json")
        if os.path.exists(results):
            memory = json.load(open(results))["provenance"].get("peak_memory_bytes")
            peak = "-" if memory is None else f"{memory / 2**20:.0f} MiB"
        rates = [f"{rate[w]:.1f}" if w in rate else "-" for w in ("tiny", "llm")]
        rows.append((name, status, seconds, *rates, peak))
head = ("stage", "status", "seconds", "tiny steps/s", "llm steps/s", "peak memory")
widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
for r in [head] + rows:
    print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
for note in notes:
    print(note)
EOF
}

if [ "${1:-}" = "--table" ]; then
    table "${2:?usage: bash tools/gpu_check.sh --table OUT}"
    exit
fi

OUT=${1:-out_gpu_check}
BUDGET_S=${BUDGET_S:-540}
CACHE=${GPU_CHECK_CACHE:-${TMPDIR:-/tmp}/gpu_check_cache}
TINY_STEPS=${GPU_PRETRAIN_STEPS_TINY:-1500}
LLM_STEPS=${GPU_PRETRAIN_STEPS_LLM:-3000}
FAKE=${GPU_CHECK_FAKE:-0}
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1
if [[ "$(realpath -m "$CACHE")/" == "$(realpath -m "$OUT")/"* ]]; then
    echo "GPU_CHECK_CACHE ($CACHE) must lie outside OUT ($OUT): OUT stays small" >&2
    exit 2
fi
mkdir -p "$OUT" "$CACHE"
rm -f "$OUT/steps.txt" "$OUT/steps.tsv"
START=$SECONDS
if [ "$FAKE" = 1 ]; then
    echo "GPU_CHECK_FAKE=1: no GPU; CUDA steps skipped, the runs are CPU stand-ins" | tee "$OUT/device.txt"
else
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"

record() {   # record NAME STATUS SECONDS FULL_STEPS: a line of the table to come
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$OUT/steps.tsv"
}

step() {   # step NAME NEED LIMIT FULL_STEPS COMMAND...: run it if NEED s of the budget are left
    local name=$1
    local need=$2
    local limit=$3
    local full_steps=$4
    shift 4
    local left=$((BUDGET_S - (SECONDS - START)))
    if [ "$left" -lt "$need" ]; then
        echo "$name: skipped: needs at least $need s, $left s of the budget left" | tee -a "$OUT/steps.txt"
        record "$name" skipped 0 -
        return
    fi
    local t=$((limit < left ? limit : left))
    local t0=$SECONDS
    rm -rf "${CACHE:?}/$name"   # a run's caches: from nothing, every time
    timeout --kill-after=10 "$t" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local status="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="timed out at $t s"
    elif [ "$rc" -ne 0 ]; then
        status="exit $rc"
    fi
    if [ "$(stat -c %s "$OUT/$name.log")" -gt 2000000 ]; then   # keep OUT small: the log's end
        tail -c 2000000 "$OUT/$name.log" > "$OUT/$name.log.tail"
        mv "$OUT/$name.log.tail" "$OUT/$name.log"
    fi
    if [ -f "$CACHE/$name/results.json" ]; then
        mkdir -p "$OUT/$name"
        cp "$CACHE/$name/results.json" "$CACHE/$name/config.json" "$OUT/$name/"
    fi
    echo "$name: $status, $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
    record "$name" "$status" "$((SECONDS - t0))" "$full_steps"
    tail -n 15 "$OUT/$name.log"
}

if [ "$FAKE" = 1 ]; then
    echo "cuda_tests: skipped: GPU_CHECK_FAKE=1, no GPU" | tee -a "$OUT/steps.txt"
    record cuda_tests skipped 0 -
    step default_on_cuda 30 200 - "$PYTHON" train.py --preset=smoke --device=cpu \
        --out="$CACHE/default_on_cuda"
    step gpu_preset 30 600 150,250 "$PYTHON" train.py --preset=smoke --device=cpu \
        --out="$CACHE/gpu_preset" \
        --pretrain_steps_tiny=50 --pretrain_steps_llm=100
else
    step cuda_tests 60 150 - "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py
    step default_on_cuda 60 240 - "$PYTHON" train.py --device=cuda --out="$CACHE/default_on_cuda"
    full=$("$PYTHON" -c "from config.presets import PRESETS; gpu = PRESETS['gpu']
print(gpu.pretrain_steps_tiny, gpu.pretrain_steps_llm, sep=',')")
    step gpu_preset 120 600 "$full" "$PYTHON" train.py --preset=gpu --device=cuda \
        --out="$CACHE/gpu_preset" \
        --pretrain_steps_tiny="$TINY_STEPS" --pretrain_steps_llm="$LLM_STEPS"
fi
echo "total: $((SECONDS - START)) s of a $BUDGET_S s budget" | tee -a "$OUT/steps.txt"
table "$OUT" | tee "$OUT/table.txt"
