"""FID and FD_DINOv2: streaming feature statistics, Fréchet distance, reference statistics files.

Reference statistics use EDM2's layout (e.g. its img512.pkl for ImageNet 512x512), a plain pickle of
    {'fid': {'mu': float64 [2048], 'sigma': float64 [2048, 2048]},
     'fd_dinov2': {'mu': float64 [1024], 'sigma': float64 [1024, 1024]}}
read with the checkpoint loader's restricted unpickler (data only), so a stats file cannot run code.

    python -m sida_edm2.metrics ref  --source <images dir|images.npz|latent shard dir> --dest stats.pkl \\
        [--metrics fid,fd_dinov2] [--inception PATH|URL] [--dinov2 DIR] [--vae stabilityai/sd-vae-ft-mse]
    python -m sida_edm2.metrics calc --source <images dir|images.npz> --ref img512.pkl [--metrics fid]
    torchrun --nproc_per_node 8 -m sida_edm2.metrics calc ...      # ranks split the images

Statistics accumulate sum(x), sum(x x^T) and n in float64 and are summed over ranks when
torch.distributed is initialised; sigma is the unbiased covariance. FD = |mu1 - mu2|^2 +
tr(S1 + S2 - 2 sqrtm(S1 S2)), the real part of scipy's matrix square root (EDM2's formula).
"""

import os
import pickle
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import click
import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist
import tqdm

from latent.manifest import MANIFEST
from latent.vae import load_vae
from sida_edm2.cli_types import DeviceType
from sida_edm2.io.safe_unpickle import load_pickle
from sida_edm2.sample import detectors as det
from sida_edm2.sample.image_sources import image_batches
from sida_edm2.sample.torchrun_env import join_torchrun, leave_process_group


class FeatureStats:
    """Running float64 sums of features (sum, sum of outer products, count)."""

    def __init__(
        self,
        dim: int,  # Feature dimension D.
    ):
        self.dim = dim
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.sum_outer: torch.Tensor | None = None

    def update(self, features: torch.Tensor) -> None:
        """Add features [N, D] (any float dtype/device; accumulated in float64 on that device)."""
        f = features.detach().to(torch.float64).reshape(-1, self.dim)
        if self.sum is None:
            self.sum = torch.zeros(self.dim, dtype=torch.float64, device=f.device)
            self.sum_outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=f.device)
        self.sum += f.sum(dim=0)
        self.sum_outer += f.T @ f
        self.count += f.shape[0]

    def all_reduce(self) -> "FeatureStats":
        """Sum the statistics of every rank in place (a no-op without an initialised process group)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )
        packed = torch.zeros(1 + self.dim + self.dim * self.dim, dtype=torch.float64, device=device)
        packed[0] = self.count
        if self.sum is not None:
            packed[1 : 1 + self.dim] = self.sum.to(device)
            packed[1 + self.dim :] = self.sum_outer.to(device).flatten()
        dist.all_reduce(packed)
        self.count = round(packed[0].item())
        self.sum = packed[1 : 1 + self.dim].clone()
        self.sum_outer = packed[1 + self.dim :].reshape(self.dim, self.dim).clone()
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu float64 [D], unbiased covariance float64 [D, D])."""
        if self.count < 2:
            raise ValueError(f"need at least 2 images for a covariance, have {self.count}")
        mu = self.sum / self.count
        sigma = (self.sum_outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.real(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)))


