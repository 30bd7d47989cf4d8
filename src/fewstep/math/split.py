"""Two networks behind one denoiser contract, split by noise level (Luhman & Luhman 2022, PDM
release: ``--snr_splits 0.25``; reference distill_pdm.md B.7).

A high-noise network (cheaper: a larger patch size) answers where log-SNR < boundary, a low-noise
network where log-SNR >= boundary. Routing is per element, so a batch with mixed timesteps (a
training or distillation batch) sends each sample to its own side, and only the networks that have
samples are called. Because the log-SNR of the schedule falls with the index, the boundary is one
index ``t_boundary`` (the last index on the low-noise side): index t goes high iff t > t_boundary.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fewstep.math.param import NetDenoiser
from fewstep.math.schedules import Schedule

SIDES = ("high", "low")


def boundary_logsnr(snr: float) -> float:
    if not snr > 0:
        raise ValueError(f"the split boundary is an SNR > 0, got {snr}")
    return math.log(snr)


def boundary_index(schedule: Schedule, logsnr: float) -> int:
    """Last schedule index on the low-noise side (log-SNR >= ``logsnr``); 0 if none is."""
    return schedule.index_of_logsnr(logsnr)


class SplitDenoiser(torch.nn.Module):
    """``high`` and ``low`` NetDenoisers (same schedule, same parameterisation) routed by log-SNR.

    ``evaluations`` counts the images each network has been evaluated on (one per element per call),
    so the cost of a sampler on a split model is counted, not assumed."""

    def __init__(self, high: NetDenoiser, low: NetDenoiser, boundary: float):
        super().__init__()
        if high.kind != low.kind:
            raise ValueError(f"split networks must share a parameterisation, got high={high.kind!r} low={low.kind!r}")
        sh, sl = high.schedule, low.schedule
        if sh.T != sl.T or sh.kind != sl.kind or not np.allclose(sh.alpha, sl.alpha, rtol=0, atol=1e-12):
            raise ValueError("split networks must share one schedule")
        self.high, self.low = high, low
        self.schedule, self.kind = sl, low.kind
        self.boundary_logsnr = float(boundary)
        self.t_boundary = boundary_index(sl, self.boundary_logsnr)
        self.evaluations = {s: 0 for s in SIDES}

    def side_of(self, t: torch.Tensor) -> torch.Tensor:
        """Boolean mask (B,): True where index t is on the high-noise side."""
        return t > self.t_boundary

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._route(z, t, self.side_of(t), "__call__")

    def continuous(self, z: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        """Continuous time tc = index / T (off-grid solvers): high iff tc T > t_boundary."""
        return self._route(z, tc, tc.double() * self.schedule.T > self.t_boundary, "continuous")

    def _route(self, z: torch.Tensor, t: torch.Tensor, high: torch.Tensor, method: str) -> torch.Tensor:
        if t.ndim != 1 or t.shape[0] != z.shape[0]:
            raise ValueError(f"t must be (B,) with B = {z.shape[0]}, got shape {tuple(t.shape)}")
        n_high = int(high.sum())
        parts = []
        for side, mask, n in (("high", high, n_high), ("low", ~high, z.shape[0] - n_high)):
            if n == 0:
                continue
            net = getattr(self, side)
            fn = net if method == "__call__" else net.continuous
            if n == z.shape[0]:
                self.evaluations[side] += n
                return fn(z, t)
            idx = mask.nonzero().squeeze(1)
            parts.append((idx, fn(z.index_select(0, idx), t.index_select(0, idx))))
            self.evaluations[side] += n
        out = torch.empty((z.shape[0], *parts[0][1].shape[1:]), dtype=parts[0][1].dtype, device=z.device)
        for idx, pred in parts:
            out.index_copy_(0, idx, pred.to(out.dtype))
        return out

    def reset_evaluations(self) -> dict[str, int]:
        """Return the counts so far and start again from zero."""
        old, self.evaluations = self.evaluations, {s: 0 for s in SIDES}
        return old


class SplitNet(torch.nn.Module):
    """Two networks ``net(z, tc)`` (``high``, ``low``) behind one ``net(z, tc)``, routed at the same
    boundary as :class:`SplitDenoiser`: the trainable form of a split model (a split teacher's
    student, PD Alg. 2 starting from both nets). Its state dict is ``high.*`` and ``low.*``, the
    layout of a split model dir.

    tc = index / T; an element goes high iff tc T > t_boundary + 1/2, so grid indices route exactly
    as ``SplitDenoiser.forward`` does, whatever rounding tc carries. In training, a side with no
    element in the batch still joins the graph with a zero term, so every parameter has a gradient
    (DDP needs that on every rank)."""

    def __init__(self, high: torch.nn.Module, low: torch.nn.Module, t_boundary: int, T: int):
        super().__init__()
        if not 0 <= t_boundary <= T:
            raise ValueError(f"t_boundary {t_boundary} is outside the schedule's 0..{T}")
        self.high, self.low = high, low
        self.t_boundary, self.T = int(t_boundary), int(T)

    def forward(self, z: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        if tc.ndim != 1 or tc.shape[0] != z.shape[0]:
            raise ValueError(f"tc must be (B,) with B = {z.shape[0]}, got shape {tuple(tc.shape)}")
        high = tc.double() * self.T > self.t_boundary + 0.5
        out: torch.Tensor | None = None
        unused: list[torch.nn.Module] = []
        for side, mask in (("high", high), ("low", ~high)):
            net = getattr(self, side)
            idx = mask.nonzero().squeeze(1)
            if idx.numel() == 0:
                unused.append(net)
                continue
            pred = net(z.index_select(0, idx), tc.index_select(0, idx))
            if out is None:
                out = torch.zeros((z.shape[0], *pred.shape[1:]), dtype=pred.dtype, device=z.device)
            out = out.index_copy(0, idx, pred.to(out.dtype))
        assert out is not None  # B >= 1: some side has an element
        if self.training and torch.is_grad_enabled():
            for net in unused:
                out = out + 0.0 * sum(p.sum() for p in net.parameters()).to(out.dtype)
        return out
