#!/usr/bin/env bash
# The speed/memory matrix of issue 7 on ONE GPU (an H100), within about 8 minutes: one
# benchmarks/train_step.py process per configuration, each appending a JSON line to $OUT/train_step.jsonl,
# then the markdown table of all of them.
#
#   OUT=/path/to/results bash benchmarks/gpu_perf.sh
#   OUT=... ONLY="xs64-compile xs64-all" bash benchmarks/gpu_perf.sh          # just these runs
#   OUT=... BEST_FLAGS="--channels-last --compile" bash benchmarks/gpu_perf.sh   # switches of the big runs
#   OUT=... GPUS=2 ONLY="xxl2 m32" bash benchmarks/gpu_perf.sh     # data-parallel runs under torchrun
#   OUT=... PROFILE=1 ONLY=xs64-eager bash benchmarks/gpu_perf.sh  # + kernel profile in $OUT/logs/
#
# Runs, in priority order (labels for ONLY):
#   xs64-eager     XS, batch 64, the plain networks (no weight cache, no weight recomputation)
#   xs64-cache     + baked teacher and cached fake-score weights in the generator update
#   xs64-default   the training's defaults (the preset's weight recomputation: off for XS)
#   xs64-cl        the plain networks + channels_last
#   xxl2           XXL at the release's 2 images per GPU (ZeRO-2, bf16)
#   xxl16-ckpt     XXL at 16 per GPU with activation checkpointing, ZeRO-2
#   xxl32-ckpt     XXL at 32 per GPU with activation checkpointing, ZeRO-2
#   m32, m64       M at its preset batch 32 and at 64 (the planner's largest without checkpointing)
#   xs128          XS at 128 (the largest without checkpointing)
#   xs256-ckpt     XS at 256 with activation checkpointing
#   xs64-compile   the plain networks + torch.compile of every block (compilation in the warm-up)
#   xs64-all       every switch: cache, recomputation, channels_last, compile
# The runs from xxl2 on use the defaults plus BEST_FLAGS; without BEST_FLAGS, --channels-last is added
# when xs64-cl beat xs64-eager by more than 2%. A run is killed after RUN_TIMEOUT_S (compile runs:
# COMPILE_TIMEOUT_S) and skipped once BUDGET_S seconds have passed; skipped and failed runs are listed at
# the end (their logs are in $OUT/logs/), so they can be rerun with ONLY.
set -u
cd "$(dirname "$0")/.."

OUT=${OUT:?set OUT to the results directory}
PYTHON=${PYTHON:-python}
WORKDIR=${WORKDIR:-/tmp/sida-gpu-perf}  # the random teachers (XXL: 6 GB): not under $OUT
BUDGET_S=${BUDGET_S:-450}
RUN_TIMEOUT_S=${RUN_TIMEOUT_S:-120}
COMPILE_TIMEOUT_S=${COMPILE_TIMEOUT_S:-200}
ONLY=${ONLY:-}
GPUS=${GPUS:-1}
PROFILE=${PROFILE:-}
JSONL=$OUT/train_step.jsonl
EAGER="--no-weight-cache --no-weight-recompute --no-fused --no-fused-adam --no-channels-last"
XS="--preset edm2-img512-xs"
M="--preset edm2-img512-m"
XXL="--preset edm2-img512-xxl"
mkdir -p "$OUT/logs" "$WORKDIR"
START=$(date +%s)
SKIPPED=()
FAILED=()

# shellcheck source=benchmarks/budget.sh
source benchmarks/budget.sh

run() {  # run LABEL TIMEOUT_S train_step.py-ARGS...
    local label=$1
    shift
    selected_limit "$label" "$1" || return
    shift
    echo "=== $label: train_step.py $* (at most ${LIMIT} s)"
    local t0
    t0=$(date +%s)
    local launch=("$PYTHON")
    ((GPUS > 1)) && launch=(torchrun --standalone --nproc_per_node "$GPUS")
    local extra=()
    [[ -n $PROFILE ]] && extra=(--profile "$OUT/logs/$label-gpus$GPUS.profile.txt")
    timeout --signal=KILL "$LIMIT" "${launch[@]}" benchmarks/train_step.py --workdir "$WORKDIR" \
        --out "$JSONL" "${extra[@]}" "$@" >"$OUT/logs/$label-gpus$GPUS.log" 2>&1
    finished "$label" $? "$t0" "$OUT/logs/$label-gpus$GPUS.log"
}

best_flags() {  # --channels-last when it beat the plain networks at XS batch 64 by more than 2%
    "$PYTHON" - "$JSONL" <<'EOF'
import json, sys
from pathlib import Path

path = Path(sys.argv[1])
rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
speed = {r.get("options"): r["img_s_gpu"] for r in rows
         if r["preset"] == "edm2-img512-xs" and r["batch_gpu"] == 64 and r["gpus"] == 1}
print("--channels-last" if speed.get("cl", 0) > 1.02 * speed.get("eager", float("inf")) else "")
EOF
}

QUICK="--warmup 2 --iters 4"
run xs64-eager "$RUN_TIMEOUT_S" $XS --batch-gpu 64 $QUICK $EAGER
run xs64-cache "$RUN_TIMEOUT_S" $XS --batch-gpu 64 $QUICK --no-weight-recompute
run xs64-default "$RUN_TIMEOUT_S" $XS --batch-gpu 64 $QUICK
run xs64-cl "$RUN_TIMEOUT_S" $XS --batch-gpu 64 $QUICK $EAGER --channels-last

BEST=${BEST_FLAGS-$(best_flags)}
echo "=== switches of the runs below: defaults ${BEST:+plus $BEST}"
run xxl2 "$RUN_TIMEOUT_S" $XXL --batch-gpu 2 --warmup 2 --iters 3 $BEST
run xxl16-ckpt "$RUN_TIMEOUT_S" $XXL --batch-gpu 16 --activation-checkpointing --warmup 2 --iters 3 $BEST
run xxl32-ckpt "$RUN_TIMEOUT_S" $XXL --batch-gpu 32 --activation-checkpointing --warmup 2 --iters 3 $BEST
run m32 "$RUN_TIMEOUT_S" $M --batch-gpu 32 $QUICK $BEST
run m64 "$RUN_TIMEOUT_S" $M --batch-gpu 64 $QUICK $BEST
run xs128 "$RUN_TIMEOUT_S" $XS --batch-gpu 128 $QUICK $BEST
run xs256-ckpt "$RUN_TIMEOUT_S" $XS --batch-gpu 256 --activation-checkpointing $QUICK $BEST

# Compilation last: its warm-up time on the GPU machine is the least predictable.
run xs64-compile "$COMPILE_TIMEOUT_S" $XS --batch-gpu 64 --warmup 3 --iters 4 $EAGER --compile
run xs64-all "$COMPILE_TIMEOUT_S" $XS --batch-gpu 64 --warmup 3 --iters 4 --channels-last --compile

echo
echo "total $(($(date +%s) - START)) s"
((${#SKIPPED[@]})) && echo "skipped (time budget): ${SKIPPED[*]}"
((${#FAILED[@]})) && echo "failed: ${FAILED[*]}"
[[ -f $JSONL ]] && "$PYTHON" benchmarks/train_step.py --table "$JSONL"
exit 0
