"""EDM2's magnitude-preserving UNet and its preconditioner, with the SiDA additions (docs/ARCHITECTURE.md,
"The networks").

State-dict names and shapes equal the official EDM2 ones, so official snapshots load 1:1:

    net = Precond(img_resolution=64, img_channels=4, label_dim=1000, model_channels=128)   # EDM2-XS
    D = net(x, sigma, onehot)                                     # denoised, float32 [B,C,H,W]
    D, disc = net(x, sigma, onehot, output="both")                # plus the discriminator map
    disc, logvar = net(x, sigma, onehot, output="disc", return_logvar=True)   # encoder only

The discriminator map is the channel mean of the last encoder block's output: [B,1,R/2^(k-1),R/2^(k-1)]
for a channel_mult of length k, i.e. [B,1,H/8,W/8] for the 4-level img512 networks.
"""

import json
import math

import torch

from sida_edm2.model.mp_layers import (
    MPConv,
    MPFourier,
    fused_kernels,
    is_channels_last,
    mp_cat,
    mp_silu,
    mp_sum,
    normalize,
    resample,
)

# The fixed noise level at which the one-step generator is evaluated (paper Table 7, sigma_init).
SIGMA_INIT = 2.5

OUTPUT_MODES = ("denoised", "disc", "both")


