"""Time full SiDA iterations of the real training loop (both updates, EMA, forced normalisation, real
DeepSpeed engines) on random weights and synthetic latents, and report img/s, MFU and peak memory.

    python benchmarks/train_step.py --preset edm2-img512-xs --batch-gpu 64
    torchrun --nproc_per_node 2 benchmarks/train_step.py --preset edm2-img512-m --batch-gpu 32 --zero-stage 2
    python benchmarks/train_step.py --preset edm2-img512-xxl --batch-gpu 16 --activation-checkpointing \
        --out results/xxl.json
    python benchmarks/train_step.py --channels-last --compile   # speed switches (sida_edm2.model.speed)
    python benchmarks/train_step.py --no-weight-cache --no-weight-recompute    # "eager": the plain networks
    python benchmarks/train_step.py --profile results/xs64-profile.txt    # where the GPU time goes
    python benchmarks/train_step.py --fused --fused-adam --channels-last  # the fused kernels (GPU)
    python benchmarks/train_step.py --ceiling     # + the iteration's forward and backward passes alone

One line of JSON per run goes to --out (appended), so a shell loop over configurations builds a table;
`--table results.jsonl` prints such a file as markdown. The teacher is an export with random weights
(gains set to 1 so that no layer computes zeros) written once to --workdir. Iterations run in the SiDA
phase (both updates, adversarial terms on). FLOPs per image come from sida_edm2.plan.flops (counted once per
preset on the meta device); MFU is against the dense bf16 peak of 989.4 TFLOP/s, the H100 SXM's and
also the H200's (same GH100 compute; the H200 differs in memory). --profile runs two more
iterations under the torch profiler after the timed ones and writes the GPU time by kernel category
(sida_edm2-independent name matching: convolution/GEMM, attention, Triton, elementwise, reductions, ...)
and the top kernels to a text file, next to a Chrome trace (.json.gz) of those iterations; the JSON
line then also holds the GPU busy share of the wall time and the kernels per iteration.

--ceiling also times, after the loop (and after its peak memory was read), the same networks (same
switches, the engines' own modules) doing only the iteration's forward and backward passes back to
back: the iteration replica of sida_edm2.plan.flops (both updates, the same FLOPs), gradients taken with
torch.autograd.grad (so no DeepSpeed hook, optimizer step, EMA, normalisation or loss bookkeeping
runs). `loop_over_ceiling`, the loop's time over the ceiling's, is what the loop logic costs.
"""

import collections
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sida_edm2.io.network_files import save_export
from sida_edm2.model import speed
from sida_edm2.model.networks import Precond
from sida_edm2.model.presets import get_preset
from sida_edm2.plan.flops import (
    H100_SXM_BF16_DENSE_PEAK,
    IterationNetworks,
    count_iteration_flops,
    fake_score_pass,
    generator_pass,
    mfu,
)
from sida_edm2.plan.memory import predict_peak_bytes
from sida_edm2.train.config import resolve_config
from sida_edm2.train.engines import fused_kernels_available
from sida_edm2.train.trainer import Trainer

GIB = 2**30
PEAK = H100_SXM_BF16_DENSE_PEAK


def random_teacher(preset: str, workdir: Path) -> Path:
    """An export of the preset's network with random weights and unit gains (written once, by rank 0)."""
    path = workdir / f"teacher-{preset}.safetensors"
    done = path.with_suffix(".done")
    if int(os.environ.get("RANK", "0")) == 0 and not done.exists():
        torch.manual_seed(0)
        net = Precond(**get_preset(preset)["network"])
        with torch.no_grad():
            for name, param in net.named_parameters():
                if name.endswith("_gain"):
                    param.fill_(1.0)
        save_export(net, path)
        done.touch()
    while not done.exists():
        time.sleep(1)
    return path


def synthetic_batches(batch_gpu: int, network: dict, device: torch.device):
    """Endless real-data micro-batches: unit-scale latents and one-hot labels, already on the device."""
    shape = [batch_gpu, network["img_channels"], network["img_resolution"], network["img_resolution"]]
    gen = torch.Generator(device).manual_seed(1)
    while True:
        latents = torch.randn(shape, generator=gen, device=device) * 0.5
        labels = torch.randint(network["label_dim"], [batch_gpu], generator=gen, device=device)
        yield latents, torch.nn.functional.one_hot(labels, network["label_dim"]).float()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


