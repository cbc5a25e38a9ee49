#!/usr/bin/env bash
# Issue 15 on one host of 8 GPUs, in one call of under 10 minutes: data-parallel scaling, XXL under
# ZeRO-2 and ZeRO-3, and an exact-resume check across a kill. Each run appends a JSON line to
# $OUT/multi_gpu.jsonl (benchmarks/train_step.py); the tables come at the end.
#
#   OUT=/path/to/results bash benchmarks/multi_gpu.sh
#   OUT=... ONLY="scale-xs xxl" bash benchmarks/multi_gpu.sh       # parts: scale-xs scale-m xxl resume
#
# Scaling runs of 1, 2 and 4 GPUs share the host (GPUs 0, 1-2 and 3-6, concurrently), then 8 GPUs run
# alone; scaling efficiency = img/s per GPU at N GPUs / img/s at 1 GPU. XXL runs at the largest per-GPU
# batch that `python -m sida_edm2.plan --preset edm2-img512-xxl --gpus 8 --gpu-memory 139` predicted to
# fit (benchmarks/RESULTS.md lists the predictions, written down before the run).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the results directory}
ONLY=${ONLY:-scale-xs scale-m xxl resume}
RUN_TIMEOUT_S=${RUN_TIMEOUT_S:-150}
WORKDIR=${WORKDIR:-/tmp/sida-multi-gpu}
JSONL=$OUT/multi_gpu.jsonl
mkdir -p "$OUT/logs" "$WORKDIR"
START=$(date +%s)

step() {  # step LABEL GPU_LIST train_step.py-ARGS...: one run on the listed GPUs
    local label=$1 gpus=$2
    shift 2
    local n
    n=$(($(tr -cd ',' <<<"$gpus" | wc -c) + 1))
    echo "=== $label on GPUs $gpus: $*"
    CUDA_VISIBLE_DEVICES=$gpus timeout --signal=KILL "$RUN_TIMEOUT_S" \
        torchrun --standalone --nproc_per_node "$n" --master_port $((29500 + RANDOM % 1000)) \
        benchmarks/train_step.py --workdir "$WORKDIR" --out "$JSONL" "$@" >"$OUT/logs/$label.log" 2>&1
    echo "    $label: exit $?"
}

scale() {  # scale PRESET BATCH_GPU
    local preset=$1 batch=$2 args=(--preset "edm2-img512-$1" --batch-gpu "$2" --zero-stage 2 --warmup 2 --iters 4)
    step "$preset$batch-1gpu" 0 "${args[@]}" &
    step "$preset$batch-2gpu" 1,2 "${args[@]}" &
    step "$preset$batch-4gpu" 3,4,5,6 "${args[@]}" &
    wait
    step "$preset$batch-8gpu" 0,1,2,3,4,5,6,7 "${args[@]}"
}

ALL=0,1,2,3,4,5,6,7
XXL=(--preset edm2-img512-xxl --warmup 2 --iters 3)
[[ " $ONLY " == *" scale-xs "* ]] && scale xs 64
[[ " $ONLY " == *" scale-m "* ]] && scale m 64
if [[ " $ONLY " == *" xxl "* ]]; then
    step xxl64-zero2 $ALL "${XXL[@]}" --batch-gpu 64 --zero-stage 2
    step xxl256-zero2-ckpt $ALL "${XXL[@]}" --batch-gpu 256 --zero-stage 2 --activation-checkpointing
    step xxl64-zero3 $ALL "${XXL[@]}" --batch-gpu 64 --zero-stage 3 --teacher-zero3
    step xxl256-zero3-ckpt $ALL "${XXL[@]}" --batch-gpu 256 --zero-stage 3 --teacher-zero3 \
        --activation-checkpointing
fi
if [[ " $ONLY " == *" resume "* ]]; then
    echo "=== resume: three XS runs on 8 GPUs, the third killed and rerun"
    timeout --signal=KILL 300 python benchmarks/multi_gpu_resume.py --gpus 8 --workdir "$WORKDIR/resume" \
        --out "$OUT/resume.json" >"$OUT/logs/resume.log" 2>&1
    echo "    resume: exit $?"
    cat "$OUT/resume.json" 2>/dev/null
fi
echo "total $(($(date +%s) - START)) s"
[[ -f $JSONL ]] && python benchmarks/train_step.py --table "$JSONL"
exit 0
