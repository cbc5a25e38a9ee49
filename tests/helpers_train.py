"""Shared pieces of the training tests: a tiny teacher export, a synthetic latent dataset, launching
distributed runs as subprocesses (a process group cannot be re-initialised in-process).

Also a script: `python -m torch.distributed.run --nproc_per_node 2 tests/helpers_train.py SCENARIO OUT
--key value ...` runs one of the SCENARIOS below inside a real multi-process Trainer and writes what the
tests check to the JSON file OUT (rank 0).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # train_edm2.py lives at the repository root, outside the package
    sys.path.insert(0, str(REPO))
PRESET = "tiny"


def make_teacher(path: Path, seed: int = 0, row_rms: float = 3.0) -> Path:
    """A random tiny-preset Precond as an export. Its MPConv rows get RMS `row_rms` (so forced
    normalisation visibly changes them) and its gains are non-zero (a fresh EDM2 network has zero
    out_gain, which would leave every other weight without gradient)."""
    from sida_edm2.io.network_files import save_export
    from sida_edm2.model.networks import Precond
    from sida_edm2.model.presets import get_preset
    from sida_edm2.model.weight_norm import force_normalize_, mp_weight_params

    torch.manual_seed(seed)
    net = Precond(**get_preset(PRESET)["network"])
    with torch.no_grad():
        force_normalize_(net)
        for _, weight in mp_weight_params(net):
            weight.mul_(row_rms)
        for param in net.parameters():
            if param.ndim == 0:  # emb_gain, out_gain
                param.fill_(0.5 + 0.5 * torch.rand([]).item())
    save_export(net, path)
    return path


def make_generator_export(path: Path, seed: int = 1) -> Path:
    """A tiny-preset generator export (no logvar head) with weights unlike the teacher's."""
    from sida_edm2.io.network_files import load_network, save_export
    from sida_edm2.model.networks import Precond

    source = load_network(make_teacher(path.with_name(path.stem + "-source.safetensors"), seed=seed))
    G = Precond(**{**source.init_kwargs, "logvar_channels": 0})
    G.load_state_dict({k: v for k, v in source.state_dict().items() if not k.startswith("logvar_")})
    save_export(G, path)
    return path


