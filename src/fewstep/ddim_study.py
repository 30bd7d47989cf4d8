"""The DDIM study (DDIM paper, sections 5.2-5.4) on a trained model: reconstruction error of
encode -> decode against the step count, consistency of one x_T decoded at several step counts,
and interpolation grids. Functions on tensors; the stage (stages/ddim_study.py) does the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from fewstep.math import metrics as M
from fewstep.math.ddim import PerImageNoise
from fewstep.math.inversion import decode, encode, interpolate_images, interpolate_latents
from fewstep.math.param import Denoiser
from fewstep.math.schedules import timesteps


def step_grid(T: int, n: int, spacing: str = "trailing") -> list[int]:
    """The descending sampler grid for ``n`` steps, capped at the schedule's T."""
    return timesteps(T, min(int(n), T), spacing)


def unique_counts(T: int, counts: Sequence[int]) -> list[int]:
    """Step counts capped at T, deduplicated, ascending (1024 on a T=64 schedule becomes 64)."""
    return sorted({min(int(n), T) for n in counts})


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int,
             device: torch.device | str) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


@dataclass
class Reconstruction:
    rows: list[dict[str, Any]]  # one per step count: steps, nfe, mse (+ its standard error over images), mse_01, rmse, psnr, latent_std
    images: dict[int, torch.Tensor]  # step count -> reconstructions (N, C, H, W) on the CPU


@torch.no_grad()
def reconstruction(den: Denoiser, images: torch.Tensor, counts: Sequence[int], spacing: str = "trailing",
                   clip: bool = False, batch_size: int = 64, device: torch.device | str = "cpu",
                   progress: bool = False) -> Reconstruction:
    """encode -> decode of ``images`` (N, C, H, W) in [-1, 1] at each step count.

    mse is per dimension on the [-1, 1] scale; mse_01 on the [0, 1] scale (mse / 4), the scale of the
    DDIM paper's Table 2. nfe counts both directions. latent_std is the std of the encoded x_T (close
    to 1 when the encoding is Gaussian-like)."""
    T = den.schedule.T
    rows, recs = [], {}
    ref = images.double().numpy()
    for n in tqdm(unique_counts(T, counts), desc="reconstruction", disable=not progress, leave=False):
        steps = step_grid(T, n, spacing)
        latents: list[torch.Tensor] = []

        def roundtrip(x: torch.Tensor) -> torch.Tensor:
            z = encode(den, x, steps[::-1], clip=clip)
            latents.append(z.float().cpu())
            return decode(den, z, steps, clip=clip)

        rec = _batched(roundtrip, images, batch_size, device)
        per_image = ((rec.double().numpy() - ref) ** 2).reshape(len(ref), -1).mean(1)
        mse = float(per_image.mean())
        se = float(per_image.std(ddof=1) / np.sqrt(len(per_image))) if len(per_image) > 1 else 0.0
        rows.append({"steps": n, "nfe": 2 * len(steps), "mse": mse, "mse_se": se, "mse_01": mse / 4.0,
                     "rmse": M.rmse(rec.numpy(), ref), "psnr": M.psnr(rec.numpy(), ref),
                     "latent_std": float(torch.cat(latents).std())})
        recs[n] = rec
    return Reconstruction(rows, recs)


@dataclass
class Consistency:
    rows: list[dict[str, Any]]  # one per step count: steps, rmse / psnr / feat_dist (/_rel) to the reference
    images: dict[int, torch.Tensor]  # step count -> decoded images (N, C, H, W)
    reference_steps: int


@torch.no_grad()
def consistency(den: Denoiser, seeds: Sequence[int], shape: tuple[int, int, int], counts: Sequence[int],
                features: Callable[[torch.Tensor], np.ndarray] | None = None, spacing: str = "trailing",
                clip: bool = True, batch_size: int = 64, device: torch.device | str = "cpu",
                progress: bool = False) -> Consistency:
    """The same x_T (one per seed, drawn as the evaluation draws it) decoded at every step count; the
    largest count is the reference. Distances to it: pixel RMSE and PSNR, and with ``features`` (images
    -> (N, d) evaluator features) the mean per-image feature distance, also relative to the mean
    distance between the reference features of different images (1 = as far as an unrelated image)."""
    T = den.schedule.T
    counts = unique_counts(T, counts)
    x_T = PerImageNoise(list(seeds)).randn(*shape)
    imgs = {}
    for n in tqdm(counts, desc="consistency", disable=not progress, leave=False):
        steps = step_grid(T, n, spacing)
        imgs[n] = _batched(lambda z: decode(den, z, steps, clip=clip), x_T, batch_size, device).clamp(-1, 1)
    ref_n = counts[-1]
    ref = imgs[ref_n].numpy()
    f_ref = features(imgs[ref_n]) if features is not None else None
    spread = float(np.linalg.norm(f_ref - np.roll(f_ref, 1, 0), axis=1).mean()) if f_ref is not None and len(ref) > 1 else None
    rows = []
    for n in counts:
        a = imgs[n].numpy()
        psnr = M.psnr(a, ref)
        row: dict[str, Any] = {"steps": n, "rmse": M.rmse(a, ref), "psnr": psnr if np.isfinite(psnr) else None}
        if f_ref is not None:
            d = float(np.linalg.norm(features(imgs[n]) - f_ref, axis=1).mean())
            row["feat_dist"] = d
            row["feat_dist_rel"] = d / spread if spread else None
        rows.append(row)
    return Consistency(rows, imgs, ref_n)


@torch.no_grad()
def interpolation_grid(den: Denoiser, shape: tuple[int, int, int], n: int, steps: Sequence[int],
                       seed_pairs: Sequence[tuple[int, int]] = (), image_pairs: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
                       clip_noise: bool = True, clip_images: bool = False,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """(rows * n, C, H, W): one row per seed pair (slerp between the seeds' x_T) then one per image
    pair (slerp between the encoded images), all decoded with DDIM on ``steps`` (descending)."""
    rows = []
    for a, b in seed_pairs:
        z = PerImageNoise([a, b], device).randn(*shape)
        rows.append(interpolate_latents(den, z[0], z[1], n, steps, clip=clip_noise).float().cpu())
    for xa, xb in image_pairs:
        rows.append(interpolate_images(den, xa.to(device), xb.to(device), n, steps, clip=clip_images).float().cpu())
    if not rows:
        raise ValueError("an interpolation grid needs at least one seed pair or image pair")
    return torch.cat(rows).clamp(-1, 1)
