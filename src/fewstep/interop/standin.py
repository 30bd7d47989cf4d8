"""A small stand-in for google/ddpm-cifar10-32: a diffusers source dir of the same config family, so
profiles/ddpm-cifar10.yaml (and its --smoke) runs without the download.

Same family as the real model (diffusers 0.42.1 ``UNet2DModel`` in DDPM's configuration: block types
Down/AttnDown/Down/Down, one-head attention, ``freq_shift=1``, ``flip_sin_to_cos=False``,
``downsample_padding=0``, ``norm_eps=1e-6``; fewstep.peers.ddpm_cifar10_unet is the full-size one)
with narrower blocks, and the real model's scheduler config (``DDPMScheduler``, linear betas 1e-4 to
0.02, T = 1000, epsilon prediction). Written as ``save_pretrained`` writes it, in the snapshot's flat
layout: config.json + diffusion_pytorch_model.safetensors + scheduler_config.json. Random weights,
or a few steps of the DDPM epsilon loss on prepared images (``train_steps``).

diffusers is imported inside the functions (an optional extra).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep import storage
from fewstep.progress import progress as progress_bar

# google/ddpm-cifar10-32's scheduler_config.json (DDPMScheduler)
DDPM_CIFAR10_SCHEDULER: dict[str, Any] = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                              beta_schedule="linear", prediction_type="epsilon", clip_sample=True,
                                              variance_type="fixed_large")


def standin_unet(image_size: int = 32, channels: int = 16, layers_per_block: int = 1) -> torch.nn.Module:
    """DDPM CIFAR-10's UNet2DModel with ``channels`` x (1, 2, 2, 2) blocks (the real one: 128; 4 levels
    need image_size divisible by 8)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import UNet2DModel

    if image_size % 8:
        raise ValueError(f"the DDPM UNet has 4 levels: image_size must be divisible by 8, got {image_size}")
    c = int(channels)
    return UNet2DModel(
        sample_size=image_size, in_channels=3, out_channels=3,
        block_out_channels=(c, 2 * c, 2 * c, 2 * c), layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
        norm_num_groups=min(8, c), dropout=0.0,
    )


def unet_from_config(config_json: str | Path) -> torch.nn.Module:
    """A UNet2DModel built from a source's config.json, random weights (for counting FLOPs)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import UNet2DModel

    return UNet2DModel.from_config(UNet2DModel.load_config(str(Path(config_json).parent)))


def _train(unet: torch.nn.Module, scheduler: Any, images: np.ndarray, steps: int, batch_size: int, lr: float,
           seed: int, progress: bool) -> list[float]:
    """``steps`` AdamW steps of DDPM's epsilon loss on uint8 NHWC ``images`` (diffusers' add_noise)."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    unet.train()
    losses = []
    for _ in progress_bar(range(steps), enabled=progress, desc="stand-in"):
        x = data[torch.randint(0, len(data), (batch_size,), generator=gen)].float() / 127.5 - 1.0
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        eps = torch.randn(x.shape, generator=gen)
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(x, eps, t), t).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def write_standin(out: str | Path, *, image_size: int = 32, channels: int = 16, seed: int = 0,
                  images: np.ndarray | None = None, train_steps: int = 0, batch_size: int = 16, lr: float = 2e-4,
                  progress: bool = False, scheduler: dict[str, Any] | None = None) -> Path:
    """Write the stand-in source dir ``out`` (atomically) and return it. ``images``: uint8 (N, H, W, 3)
    to train on for ``train_steps`` steps (0: random weights). ``scheduler``: overrides of the
    scheduler config (e.g. a smaller num_train_timesteps for a test)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    unet = standin_unet(image_size, channels)
    sched = DDPMScheduler(**{**DDPM_CIFAR10_SCHEDULER, **(scheduler or {})})
    if train_steps:
        if images is None or images.shape[1:] != (image_size, image_size, 3):
            raise ValueError(f"training the stand-in needs uint8 images (N, {image_size}, {image_size}, 3)")
        _train(unet, sched, images, train_steps, batch_size, lr, seed, progress)
    with storage.atomic_dir(out) as tmp:
        unet.eval().save_pretrained(tmp, safe_serialization=True)
        sched.save_pretrained(tmp)
    return Path(out)
