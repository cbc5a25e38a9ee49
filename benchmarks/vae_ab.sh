#!/usr/bin/env bash
# Today's VAE stages beside the new ones, on one GPU, in about 4 minutes on one H200 (benchmarks/vae_ab.py
# says what each variant measures). Prints a markdown table; OUT_DIR gets vae_ab.md, results.json and one
# log per variant.
#
#   bash benchmarks/vae_ab.sh BASELINE_DIR OUT_DIR [more vae_ab.py options, e.g. --variants today,new-cl]
#
# BASELINE_DIR: a checkout of the code to compare against, e.g. `git worktree add .baseline 5703311`.
# PYTHON: the interpreter with the project's packages [default: python].
set -euo pipefail
baseline=${1:?usage: bash benchmarks/vae_ab.sh BASELINE_DIR OUT_DIR [vae_ab.py options]}
out=${2:?usage: bash benchmarks/vae_ab.sh BASELINE_DIR OUT_DIR [vae_ab.py options]}
shift 2
baseline=$(cd "$baseline" && pwd)
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/vae_ab.py --baseline "$baseline" --out "$out" "$@"
