#!/usr/bin/env bash
# Every GPU measurement of benchmarks/RESULTS.md in one call on a host with two H100s (about 9 minutes):
#   GPU 0: the toy reproduction (benchmarks/toy_reproduction.py, issue 6)
#   GPU 1: the single-GPU speed/memory matrix (benchmarks/gpu_perf.sh), then the SD-VAE encoder and
#          latent-reader benchmark (benchmarks/encode_bench.py)
#   both:  data-parallel training iterations on 2 GPUs (benchmarks/train_step.py under torchrun)
#
#   OUT=/path/to/results TOY_FLAGS="..." bash benchmarks/gpu_session.sh
#
# At most eight files come back from the device machine, so the logs end up in one logs.tgz.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the results directory}
TOY_TIMEOUT_S=${TOY_TIMEOUT_S:-430}
TOY_FLAGS=${TOY_FLAGS:-}
mkdir -p "$OUT/work"
export PYTHONUNBUFFERED=1
git rev-parse HEAD 2>/dev/null >"$OUT/work/commit.txt"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv >"$OUT/work/gpus.txt"
cat "$OUT/work/gpus.txt"
START=$(date +%s)

(
    CUDA_VISIBLE_DEVICES=0 timeout --signal=INT "$TOY_TIMEOUT_S" \
        python benchmarks/toy_reproduction.py --out "$OUT/work/toy" $TOY_FLAGS >"$OUT/work/toy.log" 2>&1
    echo "toy_reproduction exit $? after $(($(date +%s) - START)) s" >>"$OUT/work/toy.log"
) &
(
    CUDA_VISIBLE_DEVICES=1 OUT="$OUT/work/perf" BUDGET_S=${PERF_BUDGET_S:-300} \
        bash benchmarks/gpu_perf.sh >"$OUT/work/perf.log" 2>&1
    CUDA_VISIBLE_DEVICES=1 timeout 110 python benchmarks/encode_bench.py --iters 10 --pipeline-images 256 \
        --reader-samples 8192 --out "$OUT/encode_bench.json" >"$OUT/work/encode.log" 2>&1
    echo "encode_bench exit $?" >>"$OUT/work/encode.log"
) &
wait
echo "single-GPU part done after $(($(date +%s) - START)) s"

JSONL="$OUT/work/perf/train_step.jsonl"
for args in "--preset edm2-img512-xs --batch-gpu 64" "--preset edm2-img512-m --batch-gpu 32"; do
    timeout --signal=KILL 75 torchrun --standalone --nproc_per_node 2 benchmarks/train_step.py $args \
        --zero-stage 2 --warmup 2 --iters 3 --workdir /tmp/sida-gpu-perf --out "$JSONL" \
        >>"$OUT/work/perf2.log" 2>&1 || echo "2-GPU run '$args' failed" | tee -a "$OUT/work/perf2.log"
done

cp "$JSONL" "$OUT/train_step.jsonl" 2>/dev/null
for f in results.json results.md fd_vs_kimg.png; do cp "$OUT/work/toy/$f" "$OUT/toy_$f" 2>/dev/null; done
tar czf "$OUT/logs.tgz" --exclude='*.safetensors' --exclude='checkpoints' -C "$OUT" work
rm -rf "$OUT/work"
echo "total $(($(date +%s) - START)) s"
tail -n 30 "$OUT/toy_results.md" 2>/dev/null
python benchmarks/train_step.py --table "$OUT/train_step.jsonl"
