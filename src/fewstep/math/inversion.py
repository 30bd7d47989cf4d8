"""DDIM inversion (encode), decode, and spherical interpolation of latents (DDIM paper, sections 5.3-5.4).

The deterministic DDIM update (eta = 0) is the Euler step of the ODE
    d(z / alpha) = eps_hat(z) d(sigma / alpha)                      (DDIM eq. 13-14)
run from high noise to low noise. ``encode`` runs the same Euler step the other way, image -> x_T,
on an ascending sub-sequence of the schedule's indices, with the sampler's own float64 coefficients
(``ddim_coefficients``); ``decode`` is the deterministic sampler. Both are first order, so encode
then decode returns the image up to an error that falls as the step count grows.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from fewstep.progress import progress as progress_bar

from fewstep.math.ddim import ddim_coefficients, sample_ddim
from fewstep.math.param import Denoiser, predict_x_eps


def _check_ascending(steps: Sequence[int], T: int) -> list[int]:
    steps = [int(t) for t in steps]
    if not steps or any(a >= b for a, b in zip(steps, steps[1:])) or steps[0] < 1:
        raise ValueError(f"encode steps must be strictly ascending indices >= 1, got {steps[:8]}...")
    if steps[-1] > T:
        raise ValueError(f"step {steps[-1]} is beyond the schedule's T={T}")
    return steps


@torch.no_grad()
def encode(
    denoiser: Denoiser,
    x0: torch.Tensor,
    steps: Sequence[int],
    clip: bool = False,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Deterministic DDIM inversion: clean images x0 (index 0) -> latents at ``steps[-1]``.

    ``steps`` is a strictly ascending list of schedule indices >= 1 (``timesteps(T, S)[::-1]``, the
    reverse of the sampler's list). Each step s -> t reads (x_hat, eps_hat) at the current point and
    sets z_t = alpha_t x_hat + sigma_t eps_hat. Index 0 is clean data, outside the denoiser's domain
    (1..T): the first step keeps x_hat = x0 exactly (sigma_0 = 0) and reads eps_hat at index 1, the
    role DDPM's t = 0 (abar = 1 - beta_1) plays in the paper's code.
    """
    sch = denoiser.schedule
    steps = _check_ascending(steps, sch.T)
    grid = [0] + steps
    z = x0
    for i in progress_bar(range(len(steps)), enabled=progress, desc="ddim encode", leave=False):
        s, t = grid[i], grid[i + 1]
        e = max(s, 1)  # where the denoiser is read
        ee = torch.full((z.shape[0],), e, dtype=torch.long, device=z.device)
        x_hat, eps_hat = predict_x_eps(denoiser, z, ee, clip=clip)
        if s == 0:
            x_hat = z
        c_x, c_eps, _ = ddim_coefficients(float(sch.alpha[e]), float(sch.sigma[e]),
                                          float(sch.alpha[t]), float(sch.sigma[t]))
        z_next = c_x * x_hat + c_eps * eps_hat
        if callback is not None:
            callback({"i": i, "s": s, "t": t, "z": z, "x_hat": x_hat, "eps_hat": eps_hat, "z_next": z_next})
        z = z_next
    return z


@torch.no_grad()
def decode(denoiser: Denoiser, x_T: torch.Tensor, steps: Sequence[int], clip: bool = False,
           progress: bool = False) -> torch.Tensor:
    """The deterministic DDIM sampler (eta = 0) from x_T at ``steps[0]`` (descending) down to clean."""
    return sample_ddim(denoiser, x_T, steps, eta=0.0, clip=clip, progress=progress)


@torch.no_grad()
def reconstruct(denoiser: Denoiser, x0: torch.Tensor, steps: Sequence[int], clip: bool = False) -> torch.Tensor:
    """decode(encode(x0)) on the descending sampler grid ``steps`` (encoded on its reverse)."""
    steps = [int(t) for t in steps]
    return decode(denoiser, encode(denoiser, x0, steps[::-1], clip=clip), steps, clip=clip)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation between two tensors taken as single vectors (DDIM section 5.3):
    sin((1-t) theta)/sin(theta) a + sin(t theta)/sin(theta) b, theta the angle between them, weights in
    float64. For nearly parallel (or antiparallel) vectors, where sin(theta) < eps, it falls back to
    linear interpolation. t = 0 gives a, t = 1 gives b."""
    if a.shape != b.shape:
        raise ValueError(f"slerp needs tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    t = float(t)
    af, bf = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = float(af.norm()), float(bf.norm())
    if na == 0.0 or nb == 0.0:
        w_a, w_b = 1.0 - t, t
    else:
        cos = min(1.0, max(-1.0, float(af @ bf) / (na * nb)))
        theta = math.acos(cos)
        sin = math.sin(theta)
        if sin < eps:
            w_a, w_b = 1.0 - t, t
        else:
            w_a, w_b = math.sin((1.0 - t) * theta) / sin, math.sin(t * theta) / sin
    out = w_a * a.double() + w_b * b.double()
    return out.to(a.dtype)


def slerp_path(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """(n, *a.shape): slerp at t = 0, 1/(n-1), ..., 1."""
    if n < 2:
        raise ValueError(f"an interpolation path needs n >= 2 points, got {n}")
    return torch.stack([slerp(a, b, i / (n - 1)) for i in range(n)])


@torch.no_grad()
def interpolate_latents(denoiser: Denoiser, z_a: torch.Tensor, z_b: torch.Tensor, n: int, steps: Sequence[int],
                        clip: bool = True) -> torch.Tensor:
    """Decode the slerp path between two latents x_T (each (C, H, W)) with DDIM on ``steps``
    (descending): (n, C, H, W) images, the first decoded from z_a, the last from z_b."""
    return decode(denoiser, slerp_path(z_a, z_b, n), steps, clip=clip)


@torch.no_grad()
def interpolate_images(denoiser: Denoiser, x_a: torch.Tensor, x_b: torch.Tensor, n: int, steps: Sequence[int],
                       clip: bool = False) -> torch.Tensor:
    """Encode two images (each (C, H, W) in [-1, 1]) on ``steps`` reversed, slerp their latents, decode:
    (n, C, H, W); the ends are the two reconstructions."""
    steps = [int(t) for t in steps]
    z = encode(denoiser, torch.stack([x_a, x_b]), steps[::-1], clip=clip)
    return interpolate_latents(denoiser, z[0], z[1], n, steps, clip=clip)
