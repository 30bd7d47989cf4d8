"""Progressive distillation target (Salimans & Ho 2022, Algorithm 2), on a discrete grid.

A student that samples in N/2 DDIM steps learns, at each of its steps t -> t'', the x that makes
one DDIM step land where two teacher DDIM steps t -> t' -> t'' land. All math in x-space with
the stable sigma ratio; on the last student step (t'' = 0) the target is the teacher's second
x prediction itself.

The teacher runs in IEEE float32 (``full_precision``) even where its own forward would use bf16
autocast (CUDA): a bf16 target carries its rounding (~4e-3 relative) into every student round; the
student's forward may stay mixed precision (issue 18.4; ``benchmarks/fp32_targets.py``).
"""

from __future__ import annotations

import contextlib

import torch

from fewstep.math.param import Denoiser, full_precision, predict_x_eps


def _bc(a: torch.Tensor) -> torch.Tensor:
    return a.view(-1, 1, 1, 1)


def ddim_to(x_hat: torch.Tensor, z: torch.Tensor, a_t, s_t, a_s, s_s) -> torch.Tensor:
    """Deterministic DDIM step t -> s written with x_hat: z_s = a_s x + (s_s / s_t)(z - a_t x)."""
    return _bc(a_s) * x_hat + _bc(s_s / s_t) * (z - _bc(a_t) * x_hat)


@torch.no_grad()
def distill_target(teacher: Denoiser, z_t: torch.Tensor, t: torch.Tensor, dt: int, *,
                   fp32: bool = True) -> torch.Tensor:
    """x target for the student at indices ``t`` (B,), teacher step size ``dt`` (grid indices):
    t' = t - dt, t'' = t - 2 dt (a grid that T divides; see :func:`distill_target_path`)."""
    return distill_target_path(teacher, z_t, t, t - dt, t - 2 * dt, fp32=fp32)


@torch.no_grad()
def distill_target_path(teacher: Denoiser, z_t: torch.Tensor, t: torch.Tensor, t1: torch.Tensor,
                        t2: torch.Tensor, *, fp32: bool = True) -> torch.Tensor:
    """x target for the student stepping t -> t'' (= ``t2``) where the teacher takes two DDIM steps
    t -> t' (= ``t1``) -> t'' (indices, (B,) each, t > t' > t'' >= 0; any spacing).

    Inverting one DDIM step t -> t'':
        x~ = (z_t'' - (s_t''/s_t) z_t) / (a_t'' - (s_t''/s_t) a_t)      (PD eq. in Alg. 2)

    ``fp32=False`` leaves the teacher at its own precision (bf16 autocast on CUDA): only to measure
    what float32 buys (benchmarks/fp32_targets.py); training always uses float32.
    """
    sch = teacher.schedule
    if t2.device.type == "cpu" and (t2 < 0).any():  # free on the CPU; on a GPU it would sync every step
        raise ValueError("student index below 2*dt: t'' would be negative")
    a_t, s_t = sch.at(t, torch.float64)
    a_1, s_1 = sch.at(t1, torch.float64)
    a_2, s_2 = sch.at(t2, torch.float64)
    z = z_t.double()
    with full_precision(teacher) if fp32 else contextlib.nullcontext():
        x1, _ = predict_x_eps(teacher, z_t, t)
        z1 = ddim_to(x1.double(), z, a_t, s_t, a_1, s_1)
        x2, _ = predict_x_eps(teacher, z1.to(z_t.dtype), t1)
    x2 = x2.double()
    z2 = ddim_to(x2, z1, a_1, s_1, a_2, s_2)
    r = s_2 / s_t  # float64 tables: exact enough without the softplus form
    denom = a_2 - r * a_t
    last = t2 == 0
    x_tilde = (z2 - _bc(r) * z) / _bc(torch.where(last, torch.ones_like(denom), denom))
    x_tilde = torch.where(_bc(last), x2, x_tilde)
    return x_tilde.to(z_t.dtype)
