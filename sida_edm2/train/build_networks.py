"""The networks of a run, built from the teacher (Algorithms 1 and 3; docs/ARCHITECTURE.md).

    nets = build_networks(cfg)                  # everything below, per method
    teacher, manifest = load_teacher(cfg)       # frozen EDM2 Precond, checked against the preset and data
    G = build_generator(cfg, teacher)           # teacher weights (or --init-generator), no logvar head
    F = build_fake_score(teacher)               # teacher weights, logvar head kept

G is a plain Precond without logvar head, called as G(sigma_init * z, sigma_init, labels), so that
--sigma-init is honoured and its export loads with `load_network` like any Precond. Method "edm2"
(training a teacher with EDM2's loss) has no teacher and no G: its one network is a freshly initialised
Precond of the preset, in the fake score's place.
"""

import dataclasses

import torch

from sida_edm2.io.network_files import UNUSABLE_CHECKPOINT, describe_mismatch, load_network, state_shapes
from sida_edm2.model.networks import Precond
from sida_edm2.model.presets import get_preset
from sida_edm2.train.config import ConfigError, TrainConfig

LOGVAR_PREFIX = "logvar_"


def load_teacher(cfg: TrainConfig) -> tuple[Precond, dict | None]:
    """The teacher (fp32, eval, frozen, on the CPU) and the dataset manifest (None without --data).

    Clear ConfigErrors when the teacher's architecture is not the preset's, or the latents' shape or
    class count does not fit the networks.
    """
    try:
        teacher = load_network(cfg.teacher)
    except UNUSABLE_CHECKPOINT as err:
        raise ConfigError(f"--teacher: {err}") from None
    network = get_preset(cfg.preset)["network"]
    with torch.device("meta"):
        reference = Precond(**network)
    expected, got = state_shapes(reference.state_dict()), state_shapes(teacher.state_dict())
    if expected != got:
        raise ConfigError(
            f"--teacher {cfg.teacher} does not have the architecture of preset {cfg.preset!r} "
            f"({describe_mismatch(expected, got)}); pick the preset that matches the teacher"
        )
    if teacher.logvar_linear is None:
        raise ConfigError(f"--teacher {cfg.teacher} has no logvar head: the fake score needs one")
    return teacher, read_checked_manifest(cfg, teacher)


def read_checked_manifest(cfg: TrainConfig, net: Precond) -> dict | None:
    """The manifest of --data (None without it), after checking its latents and classes fit `net`."""
    if not cfg.data:
        return None
    from latent.reader import read_manifest

    manifest = read_manifest(cfg.data)
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    if list(manifest["latent_shape"]) != shape:
        raise ConfigError(
            f"--data latents have shape {manifest['latent_shape']}, the networks expect {shape}"
        )
    if manifest["num_classes"] != net.label_dim:
        raise ConfigError(
            f"--data has {manifest['num_classes']} classes, the networks {net.label_dim} (label_dim)"
        )
    return manifest


def _without_logvar(state: dict) -> dict:
    return {name: t for name, t in state.items() if not name.startswith(LOGVAR_PREFIX)}


def _build_from(kwargs: dict, state: dict) -> Precond:
    with torch.device("meta"):
        net = Precond(**kwargs)
    net = net.to_empty(device="cpu")
    net.load_state_dict(state, strict=True)
    return net.float().train().requires_grad_(True)


def build_generator(cfg: TrainConfig, teacher: Precond) -> Precond:
    """G: the teacher's architecture without logvar head, weights from the teacher (theta <- phi) or,
    with --init-generator, from that generator (SiD²A: theta <- theta_sid)."""
    kwargs = {**teacher.init_kwargs, "logvar_channels": 0}
    state = _without_logvar(teacher.state_dict())
    if cfg.init_generator:
        try:
            init = load_network(cfg.init_generator)
        except UNUSABLE_CHECKPOINT as err:
            raise ConfigError(f"--init-generator: {err}") from None
        init_state = _without_logvar(init.state_dict())
        if state_shapes(init_state) != state_shapes(state):
            raise ConfigError(
                f"--init-generator {cfg.init_generator} does not match the teacher's architecture "
                f"({describe_mismatch(state_shapes(state), state_shapes(init_state))})"
            )
        state = init_state
    return _build_from(kwargs, state)


def build_fake_score(teacher: Precond) -> Precond:
    """The fake score f_psi: a trainable copy of the teacher, logvar head included (psi <- phi)."""
    return _build_from(dict(teacher.init_kwargs), teacher.state_dict())


def build_denoiser(cfg: TrainConfig) -> Precond:
    """A fresh EDM2 network of the preset (logvar head included) for method "edm2", initialised from
    cfg.seed alone, so every rank builds the same one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = Precond(**get_preset(cfg.preset)["network"])
    return net.train().requires_grad_(True)


@dataclasses.dataclass
class Networks:
    teacher: Precond | None  # frozen; None for "edm2"
    generator: Precond | None  # G; None for "edm2"
    denoiser: Precond  # the fake score f_psi, or the EDM2 network that "edm2" trains
    manifest: dict | None  # the dataset's manifest (None without --data)


def build_networks(cfg: TrainConfig) -> Networks:
    """The run's networks on the CPU in fp32, before any DeepSpeed wrapping."""
    if cfg.method == "edm2":
        denoiser = build_denoiser(cfg)
        return Networks(None, None, denoiser, read_checked_manifest(cfg, denoiser))
    teacher, manifest = load_teacher(cfg)
    return Networks(teacher, build_generator(cfg, teacher), build_fake_score(teacher), manifest)
