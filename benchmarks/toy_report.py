"""The report of benchmarks/toy_reproduction.py: results.json (every number), results.md (the table and
the decisions) and curves.png (every score of every run against iterations), from what --out holds.

The decision rules are those of toy_reproduction.py's docstring; `decide` applies them.
"""

import itertools
import json
import math
from pathlib import Path

import numpy as np

NAMES = {
    "sid-exact": "SiD from the exact denoiser (control)",
    "sid": "SiD",
    "sida": "SiDA",
    "sida-psi": "SiDA, lambda_adv_psi scaled (ablation)",
    "sid2a": "SiD²A (from SiD)",
}
SCORES = ("cfd", "noise_var_ratio", "precision", "recall", "modes_covered")
SCORES += ("structure_precision", "structure_recall")
REACH_FACTOR = 1.25  # claim 2: iterations to 1.25x the teacher's cfd


def iterations_to_reach(curve: list[dict], target: float) -> float | None:
    """First iteration at which cfd <= target, interpolated linearly between the two scores around the
    crossing; None if it never does."""
    if curve and curve[0]["cfd"] <= target:
        return float(curve[0]["iteration"])
    for before, after in itertools.pairwise(curve):
        if after["cfd"] <= target:
            frac = (before["cfd"] - target) / (before["cfd"] - after["cfd"])
            return before["iteration"] + frac * (after["iteration"] - before["iteration"])
    return None


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def collect(out: Path, settings: dict) -> dict:
    """Everything on disk: references, teacher scores, every student's curve and whether it finished."""
    from benchmarks.toy_reproduction import done_marker, student_jobs

    runs = []
    for name, job in student_jobs(settings).items():
        curve_file = out / "runs" / name / "curve.jsonl"
        if not curve_file.exists():
            continue
        curve = [json.loads(line) for line in curve_file.read_text().splitlines() if line.strip()]
        if not curve:  # started, not scored yet
            continue
        speed_file = out / "runs" / name / "speed.jsonl"
        speed = (
            [json.loads(line) for line in speed_file.read_text().splitlines()] if speed_file.exists() else []
        )
        finished = done_marker(out, name).exists()
        runs.append({"name": name, **job, "curve": curve, "finished": finished, "speed": speed})
    return {
        "settings": settings,
        "reference": _read_json(out / "reference.json"),
        "teacher": _read_json(out / "runs" / "teacher" / "score.json"),
        "runs": runs,
    }


def _final(record: dict, variant: str) -> dict[int, dict]:
    """seed -> last curve point, for the finished runs of `variant`."""
    return {r["seed"]: r["curve"][-1] for r in record["runs"] if r["variant"] == variant and r["finished"]}


def _complete(record: dict, variant: str) -> bool:
    return len(_final(record, variant)) == len(record["settings"]["seeds"])


def decide(record: dict) -> dict:
    """The gate and the three claims by the rules fixed before the run (toy_reproduction.py)."""
    if record["reference"] is None or record["teacher"] is None:
        return {"gate": "incomplete", "claim1": "incomplete", "claim2": "incomplete", "claim3": "incomplete"}
    T = record["teacher"]["heun_63"]["cfd"]
    E = record["reference"]["exact_heun_63"]["cfd"]
    seeds = record["settings"]["seeds"]
    out: dict = {"teacher_cfd": T, "exact_cfd": E}

    control = _final(record, "sid-exact")
    gate_level = E + 0.5 * (T - E)
    out["gate_level"] = gate_level
    if not _complete(record, "sid-exact"):
        out["gate"] = "incomplete"
    else:
        out["gate"] = "passes" if all(p["cfd"] <= gate_level for p in control.values()) else "fails"
    refute = "refuted" if out["gate"] == "passes" else "inconclusive"

    sida = _final(record, "sida")
    if not _complete(record, "sida"):
        out["claim1"] = "incomplete"
    else:
        below = sum(p["cfd"] < T for p in sida.values())
        out["claim1_seeds_below"] = below
        out["claim1"] = (
            "confirmed"
            if below == len(seeds)
            else refute
            if below <= 1 and len(seeds) >= 3
            else ("inconclusive")
        )

    out["claim2"] = "incomplete"
    if _complete(record, "sida") and _complete(record, "sid"):
        target = REACH_FACTOR * T
        budget = record["settings"]["iters"]
        pairs = {}
        for seed in seeds:
            i_a = iterations_to_reach(_curve(record, "sida", seed), target)
            i_d = iterations_to_reach(_curve(record, "sid", seed), target)
            pairs[seed] = (i_a, i_d)
        out["claim2_iterations"] = {str(s): {"sida": a, "sid": d} for s, (a, d) in pairs.items()}
        fast = [a is not None and (budget if d is None else d) >= max(3 * a, 1e-9) for a, d in pairs.values()]
        slow = [d is not None and d < 1.5 * (math.inf if a is None else a) for a, d in pairs.values()]
        out["claim2"] = "confirmed" if all(fast) else refute if sum(slow) > len(seeds) / 2 else "inconclusive"

    if _complete(record, "sida-psi"):  # the ablation: claim 1's and claim 2's numbers, no decision
        ablation = _final(record, "sida-psi")
        out["ablation_seeds_below"] = sum(p["cfd"] < T for p in ablation.values())
        out["ablation_iterations_to_1.25T"] = {
            str(s): iterations_to_reach(_curve(record, "sida-psi", s), REACH_FACTOR * T) for s in seeds
        }

    out["claim3"] = "incomplete"
    if _complete(record, "sid2a") and _complete(record, "sid"):
        back = record["settings"]["sid2a_iters"]
        ratios = {}
        for seed in seeds:
            sid_curve = _curve(record, "sid", seed)
            end = sid_curve[-1]
            earlier = [p for p in sid_curve if p["iteration"] <= end["iteration"] - back]
            pace = end["cfd"] / earlier[-1]["cfd"] if earlier else 1.0
            ratios[seed] = (_curve(record, "sid2a", seed)[-1]["cfd"] / end["cfd"], pace)
        out["claim3_ratios"] = {str(s): {"r": r, "sid_pace": p} for s, (r, p) in ratios.items()}
        good = [r <= 0.8 and 1 - r >= 2 * (1 - p) for r, p in ratios.values()]
        beats_pace = sum(1 - r > 1 - p for r, p in ratios.values())
        out["claim3"] = "confirmed" if all(good) else refute if beats_pace <= 1 else "inconclusive"
    return out