def make_dataset(path: Path, num_samples: int = 64, seed: int = 0, nonfinite: bool = False) -> Path:
    """A synthetic tiny-preset latent dataset (4 x 16 x 16 latents, 10 classes) in 4 shards; with
    `nonfinite` every latent holds a NaN (for the tests of dropped samples and skipped steps)."""
    from latent.shards import write_synthetic_dataset
    from sida_edm2.model.presets import get_preset

    network = get_preset(PRESET)["network"]
    res, classes = network["img_resolution"], network["label_dim"]
    rng = np.random.default_rng(seed)
    mean = rng.normal(0.0, 4.0, size=[num_samples, 4, res, res]).astype(np.float32)
    if nonfinite:
        mean[:, 0, 0, 0] = np.nan
    std = np.full_like(mean, 0.5)
    labels = rng.integers(0, classes, size=num_samples)
    write_synthetic_dataset(path, mean, std, labels, num_classes=classes, shard_size=num_samples // 4)
    return path


def end_distributed_script() -> None:
    """The last line of a script run under torch.distributed.run, once its report is written: leave the
    process group, then exit without interpreter teardown. With DeepSpeed engines still alive, that
    teardown aborted a finished rank now and then ("terminate called without an active exception",
    SIGABRT; 2 of ~10 suite runs, test_flat_master.py only, even after the group was destroyed)."""
    from sida_edm2.sample.torchrun_env import leave_process_group

    leave_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.pop("LOCAL_RANK", None)
    return env


def launch_command(script: str, args: list[str], nproc: int) -> list[str]:
    """`python -m torch.distributed.run` of a script with nproc CPU processes (a free port each time)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "--master_addr=127.0.0.1",
        script,
        *args,
    ]


def run_distributed(script: str, args: list[str], nproc: int = 2, timeout: float = 240) -> str:
    """Run to completion; raise with the output when it fails. Returns the combined output."""
    proc = subprocess.run(
        launch_command(script, args, nproc),
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"{script} {args} failed (exit {proc.returncode}):\n{output[-6000:]}")
    return output


def run_scenario(scenario: str, out: Path, nproc: int, **options) -> str:
    """Run one of SCENARIOS (below) under torch.distributed.run; `options` are TrainConfig fields plus
    `iterations`. Booleans travel as JSON."""
    args = [scenario, str(out)]
    for key, value in options.items():
        args += [key, json.dumps(value) if isinstance(value, bool) else str(value)]
    return run_distributed("tests/helpers_train.py", args, nproc=nproc)


def cli_args(teacher: Path | None, run_dir: Path, data: Path | None = None, **flags) -> list[str]:
    """train_edm2.py arguments for the tiny preset and every flag given as key=value."""
    args = ["--preset", PRESET, "--run-dir", str(run_dir), "--num-workers", "0"]
    if teacher is not None:
        args += ["--teacher", str(teacher)]
    if data is not None:
        args += ["--data", str(data)]
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False:
            args += [flag, str(value)]
    return args


# ----------------------------------------------------------------------------------------------------
# Scenarios run inside torch.distributed.run (see the module docstring).


def _master_report(trainer) -> dict:
    """Largest |row RMS - 1| over every MPConv weight of both engines' fp32 master copies, and the
    largest difference between a master weight and the module's working copy (gathered under ZeRO-3)."""
    import deepspeed

    from sida_edm2.model.weight_norm import mp_weight_params
    from sida_edm2.train.ds_master import visit_master_weights

    worst_rms, worst_copy = 0.0, 0.0
    for engine in (trainer.engine_g, trainer.engine_f):
        mp_names = {name for name, _ in mp_weight_params(engine.module)}
        params = dict(engine.module.named_parameters())
        for name, value in visit_master_weights(engine, normalize=False):
            if name in mp_names:
                rms = value.flatten(1).square().mean(dim=1).sqrt()
                worst_rms = max(worst_rms, float((rms - 1).abs().max()))
            param = params[name]
            with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
                worst_copy = max(worst_copy, float((param.data.float() - value).abs().max()))
    return {"max_row_rms_error": worst_rms, "max_working_copy_diff": worst_copy}


def scenario_steps(trainer, iterations: int) -> dict:
    """Run iterations sub-step by sub-step: per iteration the phase, whether each network's fp32
    master weights changed across the other network's update (they must not), losses finite, and at
    the end the worst master-row RMS deviation."""
    from sida_edm2.train.ds_master import master_state_dict
    from sida_edm2.train.losses import training_phase

    cfg = trainer.cfg
    records = []
    for _ in range(iterations):
        phase = training_phase(trainer.nimg, cfg.fake_only_kimg, cfg.sid_only_kimg, cfg.method)
        g0, f0 = master_state_dict(trainer.engine_g), master_state_dict(trainer.engine_f)
        trainer.fake_score_update()
        g1, f1 = master_state_dict(trainer.engine_g), master_state_dict(trainer.engine_f)
        if phase != "fake_only":
            trainer.generator_update(phase)
        g2, f2 = master_state_dict(trainer.engine_g), master_state_dict(trainer.engine_f)
        trainer.nimg += cfg.batch
        trainer.iteration += 1
        records.append(
            {
                "phase": phase,
                "g_same_across_f_update": all(torch.equal(g0[k], g1[k]) for k in g0),
                "f_changed_by_f_update": any(not torch.equal(f0[k], f1[k]) for k in f0),
                "f_same_across_g_update": all(torch.equal(f1[k], f2[k]) for k in f1),
                "g_changed_by_g_update": any(not torch.equal(g1[k], g2[k]) for k in g1),
                "g_engine_steps": trainer.engine_g.global_steps,
            }
        )
    stats = trainer.stats.reduce()
    return {"iterations": records, "stats": stats, **_master_report(trainer)}


def scenario_weights(trainer, iterations: int) -> dict:
    """Run whole iterations; return both engines' fp32 masters and the EMA (written with torch.save)."""
    from sida_edm2.train.ds_master import master_state_dict

    phases = [trainer.run_iteration() for _ in range(iterations)]
    out = {
        "phases": phases,
        "G": master_state_dict(trainer.engine_g),
        "F": master_state_dict(trainer.engine_f),
    }
    ema = trainer.ema_network()  # collective
    if ema is not None:
        out["ema"] = {k: v.detach().clone() for k, v in ema.named_parameters()}
    return out


def scenario_init(trainer, iterations: int) -> dict:
    """Before any step: are G's masters and EMA the --init-generator's weights, the fake score's the
    teacher's? Then run iterations and report the master rows' RMS."""
    from sida_edm2.io.network_files import load_network
    from sida_edm2.train.ds_master import master_state_dict

    init = load_network(trainer.cfg.init_generator).state_dict()
    teacher = load_network(trainer.cfg.teacher).state_dict()

    def same(masters: dict, reference: dict) -> bool:
        return all(torch.equal(v.reshape(reference[k].shape), reference[k]) for k, v in masters.items())

    result = {
        "g_is_init_generator": same(master_state_dict(trainer.engine_g), init),
        "ema_is_init_generator": same(dict(trainer.ema_network().named_parameters()), init),
        "f_is_teacher": same(master_state_dict(trainer.engine_f), teacher),
        "phases": [trainer.run_iteration() for _ in range(iterations)],
    }
    return {**result, **_master_report(trainer)}


def scenario_train(trainer, iterations: int) -> dict:
    """The whole run (trainer.train(), `iterations` unused): what train_edm2.py does after parsing."""
    trainer.train()
    return {"nimg": trainer.nimg}


# Kill points for `kill=...`: the process SIGKILLs itself (no cleanup runs, as with a real kill) ...
KILL_POINTS = {
    # ... inside the first export of the run, once its temporary safetensors file is written;
    "in-export": "safetensors",
    # ... when the final checkpoint is complete and `latest` names it, before its exports are written.
    "before-final-exports": "write_exports",
}


def _install_kill(point: str, final_nimg: int) -> None:
    import signal

    import safetensors.torch

    import sida_edm2.train.trainer

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if KILL_POINTS[point] == "safetensors":
        save_file = safetensors.torch.save_file

        def save_then_die(tensors, filename, metadata=None):
            save_file(tensors, filename, metadata=metadata)
            if Path(filename).name.startswith(".export-"):
                die()

        safetensors.torch.save_file = save_then_die
    else:
        write_exports = sida_edm2.train.trainer.write_exports

        def die_before_final(module, run_dir, nimg):
            if nimg == final_nimg:
                die()
            return write_exports(module, run_dir, nimg)

        sida_edm2.train.trainer.write_exports = die_before_final


SCENARIOS = {
    "steps": scenario_steps, "weights": scenario_weights, "init": scenario_init, "train": scenario_train,
}  # fmt: skip


def _parse(text: str):
    """Command-line value: JSON (numbers, booleans, lists) where it parses, else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str]) -> None:
    from sida_edm2.train.config import resolve_config
    from sida_edm2.train.trainer import Trainer

    scenario, out, *rest = argv
    options = dict(zip(rest[::2], rest[1::2], strict=True))
    iterations = int(options.pop("iterations", 0))
    kill = options.pop("kill", None)
    cfg = resolve_config(PRESET, num_workers=0, **{k: _parse(v) for k, v in options.items()})
    if kill is not None:
        _install_kill(kill, final_nimg=round(cfg.max_kimg * 1000))
    trainer = Trainer(cfg)
    result = SCENARIOS[scenario](trainer, iterations)
    if trainer.rank == 0:
        if out.endswith(".pt"):
            torch.save(result, out)
        else:
            Path(out).write_text(json.dumps(result))
    end_distributed_script()


if __name__ == "__main__":
    main(sys.argv[1:])
