"""A class-conditional latent distribution with known statistics, and the distances of a sampler to it.

    mix = ToyMixture.create(num_classes=10, modes=4, shape=(4, 8, 8), seed=0, device="cuda")
    x, onehot = mix.sample(256, generator)            # fresh latents + one-hot labels
    scores = MixtureScores(mix, generator)             # exact per-class moments, data percentiles
    scores.score(samples, labels)                      # cfd, noise_var_ratio, precision, recall, ...
    teacher = MixtureDenoiser(mix)                     # the exact denoiser: net(x, sigma, onehot)

Class c (uniform over classes) is a mixture of `modes` Gaussians with unequal weights MODE_WEIGHTS;
component (c, k) is N(m_ck, U_ck U_ck^T + s^2 I): a smooth mean image m_ck, a rank-r factor U_ck of
smooth images, and a small isotropic part s. Smooth means low spatial frequencies per channel, so the
mixture looks like latents (structure, not white noise). The per-element variance is MEAN_STD^2 +
RANK * FACTOR_STD^2 + ISO_STD^2 ~ 0.24, i.e. a standard deviation near EDM2's sigma_data 0.5.
Everything a sampler is compared with follows in closed form: the denoiser E[x0 | x_t, c] (so a perfect
teacher exists), each class's moments in the signal subspace spanned by the means and factors (so the
Fréchet distance is measured against the truth, not another finite sample) and each component's density
there. The finite-sample floor of every score is what the same number of true samples get.
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
KNN = 3  # neighbours that set the radii of the k-NN manifolds (structure_precision / structure_recall)


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
    # The signal subspace: where the means and the low-rank factors live.

    def signal_basis(self) -> torch.Tensor:
        """Orthonormal basis Q [D, q] of the span of every mean and factor (q = 124 smooth directions for
        4 channels with frequencies up to MAX_FREQ). Outside it every component is N(0, s^2) per
        dimension, so a sampler's errors split into structure (inside) and noise level (outside)."""
        vectors = torch.cat([self.means, self.factors.transpose(1, 2).reshape(-1, self.dim)])
        u, svals, _ = torch.linalg.svd(vectors.T, full_matrices=False)
        return u[:, svals > svals[0] * 1e-9]

    def project(self, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(means [K, q], factors [K, q, r]) in the coordinates of `basis` (exact: both lie in its span)."""
        return self.means @ basis, torch.einsum("kdr,dq->kqr", self.factors, basis)

    def class_moments(self, basis: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Exact (mean [q], covariance [q, q]) of every class in the coordinates of `basis`."""
        means, factors = self.project(basis)
        eye = torch.eye(basis.shape[1], dtype=means.dtype, device=means.device)
        out = []
        for c in range(self.num_classes):
            w = self.log_weights[c].exp()
            rows = slice(c * self.modes, (c + 1) * self.modes)
            m, u = means[rows], factors[rows]
            mu = w @ m
            second = torch.einsum("k,kqr,kpr->qp", w, u, u) + (m.T * w) @ m + ISO_STD**2 * eye
            out.append((mu, second - torch.outer(mu, mu)))
        return out


def lowrank_log_likelihoods(
    x: torch.Tensor, means: torch.Tensor, factors: torch.Tensor, iso_var: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """log N(x_i; m_k, U_k U_k^T + a_i I) for every sample i and component k, by Woodbury and expanded
    squares (no [n, K, D] tensor). x [n, D]; means [K, D]; factors [K, D, r]; iso_var a: a float or
    [n]. Returns (log-likelihoods [n, K], c [n, K, r] = (a I + U_k^T U_k)^-1 U_k^T (x_i - m_k)), the
    second being what the posterior mean needs. Every operation is differentiable in x."""
    n, dim = x.shape
    rank = factors.shape[2]
    a = torch.as_tensor(iso_var, dtype=x.dtype, device=x.device).reshape(-1, 1)  # [n or 1, 1]
    gram = factors.transpose(1, 2) @ factors  # [K, r, r]
    eye = torch.eye(rank, dtype=x.dtype, device=x.device)
    inner = a[..., None, None] * eye + gram[None]  # [n or 1, K, r, r]: one inverse per noise level
    proj = torch.einsum("nd,kdr->nkr", x, factors) - torch.einsum("kd,kdr->kr", means, factors)[None]
    c = torch.einsum("nkrs,nks->nkr", torch.linalg.inv(inner).expand(n, -1, -1, -1), proj)  # [n, K, r]
    sq = (x**2).sum(1, keepdim=True) - 2 * x @ means.T + (means**2).sum(1)[None]  # |x - m_k|^2
    quad = (sq - (proj * c).sum(2)) / a
    logdet = torch.logdet(inner) + (dim - rank) * torch.log(a)
    return -0.5 * (dim * math.log(2 * math.pi) + logdet + quad), c


class MixtureDenoiser(torch.nn.Module):
    """The mixture's exact denoiser E[x0 | x0 + sigma n = x; class], a perfect teacher with the EDM2
    Precond call signature net(x, sigma, onehot) -> [N, C, H, W], differentiable in x.

    Per component k, x0 ~ N(m_k, S_k) with S_k = U_k U_k^T + s^2 I, so E[x0 | x, k] = x - sigma^2
    (S_k + sigma^2 I)^-1 (x - m_k) = x - (sigma^2 / a) (d - U_k c_k) with a = s^2 + sigma^2, d = x - m_k,
    c_k = (a I + U_k^T U_k)^-1 U_k^T d (Woodbury); the components of the requested class are weighted
    by their posterior p(k | x) ~ pi_k N(x; m_k, S_k + sigma^2 I) (every class's when onehot is None).
    Computed in float64 whatever the input; returns the input's dtype."""

    def __init__(self, mixture: ToyMixture):
        super().__init__()
        self.register_buffer("means", mixture.means.clone())
        self.register_buffer("factors", mixture.factors.clone())
        log_prior = mixture.log_weights - math.log(mixture.num_classes)
        self.register_buffer("log_prior", log_prior.reshape(-1).clone())
        self.modes, self.shape = mixture.modes, mixture.shape
        self.img_channels, self.img_resolution = mixture.shape[0], mixture.shape[1]
        self.label_dim = mixture.num_classes

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        flat = x.reshape(n, -1).double()
        sigma = torch.as_tensor(sigma, device=x.device).double().reshape(-1).expand(n)
        a = ISO_STD**2 + sigma**2
        ll, c = lowrank_log_likelihoods(flat, self.means, self.factors, a)
        logits = ll + self.log_prior
        if class_labels is not None:  # only the requested class's components
            component_class = torch.arange(logits.shape[1], device=x.device) // self.modes
            allowed = class_labels.to(x.device).argmax(1)[:, None] == component_class[None]
            logits = logits.masked_fill(~allowed, -math.inf)
        w = torch.softmax(logits, dim=1)  # [n, K]
        mean_part = flat - w @ self.means
        factor_part = torch.einsum("nkr,kdr->nd", w[..., None] * c, self.factors)
        out = flat - (sigma**2 / a)[:, None] * (mean_part - factor_part)
        return out.reshape(x.shape).to(x.dtype)


class MixtureScores:
    """What a sampler gets right about the mixture, from samples x generated for known labels:

    cfd              class-conditional Fréchet distance in the signal subspace: per class, the FD of the
                     samples' coordinates in `signal_basis` to that class's exact moments; mean over
                     classes (a sampler that swaps classes scores as badly as one that ignores them)
    noise_var_ratio  mean squared norm per dimension outside the signal subspace, over its true value
                     s^2 (1 = right; > 1 too noisy; < 1 too smooth)
    precision        share of samples whose in-class log density (signal subspace) is above the 1st
                     percentile of true samples' of that class (true samples: 0.99)
    recall           mode coverage: per class sum_k min(share of the class's samples that are precise
                     and whose most likely mode is k, pi_k), mean over classes (1 = every mode at its
                     weight; a class collapsed on its largest mode scores 0.4)
    modes_covered    share of the (class, mode) pairs with at least half their expected share
    structure_precision, structure_recall
                     k-NN precision and recall (Kynkaenniemi et al. 2019, k = KNN) in each class's
                     structure subspace (the span of its modes' mean differences and factors, <= 19
                     dimensions): the share of samples inside the union of the true samples' k-NN balls,
                     and of true samples inside the samples' balls, against as many true samples of the
                     class as there are samples (true samples: about 0.9 each)
    Densities are those of the signal-subspace coordinates, so that the noise level (reported on its own)
    does not drown the structure. Even there about 120 directions hold only the isotropic std s = 0.05,
    so a sampler with a few times the true noise variance lands below the 1st percentile whatever its
    structure: precision, recall and modes_covered then read 0. The structure scores measure distances
    at the scale of the factors instead (k-NN radii ~1, the isotropic part ~0.2), so they still say
    whether the samples sit on the modes and cover them. `reference_n` true samples set the per-class
    percentiles and the k-NN reference sets."""

    def __init__(self, mix: ToyMixture, generator: torch.Generator, reference_n: int = 20000):
        self.mix = mix
        self.basis = mix.signal_basis()
        self.means, self.factors = mix.project(self.basis)
        self.references = [FrechetReference(mu, cov) for mu, cov in mix.class_moments(self.basis)]
        x, labels, _ = mix.sample_with_modes(reference_n, generator)
        coords = x.reshape(x.shape[0], -1).to(self.basis) @ self.basis
        own = self._in_class(coords, labels)
        density = torch.logsumexp(own, dim=1)
        self.thresholds = torch.stack(
            [torch.quantile(density[labels == c], 0.01) for c in range(mix.num_classes)]
        )
        self.structure = [self._structure_basis(c) for c in range(mix.num_classes)]
        self.structure_refs = [self._structure_coords(coords[labels == c], c) for c in range(mix.num_classes)]

    def _structure_basis(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(centre [q], orthonormal basis [q, d]) of class c's structure subspace, in signal coordinates."""
        rows = slice(c * self.mix.modes, (c + 1) * self.mix.modes)
        means, factors = self.means[rows], self.factors[rows]
        centre = means.mean(0)
        vectors = torch.cat([means - centre, factors.transpose(1, 2).reshape(-1, means.shape[1])])
        u, svals, _ = torch.linalg.svd(vectors.T, full_matrices=False)
        return centre, u[:, svals > svals[0] * 1e-9]

    def _structure_coords(self, coords: torch.Tensor, c: int) -> torch.Tensor:
        centre, basis = self.structure[c]
        return (coords - centre) @ basis

    @staticmethod
    def _knn_coverage(points: torch.Tensor, manifold: torch.Tensor) -> torch.Tensor:
        """Whether each point lies in the union of the balls around `manifold`'s points whose radius is
        the distance to their KNN-th nearest neighbour in `manifold`: bool [len(points)]."""
        radii = torch.cdist(manifold, manifold).kthvalue(KNN + 1, dim=1).values  # the first is itself
        return (torch.cdist(points, manifold) <= radii[None]).any(dim=1)

    def _in_class(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log pi_k + log N(coords; component k) for the requested class's modes, from signal-subspace
        coordinates Q^T x [n, q]: [n, modes]."""
        ll, _ = lowrank_log_likelihoods(coords, self.means, self.factors, ISO_STD**2)
        ll = ll + self.mix.log_weights.reshape(-1)
        modes = self.mix.modes
        rows = labels.to(ll.device)[:, None] * modes + torch.arange(modes, device=ll.device)
        return ll.gather(1, rows)

    def score(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
        mix, labels = self.mix, labels.to(self.basis.device)
        flat = x.reshape(x.shape[0], -1).to(self.basis)
        coords = flat @ self.basis
        outside = flat - coords @ self.basis.T
        own = self._in_class(coords, labels)
        precise = torch.logsumexp(own, dim=1) >= self.thresholds[labels]
        nearest = own.argmax(1)
        weights = mix.log_weights.exp()
        cfd, recall, covered = [], [], 0
        on_modes, covering = [], []
        for c in range(mix.num_classes):
            mine = labels == c
            cfd.append(self.references[c].distance(coords[mine]))
            if int(mine.sum()) > KNN:
                samples = self._structure_coords(coords[mine], c)
                truth = self.structure_refs[c][: len(samples)]  # as many true samples as samples
                on_modes.append(self._knn_coverage(samples, truth))
                covering.append(self._knn_coverage(truth, samples).double().mean().item())
            counts = torch.bincount(nearest[mine & precise], minlength=mix.modes).double()
            share = counts / max(int(mine.sum()), 1)
            recall.append(torch.minimum(share, weights[c]).sum().item())
            covered += int((share >= 0.5 * weights[c]).sum())
        return {
            "cfd": float(np.mean(cfd)),
            "noise_var_ratio": (outside**2).sum(1).mean().item()
            / (mix.dim - self.basis.shape[1])
            / ISO_STD**2,
            "precision": precise.double().mean().item(),
            "recall": float(np.mean(recall)),
            "modes_covered": covered / (mix.num_classes * mix.modes),
            "structure_precision": torch.cat(on_modes).double().mean().item() if on_modes else math.nan,
            "structure_recall": float(np.mean(covering)) if covering else math.nan,
        }


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
