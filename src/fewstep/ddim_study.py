"""The DDIM study (DDIM paper, sections 5.2-5.4) on a trained model: reconstruction error of
encode -> decode against the step count, consistency of one x_T decoded at several step counts,
and interpolation grids. Functions on tensors, and :func:`run_study`, the whole study of the stage
ddim_study with its grids and plot tables.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fewstep.math import metrics as M
from fewstep.math.ddim import PerImageNoise
from fewstep.math.inversion import decode, encode, interpolate_images, interpolate_latents
from fewstep.math.param import Denoiser
from fewstep.math.schedules import timesteps
from fewstep.progress import progress as progress_bar


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
    for n in progress_bar(unique_counts(T, counts), desc="reconstruction", enabled=progress, leave=False):
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
    for n in progress_bar(counts, desc="consistency", enabled=progress, leave=False):
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
def interpolation_grid(den: Denoiser, n: int, steps: Sequence[int],
                       seed_pairs: Sequence[tuple[int, int]] = (), image_pairs: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
                       clip_noise: bool = True, clip_images: bool = False,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """(rows * n, C, H, W): one row per seed pair (slerp between the seeds' x_T) then one per image
    pair (slerp between the encoded images), all decoded with DDIM on ``steps`` (descending)."""
    rows = []
    for a, b in seed_pairs:
        z = PerImageNoise([a, b], device).randn(*den.card.image_shape)  # type: ignore[attr-defined]
        rows.append(interpolate_latents(den, z[0], z[1], n, steps, clip=clip_noise).float().cpu())
    for xa, xb in image_pairs:
        rows.append(interpolate_images(den, xa.to(device), xb.to(device), n, steps, clip=clip_images).float().cpu())
    if not rows:
        raise ValueError("an interpolation grid needs at least one seed pair or image pair")
    return torch.cat(rows).clamp(-1, 1)


def load_split(data: Path, n: int, seed: int) -> tuple[torch.Tensor, str]:
    """``n`` images of the test split (the train split when there is none), picked with ``seed``."""
    from fewstep import storage
    from fewstep.data import DataError
    from fewstep.images import from_uint8

    split = "test" if (data / "test_images.npy").exists() else "train"
    if split == "train":
        print(f"ddim_study: no test split in {data}; using the train split", file=sys.stderr)
    arr = storage.load_array(data / f"{split}_images.npy", mmap=True)
    if len(arr) == 0:
        raise DataError(f"{data}/{split}_images.npy holds no images")
    pick = np.sort(np.random.default_rng(seed).permutation(len(arr))[: min(n, len(arr))])
    return from_uint8(np.asarray(arr[pick])), split


def run_study(den: Denoiser, data: Path, evaluator: Path, sp: Any,
              device: torch.device, samples: Path, plots: Path, progress: bool = False) -> dict[str, Any]:
    """The stage ddim_study: reconstruction, consistency and interpolation of ``den`` (images of
    ``shape``) with the ddim_study params ``sp`` on images of ``data``; feature distances in the
    evaluator at ``evaluator`` when there is one. Writes the grids under ``samples``
    (ddim_reconstruction/consistency/interpolation.png) and the plot tables under ``plots``;
    returns the metrics (metrics/ddim_study.json)."""
    from fewstep.data import DataError
    from fewstep.images import save_grid
    from fewstep.outputs import write_rows_csv

    shape = den.card.image_shape  # type: ignore[attr-defined]
    T, size = den.schedule.T, shape[-1]
    images, split = load_split(data, sp.n_images, sp.seed)
    if images.shape[1:] != shape:
        raise DataError(f"{data}: images are {tuple(images.shape[1:])}, the model expects {shape}")
    feats = None
    if (evaluator / "config.json").exists():
        from fewstep.train.evaluator import features, load_evaluator

        net, _ = load_evaluator(evaluator, device)
        feats = lambda x: features(net, x)  # noqa: E731
    else:
        print(f"ddim_study: no evaluator at {evaluator}; feature distances skipped", file=sys.stderr)
    out: dict = {"split": split, "n_images": len(images), "T": T, "spacing": sp.spacing, "clip": sp.clip,
                 "seconds": {}}

    t0 = time.perf_counter()
    rec = reconstruction(den, images, sp.recon_steps, sp.spacing, sp.clip, sp.batch_size, device, progress)
    out["seconds"]["reconstruction"] = round(time.perf_counter() - t0, 2)
    out["reconstruction"] = {str(r["steps"]): r for r in rec.rows}

    t0 = time.perf_counter()
    seeds = list(range(sp.seed, sp.seed + sp.n_consistency))
    con = consistency(den, seeds, shape, sp.consistency_steps, feats, sp.spacing, True, sp.batch_size, device,
                      progress)
    out["seconds"]["consistency"] = round(time.perf_counter() - t0, 2)
    out["consistency"] = {"reference_steps": con.reference_steps, "n": len(seeds),
                          "rows": {str(r["steps"]): r for r in con.rows}}

    t0 = time.perf_counter()
    k = sp.interp_pairs
    seed_pairs = [(sp.seed + 2 * i, sp.seed + 2 * i + 1) for i in range(k)]
    image_pairs = [(images[2 * i], images[2 * i + 1]) for i in range(min(k, len(images) // 2))]
    interp = interpolation_grid(den, sp.interp_n, step_grid(T, sp.interp_steps, sp.spacing), seed_pairs,
                                image_pairs, clip_noise=True, clip_images=sp.clip, device=device)
    out["seconds"]["interpolation"] = round(time.perf_counter() - t0, 2)
    out["interpolation"] = {"steps": min(sp.interp_steps, T), "n": sp.interp_n, "seed_pairs": seed_pairs,
                            "image_pairs": len(image_pairs)}

    scale = max(1, 64 // size)
    m = min(8, len(images))
    save_grid(torch.cat([images[:m]] + [rec.images[n][:m] for n in sorted(rec.images)]),
              samples / "ddim_reconstruction.png", nrow=m, scale=scale)
    counts = sorted(con.images)
    save_grid(torch.stack([con.images[n][i] for i in range(len(seeds)) for n in counts]),
              samples / "ddim_consistency.png", nrow=len(counts), scale=scale)
    save_grid(interp, samples / "ddim_interpolation.png", nrow=sp.interp_n, scale=scale)
    write_rows_csv(plots / "ddim_reconstruction.csv", rec.rows, ["steps", "nfe", "mse", "mse_se", "mse_01", "psnr"])
    crows = [r for r in con.rows if r["steps"] != con.reference_steps]
    write_rows_csv(plots / "ddim_consistency.csv", crows, ["steps", "rmse", "psnr"])
    fkeys = ["steps", "feat_dist", "feat_dist_rel"] if feats is not None else ["steps"]
    write_rows_csv(plots / "ddim_consistency_features.csv", crows, fkeys)  # header only without an evaluator
    return out


LATENTS_FORMAT = "ddim-latents"


@dataclass
class LatentsInfo:
    """What an encoded latents file says about its making (None where it does not say)."""

    weights_sha256: str | None
    steps: list[int] | None
    clip: bool | None


def save_latents(path: str | Path, z: torch.Tensor, weights_sha256: str | None, steps: Sequence[int],
                 clip: bool) -> None:
    """DDIM-encoded x_T as safetensors, with the model's weights hash and the encode grid."""
    import json

    from fewstep import storage

    meta = {"fewstep": LATENTS_FORMAT, "model_weights_sha256": str(weights_sha256), "steps": json.dumps(list(steps)),
            "clip": str(clip)}
    storage.save_tensors(path, {"latents": z}, metadata=meta)


def load_latents(path: str | Path) -> tuple[torch.Tensor, LatentsInfo]:
    """The latents of :func:`save_latents` and what their metadata says."""
    import json

    from safetensors import safe_open

    from fewstep import storage

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    z = storage.load_tensors(path)["latents"]
    sha = meta.get("model_weights_sha256")
    return z, LatentsInfo(None if sha in (None, "None") else sha,
                          json.loads(meta["steps"]) if "steps" in meta else None,
                          meta["clip"] == "True" if "clip" in meta else None)
