"""The VAE wrapper on a tiny real AutoencoderKL: [0,1] inputs, float32 moments, EDM2 decoding."""

import pytest
import torch
from helpers_latent import TINY_VAE_CONFIG, save_tiny_vae

from latent.scaling import scale_latents
from latent.vae import (
    SD_VAE_FT_MSE_CONFIG,
    build_vae,
    decode_to_uint8,
    encode_moments,
    load_vae,
    vae_revision,
)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny")


def test_encode_moments_are_the_posterior_of_unit_range_pixels(vae_dir):
    vae = load_vae(str(vae_dir), "cpu", torch.float32)
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    mean, std = encode_moments(vae, pixels)
    posterior = vae.encode(pixels.float() / 255).latent_dist
    assert mean.shape == (3, 4, 4, 4) and mean.dtype == torch.float32
    torch.testing.assert_close(mean, posterior.mean)
    torch.testing.assert_close(std, posterior.std)


def test_decode_to_uint8_inverts_scaling_and_truncates(vae_dir):
    vae = load_vae(str(vae_dir), "cpu", torch.float32)
    raw = torch.randn(2, 4, 4, 4)
    images = decode_to_uint8(vae, scale_latents(raw))
    expected = (vae.decode(raw).sample.clamp(0, 1) * 255).to(torch.uint8)
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 32, 32)
    assert (images.int() - expected.int()).abs().max() <= 1  # scale/unscale round trip: float rounding


def test_cpu_refuses_bfloat16():
    with pytest.raises(ValueError, match="float32 on CPU"):
        build_vae(TINY_VAE_CONFIG, "cpu", torch.bfloat16)


def test_sd_vae_ft_mse_architecture_size():
    # The benchmark's random-weight stand-in must be the real architecture (83.65M parameters).
    with torch.device("meta"):
        from diffusers import AutoencoderKL

        vae = AutoencoderKL(**SD_VAE_FT_MSE_CONFIG)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863


def test_vae_revision_of_a_local_directory(vae_dir):
    revision = vae_revision(str(vae_dir))
    assert revision.startswith("local-sha256:") and revision == vae_revision(str(vae_dir))


def test_padding_to_a_fixed_batch_changes_no_output(vae_dir):
    # A VAE compiled for one batch shape gets the last, smaller batch padded; GroupNorm is per sample,
    # so the padded samples must not change the real ones.
    vae = load_vae(str(vae_dir), "cpu", torch.float32)
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    mean, std = encode_moments(vae, pixels)
    padded_mean, padded_std = encode_moments(vae, pixels, pad_to=5)
    assert padded_mean.shape == mean.shape
    torch.testing.assert_close(padded_mean, mean)
    torch.testing.assert_close(padded_std, std)
    latents = torch.randn(2, 4, 4, 4)
    assert torch.equal(decode_to_uint8(vae, latents, pad_to=4), decode_to_uint8(vae, latents))


def test_layout_switch_and_sdpa_attention(vae_dir):
    from diffusers.models.attention_processor import AttnProcessor2_0

    vae = load_vae(str(vae_dir), "cpu", torch.float32, channels_last=False)
    assert {type(p) for p in vae.attn_processors.values()} == {AttnProcessor2_0}
    assert vae.encoder.conv_in.weight.is_contiguous()
