"""A class-conditional latent distribution with known statistics, and the distances of a sampler to it.

    mix = ToyMixture.create(num_classes=10, modes=4, shape=(4, 16, 16), seed=0, device="cuda")
    x, onehot = mix.sample(256, generator)            # fresh latents + one-hot labels
    ref = mix.frechet_reference()                      # exact mixture moments, sqrt computed once
    fd = ref.distance(samples)                         # Fréchet distance of a sample set to the truth
    cov = mix.mode_coverage(samples, labels, ll_ref)   # per-class nearest-mode check

Class c (uniform over classes) is a mixture of `modes` Gaussians with unequal weights MODE_WEIGHTS;
component (c, k) is N(m_ck, U_ck U_ck^T + s^2 I): a smooth mean image m_ck, a rank-r factor U_ck of
smooth images, and a small isotropic part s. Smooth means low spatial frequencies per channel, so the
mixture looks like latents (structure, not white noise). The per-element variance is MEAN_STD^2 +
RANK * FACTOR_STD^2 + ISO_STD^2 ~ 0.24, i.e. a standard deviation near EDM2's sigma_data 0.5. Mean and
covariance of the whole mixture follow in closed form, so the Fréchet distance of a sampler is measured
against the truth, not against another finite sample; its finite-sample floor is what the same number
of true samples score.
"""

import dataclasses
import math

import numpy as np
import torch

MODE_WEIGHTS = (0.4, 0.3, 0.2, 0.1)  # within a class; unequal so that dropping the small mode shows
RANK = 4  # rank of each component's structured covariance
ISO_STD = 0.05  # the isotropic part s
MEAN_STD, FACTOR_STD = 0.35, 0.17  # per-element spread of the mode means and of the low-rank part
MAX_FREQ = 3  # highest spatial frequency (cycles per side) of the smooth patterns


def _smooth_patterns(rng: np.random.Generator, count: int, shape: tuple[int, int, int]) -> np.ndarray:
    """`count` random images [C,H,W] made of low-frequency cosines, each scaled to unit RMS."""
    c, h, w = shape
    y, x = np.meshgrid(np.arange(h) / h, np.arange(w) / w, indexing="ij")
    out = np.zeros((count, c, h, w))
    for fy in range(MAX_FREQ + 1):
        for fx in range(MAX_FREQ + 1):
            amp = rng.normal(size=(count, c, 1, 1)) / (1 + fx + fy)
            phase = rng.uniform(0, 2 * np.pi, size=(count, c, 1, 1))
            out += amp * np.cos(2 * np.pi * (fy * y + fx * x) + phase)
    return out / np.sqrt((out**2).mean(axis=(1, 2, 3), keepdims=True))


