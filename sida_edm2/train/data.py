"""What the distillation loop draws each iteration: real latent batches, class labels, noise; and its seeds.

Reproducibility contract (what makes a resumed run bit-identical to an uninterrupted one):
- The real-data stream is a deterministic function of (seed, rank, segment), a segment being the span
  between two checkpoints: the reader is rebuilt after every checkpoint, in uninterrupted and resumed
  runs alike, so resuming needs no position inside a shard stream.
- All other randomness of an iteration comes from the rank's `noise` generator (plus torch's global RNG
  for dropout), whose states are checkpointed.
- Every random tensor of one optimizer step is drawn up front for the rank's whole step
  (batch_gpu * rounds samples) and sliced per micro-batch, so R rounds of B samples see exactly the
  samples of one round of R*B: gradient accumulation is testable against a single big batch.
"""

import dataclasses
import random
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # latent.reader (webdataset) is imported only when real data is opened
    from latent.reader import LatentLoader


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. (seed, rank, segment)) via NumPy's SeedSequence hashing."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class LabelSampler:
    """Class labels for generated images: the dataset's class frequencies, uniform without a dataset."""

    def __init__(
        self,
        label_dim: int,  # Number of classes of the networks (0: unconditional, no labels).
        class_counts: list[int] | None,  # The manifest's per-class sample counts; None: uniform.
        device: torch.device,  # Device of the noise generator and of the returned labels.
    ):
        self.label_dim = label_dim
        if label_dim and class_counts is not None:
            if len(class_counts) != label_dim:
                raise ValueError(f"the dataset has {len(class_counts)} classes, the networks {label_dim}")
            weights = torch.as_tensor(class_counts, dtype=torch.float64)
            if weights.sum() <= 0:
                weights = torch.ones(label_dim, dtype=torch.float64)  # unlabelled data: uniform
        else:
            weights = torch.ones(max(label_dim, 1), dtype=torch.float64)
        self.probs = (weights / weights.sum()).to(device=device, dtype=torch.float32)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor | None:
        """One-hot float32 [n, label_dim] drawn from the class frequencies, or None when unconditional."""
        if not self.label_dim:
            return None
        index = torch.multinomial(self.probs, n, replacement=True, generator=generator)
        return torch.nn.functional.one_hot(index, self.label_dim).to(torch.float32)


@dataclasses.dataclass
class StepNoise:
    """Random draws of one rank's optimizer step, [n, ...] with n = batch_gpu * rounds."""

    z: torch.Tensor  # generator input noise (G sees sigma_init * z)
    eps: torch.Tensor  # diffusion noise added to the generator output
    level: torch.Tensor  # fake-score update: standard normal for ln sigma; G update: uniform t in [0, 1)
    labels: torch.Tensor | None  # one-hot labels of the generated images (None: unconditional/real labels)

    def micro_batch(self, index: int, size: int) -> "StepNoise":
        part = slice(index * size, (index + 1) * size)
        return StepNoise(
            self.z[part], self.eps[part], self.level[part], None if self.labels is None else self.labels[part]
        )


def draw_step_noise(
    generator: torch.Generator,
    n: int,
    shape: list[int],
    uniform_level: bool,
    labels: LabelSampler | None,
) -> StepNoise:
    """Draw z, eps, the noise-level variable and (when `labels` is given) the labels, in that order."""
    device = generator.device
    z = torch.randn([n, *shape], generator=generator, device=device)
    eps = torch.randn([n, *shape], generator=generator, device=device)
    if uniform_level:
        level = torch.rand([n], generator=generator, device=device)
    else:
        level = torch.randn([n], generator=generator, device=device)
    onehot = labels.sample(n, generator) if labels is not None else None
    return StepNoise(z, eps, level, onehot)


def open_real_data(
    data_dir: str, batch_gpu: int, *, rank: int, world_size: int, seed: int, segment: int, num_workers: int
) -> "LatentLoader":
    """An endless loader of this rank's real micro-batches (latents [B,C,h,w], one-hot [B,K]) for one
    segment: the same (seed, rank, segment) always gives the same batches. It counts what it skips
    (`skipped_shards`, `skipped_samples`) and raises UnreadableDataError when nothing can be read."""
    from latent.reader import make_latent_loader

    return make_latent_loader(
        data_dir,
        batch_gpu,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        seed=derived_seed(seed, rank, segment),
    )
