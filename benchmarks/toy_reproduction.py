"""Can a one-step student beat its teacher, does SiDA get there faster than SiD, does SiD²A improve a SiD
generator quickly? The paper's three claims, tested on a distribution whose denoiser is known exactly.

    python benchmarks/toy_reproduction.py --out runs/toy --copy-to <dir> --time-budget-s 520   # one H200
    python benchmarks/toy_reproduction.py --out /tmp/toy --quick         # CPU smoke run, 2-4 min on 2 cores

Data: `benchmarks/toy_mixture.py` on 4x8x8 latents: 10 classes, each a mixture of 4 Gaussians (weights
0.4/0.3/0.2/0.1) with smooth means and rank-4 smooth covariances in a 124-dimensional signal subspace,
isotropic noise of std 0.05 in all 256 dimensions. Fresh samples feed every micro-batch.
Networks: preset `toy` (sida_edm2/model/presets.py: the demo network on 8x8 latents).

Jobs (each a separate process, run concurrently up to --jobs; the GPU is shared):
  reference     the data floor (true samples) and the exact-score sampler (the mixture's exact denoiser,
                EDM2's Heun sampler, 63 evaluations) on the evaluation noise
  teacher       an EDM2 network trained with EDM2's loss (`--method edm2`) for --teacher-kimg at batch
                --teacher-batch, lr 0.02, on purpose briefly: good but imperfect; scored with Heun at 63
                evaluations and with one denoising step
  sid-exact-sN  the control: SiD distilled from the exact denoiser (`Trainer(..., teacher=...)`), G and the
                fake score starting from the trained teacher's weights like every other student
  sid-sN, sida-sN       SiD and SiDA distilled from the teacher
  sida-psi-sN   ablation: SiDA with lambda_adv_psi scaled by the latent size, 100 * 256 / 16384 = 1.5625
                (the DSM term sums over latent elements, the discriminator term is a mean, so the
                preset's weight was tuned for XS's 16,384 elements)
  sid2a-sN      SiD²A from the final EMA generator of sid-sN, for --sid2a-iters more iterations
Settings (preset `toy`, i.e. XS's SiDA settings): batch 2048, Adam betas (0, 0.999), eps 1e-6,
lambda_sid 100, lambda_adv_theta 0.01, lambda_adv_psi 100, alpha 1, sigma_init 2.5, tmax 0.8, EMA
half-life 2 Mimg with ramp-up 0.05, forced normalisation; SiDA/SiD²A: fake-score-only while at most
100,000 images were seen, SiD alone up to 200,000, then SiDA (strictly more, as the release); SiD
trains G from the first iteration (the release's rule, `training_phase`).
Deviations, forced by the budget of two 10-minute device calls:
  - lr 3e-4 instead of 5e-5: a time compression. SiDA on XS passes its teacher after about 10 Mimg
    (~4,900 iterations); here each student has --iters (800) iterations, about 6x fewer.
  - 8x8 latents and the demo-sized network (1.8M parameters), fp32: one iteration of the demo network on
    16x16 latents costs 4x more, which 15 students x 800 (SiD²A 400) iterations could not afford.
  - SiD²A runs --sid2a-iters (400) iterations after SiD's 800 (1,200 in all for its generator).
Every --eval-every iterations (and at 0 and at the end) the EMA generator makes --eval-samples one-step
latents from fixed noise with balanced classes, scored by `MixtureScores` (toy_mixture.py): cfd
(class-conditional Fréchet distance in the signal subspace; the primary score), noise_var_ratio,
precision, recall, modes_covered (densities: a few times the true noise variance zeroes them), and
structure_precision / structure_recall (k-NN, at the scale of the modes: they still see whether samples
sit on and cover the modes when the noise level is off). The same scores are reported for the data
floor, the exact-score sampler and the teacher (63 evaluations).

Decision rules, fixed before the run (T, E: the teacher's and the exact-score sampler's cfd; a student's
score is its cfd at its last evaluation; "every seed" means every seed asked for, all finished):
  Gate (control): passes if every sid-exact seed ends at cfd <= E + 0.5 (T - E), i.e. the budget lets a
    student with a perfect teacher get at least halfway from the teacher's level to the exact sampler's.
    A failed gate turns every "refuted" below into "inconclusive" (a claim can still be confirmed).
  Claim 1 (one step beats the teacher): confirmed if every SiDA seed ends below T; refuted if at most one
    does (with 3 or more seeds); otherwise inconclusive.
  Claim 2 (SiDA converges much faster than SiD): per seed, i_A and i_D are the iterations at which SiDA
    and SiD first reach 1.25 T (linear interpolation between evaluations; never reached: i_D counts as
    the budget, i_A as infinite). Confirmed if every seed has i_A finite and i_D >= 3 i_A; refuted if a
    majority of seeds has i_D < 1.5 i_A; otherwise inconclusive.
  Claim 3 (SiD²A improves quickly on SiD): per seed, r = cfd(SiD²A end) / cfd(SiD end) and SiD's own pace
    p = cfd(SiD end) / cfd(SiD at --sid2a-iters before its end). Confirmed if every seed has r <= 0.8 and
    1 - r >= 2 (1 - p); refuted if at most one seed has 1 - r > 1 - p; otherwise inconclusive.
  The sida-psi ablation is reported with claim 1's and claim 2's numbers, outside the decisions.

Resumable and time-boxed: everything lives in --out; finished jobs are kept, an unfinished student
checkpoints before --time-budget-s runs out and continues from there on the next call with the same
--out (same settings, checked), and no job starts with less than --min-start-s left. results.json,
results.md and curves.png are rewritten every --report-every-s and at the end; every process prints its
iterations per second. Ctrl-C stops the jobs (each checkpoints first) and writes the report.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from benchmarks.toy_mixture import MixtureDenoiser, MixtureScores, ToyMixture
from benchmarks.toy_report import write_report
from sida_edm2.io.network_files import load_network
from sida_edm2.sample.sampling import compute_dtype, denoise, heun_sampler
from sida_edm2.train.config import resolve_config
from sida_edm2.train.trainer import Trainer

PRESET = "toy"
SHAPE = (4, 8, 8)
XS_LATENT_ELEMENTS = 4 * 64 * 64  # what lambda_adv_psi was tuned for
PAUSED = 3  # a worker's exit status when it checkpointed at the deadline (resumable)
SAVE_MARGIN_S = 20.0  # a checkpoint and a clean exit take well under this
STOP = threading.Event()  # set by SIGTERM / SIGINT in a worker
VARIANTS = ("sid-exact", "sid", "sida", "sida-psi", "sid2a")
QUICK = dict(
    iters=6,
    sid2a_iters=4,
    batch=32,
    teacher_kimg=0.192,
    teacher_batch=32,
    eval_every=3,
    eval_samples=100,
    reference_samples=600,
    seeds="0",
    jobs=2,
    fake_only_kimg=0.064,
    sid_only_kimg=0.128,
    checkpoint_every=4,
)


# ----------------------------------------------------------------------------------------------------
# Evaluation: fixed noise and balanced labels, scored against the mixture.


class Evaluator:
    """The same fixed noise, labels and reference percentiles in every process (all seeded)."""

    def __init__(self, settings: dict, device: torch.device, batch: int = 2500):
        self.mix = ToyMixture.create(shape=SHAPE, device=device)
        gen = torch.Generator(device).manual_seed(123)
        n = settings["eval_samples"]
        self.scores = MixtureScores(self.mix, gen, settings["reference_samples"])
        self.noise = torch.randn([n, *SHAPE], generator=gen, device=device)
        self.labels = torch.arange(n, device=device) % self.mix.num_classes
        self.onehot = torch.nn.functional.one_hot(self.labels, self.mix.num_classes).float()
        self.batch, self.device, self.gen = batch, device, gen

    def _batched(self, fn) -> torch.Tensor:
        pairs = zip(self.noise.split(self.batch), self.onehot.split(self.batch), strict=True)
        return torch.cat([fn(z, c) for z, c in pairs])

    def score(self, x: torch.Tensor) -> dict:
        return self.scores.score(x, self.labels)

    def floor(self) -> dict:
        """True samples for the evaluation's labels (what a perfect sampler scores at this n)."""
        x, _, _ = self.mix.sample_with_modes(len(self.labels), self.gen, self.labels)
        return self.score(x)

    @torch.no_grad()
    def one_step(self, net: torch.nn.Module, sigma: float) -> dict:
        was_training = net.training
        net.eval()
        with compute_dtype(net, torch.float32):  # scores in fp32 whatever the training precision
            x = self._batched(lambda z, c: denoise(net, sigma * z, sigma, c))
        net.train(was_training)
        return self.score(x)

    @torch.no_grad()
    def heun(self, net: torch.nn.Module, num_steps: int = 32) -> dict:
        with compute_dtype(net, torch.float32):
            return self.score(self._batched(lambda z, c: heun_sampler(net, z, c, num_steps=num_steps)))


