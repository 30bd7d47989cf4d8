"""Discrete-time noise schedules, in float64.

Index convention: a schedule with ``T`` training steps has indices ``0..T``. Index ``i``
corresponds to continuous time ``t = i / T``; index 0 is clean data (alpha = 1, sigma = 0)
and index ``T`` is the noisiest point. Variance preserving: ``x_t = alpha_t x_0 + sigma_t eps``,
``alpha_t^2 + sigma_t^2 = 1``, log-SNR ``lambda_t = log(alpha_t^2 / sigma_t^2)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence, get_args

import numpy as np
import torch

# Schedule and spacing names, defined here once (fewstep.config and the model card import them).
ScheduleKind = Literal["cosine", "linear"]  # the schedules fewstep trains with (params)
SCHEDULE_KINDS: tuple[str, ...] = get_args(ScheduleKind)
# A model card may also hold an imported model's schedule, computed as diffusers computes it.
DIFFUSERS_KIND = "diffusers"
CARD_SCHEDULE_KINDS: tuple[str, ...] = SCHEDULE_KINDS + (DIFFUSERS_KIND,)
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
BETA_SCHEDULES: tuple[str, ...] = get_args(BetaSchedule)


@dataclass(frozen=True)
class Schedule:
    """alpha / sigma / log-SNR tables for indices 0..T (float64 numpy arrays)."""

    kind: str
    T: int
    alpha: np.ndarray  # (T+1,)
    sigma: np.ndarray  # (T+1,)
    # float64 copies of the tables per device, so ``at`` gathers where ``t`` lives (no host sync)
    _on_device: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def logsnr(self) -> np.ndarray:
        """lambda_i = log(alpha^2 / sigma^2); +inf at index 0."""
        with np.errstate(divide="ignore"):
            return 2.0 * (np.log(self.alpha) - np.log(self.sigma))

    def at(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t, sigma_t for an integer index tensor, looked up in float64 then cast.

        The lookup runs on ``t``'s device against float64 copies of the tables kept there, so a
        training or sampling step on a GPU never waits for the host."""
        tables = self._on_device.get(t.device)
        if tables is None:
            tables = (torch.from_numpy(self.alpha).to(t.device), torch.from_numpy(self.sigma).to(t.device))
            self._on_device[t.device] = tables
        idx = t.detach().long()
        return tables[0][idx].to(dtype), tables[1][idx].to(dtype)

    def index_of_logsnr(self, logsnr: float) -> int:
        """Largest index whose log-SNR is still >= ``logsnr`` (0 if none is)."""
        lam = self.logsnr
        ok = np.nonzero(lam >= logsnr)[0]
        return int(ok.max()) if ok.size else 0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "T": self.T}


def cosine_schedule(T: int, logsnr_min: float = -20.0, logsnr_max: float = 20.0) -> Schedule:
    """Truncated cosine schedule in log-SNR (Salimans & Ho 2022, schedules.py):
    lambda(t) = -2 log tan(a t + b), clamped to [logsnr_min, logsnr_max] by construction."""
    if logsnr_min >= logsnr_max:
        raise ValueError(f"logsnr_min ({logsnr_min}) must be below logsnr_max ({logsnr_max})")
    b = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - b
    t = np.arange(T + 1, dtype=np.float64) / T
    lam = -2.0 * np.log(np.tan(a * t + b))
    alpha = np.sqrt(_sigmoid(lam))
    sigma = np.sqrt(_sigmoid(-lam))
    alpha[0], sigma[0] = 1.0, 0.0
    return Schedule("cosine", T, alpha, sigma)


