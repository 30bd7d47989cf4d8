"""The patched-diffusion study's measurements (Luhman & Luhman 2022), as functions on tensors.

``x_error_by_logsnr``: the x-prediction error of a denoiser per log-SNR bin on held-out images,
the paper's redundancy argument (at high noise the optimal x is blurry, so a coarse, patched net
should predict it as well as a full-resolution one). Every denoiser scored with the same seed sees
the same images, timesteps and noise, so curves of different models are paired. ``redundancy``
scores every teacher of a models dir; ``objective_study`` trains and scores one teacher of the
eps / x / v objective study.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fewstep.errors import UserError
from fewstep.math.param import Denoiser, predict_x_eps
from fewstep.train.loop import step_seed


@dataclass(frozen=True)
class BinError:
    lo: float  # log-SNR bin edges
    hi: float
    logsnr: float  # mean log-SNR of the timesteps drawn in the bin
    mse: float  # mean squared x error per dimension, images in [-1, 1]
    n: int  # images scored (0: the schedule has no index in the bin)

    def to_dict(self) -> dict:
        return asdict(self)


def bin_edges(logsnr_min: float, logsnr_max: float, bins: int) -> np.ndarray:
    """Equal-width log-SNR bin edges, ascending (float64)."""
    if bins < 1 or not logsnr_min < logsnr_max:
        raise ValueError(f"need bins >= 1 and logsnr_min < logsnr_max, got {bins}, {logsnr_min}, {logsnr_max}")
    return np.linspace(logsnr_min, logsnr_max, bins + 1)


@torch.no_grad()
def x_error_by_logsnr(
    den: Denoiser,
    images: torch.Tensor,
    edges: np.ndarray,
    seed: int = 0,
    batch_size: int = 256,
) -> list[BinError]:
    """x-prediction MSE per log-SNR bin [edges[k], edges[k+1]).

    ``images``: (N, C, H, W) float in [-1, 1]. Per bin, each image gets one timestep drawn
    uniformly from the schedule indices whose log-SNR lies in the bin, and one noise draw; both
    come from generators seeded by (seed, bin), so they do not depend on the model or the batch size.
    """
    sch = den.schedule
    lam = sch.logsnr
    idx_all = np.arange(1, sch.T + 1)
    dev = next((p.device for p in den.parameters()), torch.device("cpu")) if isinstance(den, torch.nn.Module) \
        else torch.device("cpu")
    out = []
    for k in range(len(edges) - 1):
        lo, hi = float(edges[k]), float(edges[k + 1])
        cand = idx_all[(lam[1:] >= lo) & (lam[1:] < hi)]
        if cand.size == 0:
            out.append(BinError(lo, hi, float("nan"), float("nan"), 0))
            continue
        gen = torch.Generator("cpu").manual_seed(step_seed(seed, k, stream=7))
        pick = torch.randint(0, cand.size, (images.shape[0],), generator=gen)
        t_all = torch.from_numpy(cand[pick.numpy()]).long()
        eps_all = torch.randn(images.shape, generator=gen)
        sq, n = 0.0, 0
        for s in range(0, images.shape[0], batch_size):
            x = images[s : s + batch_size].to(dev, torch.float32)
            t = t_all[s : s + batch_size].to(dev)
            a, sg = sch.at(t, torch.float32)
            z = a.view(-1, 1, 1, 1) * x + sg.view(-1, 1, 1, 1) * eps_all[s : s + batch_size].to(dev)
            x_hat, _ = predict_x_eps(den, z, t, clip=False)
            sq += float(((x_hat.float() - x) ** 2).mean(dim=(1, 2, 3)).double().sum())
            n += x.shape[0]
        out.append(BinError(lo, hi, float(lam[t_all.numpy()].mean()), sq / n, n))
    return out


def mean_error(bins: list[BinError]) -> float:
    """The unweighted mean over the non-empty bins (each noise level counts once)."""
    vals = [b.mse for b in bins if b.n]
    return float(np.mean(vals)) if vals else float("nan")


def images_from_uint8(arr: np.ndarray, n: int | None = None) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) float in [-1, 1], the first ``n``."""
    arr = arr[:n] if n else arr
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2))).float() / 127.5 - 1.0


# --- the redundancy analysis (stage redundancy) -------------------------------------------------

def teacher_dirs(models_dir: Path) -> list[Path]:
    """Model dirs with role teacher, the finest patch size first."""
    from fewstep import models

    dirs = sorted(models_dir.iterdir()) if models_dir.is_dir() else []
    cards = {d: models.load_card(d) for d in dirs if models.has_card(d)}
    found = [d for d, c in cards.items() if c.role == "teacher"]
    return sorted(found, key=lambda d: (min(cards[d].patch_sizes), d.name))


def label(name: str, card: Any) -> str:
    """``name (P=.., N steps)`` for a model card (fewstep.models.ModelCard)."""
    ps = card.patch_sizes
    p = f"P={ps[0]}" if len(ps) == 1 else f"P={ps[0]} high / {ps[1]} low"
    return f"{name} ({p}, {card.lineage.train_steps} steps)"


class NoTeachersError(UserError):
    """The redundancy analysis found no teacher model dir."""


