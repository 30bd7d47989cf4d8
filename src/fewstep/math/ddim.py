"""DDIM (Song, Meng, Ermon 2021), deterministic (eta = 0) and stochastic, on any descending
sub-sequence of the schedule's indices. Coefficients in float64, cast at the boundary."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from fewstep.progress import progress as progress_bar

from fewstep.math.guidance import GuidanceError, maybe_guided
from fewstep.math.param import Denoiser, predict_raw_x_eps


class PerImageNoise:
    """One torch.Generator per image seed, so an image never depends on the batch it is in
    (EDM's StackedRandomGenerator idea). ``randn`` draws one tensor per image and stacks them."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device)
        self.generators = [torch.Generator("cpu").manual_seed(s) for s in self.seeds]

    def randn(self, *shape: int) -> torch.Tensor:
        out = torch.stack([torch.randn(shape, generator=g) for g in self.generators])
        return out.to(self.device)


def ddim_coefficients(
    alpha_t: float, sigma_t: float, alpha_s: float, sigma_s: float, eta: float = 0.0, variance: str = "ddim"
) -> tuple[float, float, float]:
    """(c_x, c_eps, c_noise) for z_s = c_x x_hat + c_eps eps_hat + c_noise noise (DDIM eq. 12).

    variance="ddim": sigma_tau = eta * sqrt((1-abar_s)/(1-abar_t)) * sqrt(1 - abar_t/abar_s).
    variance="hat":  the DDPM larger variance sigma_hat = sqrt(1 - abar_t/abar_s), around the
                     eta = 1 (posterior) mean, as in DDIM Table 1's last row.
    """
    if sigma_t <= 0.0:
        raise ValueError("a DDIM step cannot start from a clean sample (sigma_t = 0)")
    ratio = 1.0 - (alpha_t / alpha_s) ** 2  # 1 - abar_t / abar_s
    ratio = max(ratio, 0.0)
    post = (sigma_s / sigma_t) * math.sqrt(ratio)  # eta = 1 value
    if variance == "ddim":
        c_noise = eta * post
        c_eps = math.sqrt(max(sigma_s**2 - c_noise**2, 0.0))
    elif variance == "hat":
        c_noise = math.sqrt(ratio) if sigma_s > 0 else 0.0
        c_eps = math.sqrt(max(sigma_s**2 - post**2, 0.0))
    else:
        raise ValueError(f"unknown variance {variance!r}; expected 'ddim' or 'hat'")
    return alpha_s, c_eps, c_noise


def sample_ddim(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    steps: Sequence[int],
    eta: float = 0.0,
    variance: str = "ddim",
    noise: PerImageNoise | None = None,
    clip: bool = True,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run DDIM from x_T at steps[0] down through steps[1:] and finally to index 0 (clean).

    ``steps`` is a strictly descending list of schedule indices >= 1 (see schedules.timesteps).
    ``noise`` must be given when the sampler is stochastic. ``callback`` gets, per step, a dict
    with i, t, s, z (input), pred (the denoiser's raw output, in its own parameterisation), x_hat,
    eps_hat and z_next.
    """
    steps = [int(t) for t in steps]
    if not steps or any(a <= b for a, b in zip(steps, steps[1:])) or steps[-1] < 1:
        raise ValueError(f"steps must be strictly descending indices >= 1, got {steps[:8]}...")
    if steps[0] > denoiser.schedule.T:
        raise ValueError(f"step {steps[0]} is beyond the schedule's T={denoiser.schedule.T}")
    stochastic = eta > 0 or variance == "hat"
    if stochastic and noise is None:
        raise ValueError("a stochastic DDIM sampler (eta > 0 or variance='hat') needs a noise source")
    sch = denoiser.schedule
    z = x_T
    grid = steps + [0]
    for i in progress_bar(range(len(steps)), enabled=progress, desc="ddim", leave=False):
        t, s = grid[i], grid[i + 1]
        tt = torch.full((z.shape[0],), t, dtype=torch.long, device=z.device)
        pred, x_hat, eps_hat = predict_raw_x_eps(denoiser, z, tt, clip=clip)
        c_x, c_eps, c_noise = ddim_coefficients(
            float(sch.alpha[t]), float(sch.sigma[t]), float(sch.alpha[s]), float(sch.sigma[s]), eta, variance
        )
        z_next = c_x * x_hat + c_eps * eps_hat
        if c_noise > 0:
            z_next = z_next + c_noise * noise.randn(*z.shape[1:]).to(z.dtype)
        if callback is not None:
            callback({"i": i, "t": t, "s": s, "z": z, "pred": pred, "x_hat": x_hat, "eps_hat": eps_hat,
                      "z_next": z_next})
        z = z_next
    return z


@torch.no_grad()
def generate(
    denoiser: Denoiser,
    seeds: Sequence[int],
    shape: tuple[int, int, int],
    steps: Sequence[int],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    labels: Sequence[int] | None = None,
    guidance: float = 0.0,
    **kw,
) -> torch.Tensor:
    """Images in [-1, 1] for the given seeds: x_T and any sampler noise drawn per seed, so the
    result does not depend on ``batch_size``. ``labels``: one class per seed of a class-conditional
    denoiser, sampled with guidance scale ``guidance`` (fewstep.math.guidance)."""
    if labels is not None and len(labels) != len(seeds):
        raise GuidanceError(f"{len(labels)} class labels for {len(seeds)} seeds")
    out = []
    for lo in range(0, len(seeds), batch_size):
        chunk = list(seeds)[lo : lo + batch_size]
        noise = PerImageNoise(chunk, device)
        x_T = noise.randn(*shape)
        den = maybe_guided(denoiser, None if labels is None else list(labels)[lo : lo + batch_size], guidance)
        out.append(sample_ddim(den, x_T, steps, noise=noise, **kw).cpu())
    return torch.cat(out) if out else torch.empty(0, *shape)
