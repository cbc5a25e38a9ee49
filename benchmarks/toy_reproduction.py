"""Does one step surpass the teacher? SiD, SiDA and SiD²A on a latent distribution with known statistics.

    python benchmarks/toy_reproduction.py --out benchmarks/results/toy     # one H100: 336 s measured
    python benchmarks/toy_reproduction.py --out /tmp/toy-repro --quick     # CPU smoke run, about 75 s

Data: `benchmarks/toy_mixture.py`, per-class mixtures of structured Gaussians on 4x16x16 latents, drawn
fresh for every micro-batch and fed straight into the training loop (`Trainer(cfg, data_iter=...)`).
Teacher: the `demo` preset's EDM2 network trained with `--method edm2` (EDM2's loss) for --teacher-kimg,
on purpose briefly, so that it is good but imperfect; its EDM2 Heun sampler (32 steps, 63 evaluations)
is the baseline. Students: SiD, SiDA and SiD²A (G from that seed's SiD result) through the project's
real training loop (DeepSpeed engines, losses, phases, EMA, forced normalisation), each for
--student-kimg generator images, SiDA's phase thresholds scaled down with the budget. Every
--eval-kimg the EMA generator makes --eval-samples one-step latents from fixed noise and balanced
classes, scored by
  fd          Fréchet distance to the mixture's exact mean and covariance (floor: true samples, same n)
  mode_tv     per-class nearest-mode frequencies vs the true mode weights (total variation; 0 = exact)
  class_acc   fraction of samples whose most likely mixture component is of the requested class
  nll_gap     nats per dimension by which samples are less likely than true ones
Outputs in --out: results.json (every number), fd_vs_kimg.png, results.md (the table, also printed).
They are rewritten after every student run, and Ctrl-C (or `timeout --signal=INT`) reports the runs
finished so far before exiting with status 130; the projected total time is printed after the first run.
"""

import gc
import json
import shutil
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from benchmarks.toy_mixture import ToyMixture
from benchmarks.toy_report import plot_fd, summarise, table_markdown
from sida_edm2.io.network_files import load_network
from sida_edm2.sample.sampling import compute_dtype, denoise, heun_sampler
from sida_edm2.train.config import resolve_config
from sida_edm2.train.trainer import Trainer

PRESET = "demo"  # 16x16x4 latents, 10 classes, EDM2 UNet with 3 levels (sida_edm2/model/presets.py)


class Evaluator:
    """Scores a network on fixed noise and balanced labels against the mixture (module docstring)."""

    def __init__(self, mix: ToyMixture, n: int, seed: int, device: torch.device, batch: int = 2500):
        gen = torch.Generator(device).manual_seed(seed)
        self.mix, self.batch, self.device = mix, batch, device
        self.noise = torch.randn([n, *mix.shape], generator=gen, device=device)
        self.labels = torch.arange(n, device=device) % mix.num_classes
        self.onehot = torch.nn.functional.one_hot(self.labels, mix.num_classes).float()
        self.reference = mix.frechet_reference()
        self.reference_ll = mix.reference_log_likelihood(gen, n)
        true_x, _, _ = mix.sample_with_modes(n, gen, self.labels)
        self.floor = self.score(true_x)

    def score(self, x: torch.Tensor) -> dict:
        return {
            "fd": self.reference.distance(x),
            **self.mix.mode_coverage(x, self.labels, self.reference_ll),
        }

    def _batched(self, fn) -> torch.Tensor:
        parts = [
            fn(z, c) for z, c in zip(self.noise.split(self.batch), self.onehot.split(self.batch), strict=True)
        ]
        return torch.cat(parts)

    @torch.no_grad()
    def one_step(self, G: torch.nn.Module, sigma_init: float) -> dict:
        was_training = G.training
        G.eval()
        with compute_dtype(G, torch.float32):  # scores in fp32 whatever the training precision
            x = self._batched(lambda z, c: denoise(G, sigma_init * z, sigma_init, c))
        G.train(was_training)
        return self.score(x)

    @torch.no_grad()
    def heun(self, net: torch.nn.Module, num_steps: int = 32) -> dict:
        with compute_dtype(net, torch.float32):
            return self.score(self._batched(lambda z, c: heun_sampler(net, z, c, num_steps=num_steps)))