def load_reference_stats(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """Reference statistics in EDM2's layout ({'fid': {'mu','sigma'}, ...}); numpy arrays only."""
    stats = load_pickle(path)  # the restricted unpickler of the checkpoint loader: no code runs
    if not isinstance(stats, dict) or not all(
        isinstance(v, dict) and {"mu", "sigma"} <= v.keys() for v in stats.values()
    ):
        raise ValueError(f"{path} is not a reference statistics file ({{metric: {{'mu', 'sigma'}}}})")
    return stats


def save_reference_stats(path: str | os.PathLike, stats: Mapping[str, FeatureStats]) -> Path:
    """Write {metric: {'mu', 'sigma'}} (float64 numpy arrays) as a pickle in EDM2's layout."""
    data = {}
    for name, s in stats.items():
        mu, sigma = s.mean_cov()
        data[name] = {"mu": mu, "sigma": sigma}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(data, f)
    os.replace(tmp, path)
    return path


@torch.no_grad()
def accumulate_stats(
    detectors: Mapping[str, torch.nn.Module],
    batches: Iterable[torch.Tensor],
    device: str | torch.device = "cpu",
    progress: bool = False,
    total: int | None = None,
) -> dict[str, FeatureStats]:
    """Feed uint8 [B,3,H,W] batches through every detector (name -> module), then sum the statistics
    over ranks. Returns name -> FeatureStats."""
    stats: dict[str, FeatureStats] = {}
    bar = tqdm.tqdm(total=total, unit="img", desc="features", disable=not progress)
    for images in batches:
        images = images.to(device)
        for name, detector in detectors.items():
            features = detector(images)
            stats.setdefault(name, FeatureStats(features.shape[1])).update(features)
        bar.update(len(images))
    bar.close()
    for name, detector in detectors.items():
        if name not in stats:  # this rank had no images; it still joins the all-reduce with zeros
            probe = torch.zeros([1, 3, 64, 64], dtype=torch.uint8, device=device)
            stats[name] = FeatureStats(detector(probe).shape[1])
        stats[name].all_reduce()
    return stats


def compare_to_reference(stats: Mapping[str, FeatureStats], ref: Mapping[str, Mapping]) -> dict[str, float]:
    """name -> Fréchet distance between the images' statistics and the reference's."""
    results = {}
    for name, s in stats.items():
        if name not in ref:
            raise KeyError(f"reference statistics have no {name!r} entry (they have: {', '.join(ref)})")
        mu, sigma = s.mean_cov()
        results[name] = frechet_distance(mu, sigma, ref[name]["mu"], ref[name]["sigma"])
    return results


def parse_metric_list(text: str) -> list[str]:
    """'fid,fd_dinov2' -> ['fid', 'fd_dinov2'] (validated)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in det.METRICS]
    if unknown or not names:
        raise click.BadParameter(
            f"unknown metric(s) {unknown or text!r}; choose from {', '.join(det.METRICS)}"
        )
    return list(dict.fromkeys(names))


def load_detectors(
    names: Iterable[str], inception=None, dinov2=None, device="cpu"
) -> dict[str, torch.nn.Module]:
    """name -> detector, loading each metric's network (MissingWeightsError names missing files)."""
    return {
        name: det.load_detector(name, inception=inception, dinov2=dinov2, device=device) for name in names
    }


# ---------------------------------------------------------------------------------------------------
# Command line (python -m sida_edm2.metrics ...)


def open_metrics(metrics: list[str], ref_path: str | None, inception, dinov2, device: torch.device) -> tuple:
    """(reference statistics or None, detectors) for a command line: a file that is not statistics, a
    metric the statistics lack or missing detector weights become one-line click errors."""
    ref = None
    if ref_path is not None:
        try:
            ref = load_reference_stats(ref_path)
        except (ValueError, EOFError, pickle.UnpicklingError) as err:
            raise click.BadParameter(
                f"{ref_path}: not EDM2-style reference statistics ({err})", param_hint="'--ref'"
            ) from None
        missing = [m for m in metrics if m not in ref]
        if missing:
            raise click.UsageError(f"{ref_path} has no statistics for {', '.join(missing)}")
    try:
        detectors = load_detectors(metrics, inception=inception, dinov2=dinov2, device=device)
    except det.MissingWeightsError as err:
        raise click.ClickException(str(err)) from None
    return ref, detectors


def _source_stats(
    source, metrics, inception, dinov2, vae_name, batch, max_images, workers, device, ref_path=None
):
    """(rank, statistics of this source summed over ranks, the reference statistics of ref_path or None)."""
    if not Path(source).exists():  # before any weights are loaded
        raise click.BadParameter(f"{source} does not exist", param_hint="'--source'")
    rank, world_size, device = join_torchrun(device)
    ref, detectors = open_metrics(metrics, ref_path, inception, dinov2, device)
    vae = None
    if Path(source).is_dir() and (Path(source) / MANIFEST).is_file():
        vae = load_vae(vae_name, device, torch.float32)
    batches = image_batches(
        source, batch, rank=rank, world_size=world_size, num_workers=workers, vae=vae, max_images=max_images
    )
    return rank, accumulate_stats(detectors, batches, device, progress=rank == 0), ref


def _metric_list(ctx, param, value: str) -> list[str]:
    return parse_metric_list(value) if value else []


# Options shared with decode_samples.py (declared once, here).
def metrics_option(default: str) -> Callable:
    """--metrics: a comma list of fid, fd_dinov2 ('' = none), parsed into a list."""
    return click.option("--metrics", "metrics", default=default, show_default=bool(default),
                        callback=_metric_list, help="Comma list of fid, fd_dinov2.")  # fmt: skip


def ref_option(required: bool) -> Callable:
    """--ref: reference statistics in EDM2's .pkl layout."""
    return click.option("--ref", "ref_path", required=required, default=None,
                        type=click.Path(exists=True, dir_okay=False),
                        help="Reference statistics .pkl (EDM2 layout, e.g. img512.pkl).")  # fmt: skip


inception_option = click.option(
    "--inception", default=None, help=f"Path or URL of {det.INCEPTION_FILE} [default: cache dir]."
)
dinov2_option = click.option(
    "--dinov2", default=None, help=f"Local copy of {det.DINOV2_REPO} [default: cache dir]."
)
workers_option = click.option(
    "--workers", default=4, show_default=True, type=click.IntRange(min=0), help="Image reader processes."
)
device_option = click.option(
    "--device",
    default=None,
    type=DeviceType(allow_auto=False),
    help="Single-process device [default: cuda if available, else cpu].",
)

_common = [
    click.option(
        "--source", required=True, help="Image folder, .npz (arr_0 uint8 NxHxWx3) or latent shard folder."
    ),
    metrics_option("fid,fd_dinov2"),
    inception_option,
    dinov2_option,
    click.option(
        "--vae",
        "vae_name",
        default="stabilityai/sd-vae-ft-mse",
        show_default=True,
        help="VAE that decodes latent shards (hub id or local dir).",
    ),
    click.option(
        "--batch", default=64, show_default=True, type=click.IntRange(min=1), help="Images per batch."
    ),
    click.option(
        "--max-images", default=None, type=click.IntRange(min=2), help="Use only the first N images."
    ),
    workers_option,
    device_option,
]


def _with_common(fn):
    for option in reversed(_common):
        fn = option(fn)
    return fn


@click.group()
def main():
    """Reference statistics and Fréchet distances (FID, FD_DINOv2)."""


@main.command("ref")
@_with_common
@click.option("--dest", required=True, type=click.Path(dir_okay=False), help="Output statistics .pkl.")
def ref_command(source, metrics, inception, dinov2, vae_name, batch, max_images, workers, device, dest):
    """Write reference statistics of SOURCE in EDM2's .pkl layout."""
    probe = Path(dest).resolve().with_name(f".{Path(dest).name}.probe-{os.getpid()}")
    try:  # before the images are read, not after (root passes every permission check: write a file)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        problem = f"cannot write in {probe.parent} ({err.strerror})"
        raise click.BadParameter(problem, param_hint="'--dest'") from None
    rank, stats, _ = _source_stats(
        source, metrics, inception, dinov2, vae_name, batch, max_images, workers, device
    )
    if rank == 0:
        save_reference_stats(dest, stats)
        counts = ", ".join(f"{n}: {s.count} images" for n, s in stats.items())
        click.echo(f"wrote {dest} ({counts})")
    leave_process_group()


@main.command("calc")
@_with_common
@ref_option(required=True)
def calc_command(source, metrics, inception, dinov2, vae_name, batch, max_images, workers, device, ref_path):
    """Fréchet distances between SOURCE and the reference statistics."""
    rank, stats, ref = _source_stats(
        source, metrics, inception, dinov2, vae_name, batch, max_images, workers, device, ref_path
    )
    if rank == 0:
        for name, value in compare_to_reference(stats, ref).items():
            click.echo(f"{name}: {value:.4f} ({stats[name].count} images)")
    leave_process_group()


if __name__ == "__main__":
    main()
