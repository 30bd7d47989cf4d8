"""The patched-diffusion study's measurements (Luhman & Luhman 2022), as functions on tensors.

``x_error_by_logsnr``: the x-prediction error of a denoiser per log-SNR bin on held-out images,
the paper's redundancy argument (at high noise the optimal x is blurry, so a coarse, patched net
should predict it as well as a full-resolution one). Every denoiser scored with the same seed sees
the same images, timesteps and noise, so curves of different models are paired.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

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