# ----------------------------------------------------------------------------------------------------
# Jobs.


def student_jobs(settings: dict) -> dict[str, dict]:
    """name -> {variant, seed, after (jobs that must be done first)} for every student."""
    jobs = {}
    for seed in settings["seeds"]:
        for variant in settings["variants"]:
            after = ["teacher"] + ([f"sid-s{seed}"] if variant == "sid2a" else [])
            jobs[f"{variant}-s{seed}"] = {"variant": variant, "seed": seed, "after": after}
    return jobs


def all_jobs(settings: dict) -> dict[str, dict]:
    return {"reference": {"after": []}, "teacher": {"after": []}, **student_jobs(settings)}


def write_json(path: Path, value) -> None:
    """Whole-file replace, so that a reader (or a kill) never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def run_config(settings: dict, out: Path, name: str, **overrides):
    return resolve_config(
        PRESET,
        str(out / "runs" / name),
        external_data=True,
        seed=overrides.pop("seed"),
        batch_gpu=overrides["batch"],
        precision="fp32",  # the 1.8M-parameter network gains little from bf16; SiD's signal is a difference
        zero_stage=0,  # one GPU: nothing to partition
        keep_checkpoints=1,
        checkpoint_kimg=1e9,  # checkpoints are this script's (drive), not train()'s
        tick_kimg=1e9,
        **overrides,
    )


def drive(trainer: Trainer, iters: int, deadline: float, checkpoint_every: int, on_iteration=None) -> bool:
    """Iterate up to `iters`, checkpointing every `checkpoint_every` iterations and before `deadline`
    (then return False: paused); True when the run is complete. Prints the iterations per second, and
    appends them to speed.jsonl in the run folder: `it_per_s` counts everything (scoring, saves),
    `train_it_per_s` the training iterations alone."""
    start, first = time.perf_counter(), trainer.iteration
    slowest = training = 0.0
    complete = True
    while trainer.iteration < iters:
        if time.time() + slowest + SAVE_MARGIN_S > deadline or STOP.is_set():
            click.echo(f"pausing at iteration {trainer.iteration} (time budget or SIGTERM)")
            complete = False
            break
        t0 = time.perf_counter()
        trainer.run_iteration()
        step = time.perf_counter() - t0
        training += step
        if on_iteration is not None:
            on_iteration(trainer)
        slowest = max(slowest, time.perf_counter() - t0)
        if trainer.iteration % checkpoint_every == 0 and trainer.iteration < iters:
            trainer.save()
        if trainer.iteration % 25 == 0 or trainer.iteration == iters:
            rate = (trainer.iteration - first) / (time.perf_counter() - start)
            click.echo(f"iteration {trainer.iteration}/{iters}: {rate:.2f} it/s (incl. scoring, saves)")
    trainer.save()
    done, seconds = trainer.iteration - first, time.perf_counter() - start
    speed = {"iterations": done, "seconds": seconds, "it_per_s": done / seconds if seconds else 0.0}
    speed["train_it_per_s"] = done / training if training else 0.0
    with (Path(trainer.cfg.run_dir) / "speed.jsonl").open("a") as f:
        f.write(json.dumps(speed) + "\n")
    click.echo(
        f"{done} iterations in {seconds:.0f} s: {speed['it_per_s']:.2f} it/s, training alone "
        f"{speed['train_it_per_s']:.2f} it/s"
    )
    return complete


def job_reference(settings: dict, out: Path, device: torch.device, deadline: float) -> bool:
    evaluator = Evaluator(settings, device)
    exact = MixtureDenoiser(evaluator.mix)
    write_json(out / "reference.json", {"floor": evaluator.floor(), "exact_heun_63": evaluator.heun(exact)})
    return True


def job_teacher(settings: dict, out: Path, device: torch.device, deadline: float) -> bool:
    mix = ToyMixture.create(shape=SHAPE, device=device)
    batch = settings["teacher_batch"]
    cfg = run_config(
        settings,
        out,
        "teacher",
        method="edm2",
        batch=batch,
        lr=settings["teacher_lr"],
        seed=1000,
        max_kimg=settings["teacher_kimg"],
    )
    trainer = Trainer(cfg, data_iter=fresh_batches(mix, batch, 1000, lambda: trainer))
    iters = round(settings["teacher_kimg"] * 1000 / batch)
    if not drive(trainer, iters, deadline, settings["checkpoint_every"]):
        return False
    trainer.log.close()
    evaluator = Evaluator(settings, device)
    teacher = load_network(out / "runs" / "teacher" / "export-latest.safetensors", device=device)
    score = {"heun_63": evaluator.heun(teacher), "one_step": evaluator.one_step(teacher, cfg.sigma_init)}
    write_json(out / "runs" / "teacher" / "score.json", score)
    return True


def fresh_batches(mix: ToyMixture, batch: int, seed: int, trainer_of):
    """Fresh mixture batches seeded by `seed` and the iteration the run starts at, so that a resumed run
    does not replay its first batches. A generator's body runs at the first next(), i.e. inside the
    first iteration, when `trainer_of()` (the Trainer being built) exists and has resumed."""
    yield from mix.batches(batch, seed=seed + 1_000_003 * trainer_of().iteration)


def job_student(settings: dict, out: Path, device: torch.device, deadline: float, name: str) -> bool:
    job = student_jobs(settings)[name]
    variant, seed = job["variant"], job["seed"]
    method = {"sid-exact": "sid", "sida-psi": "sida"}.get(variant, variant)
    evaluator = Evaluator(settings, device)
    overrides = dict(method=method, batch=settings["batch"], lr=settings["lr"], seed=seed)
    teacher_file = out / "runs" / "teacher" / "export-latest.safetensors"
    overrides["teacher"] = str(teacher_file)
    # SiD ignores both (training_phase: G trains from the first iteration, as in the release).
    overrides.update(fake_only_kimg=settings["fake_only_kimg"], sid_only_kimg=settings["sid_only_kimg"])
    if variant == "sida-psi":
        overrides["lambda_adv_psi"] = settings["lambda_adv_psi_scaled"]
    if variant == "sid2a":
        overrides["init_generator"] = str(out / "runs" / f"sid-s{seed}" / "export-latest.safetensors")
    iters = settings["sid2a_iters"] if variant == "sid2a" else settings["iters"]
    overrides["max_kimg"] = iters * settings["batch"] / 1000
    cfg = run_config(settings, out, name, **overrides)
    exact = MixtureDenoiser(evaluator.mix) if variant == "sid-exact" else None
    mix = evaluator.mix
    data = fresh_batches(mix, cfg.batch_gpu, 10_000 + 100 * seed, lambda: trainer)
    trainer = Trainer(cfg, data_iter=data, teacher=exact)
    curve_path = Path(cfg.run_dir) / "curve.jsonl"
    kept = []
    if curve_path.exists():  # scores after the checkpoint resumed from are recomputed
        kept = [json.loads(line) for line in curve_path.read_text().splitlines() if line.strip()]
        kept = [p for p in kept if p["iteration"] <= trainer.iteration]
    curve_path.write_text("".join(json.dumps(p) + "\n" for p in kept))

    def evaluate(tr: Trainer) -> None:
        if tr.iteration % settings["eval_every"] and tr.iteration != iters:
            return
        point = {"iteration": tr.iteration, "kimg": tr.nimg / 1000, "time": time.time()}
        point.update(evaluator.one_step(tr.ema_network(device), cfg.sigma_init))
        with curve_path.open("a") as f:
            f.write(json.dumps(point) + "\n")

    if not kept:
        evaluate(trainer)
    complete = drive(trainer, iters, deadline, settings["checkpoint_every"], evaluate)
    trainer.log.close()
    return complete


# ----------------------------------------------------------------------------------------------------
# The scheduler.


def done_marker(out: Path, name: str) -> Path:
    return out / "done" / f"{name}.json"


def run_worker(out: Path, name: str, deadline: float) -> None:
    """One job in this process; exit status 0 done, PAUSED checkpointed at the deadline."""
    settings = json.loads((out / "settings.json").read_text())
    for sig in (signal.SIGTERM, signal.SIGINT):  # Ctrl-C (the group's or the scheduler's): checkpoint, exit
        signal.signal(sig, lambda *_: STOP.set())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    if name == "reference":
        complete = job_reference(settings, out, device, deadline)
    elif name == "teacher":
        complete = job_teacher(settings, out, device, deadline)
    else:
        complete = job_student(settings, out, device, deadline, name)
    seconds = time.perf_counter() - start
    if complete:
        write_json(done_marker(out, name), {"seconds_last_call": seconds})
    click.echo(f"{name}: {'done' if complete else 'paused'} after {seconds:.0f} s in this call")
    sys.exit(0 if complete else PAUSED)


def settings_from(opts: dict, quick: bool) -> dict:
    if quick:
        opts.update(QUICK)
    seeds_text = str(opts.pop("seeds"))
    try:
        seeds = [int(s) for s in seeds_text.split(",")]
    except ValueError:
        raise click.UsageError(f"--seeds {seeds_text!r}: comma-separated integers, e.g. 0,1,2") from None
    asked = {v.strip() for v in opts.pop("variants").split(",")}
    if asked - set(VARIANTS):
        raise click.UsageError(f"--variants: unknown {sorted(asked - set(VARIANTS))}; choose from {VARIANTS}")
    variants = [v for v in VARIANTS if v in asked]
    if "sid2a" in variants and "sid" not in variants:
        raise click.UsageError("--variants: sid2a starts from the SiD generator, include sid")
    for name in ("jobs", "time_budget_s", "min_start_s", "report_every_s", "copy_to"):
        opts.pop(name)
    elements = SHAPE[0] * SHAPE[1] * SHAPE[2]
    return {
        **opts,
        "seeds": seeds,
        "variants": variants,
        "quick": quick,
        "preset": PRESET,
        "shape": list(SHAPE),
        "lambda_adv_psi_scaled": 100.0 * elements / XS_LATENT_ELEMENTS,
    }


def report(out: Path, settings: dict, copy_to: Path | None) -> str:
    """The report in --out and, with --copy-to, a copy of it plus logs.tgz (logs and curves) there."""
    table = write_report(out, settings)
    if copy_to is not None:
        copy_to.mkdir(parents=True, exist_ok=True)
        for name in ("results.json", "results.md", "curves.png"):
            if (out / name).exists():
                shutil.copyfile(out / name, copy_to / name)
        with tarfile.open(copy_to / "logs.tgz", "w:gz") as tar:
            for path in sorted(
                [*out.glob("logs/*.log"), *out.glob("runs/*/curve.jsonl"), *out.glob("*.json")]
            ):
                tar.add(path, arcname=str(path.relative_to(out)))
    return table


def schedule(
    out: Path, settings: dict, jobs: int, deadline: float, min_start_s: float, report_every_s, copy_to
):
    """Launch every job whose prerequisites are done, up to `jobs` at once, while time remains."""
    todo = {name: job for name, job in all_jobs(settings).items() if not done_marker(out, name).exists()}
    running: dict[str, subprocess.Popen] = {}
    failed: list[str] = []
    last_report = 0.0
    (out / "logs").mkdir(exist_ok=True)
    (out / "done").mkdir(exist_ok=True)
    try:
        while todo or running:
            for name, proc in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[name]
                state = {0: "done", PAUSED: "paused (checkpointed, resumes on the next call)"}
                click.echo(f"[{time.strftime('%H:%M:%S')}] {name}: {state.get(rc, f'FAILED (exit {rc})')}")
                if rc not in (0, PAUSED):
                    failed.append(name)
                last_report = 0.0
            blocked = set(failed) | set(running)
            for name, job in list(todo.items()):
                if name in blocked or len(running) >= jobs:
                    continue
                if any(not done_marker(out, dep).exists() for dep in job["after"]):
                    continue
                if deadline - time.time() < min_start_s:
                    continue
                log = (out / "logs" / f"{name}.log").open("a")
                cmd = [
                    sys.executable,
                    __file__,
                    "--out",
                    str(out),
                    "--worker",
                    name,
                    "--deadline",
                    str(deadline),
                ]
                # Progress in the log as it happens; the cores shared out, not every process on every core.
                threads = str(max(1, (os.cpu_count() or 1) // jobs))
                env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads}
                running[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                del todo[name]
                click.echo(f"[{time.strftime('%H:%M:%S')}] started {name}")
                time.sleep(0.5)  # staggered: each picks a free rendezvous port
            if not running:
                break  # nothing can start: out of time, or waiting on a failed prerequisite
            if time.time() - last_report > report_every_s:
                try:
                    report(out, settings, copy_to)
                except (OSError, ValueError, KeyError, IndexError) as err:  # never stop the jobs for a report
                    click.echo(f"report failed ({err!r}); the jobs go on")
                last_report = time.time()
            time.sleep(2.0)
    except KeyboardInterrupt:
        click.echo("interrupted: every job checkpoints and stops")
        for proc in running.values():
            proc.send_signal(signal.SIGTERM)
        for proc in running.values():
            proc.wait()
    return failed


# ----------------------------------------------------------------------------------------------------
# Command line.


@click.command(context_settings={"show_default": True})
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (resumable).")
@click.option("--quick", is_flag=True, help=f"CPU smoke settings: {QUICK}.")
@click.option("--iters", type=int, default=800, help="Iterations per student (SiD²A: --sid2a-iters).")
@click.option("--sid2a-iters", type=int, default=400, help="SiD²A iterations after SiD's.")
@click.option(
    "--batch", type=int, default=2048, help="Student images per iteration (one GPU, no accumulation)."
)
@click.option("--lr", type=float, default=3e-4, help="Student Adam lr (preset 5e-5; 6x: time compression).")
@click.option("--fake-only-kimg", type=float, default=100.0, help="SiDA/SiD²A fake-score-only warm-up.")
@click.option("--sid-only-kimg", type=float, default=200.0, help="... and SiD alone up to here.")
@click.option("--teacher-kimg", type=float, default=200.0, help="EDM2 teacher training length.")
@click.option("--teacher-batch", type=int, default=512, help="EDM2 teacher batch.")
@click.option("--teacher-lr", type=float, default=2e-2, help="EDM2 teacher Adam lr.")
@click.option("--eval-every", type=int, default=50, help="Scoring interval in iterations.")
@click.option("--eval-samples", type=int, default=10000, help="One-step samples per score (balanced).")
@click.option("--reference-samples", type=int, default=20000, help="True samples for the percentiles.")
@click.option("--checkpoint-every", type=int, default=200, help="Checkpoint interval in iterations.")
@click.option("--seeds", default="0,1,2", help="Student seeds (comma-separated).")
@click.option("--variants", default=",".join(VARIANTS), help="Students to run (sid2a needs sid).")
@click.option("--jobs", type=int, default=14, help="Processes at once (the GPU is shared).")
@click.option("--time-budget-s", type=float, default=540.0, help="Wall time of this call; jobs pause.")
@click.option("--min-start-s", type=float, default=90.0, help="Start no job with less time than this left.")
@click.option("--report-every-s", type=float, default=30.0, help="Rewrite the report this often.")
@click.option(
    "--copy-to",
    type=click.Path(file_okay=False),
    default=None,
    help="Also copy results.json, results.md, curves.png and logs.tgz here at every report.",
)
@click.option("--worker", hidden=True, default=None)
@click.option("--deadline", hidden=True, type=float, default=None)
def main(out: str, quick: bool, worker: str | None, deadline: float | None, **opts) -> None:
    """Run (or continue) the toy reproduction in --out and write results.json, results.md, curves.png."""
    out_path = Path(out).resolve()
    if worker is not None:
        run_worker(out_path, worker, deadline)
    start = time.time()
    jobs, budget = (QUICK["jobs"] if quick else opts["jobs"]), opts["time_budget_s"]
    min_start_s, report_every_s = opts["min_start_s"], opts["report_every_s"]
    settings = settings_from(dict(opts), quick)
    out_path.mkdir(parents=True, exist_ok=True)
    settings_file = out_path / "settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != settings:
        raise click.UsageError(f"--out {out_path} holds a run with other settings: use another folder")
    write_json(settings_file, settings)
    copy_to = Path(opts["copy_to"]).resolve() if opts["copy_to"] else None
    failed = schedule(out_path, settings, jobs, start + budget, min_start_s, report_every_s, copy_to)
    table = report(out_path, settings, copy_to)
    click.echo(table)
    left = [name for name in all_jobs(settings) if not done_marker(out_path, name).exists()]
    click.echo(f"{time.time() - start:.0f} s; results in {out_path}/results.md, results.json, curves.png")
    if failed:
        click.echo(f"failed: {', '.join(failed)} (see {out_path}/logs/)")
        sys.exit(1)
    if left:
        click.echo(f"not finished: {', '.join(left)}; run the same command again to continue")


if __name__ == "__main__":
    main()
