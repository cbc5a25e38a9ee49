"""Summary statistics, the markdown table and the FD-vs-kimg plot of benchmarks/toy_reproduction.py.

All functions take the benchmark's `record` (what results.json holds): settings, floor, teacher
scores, and one run per (method, seed) with its curve [{"kimg", "fd", "mode_tv", ...}, ...].
"""

import itertools

import numpy as np

METHOD_NAMES = {"sid": "SiD", "sida": "SiDA", "sid2a": "SiD²A"}
SCORES = ("fd", "mode_tv", "class_accuracy", "nll_gap")


def kimg_to_reach(curve: list[dict], target: float) -> float | None:
    """First generator kimg at which the FD reaches `target`, interpolated linearly between the two
    scores around the crossing; None if it never does."""
    for before, after in itertools.pairwise(curve):
        if after["fd"] <= target:
            if before["fd"] <= target:
                return before["kimg"]
            frac = (before["fd"] - target) / (before["fd"] - after["fd"])
            return before["kimg"] + frac * (after["kimg"] - before["kimg"])
    return curve[0]["kimg"] if curve and curve[0]["fd"] <= target else None


def _mean_sd(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(arr.mean()),
        "sd": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "values": arr.tolist(),
    }


def summarise(record: dict) -> dict:
    """Per method: final and best scores over seeds (mean, sd, min, max), the kimg at which each seed
    first reaches the teacher's FD, and how many seeds end below it."""
    teacher_fd = record["teacher"]["heun_63"]["fd"]
    out = {}
    for method in dict.fromkeys(run["method"] for run in record["runs"]):
        runs = [r for r in record["runs"] if r["method"] == method]
        final = {k: _mean_sd([r["curve"][-1][k] for r in runs]) for k in SCORES}
        reach = [kimg_to_reach(r["curve"], teacher_fd) for r in runs]
        out[method] = {
            "final": final,
            "best_fd": _mean_sd([min(p["fd"] for p in r["curve"]) for r in runs]),
            "kimg_to_teacher_fd": reach,
            "seeds_below_teacher": sum(r["curve"][-1]["fd"] < teacher_fd for r in runs),
            "seeds": len(runs),
            "seconds": _mean_sd([r["seconds"] for r in runs]),
        }
    return out


def _fmt(stat: dict, digits: int = 3) -> str:
    if stat["sd"] == 0.0 and len(stat["values"]) == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def _reach(values: list[float | None]) -> str:
    return ", ".join("never" if v is None else f"{v:.1f}" for v in values)


def table_markdown(record: dict) -> str:
    """The results table (markdown) with a few lines of context under it."""
    s, t, floor = record["summary"], record["teacher"], record["floor"]
    settings = record["settings"]
    header = (
        "| sampler | network evaluations | seeds | final FD (mean ± sd) | best FD | mode TV | class acc. "
        "| NLL gap (nats/dim) | kimg to teacher FD (per seed) |\n|---|---|---|---|---|---|---|---|---|"
    )

    def single(name: str, evals: str, score: dict) -> str:
        return (
            f"| {name} | {evals} | | {score['fd']:.3f} | | {score['mode_tv']:.3f} "
            f"| {score['class_accuracy']:.3f} | {score['nll_gap']:.4f} | |"
        )

    rows = [
        header,
        single(f"true samples (floor, n={settings['eval_samples']})", "-", floor),
        single("teacher, EDM2 Heun sampler", "63", t["heun_63"]),
        single("teacher, one denoising step (students' start)", "1", t["one_step_denoiser"]),
    ]
    for method, m in s.items():
        f = m["final"]
        rows.append(
            f"| {METHOD_NAMES[method]} (EMA) | 1 | {m['seeds']} | {_fmt(f['fd'])} | {_fmt(m['best_fd'])} "
            f"| {_fmt(f['mode_tv'])} | {_fmt(f['class_accuracy'])} | {_fmt(f['nll_gap'], 4)} "
            f"| {_reach(m['kimg_to_teacher_fd'])} |"
        )
    notes = [
        "",
        f"Budget: teacher {settings['teacher_kimg']:g} kimg of EDM2 training; each student "
        f"{settings['student_kimg']:g} generator kimg at batch {settings['batch']}, lr {settings['lr']:g} "
        f"(SiD²A starts from that seed's SiD generator, so it has seen twice the budget). Device: "
        f"{record['device']}; {record.get('total_seconds', 0):.0f} s in all.",
    ]
    if record.get("interrupted"):
        notes.append(f"Interrupted: only the runs above finished (seeds asked: {settings['seeds']}).")
    for method in ("sida", "sid"):
        if method in s:
            m = s[method]
            notes.append(
                f"{METHOD_NAMES[method]} ends below the teacher's FD in "
                f"{m['seeds_below_teacher']}/{m['seeds']} seeds; it first reaches the teacher's FD "
                f"after {_reach(m['kimg_to_teacher_fd'])} kimg."
            )
    return "\n".join(rows + notes)


def plot_fd(record: dict, path) -> None:
    """FD of the EMA generator vs generator kimg: mean over seeds, band = min..max; teacher, floor lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method in dict.fromkeys(r["method"] for r in record["runs"]):
        curves = [r["curve"] for r in record["runs"] if r["method"] == method]
        length = min(len(c) for c in curves)
        # SiD²A continues a SiD run: drawn from the end of the SiD budget on, so x counts every G image.
        offset = record["settings"]["student_kimg"] if method == "sid2a" else 0.0
        kimg = np.array([p["kimg"] + offset for p in curves[0][:length]])
        fd = np.array([[p["fd"] for p in c[:length]] for c in curves])
        (line,) = ax.plot(kimg, fd.mean(0), label=METHOD_NAMES[method], marker="o", markersize=3)
        ax.fill_between(kimg, fd.min(0), fd.max(0), color=line.get_color(), alpha=0.2)
    ax.axhline(
        record["teacher"]["heun_63"]["fd"], color="k", linestyle="--", label="teacher, Heun 63 evaluations"
    )
    ax.axhline(record["floor"]["fd"], color="gray", linestyle=":", label="true samples (floor)")
    ax.set_yscale("log")
    ax.set_xlabel("generator images (kimg)")
    ax.set_ylabel("Fréchet distance to the true moments")
    ax.set_title(
        f"One-step students of an EDM2 teacher ({len(record['settings']['seeds'])} seeds, band = range)"
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