def _curve(record: dict, variant: str, seed: int) -> list[dict]:
    return next(r["curve"] for r in record["runs"] if r["variant"] == variant and r["seed"] == seed)


def _stat(values: list[float | None]) -> str:
    """One value, or mean ± std over seeds; "-" for a score the run did not record (older versions)."""
    if any(v is None for v in values):
        return "-"
    arr = np.asarray(values, dtype=np.float64)
    if len(arr) == 1:
        return f"{arr[0]:.3f}"
    return f"{arr.mean():.3f} ± {arr.std(ddof=1):.3f}"


def table_markdown(record: dict, decisions: dict) -> str:
    header = (
        "| sampler | evaluations | seeds finished | "
        + " | ".join(SCORES)
        + " |\n|---|---|---|"
        + "---|" * len(SCORES)
    )
    rows = [header]

    def single(name: str, evals: str, score: dict | None) -> None:
        if score is not None:
            rows.append(f"| {name} | {evals} | | " + " | ".join(_stat([score.get(k)]) for k in SCORES) + " |")

    ref, teacher = record["reference"] or {}, record["teacher"] or {}
    n = record["settings"]["eval_samples"]
    single(f"true samples (floor, n={n})", "-", ref.get("floor"))
    single("exact denoiser, Heun", "63", ref.get("exact_heun_63"))
    single("teacher, Heun", "63", teacher.get("heun_63"))
    single("teacher, one step (students' start)", "1", teacher.get("one_step"))
    for variant in record["settings"]["variants"]:
        runs = [r for r in record["runs"] if r["variant"] == variant and r["curve"]]  # started and scored
        if not runs:
            continue
        last = [r["curve"][-1] for r in runs]
        done = sum(r["finished"] for r in runs)
        at = sorted({p["iteration"] for p in last})
        where = "" if done == len(runs) else f" (at iterations {', '.join(map(str, at))})"
        rows.append(
            f"| {NAMES[variant]}{where} | 1 | {done}/{len(record['settings']['seeds'])} | "
            + " | ".join(_stat([p.get(k) for p in last]) for k in SCORES)
            + " |"
        )
    lines = []
    rates = [call["train_it_per_s"] for r in record["runs"] for call in r["speed"] if call["iterations"]]
    if rates:
        lines += [
            "",
            f"Training iterations per second per process ({len(rates)} process-calls, concurrent): min "
            f"{min(rates):.2f}, median {float(np.median(rates)):.2f}, max {max(rates):.2f}.",
        ]
    lines += ["", "Decisions (rules in toy_reproduction.py's docstring):"]
    for key in ("gate", "claim1", "claim2", "claim3"):
        lines.append(f"- {key}: {decisions.get(key)}")
    keys = ("gate_level", "claim1_seeds_below", "claim2_iterations", "claim3_ratios", "ablation_seeds_below")
    for key in (*keys, "ablation_iterations_to_1.25T"):
        if key in decisions:
            lines.append(f"  - {key}: {json.dumps(decisions[key])}")
    return "\n".join(rows + lines)


def plot_curves(record: dict, path: Path) -> None:
    """One panel per score against iterations; every seed drawn; references as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ("cfd", "noise_var_ratio", "precision", "recall", "structure_precision", "structure_recall")
    fig, axes = plt.subplots(2, 3, figsize=(18, 8), dpi=110)
    colours = dict(zip(NAMES, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    offset = {"sid2a": record["settings"]["iters"]}  # SiD²A continues SiD: x counts G's iterations
    refs = []
    if record["reference"]:
        refs += [
            ("floor", record["reference"]["floor"], ":"),
            ("exact, Heun 63", record["reference"]["exact_heun_63"], "-."),
        ]
    if record["teacher"]:
        refs.append(("teacher, Heun 63", record["teacher"]["heun_63"], "--"))
    for ax, key in zip(axes.flat, panels, strict=True):
        labelled = set()
        for run in record["runs"]:
            points = [p for p in run["curve"] if key in p]  # scores older versions did not record: none
            x = [p["iteration"] + offset.get(run["variant"], 0) for p in points]
            label = NAMES[run["variant"]] if run["variant"] not in labelled else None
            labelled.add(run["variant"])
            ax.plot(x, [p[key] for p in points], color=colours[run["variant"]], alpha=0.7, lw=1, label=label)
        for name, score, style in refs:
            if key in score:
                ax.axhline(score[key], color="k", linestyle=style, lw=0.8, label=name)
        ax.set_title(key)
        ax.set_xlabel(f"generator iterations (batch {record['settings']['batch']})")
        if key in ("cfd", "noise_var_ratio"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(out: Path, settings: dict) -> str:
    """results.json, results.md, curves.png from --out's contents; returns the markdown."""
    record = collect(out, settings)
    decisions = decide(record)
    record["decisions"] = decisions
    table = table_markdown(record, decisions)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(out / "results.json")
    (out / "results.md").write_text(table + "\n")
    if record["runs"]:
        plot_curves(record, out / "curves.png")
    return table
