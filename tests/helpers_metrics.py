"""Stand-in feature extractors for the metrics tests (the real Inception / DINOv2 weights are large
downloads), and the worker of the two-process statistics test."""

import os

import numpy as np
import torch

from sida_edm2.sample.detectors import DinoV2Detector, load_inception


class StandInInception(torch.nn.Module):
    """Same call signature as the StyleGAN/EDM TorchScript Inception: (uint8 images, return_features)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(48, 16, generator=gen))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float32) / 255, 4).flatten(1)  # [N, 48]
        return torch.tanh((pooled - 0.5) @ self.proj)


class StandInBackbone(torch.nn.Module):
    """A DINOv2-shaped backbone: normalised [N,3,224,224] -> [N,8] (patchify at 14, average)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.patch = torch.nn.Conv2d(3, 8, kernel_size=14, stride=14)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2:] == (224, 224)
        return torch.tanh(self.patch(x)).mean(dim=(2, 3))


def ref_command_args(source, dest, inception: str, *extra: str) -> list[str]:
    """`python -m sida_edm2.metrics ref` arguments: FID statistics of `source` with the stand-in Inception,
    in-process image reading."""
    return ["ref", "--source", str(source), "--dest", str(dest), "--metrics", "fid", "--inception", inception,
            "--workers", "0", *extra]  # fmt: skip


def save_standin_inception(path) -> str:
    """TorchScript-compile StandInInception and save it where a real inception-2015-12-05.pt would go."""
    torch.jit.save(torch.jit.script(StandInInception().eval()), str(path))
    return str(path)


def standin_detectors(inception_path) -> dict:
    """Both metrics' detectors built from the stand-ins (TorchScript file and nn.Module)."""
    return {
        "fid": load_inception(inception_path),
        "fd_dinov2": DinoV2Detector(StandInBackbone()).eval().requires_grad_(False),
    }


def stats_worker(
    rank: int, world_size: int, init_file: str, npz_path: str, inception_path: str, out_dir: str
):
    """One rank of the distributed test: accumulate this rank's share of the .npz, all-reduce, and
    (rank 0) save mu/sigma of each metric."""
    import torch.distributed as dist

    from sida_edm2.sample.image_sources import image_batches
    from sida_edm2.sample.metrics import accumulate_stats

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        batches = image_batches(npz_path, batch_size=3, rank=rank, world_size=world_size)
        stats = accumulate_stats(standin_detectors(inception_path), batches)
        if rank == 0:
            for name, s in stats.items():
                mu, sigma = s.mean_cov()
                np.savez(os.path.join(out_dir, f"{name}.npz"), mu=mu, sigma=sigma, count=s.count)
    finally:
        dist.destroy_process_group()
