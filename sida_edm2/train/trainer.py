"""SiD / SiDA / SiD²A distillation of an EDM2 teacher into a one-step generator, under DeepSpeed
(and "edm2": training such a teacher with EDM2's loss, for the demo and the toy reproduction).

    trainer = Trainer(resolve_config("edm2-img512-xs", run_dir="runs/xs", teacher=..., data=...))
    trainer.train()              # until max_kimg, with ticks, checkpoints, exports and grids

    # Benchmarks: a fixed number of iterations on any iterator of (latents, one-hot) micro-batches.
    cfg = resolve_config("edm2-img512-xs", run_dir="/tmp/b", teacher=..., external_data=True,
                         fake_only_kimg=0, sid_only_kimg=0)       # "sida" from the second iteration on
    trainer = Trainer(cfg, data_iter=synthetic_batches)
    for _ in range(10):
        trainer.run_iteration()

One iteration (Algorithms 1-3; docs/ARCHITECTURE.md, "One iteration"), B = batch_gpu, R accumulation rounds:
 1. Fake-score update, R rounds: x_g = G(sigma_init z) without grad (eval mode); x_t = x_g + s eps with
    ln s ~ N(-0.4, 1); the fake score (train mode) gives D_psi, the fake logits and logvar u; SiDA also
    runs it on the real batch noised with the same s, eps and labels (encoder only). Loss = (sum DSM +
    lambda_adv_psi * sum discriminator) / (B R); one engine step per micro-batch.
 2. Generator update, R rounds, skipped entirely in the fake-score-only phase: x_g = G(sigma_init z)
    (train mode); s from t ~ U(0, tmax); the frozen teacher gives D_phi, the fake score (eval mode, its
    parameters frozen, called as engine_f.module) D_psi, logits and u; loss = (w_sid sum SiD + w_adv sum
    adversarial) / (B R). Gradients reach G only through the inputs of the frozen networks.
 3. After each optimizer step: forced weight normalisation of the stepped network's fp32 master
    weights; after G's step the EMA of G from the same fp32 values. Under ZeRO-1/2 both happen inside
    the step, on this rank's flat fp32 partitions (sida_edm2.train.flat_master), and the EMA is gathered
    whole only for checkpoints, exports and grids (`ema_network()`); otherwise from gathered masters.
Method "edm2" runs only step 1's DSM loss, on real latents instead of generator output, for a fresh
network of the preset, and keeps the EMA of that network.
Non-finite per-sample losses are dropped and counted; steps with non-finite gradients are skipped and
counted (by sida_edm2.train.flat_master under ZeRO-1/2, DeepSpeed for fp16 and ZeRO-3, the loop at stage 0).
engine.backward(..., scale_wrt_gas=False): the loss is already divided by B*R, and DeepSpeed's default
would divide by R a second time.
"""

import copy
import time
from pathlib import Path

import torch

from latent.dir_lock import DirectoryInUseError, lock_directory, unlock_directory
from sida_edm2.model.networks import PRECISION_DTYPES
from sida_edm2.sample.grids import save_sample_grid
from sida_edm2.train import engines
from sida_edm2.train.build_networks import build_networks
from sida_edm2.train.config import ConfigError, TrainConfig, check_inputs_exist
from sida_edm2.train.data import LabelSampler, derived_seed, draw_step_noise, open_real_data, seed_everything
from sida_edm2.train.ema import NetworkEMA, ema_beta
from sida_edm2.train.log import RunLog, TickStats, tick_values
from sida_edm2.train.losses import (
    fake_score_loss,
    fake_score_sigma,
    finite_sum,
    generator_loss_weights,
    training_phase,
)
from sida_edm2.train.objectives import (
    fake_score_objective,
    freeze_fake_score,
    generator_objective,
    thaw_fake_score,
)
from sida_edm2.train.run_checkpoints import (
    capture_rng,
    check_resume_config,
    find_latest,
    load_checkpoint,
    read_pointer,
    read_state,
    remove_partial_files,
    restore_rng,
    save_checkpoint,
    write_exports,
    write_pointer,
)


