#!/usr/bin/env bash
# Issue 16's A/B on ONE GPU within about 9 minutes: today's code (a checkout of an older commit, e.g.
# 5703311, at $BASELINE) against this tree with the new speed switches on and each one off in turn,
# for XS 64, XS 128, M 32, M 64 and XXL at $XXL_BATCH per GPU (activation checkpointing). One
# benchmarks/train_step.py process per run (killed after its time limit, skipped once BUDGET_S is
# spent, so one failing variant does not sink the rest); each writes one JSON line to $OUT/runs/, the
# kernel profile to $OUT/logs/; a markdown table comes last (also in $OUT/speed_ab.md), then (PACK=1,
# the default) the runs are concatenated into $OUT/all_runs.jsonl and logs + runs packed into
# $OUT/logs.tgz without the Chrome traces (PACK= keeps everything as it is).
#
#   OUT=/path/to/results BASELINE=.baseline bash benchmarks/speed_ab.sh
#   OUT=... ONLY="xs64-base xs64-new" bash benchmarks/speed_ab.sh     # just these runs
#   OUT=... NEW_FLAGS="--fused --channels-last" bash benchmarks/speed_ab.sh   # switches of the "new" runs
#
# Runs, in priority order (labels for ONLY); "new" = NEW_FLAGS (default --fused --fused-adam
# --channels-last) with the ceiling (--ceiling: the same networks doing only the iteration's forward
# and backward passes), base = $BASELINE/benchmarks/train_step.py with its defaults:
#   xs64-base, xs64-new                    XS at 64/GPU, both with --profile
#   xs64-nofused                           XS 64, the new run without the fused kernels
#   m64-base, m64-new, xxl-base, xxl-new, xs128-base, xs128-new, m32-base, m32-new   (with --profile)
#   xs64-nocl, xs64-nofadam                XS 64, the new run without channels-last / fused Adam
#   xs64-off                               XS 64, this tree with every new switch off (regression check)
#   xs64-compile                           XS 64, every block torch.compiled (+ fused Adam, channels-last):
#                                          minutes of compilation, so last (usually its own call, ONLY=)
#   tests                                  pytest -m benchmark tests/test_fused.py, if pytest is there
# MFU is against the dense bf16 peak of 989.4 TFLOP/s (H100 SXM; the H200 has the same compute).
set -u
cd "$(dirname "$0")/.."

OUT=${OUT:?set OUT to the results directory}
BASELINE=${BASELINE:-.baseline}
PYTHON=${PYTHON:-python3}
WORKDIR=${WORKDIR:-/tmp/sida-speed-ab}  # the random teachers (XXL: 6 GB), one folder per code version
BUDGET_S=${BUDGET_S:-500}
RUN_TIMEOUT_S=${RUN_TIMEOUT_S:-110}
XXL_TIMEOUT_S=${XXL_TIMEOUT_S:-200}
COMPILE_TIMEOUT_S=${COMPILE_TIMEOUT_S:-480}  # torch.compile of every block: minutes in the warm-up
XXL_BATCH=${XXL_BATCH:-64}
ONLY=${ONLY:-}
PACK=${PACK-1}  # non-empty: at the end, the runs into all_runs.jsonl, the logs (no traces) into logs.tgz
NEW_FLAGS=${NEW_FLAGS:---fused --fused-adam --channels-last}
mkdir -p "$OUT/logs" "$OUT/runs" "$WORKDIR"
START=$(date +%s)
SKIPPED=()
FAILED=()

if [[ ! -f $BASELINE/benchmarks/train_step.py ]]; then
    echo "BASELINE=$BASELINE has no benchmarks/train_step.py: the base runs will fail" >&2
fi

# shellcheck source=benchmarks/budget.sh
source benchmarks/budget.sh

run() {  # run LABEL TIMEOUT_S CODE(base|new) train_step.py-ARGS...
    local label=$1 code=$3
    selected_limit "$label" "$2" || return
    shift 3
    local script=benchmarks/train_step.py pythonpath=$PWD
    if [[ $code == base ]]; then
        script=$BASELINE/benchmarks/train_step.py
        pythonpath=$(cd "$BASELINE" && pwd)
    fi
    echo "=== $label ($code): $* (at most ${LIMIT} s)"
    local t0
    t0=$(date +%s)
    rm -f "$OUT/runs/$label.jsonl"
    PYTHONPATH="$pythonpath${PYTHONPATH:+:$PYTHONPATH}" timeout --signal=KILL "$LIMIT" "$PYTHON" "$script" \
        --workdir "$WORKDIR/$code" --out "$OUT/runs/$label.jsonl" "$@" >"$OUT/logs/$label.log" 2>&1
    finished "$label" $? "$t0" "$OUT/logs/$label.log"
}

