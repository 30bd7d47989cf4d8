"""A tiny diffusers latent text-to-image snapshot built here (random weights, 8x8 latents, 16x16
pixels, cross_attention_dim 16): nothing is downloaded. Used by the diffusers-sd tests."""

from __future__ import annotations

from pathlib import Path

import torch

EMBED_DIM, LATENT, CHANNELS = 16, 8, 4


def tiny_sd_snapshot(d: Path, prediction_type: str = "epsilon", seed: int = 0, out_scale: float = 0.2) -> Path:
    """unet/ (UNet2DConditionModel), vae/ (AutoencoderKL), scheduler/ (SD's DDIM config) at ``d``.
    ``out_scale`` shrinks the UNet's last conv so the random network's predictions stay moderate."""
    import diffusers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=LATENT, in_channels=CHANNELS, out_channels=CHANNELS, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=EMBED_DIM, norm_num_groups=8,
        attention_head_dim=4)
    with torch.no_grad():
        unet.conv_out.weight.mul_(out_scale)
        unet.conv_out.bias.mul_(out_scale)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                                  up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16],
                                  latent_channels=CHANNELS, norm_num_groups=4, sample_size=2 * LATENT)
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                    prediction_type=prediction_type)
    unet.save_pretrained(d / "unet")
    vae.save_pretrained(d / "vae")
    sched.save_pretrained(d / "scheduler")
    return d


def random_prompts(n: int, seq_len: int = 5, dim: int = EMBED_DIM, n_negative: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, seq_len, dim, generator=g), torch.randn(n_negative, seq_len, dim, generator=g)