@dataclasses.dataclass
class ToyMixture:
    means: torch.Tensor  # [K_total, D] float64, K_total = classes * modes, row = c * modes + k
    factors: torch.Tensor  # [K_total, D, r] float64
    log_weights: torch.Tensor  # [classes, modes] within-class log weights
    num_classes: int
    modes: int
    shape: tuple[int, int, int]

    @classmethod
    def create(
        cls,
        num_classes: int = 10,
        modes: int = 4,
        shape=(4, 16, 16),
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> "ToyMixture":
        if modes > len(MODE_WEIGHTS):
            raise ValueError(f"at most {len(MODE_WEIGHTS)} modes per class")
        rng = np.random.default_rng(seed)
        total, dim = num_classes * modes, math.prod(shape)
        means = _smooth_patterns(rng, total, shape).reshape(total, dim) * MEAN_STD
        factors = _smooth_patterns(rng, total * RANK, shape).reshape(total, RANK, dim).transpose(0, 2, 1)
        factors = factors * FACTOR_STD
        weights = np.asarray(MODE_WEIGHTS[:modes]) / sum(MODE_WEIGHTS[:modes])
        log_w = np.log(np.tile(weights, (num_classes, 1)))
        to = dict(device=device, dtype=torch.float64)
        return cls(
            torch.tensor(means, **to),
            torch.tensor(factors, **to),
            torch.tensor(log_w, **to),
            num_classes,
            modes,
            tuple(shape),
        )

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def device(self) -> torch.device:
        return self.means.device

    # ------------------------------------------------------------------------------------------------
    # Sampling.

    def sample_with_modes(self, n: int, generator: torch.Generator, labels: torch.Tensor | None = None):
        """(latents float32 [n,C,H,W], labels int64 [n], component index int64 [n]); labels uniform
        unless given. All draws come from `generator` (on this mixture's device)."""
        dev = self.device
        if labels is None:
            labels = torch.randint(self.num_classes, (n,), generator=generator, device=dev)
        labels = labels.to(dev)
        mode = torch.multinomial(self.log_weights.exp()[labels], 1, generator=generator).squeeze(1)
        comp = labels * self.modes + mode
        w = torch.randn(n, RANK, 1, generator=generator, device=dev, dtype=torch.float64)
        noise = torch.randn(n, self.dim, generator=generator, device=dev, dtype=torch.float64)
        x = self.means[comp] + (self.factors[comp] @ w).squeeze(2) + ISO_STD * noise
        return x.float().reshape(n, *self.shape), labels, comp

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents float32 [n,C,H,W], one-hot float32 [n, classes]): what the training loop reads."""
        x, labels, _ = self.sample_with_modes(n, generator)
        return x, torch.nn.functional.one_hot(labels, self.num_classes).float()

    def batches(self, batch: int, seed: int):
        """An endless iterator of fresh (latents, one-hot) micro-batches."""
        gen = torch.Generator(self.device).manual_seed(seed)
        while True:
            yield self.sample(batch, gen)

    # ------------------------------------------------------------------------------------------------
    # Exact moments and the Fréchet distance.

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean [D] and covariance [D,D] of the whole mixture (classes uniform), exactly."""
        p = (self.log_weights.exp() / self.num_classes).reshape(-1)  # [K_total]
        mu = p @ self.means
        # sum_k p_k U_k U_k^T = A A^T with A = [sqrt(p_k) U_k]_k  [D, K*r]
        factor_part = (self.factors * p.sqrt().reshape(-1, 1, 1)).transpose(0, 1).reshape(self.dim, -1)
        cov = factor_part @ factor_part.T + (self.means.T * p) @ self.means - torch.outer(mu, mu)
        cov += ISO_STD**2 * torch.eye(self.dim, dtype=cov.dtype, device=cov.device)
        return mu, cov

    def frechet_reference(self) -> "FrechetReference":
        return FrechetReference(*self.moments())

    # ------------------------------------------------------------------------------------------------
    # Per-class nearest-mode check (non-Gaussian: it looks at which component each sample belongs to).

    def component_log_likelihoods(self, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """log N(x; m_k, U_k U_k^T + s^2 I) for every component k: [n, K_total] float64, by Woodbury and
        expanded squares (no [n, K, D] tensor)."""
        s2 = ISO_STD**2
        gram = self.factors.transpose(1, 2) @ self.factors  # [K, r, r]
        inner = torch.eye(RANK, dtype=gram.dtype, device=gram.device) * s2 + gram
        inner_inv = torch.linalg.inv(inner)
        logdet = torch.logdet(inner) + (self.dim - RANK) * math.log(s2)  # det(s2 I_D + U U^T)
        const = -0.5 * (self.dim * math.log(2 * math.pi) + logdet)  # [K]
        mean_proj = torch.einsum("kd,kdr->kr", self.means, self.factors)  # U_k^T m_k
        mean_sq = (self.means**2).sum(1)
        out = []
        for part in x.reshape(x.shape[0], -1).to(self.means).split(chunk):
            sq = (part**2).sum(1, keepdim=True) - 2 * part @ self.means.T + mean_sq  # |x - m_k|^2
            proj = torch.einsum("nd,kdr->nkr", part, self.factors) - mean_proj  # U_k^T (x - m_k)
            quad = (sq - torch.einsum("nkr,krq,nkq->nk", proj, inner_inv, proj)) / s2
            out.append(const[None] - 0.5 * quad)
        return torch.cat(out)

    def mode_coverage(self, x: torch.Tensor, labels: torch.Tensor, reference_ll: float | None = None) -> dict:
        """Per-class nearest-mode statistics of samples `x` generated for `labels`:
        class_accuracy   fraction whose most likely component belongs to the requested class
        mode_tv          mean over classes of the total variation between the frequencies of the nearest
                         mode (within the requested class) and the true mode weights (0 = perfect)
        modes_covered    fraction of (class, mode) pairs that get at least half their expected share
        nll_gap          (given `reference_ll`, true samples' mean best-component log-likelihood) how
                         many nats per dimension the samples' mean falls short of it (0 = as likely)."""
        ll = self.component_log_likelihoods(x)
        labels = labels.to(ll.device)
        best = ll.argmax(1)
        own = ll.reshape(-1, self.num_classes, self.modes)[torch.arange(len(labels)), labels]  # [n, modes]
        nearest = own.argmax(1)
        weights = self.log_weights.exp()
        tv, covered = [], 0
        for c in range(self.num_classes):
            pick = nearest[labels == c]
            freq = torch.bincount(pick, minlength=self.modes).double() / max(len(pick), 1)
            tv.append(0.5 * (freq - weights[c]).abs().sum().item())
            covered += int((freq >= 0.5 * weights[c]).sum())
        result = {
            "class_accuracy": (best // self.modes == labels).double().mean().item(),
            "mode_tv": float(np.mean(tv)),
            "modes_covered": covered / (self.num_classes * self.modes),
        }
        if reference_ll is not None:
            result["nll_gap"] = (reference_ll - ll.max(1).values.mean().item()) / self.dim
        return result

    def reference_log_likelihood(self, generator: torch.Generator, n: int = 10000) -> float:
        """True samples' mean best-component log-likelihood (the reference of `nll_gap`)."""
        x, _, _ = self.sample_with_modes(n, generator)
        return self.component_log_likelihoods(x).max(1).values.mean().item()


class FrechetReference:
    """Fréchet distance to fixed moments (mu, sigma) with sigma's square root computed once:
    tr sqrtm(S1 S2) = sum sqrt(eig(A S1 A)), A = S2^(1/2) symmetric, so each distance needs one
    symmetric eigendecomposition (float64, on the moments' device) instead of a general sqrtm."""

    def __init__(self, mu: torch.Tensor, sigma: torch.Tensor):
        self.mu, self.sigma = mu.double(), sigma.double()
        evals, evecs = torch.linalg.eigh(self.sigma)
        self.sqrt_sigma = (evecs * evals.clamp(min=0).sqrt()) @ evecs.T
        self.trace = torch.trace(self.sigma).item()

    def distance_to_moments(self, mu: torch.Tensor, sigma: torch.Tensor) -> float:
        mu, sigma = mu.to(self.mu), sigma.to(self.sigma)
        m = self.sqrt_sigma @ sigma @ self.sqrt_sigma
        tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum().item()
        diff = mu - self.mu
        return float(diff @ diff) + torch.trace(sigma).item() + self.trace - 2 * tr_sqrt

    def distance(self, samples: torch.Tensor) -> float:
        """FD between the sample moments of `samples` [n, ...] (unbiased covariance) and the reference."""
        x = samples.reshape(samples.shape[0], -1).to(self.mu)
        mu = x.mean(0)
        centred = x - mu
        return self.distance_to_moments(mu, centred.T @ centred / (x.shape[0] - 1))
