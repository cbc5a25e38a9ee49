"""The markdown table of a benchmarks/speed_ab.sh results directory: one row per run, from
$OUT/runs/LABEL.jsonl (train_step.py's JSON line) and, where the JSON has no profile summary (older
train_step.py versions), from the profile text $OUT/logs/LABEL.profile.txt.

    python benchmarks/speed_table.py /path/to/results
"""

import json
import re
import sys
from pathlib import Path

PRESETS = {"edm2-img512-xs": "XS", "edm2-img512-m": "M", "edm2-img512-xxl": "XXL"}
WALL = re.compile(r"^(\d+) iterations, wall ([\d.]+) s, GPU kernel time ([\d.]+) s")


def profile_summary(path: Path) -> dict:
    """GPU busy share and kernels per iteration from a train_step.py --profile text file."""
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    match = WALL.match(lines[0]) if lines else None
    if match is None:
        return {}
    iterations, wall, busy = int(match[1]), float(match[2]), float(match[3])
    kernels, in_table = 0, False
    for line in lines[1:]:
        if line.startswith("| category"):
            in_table = True
        elif in_table and line.startswith("| ") and not line.startswith("|---"):
            kernels += int(line.rstrip(" |").rsplit("|", 1)[1])
        elif in_table and not line.strip():
            break
    return {"gpu_busy": busy / wall, "kernels_per_iteration": kernels / iterations}


def rows(out: Path) -> list[dict]:
    result = []
    for path in sorted((out / "runs").glob("*.jsonl"), key=lambda p: p.stat().st_mtime):
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            continue
        row = json.loads(lines[-1])
        row["label"] = path.stem
        if "gpu_busy" not in row:
            row.update(profile_summary(out / "logs" / f"{path.stem}.profile.txt"))
        result.append(row)
    return result


def fmt(value, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def main(out: Path) -> None:
    table = rows(out)
    base = {(r["preset"], r["batch_gpu"]): r["img_s_gpu"] for r in table if r["label"].endswith("-base")}
    print(
        "| run | config | options | img/s/GPU | vs base | MFU | loop/ceiling | GPU busy | kernels/it | "
        "peak alloc GiB | planner GiB | planner error |"
    )
    print("|" + "---|" * 12)
    for r in table:
        config = f"{PRESETS.get(r['preset'], r['preset'])} {r['batch_gpu']}"
        if r["activation_checkpointing"]:
            config += " ckpt"
        ref = base.get((r["preset"], r["batch_gpu"]))
        ratio = r["img_s_gpu"] / ref if ref else None
        peak, planned = r["peak_allocated_gib"], r["predicted_gib"]
        error = (planned - peak) / peak * 100 if peak else None
        print(
            f"| {r['label']} | {config} | {r.get('options', '')} | {r['img_s_gpu']:.1f} | "
            f"{fmt(ratio, '.2f', 'x')} | {100 * r['mfu']:.1f}% | {fmt(r.get('loop_over_ceiling'), '.2f')} | "
            f"{fmt(r.get('gpu_busy') and 100 * r['gpu_busy'], '.0f', '%')} | "
            f"{fmt(r.get('kernels_per_iteration'), ',.0f')} | {peak:.1f} | {planned:.1f} | "
            f"{fmt(error, '+.0f', '%')} |"
        )


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "runs").is_dir():
        sys.exit("usage: python benchmarks/speed_table.py RESULTS_DIR   (a speed_ab.sh $OUT, with runs/)")
    main(Path(sys.argv[1]))