# Kernel-name patterns, first match wins: which kind of work a CUDA kernel does.
KERNEL_CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("convolution/GEMM", ("conv", "gemm", "cudnn", "cutlass", "xmma", "nvjet", "sm90_", "sm80_", "grad")),
    ("Triton (compiled)", ("triton",)),
    ("reduction", ("reduce", "norm")),
    ("copy/cast", ("copy", "memcpy", "memset", "cat", "fill")),
    ("communication", ("nccl",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "foreach", "silu", "lerp", "clamp")),
)


def kernel_category(name: str) -> str:
    lower = name.lower()
    return next((cat for cat, keys in KERNEL_CATEGORIES if any(k in lower for k in keys)), "other")


def ceiling_iteration(trainer):
    """One iteration's forward and backward passes only (see the module docstring), as a function."""
    cfg = trainer.cfg
    nets = IterationNetworks(
        generator=trainer.engine_g.module,
        fake_score=trainer.engine_f.module,
        teacher=trainer.teacher,
        settings=cfg.to_dict(),  # the run's loss settings (sigma_init, tmax, alpha, lambdas)
        cache_fake_score_weights=cfg.weight_cache,
    )
    trained = {
        net: [p for p in net.parameters() if p.requires_grad] for net in (nets.generator, nets.fake_score)
    }

    def run() -> None:
        torch.autograd.grad(fake_score_pass(nets, cfg.batch_gpu), trained[nets.fake_score])
        torch.autograd.grad(generator_pass(nets, cfg.batch_gpu), trained[nets.generator])
        speed.cache_effective_weights(nets.fake_score, False)  # the loop recomputes them every update

    return run


