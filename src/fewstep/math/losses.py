"""Diffusion training losses, all written as a weighted x-MSE (Salimans & Ho 2022, section 4).

weighting:
    snr         w = alpha^2/sigma^2          (plain eps-MSE)
    snr_trunc   w = max(alpha^2/sigma^2, 1)  (max of x-MSE and eps-MSE)
    snr+1       w = 1 + alpha^2/sigma^2      (v-MSE)
    sqrt_snr    w = alpha/sigma              (Patched diffusion's x-loss weighting)
    constant    w = 1                        (plain x-MSE)
Weights are computed from errors in the space each one names, never as an SNR ratio, so a
zero-SNR end of the grid cannot produce inf * 0 (reference distill_pdm.md, pitfall E.2).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from fewstep.math.param import Parameterization, to_eps, to_x

# The weighting names, defined here once (fewstep.config and the model card import them).
Weighting = Literal["snr", "snr_trunc", "snr+1", "sqrt_snr", "constant"]
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)

# Default weighting per parameterisation: the one that makes its natural MSE.
DEFAULT_WEIGHTING: dict[Parameterization, Weighting] = {"eps": "snr", "x": "snr_trunc", "v": "snr+1"}

# eps-prediction with snr_trunc weighting diverges (Salimans & Ho 2022, Table 1)
DIVERGENT: tuple[tuple[Parameterization, Weighting], ...] = (("eps", "snr_trunc"),)


def divergence(parameterization: str, weighting: str | None) -> str | None:
    """Why (``parameterization``, ``weighting``) must not be trained, in one line; None if it may."""
    if (parameterization, weighting) in DIVERGENT:
        return f"{parameterization}-prediction with {weighting} weighting diverges (Salimans & Ho 2022, Table 1)"
    return None


def weighted_x_loss(
    pred: torch.Tensor,
    kind: str,
    z: torch.Tensor,
    x_target: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    weighting: str,
    eps_target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example loss (B,) of a network prediction of ``kind`` against the clean target.

    ``eps_target`` (the true noise, when known) avoids re-deriving it by a division by sigma."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    dims = tuple(range(1, z.ndim))
    x_hat = to_x(pred, kind, z, alpha, sigma)
    x_mse = ((x_hat - x_target) ** 2).mean(dims)
    if weighting == "constant":
        return x_mse
    a = alpha.reshape(-1).to(z.dtype)
    s = sigma.reshape(-1).to(z.dtype)
    if weighting == "sqrt_snr":
        return x_mse * (a / s.clamp_min(1e-8))
    if eps_target is None:
        shape = (-1, *[1] * (z.ndim - 1))
        eps_target = (z - a.view(shape) * x_target) / s.view(shape)
    eps_hat = to_eps(pred, kind, z, alpha, sigma)
    eps_mse = ((eps_hat - eps_target) ** 2).mean(dims)
    if weighting == "snr":
        return eps_mse
    if weighting == "snr_trunc":
        return torch.maximum(x_mse, eps_mse)
    return x_mse + eps_mse  # (1 + SNR) x-MSE, which equals the v-MSE
