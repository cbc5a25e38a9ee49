#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md in one call on a host with four H100s (under 10 minutes):
#   GPU 0:    the toy reproduction (benchmarks/toy_reproduction.py, issue 13; its own processes)
#   GPU 1:    the runs $GPU1_RUNS, with kernel profiles
#   GPU 2,3:  data-parallel runs on both ($PAIR_RUNS), then $GPU2_RUNS on GPU 2 and $GPU3_RUNS on GPU 3
# Every lane is benchmarks/gpu_perf.sh (or the toy script) with its own labels; see there for them.
#
#   OUT=/path/to/results TOY_FLAGS="..." bash benchmarks/gpu_session.sh
#   OUT=... GPU1_RUNS="xs64-eager xs64-compile" PAIR_RUNS="xxl2" bash benchmarks/gpu_session.sh
#
# Few files come back from the device machine, so the logs end up in one logs.tgz.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the results directory}
TOY_TIMEOUT_S=${TOY_TIMEOUT_S:-520}
TOY_FLAGS=${TOY_FLAGS:-}
GPU1_RUNS=${GPU1_RUNS:-xs64-default xs64-eager xs128 m32 m64}
PAIR_RUNS=${PAIR_RUNS:-xs64-default m32 xxl16-ckpt}
GPU2_RUNS=${GPU2_RUNS:-xxl2 xxl16-ckpt}
GPU3_RUNS=${GPU3_RUNS:-xxl32-ckpt}
W=$OUT/work
mkdir -p "$W"
export PYTHONUNBUFFERED=1
git rev-parse HEAD 2>/dev/null >"$W/commit.txt"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv | tee "$W/gpus.txt"
START=$(date +%s)

lane() {  # lane NAME VAR=VALUE...: gpu_perf.sh with that environment, in the background
    local name=$1
    shift
    (env BUDGET_S=500 "$@" bash benchmarks/gpu_perf.sh >"$W/$name.log" 2>&1) &
}

(
    CUDA_VISIBLE_DEVICES=0 python benchmarks/toy_reproduction.py --out "$W/toy" --time-budget-s "$TOY_TIMEOUT_S" \
        $TOY_FLAGS >"$W/toy.log" 2>&1
    echo "toy_reproduction exit $? after $(($(date +%s) - START)) s" >>"$W/toy.log"
) &
lane gpu1 CUDA_VISIBLE_DEVICES=1 OUT="$W/gpu1" PROFILE=1 COMPILE_TIMEOUT_S=420 ONLY="$GPU1_RUNS"
(
    CUDA_VISIBLE_DEVICES=2,3 OUT="$W/gpu23" GPUS=2 WORKDIR=/tmp/sida-gpu23 BUDGET_S=${PAIR_BUDGET_S:-240} \
        ONLY="$PAIR_RUNS" bash benchmarks/gpu_perf.sh >"$W/gpu23.log" 2>&1
    lane gpu2 CUDA_VISIBLE_DEVICES=2 OUT="$W/gpu2" WORKDIR=/tmp/sida-gpu23 BUDGET_S=250 ONLY="$GPU2_RUNS"
    lane gpu3 CUDA_VISIBLE_DEVICES=3 OUT="$W/gpu3" WORKDIR=/tmp/sida-gpu23 BUDGET_S=250 ONLY="$GPU3_RUNS"
    wait
) &
wait
echo "all lanes done after $(($(date +%s) - START)) s"

cat "$W"/gpu*/train_step.jsonl >"$OUT/train_step.jsonl" 2>/dev/null
for f in results.json results.md curves.png; do cp "$W/toy/$f" "$OUT/toy_$f" 2>/dev/null; done
for f in "$W"/gpu*/logs/*.profile.txt; do echo "== $(basename "$f")" && cat "$f"; done >"$OUT/profiles.txt" 2>/dev/null
tar czf "$OUT/logs.tgz" --exclude='*.safetensors' --exclude='checkpoints' -C "$OUT" work
rm -rf "$W"
echo "total $(($(date +%s) - START)) s"
tail -n 30 "$OUT/toy_results.md" 2>/dev/null
grep -A10 "^== " "$OUT/profiles.txt" 2>/dev/null
python benchmarks/train_step.py --table "$OUT/train_step.jsonl"
