"""Analytic denoisers for tests and sanity checks (closed-form optimal predictions)."""

from __future__ import annotations

import torch

from fewstep.math.schedules import Schedule


class GaussianDenoiser:
    """Optimal x-prediction for data x ~ N(mu, diag(s^2)): E[x | z_t] with z_t = a x + sigma eps,
    E[x|z] = mu + a s^2 / (a^2 s^2 + sigma^2) (z - a mu). Satisfies the denoiser contract."""

    kind = "x"

    def __init__(self, schedule: Schedule, mu: torch.Tensor, std: torch.Tensor):
        self.schedule, self.mu, self.std = schedule, mu.double(), std.double()
        self.calls = 0

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        a, s = self.schedule.at(t, torch.float64)
        a, s = a.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1)
        var = self.std**2
        x = self.mu + a * var / (a**2 * var + s**2) * (z.double() - a * self.mu)
        return x.to(z.dtype)