class Trainer:
    """Builds the networks and engines, resumes from the run directory if it can, and runs iterations.
    `data_iter` replaces the latent reader with any iterator of (latents, one-hot) micro-batches of
    batch_gpu samples (benchmarks); without it, real data is read from cfg.data per segment.
    `teacher` replaces the frozen teacher in the losses by any module with the Precond call
    net(x, sigma, onehot) (e.g. a known distribution's exact denoiser); cfg.teacher still gives the
    architecture and the initial weights of G and the fake score."""

    def __init__(self, cfg: TrainConfig, data_iter=None, teacher: torch.nn.Module | None = None):
        # Configuration and file errors surface before any process group or engine exists.
        check_inputs_exist(cfg)
        self.cfg = cfg
        self.rounds = cfg.accumulation_rounds(engines.world_size_from_env())
        nets = build_networks(cfg)
        if teacher is not None:
            nets.teacher = teacher
        self.manifest = nets.manifest

        self.env = engines.init_deepspeed_distributed()
        self.rank, self.world_size, self.device = self.env.rank, self.env.world_size, self.env.device
        self.precision = cfg.resolved_precision(self.device.type == "cuda")
        self.use_real_data = cfg.method != "sid"
        # Rank 0 prepares the run directory; the broadcast holds the other ranks until it is done and
        # stops them with rank 0's error, if any (instead of leaving them in a collective it never joins).
        problem = [_claim_run_dir(cfg.run_dir) if self.rank == 0 else None]
        torch.distributed.broadcast_object_list(problem, src=0)
        if problem[0] is not None:
            raise ConfigError(problem[0])
        self.log = RunLog(cfg.run_dir, self.rank)
        seed_everything(derived_seed(cfg.seed, self.rank))
        self.noise = torch.Generator(self.device).manual_seed(derived_seed(cfg.seed, self.rank, 1 << 20))
        self._build_engines(nets)
        self.ema_engine = self.engine_f if self.engine_g is None else self.engine_g

        self.nimg = self.iteration = self.segment = 0
        self.skipped = {"steps_g": 0, "steps_f": 0}  # optimizer steps skipped for non-finite gradients
        self.stats = TickStats(self.device)
        self._resume_or_start()
        self.loader = None  # the segment's LatentLoader (None: no real data, or data_iter)
        self.data = data_iter if data_iter is not None else self._open_segment_data()
        self._external_data = data_iter is not None

    def _build_engines(self, nets) -> None:
        """The EMA, both engines with their master-weight handlers, and the teacher, each network with
        the run's compute dtype, activation checkpointing and speed switches."""
        cfg, G, F = self.cfg, nets.generator, nets.denoiser
        trained = [net for net in (G, F) if net is not None]
        # The EMA follows G, or the network that "edm2" trains; it is copied before any wrapping. Under
        # ZeRO-1/2 the EMA itself lives on the GPUs as flat partitions (sida_edm2.train.flat_master): this
        # copy is only where it is gathered for checkpoints and exports, so it stays in host memory.
        ema_device = torch.device("cpu") if cfg.zero_stage in (1, 2) else self.device
        self.ema = NetworkEMA(trained[0], ema_device) if self.rank == 0 else None
        compute_dtype = PRECISION_DTYPES[self.precision] if self.device.type == "cuda" else torch.float32
        if cfg.fused and not engines.fused_kernels_available():
            self.log.message("the fused kernels need a GPU: the networks run eager")
        for net in trained:
            net.compute_dtype = compute_dtype
            blocks = engines.configure_network(net, cfg)
            if blocks:
                self.log.message(f"activation checkpointing: {blocks} blocks recomputed in backward")
        self.latent_shape = [F.img_channels, F.img_resolution, F.img_resolution]
        self.labels = LabelSampler(
            F.label_dim, self.manifest["class_counts"] if self.manifest else None, self.device
        )
        ds_config = engines.build_ds_config(
            engines.load_ds_config(cfg.zero_stage, cfg.ds_config),
            batch_gpu=cfg.batch_gpu, rounds=self.rounds, world_size=self.world_size, precision=self.precision,
        )  # fmt: skip
        # Stage 0 in fp32 runs the client Adam unwrapped: the loop itself skips non-finite steps there.
        adam = dict(lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, fused_adam=cfg.fused_adam)
        self.engine_g, self.engine_f, self.masters = engines.build_engines(
            G, F, ds_config, adam,
            force_norm=cfg.force_norm, check_grads=cfg.zero_stage == 0 and self.precision == "fp32",
        )  # fmt: skip
        self.teacher = None
        if nets.teacher is not None:
            zero3_teacher = engines.teacher_zero3_config(ds_config) if cfg.teacher_zero3 else None
            self.teacher = engines.prepare_teacher(
                nets.teacher, self.device, self.precision, zero3_teacher, bake_weights=cfg.weight_cache
            )
            # Its activations serve only G's input gradient: recomputed like the trained networks'.
            engines.configure_network(self.teacher, cfg)

    # ------------------------------------------------------------------------------------------------
    # One iteration.

    def run_iteration(self) -> str:
        """Fake-score update, generator update (unless fake-score-only), EMA. Returns the phase."""
        cfg = self.cfg
        if cfg.method == "edm2":
            phase = "edm2"
            self.denoiser_update()
        else:
            phase = training_phase(self.nimg, cfg.fake_only_kimg, cfg.sid_only_kimg, cfg.method)
            self.fake_score_update()
            if phase != "fake_only":
                self.generator_update(phase)
        self.nimg += cfg.batch
        self.iteration += 1
        return phase

    def fake_score_update(self) -> None:
        """R micro-batches of the fake-score (and, with real data, discriminator) loss; one optimizer step."""
        cfg, B = self.cfg, self.cfg.batch_gpu
        step_batch = B * self.rounds  # the per-GPU batch of one optimizer step
        step = draw_step_noise(
            self.noise,
            step_batch,
            self.latent_shape,
            uniform_level=False,
            labels=None if self.use_real_data else self.labels,
        )
        G, F = self.engine_g.module, self.engine_f
        G.eval()
        F.module.train()
        for r in range(self.rounds):
            noise = step.micro_batch(r, B)
            x_real, labels = self._next_real_batch() if self.use_real_data else (None, noise.labels)
            terms = fake_score_objective(
                G, F, noise.z, noise.eps, noise.level, labels, x_real,
                sigma_init=cfg.sigma_init, lambda_adv_psi=cfg.lambda_adv_psi,
            )  # fmt: skip
            self.stats.add("loss/fake_score", terms.dsm, B - terms.dsm_dropped)
            self.stats.add("skipped/samples/count", terms.dsm_dropped)
            if terms.disc is not None:
                self.stats.add("loss/discriminator", terms.disc, B - terms.disc_dropped)
                self.stats.add("skipped/samples/count", terms.disc_dropped)
            F.backward(terms.loss / step_batch, scale_wrt_gas=False)
            self._step(F, "steps_f")

    def generator_update(self, phase: str) -> None:
        """R micro-batches of the generator loss of `phase` ("sid" or "sida"); one optimizer step + EMA."""
        cfg, B = self.cfg, self.cfg.batch_gpu
        step_batch = B * self.rounds
        weights = generator_loss_weights(phase, cfg.lambda_sid, cfg.lambda_adv_theta)
        step = draw_step_noise(
            self.noise, step_batch, self.latent_shape, uniform_level=True, labels=self.labels
        )
        G, F = self.engine_g, self.engine_f.module
        G.module.train()
        # Called through .module so that its engine sees no forward/backward of its own.
        freeze_fake_score(F, cfg.weight_cache)
        try:
            for r in range(self.rounds):
                noise = step.micro_batch(r, B)
                terms = generator_objective(
                    G, F, self.teacher, noise.z, noise.eps, noise.level, noise.labels,
                    sigma_init=cfg.sigma_init, tmax=cfg.tmax, alpha=cfg.alpha, weights=weights,
                )  # fmt: skip
                self._log_mean("loss/sid", terms.sid)
                if terms.adversarial is not None:
                    self._log_mean("loss/adversarial", terms.adversarial)
                self.stats.add("skipped/samples/count", terms.dropped)
                G.backward(terms.loss / step_batch, scale_wrt_gas=False)
                self._step(G, "steps_g")
        finally:
            thaw_fake_score(F)

    def denoiser_update(self) -> None:
        """Method "edm2": R micro-batches of EDM2's loss (logvar-weighted DSM) on real latents."""
        B = self.cfg.batch_gpu
        step_batch = B * self.rounds
        step = draw_step_noise(self.noise, step_batch, self.latent_shape, uniform_level=False, labels=None)
        F = self.engine_f
        F.module.train()
        for r in range(self.rounds):
            noise = step.micro_batch(r, B)
            x, labels = self._next_real_batch()
            sigma = fake_score_sigma(noise.level)
            denoised, logvar = F(
                x + sigma.reshape(-1, 1, 1, 1) * noise.eps, sigma, labels, return_logvar=True
            )
            loss, dropped = finite_sum(fake_score_loss(denoised, x, sigma, logvar))
            self.stats.add("loss/denoiser", loss, B - dropped)
            self.stats.add("skipped/samples/count", dropped)
            F.backward(loss / step_batch, scale_wrt_gas=False)
            self._step(F, "steps_f")

    def _log_mean(self, name: str, per_sample: torch.Tensor) -> None:
        total, dropped = finite_sum(per_sample.detach())
        self.stats.add(name, total, per_sample.shape[0] - dropped)

    def _step(self, engine, counter: str) -> None:
        """engine.step() after every micro-batch (with the forced weight normalisation and, for the EMA's
        network, the EMA: sida_edm2.train.ds_master / flat_master); at the boundary the skip accounting."""
        beta = ema_beta(self.nimg, self.cfg.batch, self.cfg.ema_mimg)
        skipped = self.masters[engine].step(beta, self.ema)
        if skipped is not None:
            self.skipped[counter] += int(skipped)
            self.stats.add("skipped/steps/count", int(skipped))

    def _next_real_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        latents, onehot = next(self.data)
        if latents.shape[0] != self.cfg.batch_gpu:
            raise RuntimeError(
                f"real micro-batch of {latents.shape[0]} samples, expected {self.cfg.batch_gpu}"
            )
        latents = latents.to(self.device, torch.float32, non_blocking=True)
        onehot = onehot.to(self.device, torch.float32, non_blocking=True) if self.labels.label_dim else None
        return latents, onehot

    # ------------------------------------------------------------------------------------------------
    # The run: start or resume, ticks, checkpoints.

    def ema_network(self, device: torch.device | None = None) -> torch.nn.Module | None:
        """The EMA network, up to date (rank 0; None elsewhere), where it is kept (host memory under
        ZeRO-1/2) or as a copy on `device`. Collective: every rank must call it."""
        self.masters[self.ema_engine].gather_ema(self.ema)
        if self.ema is None:
            return None
        module = self.ema.module
        if device is not None and next(module.parameters()).device != device:
            module = copy.deepcopy(module).to(device)
        return module

    def _reduced_stats(self) -> dict:
        """The tick's stats over all ranks (collective), the reader's skipped shards and samples included."""
        self._count_unreadable()
        return self.stats.reduce()

    def _run_config(self) -> dict:
        return {**self.cfg.to_dict(), "world_size": self.world_size, "precision": self.precision}

    def _engines(self) -> dict:
        """The trained networks' engines by checkpoint tag."""
        return {tag: e for tag, e in (("G", self.engine_g), ("F", self.engine_f)) if e is not None}

    def _resume_or_start(self) -> None:
        latest = find_latest(self.cfg.run_dir)
        if latest is None:
            for masters in self.masters.values():
                masters.start(self.ema)
            self.log.message(f"starting {self.cfg.method} in {self.cfg.run_dir}")
            return
        state = read_state(latest)
        changed = check_resume_config(state["config"], self._run_config())
        rng = load_checkpoint(latest, self._engines(), self.ema, self.rank)
        self.masters[self.ema_engine].scatter_ema(self.ema)
        self.nimg, self.iteration, self.segment = state["nimg"], state["iteration"], state["segment"]
        self.skipped = state["skipped"]
        restore_rng(rng, self.noise)
        if self.rank == 0:
            pointer = read_pointer(self.cfg.run_dir)
            if pointer != latest.name:
                self.log.message(f"checkpoints/latest named {pointer!r}; newest complete: {latest.name}")
                write_pointer(self.cfg.run_dir, latest.name)
            # A kill between the checkpoint and its exports (or a rerun of a finished run) must leave the
            # exports this checkpoint's EMA gives: rewrite them, they are cheap next to a checkpoint.
            write_exports(self.ema.module, self.cfg.run_dir, self.nimg)
        self.log.message(
            f"resumed from {latest} at kimg {self.nimg / 1000:.3f}"
            + (f" (changed settings: {', '.join(changed)})" if changed else "")
        )

    def _count_unreadable(self) -> None:
        """Add the shards and samples the reader skipped since the last call to the tick's counts (every
        rank calls it at the same points, so that TickStats sees the same names everywhere)."""
        if self.loader is None:
            return
        now = (self.loader.skipped_shards, self.loader.skipped_samples)
        self.stats.add("skipped/unreadable_shards/count", now[0] - self._unreadable_seen[0])
        self.stats.add("skipped/unreadable_samples/count", now[1] - self._unreadable_seen[1])
        self._unreadable_seen = now

    def _open_segment_data(self):
        if not self.use_real_data:
            return None
        self._count_unreadable()  # what the previous segment's reader skipped, before it is replaced
        self._unreadable_seen = (0, 0)
        self.loader = open_real_data(
            self.cfg.data,
            self.cfg.batch_gpu,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.cfg.seed,
            segment=self.segment,
            num_workers=self.cfg.num_workers,
        )
        return iter(self.loader)

    def save(self) -> None:
        """Checkpoint (engines, EMA, counters, RNG states), exports, then the next data segment."""
        self.segment += 1
        ema = self.ema_network()  # gathered once for the checkpoint and the exports
        state = {
            "nimg": self.nimg,
            "iteration": self.iteration,
            "segment": self.segment,
            "skipped": self.skipped,
            "config": self._run_config(),
        }
        path = save_checkpoint(
            self.cfg.run_dir,
            self.iteration,
            self._engines(),
            self.ema,
            state,
            capture_rng(self.noise),
            self.cfg.keep_checkpoints,
            self.rank,
        )
        if ema is not None:
            write_exports(ema, self.cfg.run_dir, self.nimg)
        if not self._external_data:
            self.data = self._open_segment_data()
        self.log.message(f"saved {path}")

    def train(self) -> None:
        """Iterate until max_kimg; tick, checkpoint and grid at their kimg intervals and at the end."""
        cfg = self.cfg
        max_img = round(cfg.max_kimg * 1000)
        intervals = {
            "tick": cfg.tick_kimg,
            "ckpt": cfg.checkpoint_kimg,
            "grid": cfg.grid_kimg or cfg.checkpoint_kimg,
        }
        every = {name: max(1, round(kimg * 1000)) for name, kimg in intervals.items()}
        vae = None
        if cfg.vae and self.rank == 0:
            from latent.vae import load_vae

            vae = load_vae(cfg.vae, self.device)
        if self.nimg >= max_img:
            self.log.message(f"nothing to do: the run is at kimg {self.nimg / 1000:.3f} >= --max-kimg")
        tick_start, tick_nimg, maintenance = time.perf_counter(), self.nimg, 0.0
        while self.nimg < max_img:
            before = self.nimg
            phase = self.run_iteration()
            done = self.nimg >= max_img

            def crossed(name, before=before):
                return self.nimg // every[name] > before // every[name]

            if crossed("tick") or done:
                elapsed = time.perf_counter() - tick_start
                values = tick_values(
                    self._reduced_stats(), self, phase, elapsed, maintenance, self.nimg - tick_nimg
                )
                self.log.tick(values)
                tick_start, tick_nimg, maintenance = time.perf_counter(), self.nimg, 0.0
            t0 = time.perf_counter()
            if crossed("ckpt") or done:
                self.save()
            ema = self.ema_network(self.device) if crossed("grid") or done else None  # collective
            if ema is not None:
                grid = self.log.run_dir / "grids" / f"grid-{self.nimg // 1000:07d}.png"
                # An "edm2" network is a multi-step denoiser: its grid uses EDM2's 32-step Heun sampler.
                steps = 32 if cfg.method == "edm2" else 0
                save_sample_grid(ema, grid, cfg.sigma_init, vae=vae, heun_steps=steps)
            maintenance += time.perf_counter() - t0
        self.log.close()
        unlock_directory(cfg.run_dir)


def _claim_run_dir(run_dir: str) -> str | None:
    """Create the run directory, take its lock and remove a killed run's partial files; the reason
    it cannot be used, or None."""
    try:  # check_inputs_exist only judged the permissions (root passes those everywhere)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"--run-dir {run_dir} cannot be created ({err.strerror})"
    try:  # before anything in it is removed or written
        lock_directory(run_dir, "training run")
    except DirectoryInUseError as err:
        return str(err)
    remove_partial_files(run_dir)
    return None


def train(cfg: TrainConfig, data_iter=None) -> Trainer:
    """Run (or resume) the whole run described by cfg; returns the finished Trainer."""
    trainer = Trainer(cfg, data_iter=data_iter)
    trainer.train()
    return trainer