def redundancy(models_dir: Path, images: torch.Tensor, rp: Any, device: torch.device,
               log: Callable[[str], None] | None = None) -> tuple[dict[str, dict], float | None]:
    """:func:`x_error_by_logsnr` of every teacher under ``models_dir`` on the same ``images``,
    timesteps and noise (redundancy params ``rp``). Returns model name -> {patch_sizes,
    train_steps, label, bins, mean} and the split boundary (log-SNR) of a split model, if any."""
    from fewstep import models

    edges = bin_edges(rp.logsnr_min, rp.logsnr_max, rp.bins)
    results, boundary = {}, None
    for d in teacher_dirs(models_dir):
        den = models.load_denoiser(d, device)
        card = den.card
        bins = x_error_by_logsnr(den, images, edges, seed=rp.seed, batch_size=rp.batch_size)
        results[d.name] = {"patch_sizes": card.patch_sizes, "train_steps": card.lineage.train_steps,
                           "label": label(d.name, card), "bins": [b.to_dict() for b in bins],
                           "mean": mean_error(bins)}
        if models.is_split(card):
            boundary = float(card.arch.split.boundary_logsnr)
        if log is not None:
            log(f"{d.name:16s} " + " ".join(f"{b.mse:.4f}" for b in bins if b.n))
        del den
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not results:
        raise NoTeachersError(f"no teacher model dirs under {models_dir}")
    return results, boundary


# --- the objective study (stage objective) ------------------------------------------------------

def objective_scores(den: Denoiser, test_images: np.ndarray, n_test: int, rp: Any) -> dict[str, Any]:
    """x-prediction MSE of ``den`` on the first ``n_test`` test images per log-SNR bin (redundancy
    params ``rp``): overall (mean over bins), at high noise (bins with log-SNR <= 0) and low noise."""
    bins = x_error_by_logsnr(den, images_from_uint8(test_images, n_test), bin_edges(rp.logsnr_min, rp.logsnr_max, rp.bins),
                             seed=rp.seed, batch_size=rp.batch_size)
    hi_noise = [b for b in bins if b.n and b.hi <= 0.0]
    lo_noise = [b for b in bins if b.n and b.lo >= 0.0]
    return {"x_mse": mean_error(bins), "x_mse_high_noise": mean_error(hi_noise),
            "x_mse_low_noise": mean_error(lo_noise), "bins": [b.to_dict() for b in bins]}


def sample_scores(den: Denoiser, evaluator_dir: Path, n: int, steps: int, ep: Any,
                  device: torch.device) -> dict[str, Any]:
    """FD and KID (fewstep.evaluation.feature_scores) of ``n`` DDIM samples (the card's image shape)
    at ``steps`` steps on the evaluate seeds, in the evaluator's features."""
    from fewstep.evaluation import feature_scores
    from fewstep.math.ddim import generate
    from fewstep.math.schedules import timesteps
    from fewstep.train.evaluator import features, load_evaluator

    ev, stats = load_evaluator(evaluator_dir, device)
    grid = timesteps(den.schedule.T, min(steps, den.schedule.T))
    imgs = generate(den, range(ep.seed, ep.seed + n), den.card.image_shape, grid, batch_size=ep.batch_size, device=device)
    s = feature_scores(features(ev, imgs.clamp(-1, 1)), stats, ep.kid_subsets, ep.seed)
    return {"fd": s["fd"], "kid": s["kid"], "fd_n": n, "fd_steps": len(grid)}


class ObjectiveVariantError(UserError):
    """The objective study was asked for a variant or patch size that params do not list."""


def objective_study(p: Any, variant: str, patch_size: int, data: Path, model_dir: Path, ckpt_dir: Path,
                    evaluator_dir: Path, device: torch.device,
                    progress: bool = False) -> dict[str, Any]:
    """One teacher of the objective study (stage objective@<variant>-p<P>): trained with the teacher
    params overridden by objective.teacher and objective.nets.p<P>, scored by its x-error per
    noise level on the test split and, with an evaluator and objective.n_samples > 0, FD/KID."""
    from fewstep import models, storage
    from fewstep.train.teacher import train_teacher

    op = p.objective
    if variant not in op.variants or patch_size not in op.patch_sizes:
        raise ObjectiveVariantError(f"objective: {variant} at P={patch_size} is not in objective.variants x "
                                    f"objective.patch_sizes ({op.variants} x {op.patch_sizes})")
    tp = op.teacher_for(p.teacher, variant, patch_size)
    name = f"{variant}-p{patch_size}"
    result, card = train_teacher(p.model_copy(update={"teacher": tp}), data, model_dir, ckpt_dir, device,
                                 progress=progress, extra_meta={"study": "objective", "variant": name})
    den = models.load_denoiser(model_dir, device)
    test = storage.load_array(Path(data) / "test_images.npy")
    out = {"variant": variant, "parameterization": tp.parameterization, "weighting": card.weighting,
           "patch_size": patch_size, "train_steps": tp.steps,
           "final_loss": result.history[-1][1] if result.history else None,
           **objective_scores(den, test, op.n_test, p.redundancy)}
    if op.n_samples and (evaluator_dir / "config.json").exists():
        out.update(sample_scores(den, evaluator_dir, op.n_samples, op.sample_steps, p.evaluate, device))
    return out
