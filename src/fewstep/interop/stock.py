"""The stock diffusers recipe: the yardstick fewstep's teacher is measured against (issue 19 part 2).

What a diffusers user would train on the same prepared images with the library's own tutorial
recipe, for the same wall-clock seconds as fewstep's teacher (benchmarks/stock_recipe.py):

* ``UNet2DModel`` in the layout of the diffusers course's from-scratch unit (down blocks Down,
  AttnDown, AttnDown; up blocks AttnUp, AttnUp, Up; ``layers_per_block`` 2; the library's defaults
  otherwise) at block widths (32, 64, 96): 2.69M parameters at any image size (the issue's
  "2.7M"; the issue does not give the layout, so this one is a choice). Image size divisible by 4.
* eps-prediction, ``DDPMScheduler`` with linear betas 1e-4 to 0.02 over T = 1000 (its defaults),
  noise added with its ``add_noise``, timesteps uniform on 0..T-1, plain MSE to the noise.
* AdamW at a constant 3e-4, batch 64, random horizontal flips and grad-norm clip 1.0 (as diffusers'
  ``train_unconditional.py``), no EMA (its default).
* Sampling: ``DDIMScheduler.from_config`` of the same scheduler (eta 0, its default spacing and
  ``clip_sample``), the loop of diffusers' ``DDIMPipeline``.

diffusers is imported inside the functions (an optional extra; only fewstep.peers and this package
import it).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from fewstep.progress import progress as progress_bar

BLOCK_OUT_CHANNELS: tuple[int, ...] = (32, 64, 96)
DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
SCHEDULER: dict[str, Any] = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                 prediction_type="epsilon")
LR, BATCH, GRAD_CLIP = 3e-4, 64, 1.0


def _diffusers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers

    return diffusers


def stock_unet(image_size: int, block_out_channels: Sequence[int] = BLOCK_OUT_CHANNELS) -> torch.nn.Module:
    """The recipe's ``UNet2DModel`` for square RGB images of ``image_size`` (random weights)."""
    if image_size % 2 ** (len(block_out_channels) - 1):
        raise ValueError(f"{len(block_out_channels)} levels need image_size divisible by "
                         f"{2 ** (len(block_out_channels) - 1)}, got {image_size}")
    return _diffusers().UNet2DModel(sample_size=image_size, in_channels=3, out_channels=3, layers_per_block=2,
                                    block_out_channels=tuple(block_out_channels), down_block_types=DOWN_BLOCKS,
                                    up_block_types=UP_BLOCKS)


def stock_scheduler():
    """The recipe's training scheduler (``DDPMScheduler``, linear betas, eps-prediction)."""
    return _diffusers().DDPMScheduler(**SCHEDULER)


@dataclass
class StockRun:
    unet: torch.nn.Module
    scheduler: Any
    steps: int
    seconds: float
    final_loss: float
    params: int


def train_stock(images: np.ndarray, seconds: float, *, batch_size: int = BATCH, lr: float = LR, seed: int = 0,
                block_out_channels: Sequence[int] = BLOCK_OUT_CHANNELS, max_steps: int | None = None,
                progress: bool = True) -> StockRun:
    """Train the recipe on uint8 NHWC ``images`` until ``seconds`` of wall time have passed (or
    ``max_steps``); every draw comes from one generator seeded with ``seed``."""
    torch.manual_seed(seed)
    unet = stock_unet(images.shape[1], block_out_channels)
    sched = stock_scheduler()
    gen = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    unet.train()
    T = sched.config.num_train_timesteps
    bar = progress_bar(total=max(1, int(seconds)), desc="stock recipe (s)", enabled=progress)
    steps, loss_sum, loss_n, last = 0, 0.0, 0, 0.0
    t0 = time.perf_counter()
    while (time.perf_counter() - t0) < seconds and (max_steps is None or steps < max_steps):
        x = data[torch.randint(0, len(data), (batch_size,), generator=gen)].float() / 127.5 - 1.0
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        t = torch.randint(0, T, (batch_size,), generator=gen)
        eps = torch.randn(x.shape, generator=gen)
        loss = torch.nn.functional.mse_loss(unet(sched.add_noise(x, eps, t), t).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), GRAD_CLIP)
        opt.step()
        steps += 1
        loss_sum, loss_n = loss_sum + float(loss.detach()), loss_n + 1
        now = int(time.perf_counter() - t0)
        if now > last:
            bar.update(min(now, int(seconds)) - last)
            bar.set_postfix(steps=steps, loss=f"{loss_sum / loss_n:.4f}")
            last, loss_sum, loss_n = min(now, int(seconds)), 0.0, 0
    bar.close()
    if not steps:
        raise ValueError(f"no training step fit in {seconds} s")
    return StockRun(unet.eval(), sched, steps, time.perf_counter() - t0,
                    loss_sum / loss_n if loss_n else float(loss.detach()),
                    sum(p.numel() for p in unet.parameters()))


@torch.no_grad()
def sample_stock(unet: torch.nn.Module, scheduler: Any, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    """DDIM (eta 0) from ``x_T`` in ``steps`` steps with ``DDIMScheduler.from_config(scheduler.config)``:
    DDIMPipeline's loop; images in [-1, 1]."""
    ddim = _diffusers().DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    x = x_T
    for t in ddim.timesteps:
        eps = unet(x, t).sample
        x = ddim.step(eps, t, x, eta=0.0).prev_sample
    return x.clamp(-1, 1)
