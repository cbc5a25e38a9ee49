#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md in one call on a host with four H100s (under 10 minutes):
#   GPU 0:    the toy reproduction (benchmarks/toy_reproduction.py, issue 6)
#   GPU 1:    XS at 64/GPU, plain networks, with a kernel profile; then the same with torch.compile
#   GPU 2,3:  data-parallel runs on 2 GPUs (XXL 2 and 16/GPU, XS 64, M 32), then single-GPU runs of
#             M at 64 (GPU 2) and XXL at 32/GPU with activation checkpointing (GPU 3) side by side
# Every lane is benchmarks/gpu_perf.sh (or the toy script) with its own labels; see there for them.
#
#   OUT=/path/to/results TOY_FLAGS="..." bash benchmarks/gpu_session.sh
#
# Few files come back from the device machine, so the logs end up in one logs.tgz.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the results directory}
TOY_TIMEOUT_S=${TOY_TIMEOUT_S:-520}
TOY_FLAGS=${TOY_FLAGS:-}
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
    CUDA_VISIBLE_DEVICES=0 timeout --signal=INT "$TOY_TIMEOUT_S" \
        python benchmarks/toy_reproduction.py --out "$W/toy" $TOY_FLAGS >"$W/toy.log" 2>&1
    echo "toy_reproduction exit $? after $(($(date +%s) - START)) s" >>"$W/toy.log"
) &
lane profile-compile CUDA_VISIBLE_DEVICES=1 OUT="$W/gpu1" PROFILE=1 COMPILE_TIMEOUT_S=420 \
    ONLY="xs64-eager xs64-compile"
(
    CUDA_VISIBLE_DEVICES=2,3 OUT="$W/gpu23" GPUS=2 WORKDIR=/tmp/sida-gpu23 BUDGET_S=330 \
        ONLY="xxl2 xxl16-ckpt xs64-default m32" bash benchmarks/gpu_perf.sh >"$W/two-gpu.log" 2>&1
    lane m64 CUDA_VISIBLE_DEVICES=2 OUT="$W/gpu2" WORKDIR=/tmp/sida-gpu2 BUDGET_S=150 ONLY=m64
    lane xxl32 CUDA_VISIBLE_DEVICES=3 OUT="$W/gpu3" WORKDIR=/tmp/sida-gpu23 BUDGET_S=150 ONLY=xxl32-ckpt
    wait
) &
wait
echo "all lanes done after $(($(date +%s) - START)) s"

cat "$W"/gpu*/train_step.jsonl >"$OUT/train_step.jsonl" 2>/dev/null
for f in results.json results.md fd_vs_kimg.png; do cp "$W/toy/$f" "$OUT/toy_$f" 2>/dev/null; done
cat "$W"/gpu1/logs/*.profile.txt >"$OUT/profiles.txt" 2>/dev/null
tar czf "$OUT/logs.tgz" --exclude='*.safetensors' --exclude='checkpoints' -C "$OUT" work
rm -rf "$W"
echo "total $(($(date +%s) - START)) s"
tail -n 30 "$OUT/toy_results.md" 2>/dev/null
head -n 30 "$OUT/profiles.txt" 2>/dev/null
python benchmarks/train_step.py --table "$OUT/train_step.jsonl"