def profile_iterations(iteration, iterations: int, path: Path | None) -> dict:
    """Run `iterations` calls of `iteration` under the torch profiler; write the GPU time by kernel
    category, the busy fraction of the wall time, and the 25 most expensive kernels to `path` (plus a
    trace; nothing is written for None). Returns the busy share and the kernels per iteration."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    sync()
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iterations):
            iteration()
        sync()
    wall = time.perf_counter() - start
    kernels = collections.defaultdict(lambda: [0.0, 0])  # name -> [GPU microseconds, calls]
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name][0] += event.device_time
            kernels[event.name][1] += 1
    by_category = collections.defaultdict(lambda: [0.0, 0])
    for name, (us, calls) in kernels.items():
        by_category[kernel_category(name)][0] += us
        by_category[kernel_category(name)][1] += calls
    busy = sum(us for us, _ in kernels.values()) / 1e6
    summary = dict(
        gpu_busy=busy / wall, kernels_per_iteration=sum(calls for _, calls in kernels.values()) / iterations
    )
    lines = [f"{iterations} iterations, wall {wall:.3f} s, GPU kernel time {busy:.3f} s "
             f"({100 * busy / wall:.0f}% of wall; the rest is the GPU waiting for the host)", "",
             "| category | GPU s | share | kernels |", "|---|---|---|---|"]  # fmt: skip
    for cat, (us, calls) in sorted(by_category.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {cat} | {us / 1e6:.3f} | {100 * us / 1e6 / max(busy, 1e-9):.1f}% | {calls} |")
    lines += ["", "| kernel | category | GPU ms | calls |", "|---|---|---|---|"]
    for name, (us, calls) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]:
        lines.append(f"| {name[:110]} | {kernel_category(name)} | {us / 1e3:.1f} | {calls} |")
    if path is None:
        return summary
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    trace = path.with_suffix(".trace.json")
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    print("\n".join(lines[:12]))
    return summary


def options_label(cfg) -> str:
    """The speed switches of a run, e.g. "cache+recompute+cl+compile"; "eager" when all are off."""
    names = [("cache", cfg.weight_cache), ("recompute", cfg.weight_recompute),
             ("cl", cfg.channels_last), ("compile", cfg.compile), ("fused", cfg.fused),
             ("fadam", cfg.fused_adam)]  # fmt: skip
    return "+".join(name for name, on in names if on) or "eager"


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.0f}%"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _count(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f}"


def print_table(path: str) -> None:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    head = (
        "| preset | GPUs | batch/GPU | ZeRO | ckpt | options | img/s/GPU | s/kimg | TFLOP/s/GPU | "
        "MFU | loop/ceiling | GPU busy | kernels/it | fake-score s | G s | peak alloc GiB | reserved GiB | "
        "predicted GiB |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        ckpt = "on" if r["activation_checkpointing"] else "off"
        print(
            f"| {r['preset']} | {r['gpus']} | {r['batch_gpu']} | {r['zero_stage']} | {ckpt} | "
            f"{r.get('options', 'cache+recompute')} | "
            f"{r['img_s_gpu']:.1f} | {r['s_per_kimg']:.2f} | {r['tflops_gpu']:.0f} | {100 * r['mfu']:.1f}% | "
            f"{_ratio(r.get('loop_over_ceiling'))} | {_percent(r.get('gpu_busy'))} | "
            f"{_count(r.get('kernels_per_iteration'))} | "
            f"{r['fake_score_s']:.3f} | {r['generator_s']:.3f} | "
            f"{r['peak_allocated_gib']:.1f} | {r['peak_reserved_gib']:.1f} | {r['predicted_gib']:.1f} |"
        )


@click.command()
@click.option("--preset", default="edm2-img512-xs", show_default=True, help="Network preset.")
@click.option("--batch-gpu", type=int, default=None, help="Images per GPU per micro-batch [preset].")
@click.option("--rounds", type=int, default=1, show_default=True, help="Accumulation rounds per step.")
@click.option("--zero-stage", type=click.IntRange(0, 3), default=2, show_default=True, help="ZeRO stage.")
@click.option("--precision", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True)
@click.option("--activation-checkpointing", is_flag=True, help="Recompute UNet blocks in backward.")
@click.option("--teacher-zero3", is_flag=True, help="Partition the teacher with ZeRO-3.")
@click.option("--weight-cache/--no-weight-cache", default=True, show_default=True,
              help="Baked teacher weights; cached fake-score weights in the generator update.")  # fmt: skip
@click.option("--weight-recompute/--no-weight-recompute", default=None,
              help="Recompute normalised weights in backward, not kept [preset].")  # fmt: skip
@click.option("--channels-last/--no-channels-last", default=None, help="Channels-last activations [config].")
@click.option("--compile", "compile_blocks", is_flag=True, help="torch.compile every UNet block.")
@click.option("--fused/--no-fused", default=None, help="Fused Triton kernels for the MP chains [config].")
@click.option("--fused-adam/--no-fused-adam", default=None, help="torch's fused Adam kernel [config].")
@click.option("--ceiling", is_flag=True, help="Also time the iteration's forward+backward passes alone.")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed iterations first.")
@click.option("--iters", type=int, default=5, show_default=True, help="Timed iterations.")
@click.option("--workdir", default=None, help="Where the random teacher is written [a temp dir].")
@click.option("--out", default=None, help="Append one JSON line with the results to this file.")
@click.option("--profile", default=None, help="Also profile 2 iterations; write the kernel summary here.")
@click.option("--table", default=None, help="Only print the markdown table of a results file, then exit.")
def main(
    preset,
    batch_gpu,
    rounds,
    zero_stage,
    precision,
    activation_checkpointing,
    teacher_zero3,
    weight_cache,
    weight_recompute,
    channels_last,
    compile_blocks,
    fused,
    fused_adam,
    ceiling,
    warmup,
    iters,
    workdir,
    out,
    profile,
    table,
):
    if table:
        print_table(table)
        return
    workdir = Path(workdir or tempfile.gettempdir())
    workdir.mkdir(parents=True, exist_ok=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    preset_cfg = get_preset(preset)
    batch_gpu = batch_gpu or preset_cfg["batch_gpu"]
    teacher = random_teacher(preset, workdir)
    cfg = resolve_config(
        preset,
        run_dir=str(workdir / f"run-{preset}-{os.getpid()}"),
        external_data=True,
        teacher=str(teacher),
        method="sida",
        batch=batch_gpu * rounds * world,
        batch_gpu=batch_gpu,
        zero_stage=zero_stage,
        precision=precision,
        activation_checkpointing=activation_checkpointing,
        teacher_zero3=teacher_zero3,
        weight_cache=weight_cache,
        weight_recompute=weight_recompute,
        channels_last=channels_last,
        compile=compile_blocks,
        fused=fused,
        fused_adam=fused_adam,
        fake_only_kimg=0.0,
        sid_only_kimg=0.0,
        max_kimg=1e9,
        checkpoint_kimg=1e9,
        tick_kimg=1e9,
    )
    # A CPU run (fp32, tiny presets) only smoke-tests this script: its numbers mean nothing.
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(cfg, data_iter=synthetic_batches(batch_gpu, preset_cfg["network"], device))
    # The warm-up includes torch.compile's compilation with --compile: its time is reported apart.
    warmup_s = timed(lambda: [trainer.run_iteration() for _ in range(warmup)])
    # Time the loop's own run_iteration; its two updates are wrapped to split the time by update.
    split = {"fake_score_s": 0.0, "generator_s": 0.0}
    for method, key in (("fake_score_update", "fake_score_s"), ("generator_update", "generator_s")):
        update = getattr(trainer, method)

        def timed_update(*args, update=update, key=key):
            split[key] += timed(lambda: update(*args)) / iters

        setattr(trainer, method, timed_update)
    total = 0.0
    for _ in range(iters):
        total += timed(trainer.run_iteration)
    seconds = total / iters
    peak_allocated = torch.cuda.max_memory_allocated(device) / GIB if cuda else 0.0
    peak_reserved = torch.cuda.max_memory_reserved(device) / GIB if cuda else 0.0
    measured = {}
    if ceiling:
        passes = ceiling_iteration(trainer)
        passes()  # its first call fills the allocator's new pool shapes
        ceiling_s = sum(timed(passes) for _ in range(iters)) / iters
        measured = dict(ceiling_s=ceiling_s, loop_over_ceiling=seconds / ceiling_s)
    if profile:  # every rank iterates (collectives); rank 0 writes
        for method in ("fake_score_update", "generator_update"):
            delattr(trainer, method)  # the profiler sees the plain loop, not the timing wrappers
        rank0 = int(os.environ.get("RANK", "0")) == 0
        measured.update(profile_iterations(trainer.run_iteration, 2, Path(profile) if rank0 else None))
    images = batch_gpu * rounds
    flops = count_iteration_flops(preset, method="sida").per_image
    img_s = images / seconds
    plan = predict_peak_bytes(
        preset,
        batch_gpu,
        world,
        zero_stage,
        activation_checkpointing,
        teacher_zero3,
        precision=precision,
        weight_recompute=cfg.weight_recompute,
        fused=cfg.fused and fused_kernels_available(),  # what the networks ran
    )
    result = dict(
        preset=preset,
        gpus=world,
        batch_gpu=batch_gpu,
        rounds=rounds,
        zero_stage=zero_stage,
        precision=precision,
        activation_checkpointing=activation_checkpointing,
        teacher_zero3=teacher_zero3,
        options=options_label(cfg),
        device=torch.cuda.get_device_name(device) if cuda else "cpu",
        img_s_gpu=img_s,
        s_per_kimg=1000 / (img_s * world),
        iteration_s=seconds,
        tflops_gpu=flops * img_s / 1e12,
        mfu=mfu(flops * img_s, PEAK),
        peak_allocated_gib=peak_allocated,
        peak_reserved_gib=peak_reserved,
        predicted_gib=plan.total / GIB,
        predicted_terms={k: v / GIB for k, v in plan.terms().items()},
        flops_per_image=flops,
        warmup_s=warmup_s,
        compiled_graphs=torch._dynamo.utils.counters["stats"]["unique_graphs"],
        **split,
        **measured,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(result) + "\n")
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