XS="--preset edm2-img512-xs"
M="--preset edm2-img512-m"
XXL="--preset edm2-img512-xxl --batch-gpu $XXL_BATCH --activation-checkpointing --warmup 1 --iters 2"
QUICK="--warmup 2 --iters 3"
prof() { echo "--profile $OUT/logs/$1.profile.txt"; }
# shellcheck disable=SC2086  # the flag strings are word lists on purpose
{
    run xs64-base "$RUN_TIMEOUT_S" base $XS --batch-gpu 64 $QUICK $(prof xs64-base)
    run xs64-new "$RUN_TIMEOUT_S" new $XS --batch-gpu 64 $QUICK $NEW_FLAGS --ceiling $(prof xs64-new)
    run xs64-nofused "$RUN_TIMEOUT_S" new $XS --batch-gpu 64 $QUICK $NEW_FLAGS --no-fused
    run m64-base "$RUN_TIMEOUT_S" base $M --batch-gpu 64 $QUICK $(prof m64-base)
    run m64-new "$RUN_TIMEOUT_S" new $M --batch-gpu 64 $QUICK $NEW_FLAGS --ceiling $(prof m64-new)
    run xxl-base "$XXL_TIMEOUT_S" base $XXL $(prof xxl-base)
    run xxl-new "$XXL_TIMEOUT_S" new $XXL $NEW_FLAGS --ceiling $(prof xxl-new)
    run xs128-base "$RUN_TIMEOUT_S" base $XS --batch-gpu 128 $QUICK $(prof xs128-base)
    run xs128-new "$RUN_TIMEOUT_S" new $XS --batch-gpu 128 $QUICK $NEW_FLAGS --ceiling $(prof xs128-new)
    run m32-base "$RUN_TIMEOUT_S" base $M --batch-gpu 32 $QUICK $(prof m32-base)
    run m32-new "$RUN_TIMEOUT_S" new $M --batch-gpu 32 $QUICK $NEW_FLAGS --ceiling $(prof m32-new)
    run xs64-nocl "$RUN_TIMEOUT_S" new $XS --batch-gpu 64 $QUICK ${NEW_FLAGS//--channels-last/--no-channels-last}
    run xs64-nofadam "$RUN_TIMEOUT_S" new $XS --batch-gpu 64 $QUICK $NEW_FLAGS --no-fused-adam
    run xs64-off "$RUN_TIMEOUT_S" new $XS --batch-gpu 64 $QUICK --no-fused --no-fused-adam --no-channels-last
    run xs64-compile "$COMPILE_TIMEOUT_S" new $XS --batch-gpu 64 $QUICK --compile --fused-adam --channels-last \
        $(prof xs64-compile)
}

# The GPU equivalence tests of the fused path (fused vs eager network and iteration), if pytest is
# installed and time is left.
LEFT=$((BUDGET_S - ($(date +%s) - START)))
if ((LEFT > 60)) && [[ -z $ONLY || " $ONLY " == *" tests "* ]] && "$PYTHON" -c "import pytest" 2>/dev/null; then
    echo "=== tests: pytest -m benchmark tests/test_fused.py (at most ${LEFT} s)"
    timeout --signal=KILL "$LEFT" "$PYTHON" -m pytest -q -p no:cacheprovider -m benchmark tests/test_fused.py \
        >"$OUT/logs/tests.log" 2>&1
    echo "    exit $? ($(tail -n 1 "$OUT/logs/tests.log"))"
fi

echo
echo "total $(($(date +%s) - START)) s"
((${#SKIPPED[@]})) && echo "skipped (time budget): ${SKIPPED[*]}"
((${#FAILED[@]})) && echo "failed: ${FAILED[*]}"
"$PYTHON" benchmarks/speed_table.py "$OUT" | tee "$OUT/speed_ab.md"
if [[ -n $PACK ]]; then  # three files instead of dozens (a device call returns only a few files)
    cat "$OUT"/runs/*.jsonl >"$OUT/all_runs.jsonl" 2>/dev/null
    rm -f "$OUT"/logs/*.trace.json.gz
    tar czf "$OUT/logs.tgz" -C "$OUT" logs runs && rm -rf "$OUT/logs" "$OUT/runs"
fi
exit 0