def fresh_dir(path: Path) -> Path:
    """The benchmark's runs always start from scratch (a leftover checkpoint would be resumed)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def release(trainer: Trainer) -> None:
    trainer.log.close()
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_teacher(mix: ToyMixture, opts: dict, out: Path) -> tuple[Path, float]:
    """The EDM2 teacher (`--method edm2`) on fresh mixture samples; returns its export and seconds."""
    cfg = resolve_config(
        PRESET,
        str(fresh_dir(out / "teacher")),
        external_data=True,
        method="edm2",
        batch=opts["batch"],
        batch_gpu=opts["batch"],
        lr=opts["teacher_lr"],
        seed=1000,
        checkpoint_kimg=opts["teacher_kimg"],
        tick_kimg=opts["teacher_kimg"] / 5,
        max_kimg=opts["teacher_kimg"],
        precision=opts["precision"],
        zero_stage=opts["zero_stage"],
    )
    start = time.perf_counter()
    trainer = Trainer(cfg, data_iter=mix.batches(cfg.batch_gpu, seed=1000))
    trainer.train()
    seconds = time.perf_counter() - start
    release(trainer)
    return out / "teacher" / "export-latest.safetensors", seconds


def train_student(mix, opts, out, teacher, method, seed, evaluator, init_generator=None) -> dict:
    """One distillation run; the EMA generator is scored every --eval-kimg. Returns its curve."""
    run_dir = fresh_dir(out / f"{method}-seed{seed}")
    budget = opts["student_kimg"]
    phases = {"fake_only_kimg": 0.0, "sid_only_kimg": 0.0}
    if method != "sid":  # SiD trains G from the start (data-free); SiDA / SiD²A warm up as Algorithm 1
        phases = {
            "fake_only_kimg": opts["fake_only_frac"] * budget,
            "sid_only_kimg": opts["sid_only_frac"] * budget,
        }
    cfg = resolve_config(
        PRESET,
        str(run_dir),
        external_data=True,
        method=method,
        teacher=str(teacher),
        init_generator=init_generator,
        batch=opts["batch"],
        batch_gpu=opts["batch"],
        lr=opts["lr"],
        seed=seed,
        max_kimg=budget,
        checkpoint_kimg=budget,
        tick_kimg=budget / 5,
        precision=opts["precision"],
        zero_stage=opts["zero_stage"],
        **phases,
    )
    start = time.perf_counter()
    trainer = Trainer(cfg, data_iter=mix.batches(cfg.batch_gpu, seed=10_000 + seed))
    curve = [{"kimg": 0.0, **evaluator.one_step(trainer.ema_network(evaluator.device), cfg.sigma_init)}]
    eval_every = max(1, round(opts["eval_kimg"] * 1000 / cfg.batch))  # iterations
    eval_seconds = 0.0
    while trainer.nimg < budget * 1000:
        trainer.run_iteration()
        if trainer.iteration % eval_every == 0 or trainer.nimg >= budget * 1000:
            t0 = time.perf_counter()
            curve.append(
                {
                    "kimg": trainer.nimg / 1000,
                    **evaluator.one_step(trainer.ema_network(evaluator.device), cfg.sigma_init),
                }
            )
            eval_seconds += time.perf_counter() - t0
    trainer.save()  # export-latest.safetensors: SiD²A starts from the SiD one
    seconds = time.perf_counter() - start
    release(trainer)
    last = curve[-1]
    click.echo(
        f"{method:5s} seed {seed}: fd {last['fd']:.4f} (from {curve[0]['fd']:.4f}), mode_tv "
        f"{last['mode_tv']:.3f}, {seconds:.0f} s ({eval_seconds:.0f} s of evaluation)"
    )
    return {
        "method": method,
        "seed": seed,
        "curve": curve,
        "seconds": seconds,
        "export": str(run_dir / "export-latest.safetensors"),
    }


QUICK = dict(teacher_kimg=0.5, student_kimg=0.192, batch=32, eval_kimg=0.064, eval_samples=300, seeds=(0,))


def write_report(record: dict, out_path: Path, start: float) -> str:
    """results.json, results.md and fd_vs_kimg.png from what has finished so far; returns the table."""
    record["summary"] = summarise(record)
    record["total_seconds"] = time.perf_counter() - start
    (out_path / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    table = table_markdown(record)
    (out_path / "results.md").write_text(table + "\n")
    if record["runs"]:
        plot_fd(record, out_path / "fd_vs_kimg.png")
    return table


# Defaults sized for one H100 in about 6 minutes (336 s measured; the loop is launch-bound at this network
# size, so a step of 512 costs little more than one of 256: the budget is in iterations, ~64 per student).
@click.command(context_settings={"show_default": True})
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--quick", is_flag=True, help=f"CPU smoke settings: {QUICK}.")
@click.option("--teacher-kimg", type=float, default=200.0, help="EDM2 teacher training length.")
@click.option("--teacher-lr", type=float, default=2e-2, help="Teacher Adam learning rate (EDM2-like).")
@click.option("--student-kimg", type=float, default=32.0, help="Generator kimg per student run.")
@click.option("--lr", type=float, default=3e-4, help="Student Adam learning rate (G and fake score).")
@click.option("--batch", type=int, default=512, help="Images per step (one GPU, no accumulation).")
@click.option(
    "--fake-only-frac", type=float, default=0.05, help="SiDA/SiD²A fake-score-only share of the budget."
)
@click.option("--sid-only-frac", type=float, default=0.10, help="... and up to where G trains on SiD alone.")
@click.option("--eval-kimg", type=float, default=8.0, help="Scoring interval.")
@click.option("--eval-samples", type=int, default=10000, help="Samples per score.")
@click.option("--seeds", default="0,1,2", help="Student seeds (comma-separated).")
@click.option("--methods", default="sid,sida,sid2a", help="Students to run (sid2a needs sid).")
# fp32 by default: the 1.8M-parameter network is launch-bound, so bf16 buys little, and SiD's signal
# D_teacher - D_fake is small next to bf16's rounding of either term.
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="fp32")
@click.option("--zero-stage", type=click.IntRange(0, 3), default=0, help="One GPU: nothing to partition.")
def main(out: str, quick: bool, seeds: str, methods: str, **opts) -> None:
    """Train the teacher, distil it with each method and seed, score everything, write the report.
    The report is rewritten after every student run, and on Ctrl-C (or `timeout --signal=INT`) the runs
    finished so far are reported before exiting with status 130."""
    seed_list = [int(s) for s in seeds.split(",")]
    if quick:
        opts.update({k: v for k, v in QUICK.items() if k != "seeds"})
        seed_list = list(QUICK["seeds"])
    method_list = [m for m in ("sid", "sida", "sid2a") if m in {m.strip() for m in methods.split(",")}]
    if "sid2a" in method_list and "sid" not in method_list:
        raise click.UsageError("sid2a starts from the SiD generator: include sid in --methods")
    out_path = Path(out).resolve()
    out_path.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    mix = ToyMixture.create(device=device)
    evaluator = Evaluator(mix, opts["eval_samples"], seed=123, device=device)
    click.echo(f"data floor ({opts['eval_samples']} true samples): {evaluator.floor}")

    teacher_path, teacher_seconds = train_teacher(mix, opts, out_path)
    teacher = load_network(teacher_path, device=device)
    record = {
        "settings": {**opts, "seeds": seed_list, "methods": method_list, "preset": PRESET, "quick": quick},
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "floor": evaluator.floor,
        "teacher": {
            "heun_63": evaluator.heun(teacher),
            "one_step_denoiser": evaluator.one_step(teacher, 2.5),
            "seconds": teacher_seconds,
        },
        "runs": [],
        "interrupted": False,
    }
    del teacher
    click.echo(f"teacher: {teacher_seconds:.0f} s; {record['teacher']}")
    try:
        for seed in seed_list:
            sid_export = None
            for method in method_list:
                init = sid_export if method == "sid2a" else None
                run = train_student(mix, opts, out_path, teacher_path, method, seed, evaluator, init)
                sid_export = run["export"] if method == "sid" else sid_export
                record["runs"].append(run)
                write_report(record, out_path, start)
                if len(record["runs"]) == 1:  # known early, so a run that would overrun can be stopped
                    rest = (len(seed_list) * len(method_list) - 1) * run["seconds"]
                    click.echo(f"projected: {(time.perf_counter() - start + rest) / 60:.1f} min in all")
    except KeyboardInterrupt:
        record["interrupted"] = True
        click.echo(f"interrupted: reporting the {len(record['runs'])} finished student runs")
    table = write_report(record, out_path, start)
    click.echo(table)
    click.echo(
        f"wrote {out_path}/results.json, fd_vs_kimg.png, results.md in {record['total_seconds']:.0f} s"
    )
    if record["interrupted"]:
        sys.exit(130)


if __name__ == "__main__":
    main()
