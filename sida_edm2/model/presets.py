"""Training presets as data: the six EDM2 img512 sizes with SiDA's settings (paper Table 7), plus `tiny`
(unit tests, millisecond CPU forwards), `demo` (the README demo, CPU-friendly) and `toy` (the toy
reproduction benchmark).

    from sida_edm2.model.presets import get_preset
    cfg = get_preset("edm2-img512-xs")
    net = Precond(**cfg["network"])

Keys of every preset:
    network           Precond keyword arguments (img_resolution, img_channels, label_dim, model_channels, ...)
    batch, batch_gpu  total images per optimizer step, and per GPU per micro-batch
    paper_num_gpus, paper_accum_rounds   the paper's run; batch = batch_gpu * gpus * accumulation rounds
    lr, adam_betas, adam_eps             Adam for both G and the fake score
    lambda_sid, lambda_adv_theta, lambda_adv_psi, alpha     loss scales and the SiD alpha
    ema_mimg          EMA half-life in Mimg (ramp-up ratio 0.05)
    sigma_init        the generator's fixed noise level; tmax   t ~ U(0, tmax) for the generator update
    fake_only_kimg, sid_only_kimg        SiDA / SiD2A phase thresholds in generator kimg (SiD ignores them)
    force_norm        forced weight normalisation on/off
    weight_recompute  recompute normalised MPConv weights in backward instead of keeping copies: saves about
                      6 bytes/parameter per trainable forward, costs 23% img/s at XS batch 64 on an H100
                      (benchmarks/RESULTS.md), so it is on only from L up, where memory is what limits
    dropout           the network's dropout (same value as network["dropout"])
"""

import copy
import dataclasses

# SiDA's settings shared by all img512 sizes (paper Table 7), the one source of these defaults.
SIDA_SETTINGS = dict(
    batch=2048,
    lr=5e-5,
    adam_betas=[0.0, 0.999],
    adam_eps=1e-6,
    lambda_sid=100.0,
    lambda_adv_theta=0.01,
    lambda_adv_psi=100.0,
    alpha=1.0,
    ema_mimg=2.0,
    sigma_init=2.5,
    tmax=0.8,
    fake_only_kimg=100,
    sid_only_kimg=200,
    force_norm=True,
)



@dataclasses.dataclass(frozen=True)
class _Img512Size:
    """What differs between the img512 sizes: EDM2's width and dropout, the paper's Table 7 batch split, and
    the memory/speed trade-off measured in benchmarks/RESULTS.md."""

    model_channels: int
    dropout: float
    batch_gpu: int  # images per GPU per micro-batch
    paper_num_gpus: int
    paper_accum_rounds: int
    weight_recompute: bool

    def preset(self) -> dict:
        network = dict(
            img_resolution=64,  # 512x512 images -> 64x64 SD-VAE latents
            img_channels=4,
            label_dim=1000,
            model_channels=self.model_channels,
            channel_mult=[1, 2, 3, 4],
            num_blocks=3,
            attn_resolutions=[16, 8],
            dropout=self.dropout,
            logvar_channels=128,
        )
        row = dataclasses.asdict(self)
        del row["model_channels"]
        return dict(network=network, **row, **SIDA_SETTINGS)


_IMG512_SIZES = {
    "xs": _Img512Size(model_channels=128, dropout=0.0, batch_gpu=64, paper_num_gpus=16, paper_accum_rounds=2,
                      weight_recompute=False),
    "s": _Img512Size(model_channels=192, dropout=0.0, batch_gpu=64, paper_num_gpus=8, paper_accum_rounds=4,
                     weight_recompute=False),
    "m": _Img512Size(model_channels=256, dropout=0.1, batch_gpu=32, paper_num_gpus=8, paper_accum_rounds=8,
                     weight_recompute=False),
    "l": _Img512Size(model_channels=320, dropout=0.1, batch_gpu=32, paper_num_gpus=8, paper_accum_rounds=8,
                     weight_recompute=True),
    "xl": _Img512Size(model_channels=384, dropout=0.1, batch_gpu=16, paper_num_gpus=8, paper_accum_rounds=16,
                      weight_recompute=True),
    "xxl": _Img512Size(model_channels=448, dropout=0.1, batch_gpu=2, paper_num_gpus=8, paper_accum_rounds=128,
                       weight_recompute=True),
}  # fmt: skip

PRESETS: dict[str, dict] = {f"edm2-img512-{size}": spec.preset() for size, spec in _IMG512_SIZES.items()}

# Unit tests: 16x16 latents, 2 levels (disc map 8x8), one block per level, attention at 8x8 with 16-channel
# heads (the default 64 would leave 32-channel blocks without attention). Phase thresholds such that SiDA's
# first iteration (nimg 0) trains only the fake score, the next two (nimg 8, 16 <= 16) the SiD term and
# the rest SiDA, so a few-step test run reaches all three phases.
PRESETS["tiny"] = dict(
    SIDA_SETTINGS,
    network=dict(
        img_resolution=16, img_channels=4, label_dim=10, model_channels=16, channel_mult=[1, 2], num_blocks=1,
        attn_resolutions=[8], channels_per_head=16, dropout=0.0, logvar_channels=16,
    ),
    batch=8, batch_gpu=4, paper_num_gpus=1, paper_accum_rounds=2, dropout=0.0, weight_recompute=True,
    fake_only_kimg=0, sid_only_kimg=0.016,
)

# README demo: 16x16 latents, 10 classes, 3 levels (disc map 4x4), a few minutes of CPU training.
PRESETS["demo"] = dict(
    SIDA_SETTINGS,
    network=dict(
        img_resolution=16, img_channels=4, label_dim=10, model_channels=32, channel_mult=[1, 2, 2],
        num_blocks=2, attn_resolutions=[8, 4], channels_per_head=32, dropout=0.0, logvar_channels=32,
    ),
    batch=32, batch_gpu=16, paper_num_gpus=1, paper_accum_rounds=2, dropout=0.0, lr=1e-4,
    weight_recompute=False,
    fake_only_kimg=0.32, sid_only_kimg=0.64,
)

# benchmarks/toy_reproduction.py: the demo network on 8x8 latents (levels 8, 4, 2; attention at the two
# lowest, as XS has it at /4 and /8) with every SiDA setting of the img512 presets, batch 2048 included.
PRESETS["toy"] = dict(
    SIDA_SETTINGS,
    network=dict(PRESETS["demo"]["network"], img_resolution=8, attn_resolutions=[4, 2]),
    batch_gpu=2048, paper_num_gpus=1, paper_accum_rounds=1, dropout=0.0, weight_recompute=False,
)


def get_preset(name: str) -> dict:
    """A deep copy of PRESETS[name] (callers may modify it); a clear KeyError on an unknown name."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