# The dtypes a network computes in (its compute_dtype), by the precision names of the CLIs and configs.
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Block(torch.nn.Module):
    """One residual block of the encoder ('enc') or decoder ('dec'), optionally with self-attention."""

    def __init__(
        self,
        in_channels: int,  # Input channels.
        out_channels: int,  # Output channels.
        emb_channels: int,  # Channels of the noise/label embedding.
        flavor: str = "enc",  # 'enc': skip conv + pixel norm before the residual branch; 'dec': skip after.
        resample_mode: str = "keep",  # 'keep', 'down' (2x2 average) or 'up' (nearest).
        resample_filter: list[float] | tuple[float, ...] = (1, 1),  # Separable resampling filter.
        attention: bool = False,  # Add cosine self-attention after the residual branch.
        channels_per_head: int = 64,  # Channels per attention head.
        dropout: float = 0.0,  # Dropout probability after the first convolution (training only).
        res_balance: float = 0.3,  # mp_sum weight of the residual branch.
        attn_balance: float = 0.3,  # mp_sum weight of the attention branch.
        clip_act: float | None = 256,  # Clip activations to +-clip_act (None: no clipping).
    ):
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"flavor must be 'enc' or 'dec', got {flavor!r}")
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.resample_filter = list(resample_filter)
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        # The magnitude-preserving chains as fused Triton kernels (sida_edm2.model.speed.set_fused).
        self.fused = False
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, [3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, [])
        self.conv_res1 = MPConv(out_channels, out_channels, [3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, [1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, [1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, [1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.fused and not torch.compiler.is_compiling():
            return self._forward_fused(x, emb)
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        # Residual branch, modulated by the embedding (emb_gain starts at 0: modulation starts at 1).
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout != 0:
            y = torch.nn.functional.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads != 0:
            x = mp_sum(x, self._attention(x), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clip_(-self.clip_act, self.clip_act)  # x is a fresh tensor here, never a block input
        return x

    def _forward_fused(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """forward with each elementwise chain in one kernel of sida_edm2.model.mp_fused (same math)."""
        fused = fused_kernels()
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = fused.pixel_norm(x)
        y = self.conv_res0(fused.mp_silu(x))
        y = fused.modulated_mp_silu(y, self.emb_linear(emb, gain=self.emb_gain))
        if self.training and self.dropout != 0:
            y = torch.nn.functional.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        if self.num_heads == 0:
            return fused.mp_sum(x, y, t=self.res_balance, clip=self.clip_act)
        x = fused.mp_sum(x, y, t=self.res_balance)
        return fused.mp_sum(x, self._attention(x), t=self.attn_balance, clip=self.clip_act)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine attention. The qkv channels are interleaved per head as [heads, C_head, 3]: this is
        what makes official EDM2 weights work, a [3, heads, C_head] split would not."""
        N, C, H, W = x.shape
        qkv = self.attn_qkv(x)
        if is_channels_last(qkv):
            # Channels innermost: [N, HW, heads, C_head, 3] is a view; the same values as below.
            qkv = qkv.permute(0, 2, 3, 1).reshape(N, H * W, self.num_heads, -1, 3)
            q, k, v = (t.transpose(1, 2).contiguous() for t in normalize(qkv, dim=3).unbind(4))
        else:
            # Each of q, k, v: [N, heads, C_head, HW], normalised over C_head. SDPA computes
            # softmax(q^T k / sqrt(C_head)) v in the [N, heads, HW, C_head] layout; its fused kernels
            # want the last dimension contiguous.
            qkv = qkv.reshape(N, self.num_heads, -1, 3, H * W)
            q, k, v = (t.transpose(2, 3).contiguous() for t in normalize(qkv, dim=2).unbind(3))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # [N, heads, HW, C_head]
        if is_channels_last(x):
            return self.attn_proj(y.transpose(1, 2).reshape(N, H, W, C).permute(0, 3, 1, 2))
        return self.attn_proj(y.transpose(2, 3).reshape(N, C, H, W))


class UNet(torch.nn.Module):
    """EDM2's UNet. forward returns the raw network output F, the discriminator map, or both."""

    def __init__(
        self,
        img_resolution: int,  # Image (latent) resolution.
        img_channels: int,  # Image (latent) channels.
        label_dim: int,  # Number of classes, 0 = unconditional.
        model_channels: int = 192,  # Base channel count.
        channel_mult: list[int] | tuple[int, ...] = (1, 2, 3, 4),  # Per-level channel multipliers.
        channel_mult_noise: int | None = None,  # Noise-embedding multiplier (None: channel_mult[0]).
        channel_mult_emb: int | None = None,  # Embedding multiplier (None: max(channel_mult)).
        num_blocks: int = 3,  # Residual blocks per encoder level (decoder: num_blocks + 1).
        attn_resolutions: list[int] | tuple[int, ...] = (16, 8),  # Resolutions with self-attention.
        label_balance: float = 0.5,  # mp_sum weight of the label embedding vs the noise embedding.
        concat_balance: float = 0.5,  # mp_cat weight of the skip connections.
        **block_kwargs,  # Forwarded to every Block (resample_filter, channels_per_head, dropout, ...).
    ):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * (channel_mult_noise if channel_mult_noise is not None else channel_mult[0])
        cemb = model_channels * (channel_mult_emb if channel_mult_emb is not None else max(channel_mult))
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))
        self.fused = False  # fused skip concatenations (sida_edm2.model.speed.set_fused)

        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, [])
        self.emb_label = MPConv(label_dim, cemb, []) if label_dim != 0 else None

        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1  # the input gets a constant-ones channel
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, [3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(
                    cout, cout, cemb, flavor="enc", resample_mode="down", **block_kwargs
                )
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(
                    cin, cout, cemb, flavor="enc", attention=(res in attn_resolutions), **block_kwargs
                )

        self.dec = torch.nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(
                    cout, cout, cemb, flavor="dec", attention=True, **block_kwargs
                )
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(
                    cout, cout, cemb, flavor="dec", resample_mode="up", **block_kwargs
                )
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(
                    cin, cout, cemb, flavor="dec", attention=(res in attn_resolutions), **block_kwargs
                )
        self.out_conv = MPConv(cout, img_channels, [3, 3])

    def embedding(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """The noise/label embedding every block is modulated by (its own method so it can be compiled)."""
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            label_emb = self.emb_label(class_labels * math.sqrt(class_labels.shape[1]))
            emb = mp_sum(emb, label_emb, t=self.label_balance)
        return mp_silu(emb)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        output: str = "denoised",
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: [B,C,H,W] in the compute dtype; noise_labels: [B] float32; class_labels: [B|1, label_dim].
        Returns F (output "denoised"), the float32 discriminator map ("disc"), or (F, disc) ("both")."""
        if output not in OUTPUT_MODES:
            raise ValueError(f"output must be one of {OUTPUT_MODES}, got {output!r}")
        emb = self.embedding(noise_labels, class_labels)
        fused = self.fused and not torch.compiler.is_compiling()
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        disc = x.to(torch.float32).mean(dim=1, keepdim=True) if output != "denoised" else None
        if output == "disc":
            return disc

        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance, fused=fused)
            x = block(x, emb)
        x = self.out_conv(x, gain=self.out_gain)
        return x if output == "denoised" else (x, disc)


def precond_coefficients(
    sigma: torch.Tensor | float, sigma_data: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM preconditioning (c_skip, c_out, c_in, c_noise) for noise level(s) sigma, as float32 tensors
    of sigma's shape: D(x) = c_skip*x + c_out*F(c_in*x, c_noise)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    sd2 = sigma_data**2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * sigma_data / (sigma**2 + sd2).sqrt()
    c_in = 1 / (sd2 + sigma**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def _jsonable(value):
    """Tuples -> lists etc., so init_kwargs survive a JSON round trip unchanged."""
    return json.loads(json.dumps(value))


class Precond(torch.nn.Module):
    """EDM2 preconditioned denoiser D(x; sigma, c) with an optional logvar head (uncertainty u(sigma))."""

    def __init__(
        self,
        img_resolution: int,  # Image (latent) resolution.
        img_channels: int,  # Image (latent) channels.
        label_dim: int,  # Number of classes, 0 = unconditional.
        use_fp16: bool = True,  # Default compute_dtype float16 (CUDA only; float32 elsewhere).
        sigma_data: float = 0.5,  # Expected standard deviation of the training data.
        logvar_channels: int | None = 128,  # Fourier features of the logvar head; 0/None: no head.
        **unet_kwargs,  # UNet keyword arguments (model_channels, channel_mult, dropout, ...).
    ):
        super().__init__()
        self.init_kwargs = _jsonable(
            dict(
                img_resolution=img_resolution,
                img_channels=img_channels,
                label_dim=label_dim,
                use_fp16=use_fp16,
                sigma_data=sigma_data,
                logvar_channels=logvar_channels,
                **unet_kwargs,
            )
        )
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.sigma_data = sigma_data
        # Writable: e.g. torch.bfloat16. float16 runs only on CUDA (EDM2 behaviour).
        self.compute_dtype = torch.float16 if use_fp16 else torch.float32
        # Writable: run the UNet on channels-last activations (same values; faster convolutions on GPU).
        self.channels_last = False
        self.unet = UNet(
            img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs
        )
        self.logvar_fourier = MPFourier(logvar_channels) if logvar_channels else None
        self.logvar_linear = MPConv(logvar_channels, 1, []) if logvar_channels else None

    def coefficients(self, sigma: torch.Tensor | float):
        """(c_skip, c_out, c_in, c_noise) of this network's sigma_data."""
        return precond_coefficients(sigma, self.sigma_data)

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        force_fp32: bool = False,
        return_logvar: bool = False,
        output: str = "denoised",
    ):
        """See the module docstring. sigma: scalar or [B]; class_labels: one-hot [B, label_dim] (None
        means zeros). All outputs are float32."""
        if return_logvar and self.logvar_linear is None:
            raise ValueError("return_logvar=True needs a logvar head (logvar_channels > 0)")
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        if sigma.shape[0] == 1:
            sigma = sigma.expand(x.shape[0], 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = self.compute_dtype
        if force_fp32 or (dtype == torch.float16 and x.device.type != "cuda"):
            dtype = torch.float32

        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        c_noise = c_noise.flatten()
        x_in = (c_in * x).to(dtype)
        if self.channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        result = self.unet(x_in, c_noise, class_labels, output=output)
        # Outputs leave in the standard layout whatever the UNet ran in (a copy only with channels_last).
        if output == "denoised":
            outputs = (c_skip * x + c_out * result.to(torch.float32).contiguous(),)
        elif output == "disc":
            outputs = (result.contiguous(),)
        else:
            F_x, disc = result
            outputs = (c_skip * x + c_out * F_x.to(torch.float32).contiguous(), disc.contiguous())
        if return_logvar:
            logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
            outputs = (*outputs, logvar.to(torch.float32))
        return outputs[0] if len(outputs) == 1 else outputs
