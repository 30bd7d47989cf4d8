"""Parameterisations (eps, x, v) and the one denoiser contract.

With z = alpha x + sigma eps and alpha^2 + sigma^2 = 1 (Salimans & Ho 2022, App. D):
    v = alpha eps - sigma x,   x = alpha z - sigma v,   eps = sigma z + alpha v.
"""

from __future__ import annotations

from typing import Literal, Protocol, get_args, runtime_checkable

import torch

from fewstep.math.schedules import Schedule

# The parameterisation names, defined here once (fewstep.config and the model card import them).
Parameterization = Literal["eps", "x", "v"]
KINDS: tuple[str, ...] = get_args(Parameterization)


@runtime_checkable
class Denoiser(Protocol):
    """The denoiser contract every sampler takes.

    ``denoiser(z, t)`` with z a (B, C, H, W) noisy sample and t a (B,) long tensor of schedule
    indices (1..T) returns a prediction of kind ``denoiser.kind`` in float32 or better.
    """

    kind: str
    schedule: Schedule

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


def _bc(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return a.reshape(-1, *([1] * (ref.ndim - 1))).to(ref.dtype)


def to_x(pred: torch.Tensor, kind: str, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Prediction of ``kind`` -> x-prediction."""
    a, s = _bc(alpha, z), _bc(sigma, z)
    if kind == "x":
        return pred
    if kind == "v":
        return a * z - s * pred
    if kind == "eps":
        return (z - s * pred) / a  # unstable where alpha -> 0 (PD section 4)
    raise ValueError(f"unknown parameterisation {kind!r}")


def to_eps(pred: torch.Tensor, kind: str, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Prediction of ``kind`` -> eps-prediction."""
    a, s = _bc(alpha, z), _bc(sigma, z)
    if kind == "eps":
        return pred
    if kind == "v":
        return s * z + a * pred
    if kind == "x":
        return (z - a * pred) / s
    raise ValueError(f"unknown parameterisation {kind!r}")


def to_v(pred: torch.Tensor, kind: str, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Prediction of ``kind`` -> v-prediction."""
    if kind == "v":
        return pred
    a, s = _bc(alpha, z), _bc(sigma, z)
    x = to_x(pred, kind, z, alpha, sigma)
    eps = to_eps(pred, kind, z, alpha, sigma)
    return a * eps - s * x


def convert(pred: torch.Tensor, src: str, dst: str, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return {"x": to_x, "eps": to_eps, "v": to_v}[dst](pred, src, z, alpha, sigma)


def predict_x_eps(
    denoiser: Denoiser, z: torch.Tensor, t: torch.Tensor, clip: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate the denoiser once and return (x_hat, eps_hat) in z's dtype.

    With ``clip`` the x estimate is clamped to [-1, 1] and eps recomputed from it (PD A.3);
    where sigma = 0 the eps estimate is taken from the raw prediction instead.
    """
    _, x, eps = predict_raw_x_eps(denoiser, z, t, clip)
    return x, eps


def predict_raw_x_eps(
    denoiser: Denoiser, z: torch.Tensor, t: torch.Tensor, clip: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As predict_x_eps, also returning the raw prediction (kind ``denoiser.kind``, never clipped):
    (pred, x_hat, eps_hat), one evaluation."""
    alpha, sigma = denoiser.schedule.at(t, torch.float64)
    pred = denoiser(z, t).to(z.dtype)
    x = to_x(pred, denoiser.kind, z, alpha, sigma)
    eps = to_eps(pred, denoiser.kind, z, alpha, sigma)
    if clip:
        x = x.clamp(-1.0, 1.0)
        eps = torch.where(_bc(sigma, z) > 0, (z - _bc(alpha, z) * x) / _bc(sigma, z).clamp_min(1e-12), eps)
    return pred, x, eps


class NetDenoiser(torch.nn.Module):
    """Wraps a network ``net(z, t_continuous)`` into the denoiser contract.

    The network sees time as t = index / T in [0, 1], so a model trained on one grid can be
    queried on any sub-sequence of it. On CUDA the forward runs under bf16 autocast and the
    output is returned in float32.
    """

    def __init__(self, net: torch.nn.Module, schedule: Schedule, kind: str, autocast: bool = True):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown parameterisation {kind!r}; expected one of {KINDS}")
        self.net, self.schedule, self.kind, self.autocast = net, schedule, kind, autocast

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.continuous(z, t.to(torch.float32) / self.schedule.T)

    def continuous(self, z: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        """The network at continuous time tc in [0, 1] (index / T); for solvers off the grid."""
        use_amp = self.autocast and z.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            out = self.net(z.float(), tc)
        return out.float()