def linear_schedule(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """DDPM linear-beta schedule (Ho et al. 2020), betas rescaled so any T spans the same range
    as T=1000: alpha_bar_i = prod_{j<=i} (1 - beta_j)."""
    scale = 1000.0 / T
    betas = np.linspace(beta_start * scale, beta_end * scale, T, dtype=np.float64)
    if betas.max() >= 1.0:
        raise ValueError(f"linear schedule with T={T} gives beta >= 1; use more timesteps")
    abar = np.concatenate([[1.0], np.cumprod(1.0 - betas)])
    return Schedule("linear", T, np.sqrt(abar), np.sqrt(1.0 - abar))


def diffusers_betas(T: int, beta_schedule: str = "linear", beta_start: float = 1e-4, beta_end: float = 0.02,
                    trained_betas: Sequence[float] | None = None) -> torch.Tensor:
    """beta_1..beta_T (float32) exactly as diffusers' DDPM/DDIM schedulers compute them (0.42.1,
    ``scheduling_ddpm.py``; reference diffusers_interop.md section 2). diffusers' index k is our k+1.

    trained_betas: the given list; linear: linspace(b0, b1, T); scaled_linear: linspace(sqrt b0, sqrt b1, T)^2;
    squaredcos_cap_v2: beta_i = min(1 - abar(i+1/T) / abar(i/T), 0.999), abar(s) = cos^2((s + 0.008) / 1.008 pi/2)
    in Python floats, then cast (b0, b1 unused)."""
    if trained_betas is not None:
        if len(trained_betas) != T:
            raise ValueError(f"trained_betas has {len(trained_betas)} entries; the schedule's T is {T}")
        return torch.tensor(list(trained_betas), dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        def abar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=torch.float32)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected one of {BETA_SCHEDULES} or trained_betas")


def diffusers_alphas_cumprod(T: int, beta_schedule: str = "linear", beta_start: float = 1e-4, beta_end: float = 0.02,
                             trained_betas: Sequence[float] | None = None) -> torch.Tensor:
    """diffusers' ``alphas_cumprod`` (float32, diffusers indices 0..T-1): prod_{j<=k} (1 - beta_j),
    accumulated in float32 as diffusers does."""
    betas = diffusers_betas(T, beta_schedule, beta_start, beta_end, trained_betas)
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError("diffusers betas must lie in (0, 1)")
    return torch.cumprod(1.0 - betas, dim=0)


def diffusers_schedule(T: int, beta_schedule: str = "linear", beta_start: float = 1e-4, beta_end: float = 0.02,
                       trained_betas: Sequence[float] | None = None) -> Schedule:
    """An imported diffusers model's schedule: abar_i (i = 1..T) is diffusers' float32
    ``alphas_cumprod[i-1]`` bit for bit (cumprod of 1 - beta in float32, as diffusers does), widened to
    float64; index 0 is clean. alpha_i = sqrt(abar_i), sigma_i = sqrt(1 - abar_i) in float64."""
    abar = diffusers_alphas_cumprod(T, beta_schedule, beta_start, beta_end, trained_betas).double().numpy()
    abar = np.concatenate([[1.0], abar])
    return Schedule(DIFFUSERS_KIND, T, np.sqrt(abar), np.sqrt(1.0 - abar))


def make_schedule(kind: str, T: int, **kw: Any) -> Schedule:
    if T < 1:
        raise ValueError(f"schedule needs T >= 1, got {T}")
    if kind == "cosine":
        return cosine_schedule(T, **kw)
    if kind == "linear":
        return linear_schedule(T, **kw)
    if kind == DIFFUSERS_KIND:
        return diffusers_schedule(T, **kw)
    raise ValueError(f"unknown schedule {kind!r}; expected one of {CARD_SCHEDULE_KINDS}")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


# ---------------------------------------------------------------------------------------------
# Timestep spacing: which sub-sequence of 1..T a sampler with S steps visits.

Spacing = Literal["trailing", "linspace", "quadratic"]
SPACINGS: tuple[str, ...] = get_args(Spacing)


def timesteps(T: int, steps: int, spacing: str = "trailing") -> list[int]:
    """Descending sampler timesteps ``[tau_S, ..., tau_1]`` (all >= 1), to be followed by 0.

    trailing: tau_i = round(i T / S); the first step is always T (zero-SNR end of the grid).
    linspace: S points evenly from T down to 1, rounded.
    quadratic: tau_i ~ c i^2 with tau_S = T (DDIM App. D.2, re-anchored to start at T).
    Duplicates from rounding are removed, so fewer than S steps may come back for large S.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps > T:
        raise ValueError(f"steps ({steps}) cannot exceed the schedule's T ({T})")
    i = np.arange(1, steps + 1, dtype=np.float64)
    if spacing == "trailing":
        tau = np.round(i * T / steps)
    elif spacing == "linspace":
        tau = np.round(np.linspace(1, T, steps)) if steps > 1 else np.array([float(T)])
    elif spacing == "quadratic":
        tau = np.round(T * (i / steps) ** 2)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
    tau = np.clip(tau, 1, T).astype(np.int64)
    return sorted(set(tau.tolist()), reverse=True)
