"""Analytic denoisers for tests and sanity checks (closed-form optimal predictions)."""

from __future__ import annotations

import math

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


class GMMDenoiser:
    """Optimal x-prediction for an isotropic Gaussian mixture: modes mu_k (K, C, H, W), weights
    pi_k, per-mode variance s0^2. E[x|z] = sum_k r_k(z) (mu_k + a s0^2 / (a^2 s0^2 + sigma^2) (z - a mu_k)),
    r_k the posterior responsibilities. Non-linear in z, so OLSS's span is not degenerate.
    ``kind`` "eps" or "v": the same optimum returned in that parameterisation (float64 conversion)."""

    def __init__(self, schedule: Schedule, modes: torch.Tensor, s0: float = 0.2, kind: str = "x"):
        if kind not in ("x", "eps", "v"):
            raise ValueError(f"unknown parameterisation {kind!r}")
        self.schedule, self.modes, self.s0, self.kind = schedule, modes.double(), float(s0), kind
        self.calls = 0

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        k = torch.randint(0, self.modes.shape[0], (n,), generator=gen)
        return self.modes[k] + self.s0 * torch.randn((n, *self.modes.shape[1:]), generator=gen, dtype=torch.float64)

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        a, s = self.schedule.at(t, torch.float64)
        a, s = a.view(-1, 1, 1, 1, 1), s.view(-1, 1, 1, 1, 1)
        zz = z.double()[:, None]  # (B, 1, C, H, W)
        mu = self.modes[None]  # (1, K, C, H, W)
        var = a**2 * self.s0**2 + s**2
        logp = -((zz - a * mu) ** 2).sum((2, 3, 4), keepdim=True) / (2 * var)
        r = torch.softmax(logp, dim=1)
        post = mu + a * self.s0**2 / var * (zz - a * mu)
        x = (r * post).sum(1)
        if self.kind != "x":
            a, s = a[:, 0], s[:, 0]
            eps = (z.double() - a * x) / s
            x = eps if self.kind == "eps" else a * eps - s * x
        return x.to(z.dtype)


class AnalyticNet(torch.nn.Module):
    """An analytic optimum as a *network*: net(z, tc) at continuous time tc in [0, 1] on the
    truncated cosine schedule (closed form, so off-grid queries are exact), predicting ``kind``.
    Wrap it in NetDenoiser to drive solvers that leave the integer grid (diffusers peers).
    Subclasses give x_hat(z, a, s)."""

    def __init__(self, kind: str = "v", logsnr_min: float = -20.0, logsnr_max: float = 20.0):
        super().__init__()
        self.kind = kind
        self.b = math.atan(math.exp(-0.5 * logsnr_max))
        self.a = math.atan(math.exp(-0.5 * logsnr_min)) - self.b

    def x_hat(self, z: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, z: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        lam = -2.0 * torch.log(torch.tan(self.a * tc.double() + self.b)).view(-1, 1, 1, 1)
        a, s = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
        zz = z.double()
        x = self.x_hat(zz, a, s)
        eps = (zz - a * x) / s
        out = {"x": x, "eps": eps, "v": a * eps - s * x}[self.kind]
        return out.to(z.dtype)


class GaussianNet(AnalyticNet):
    """Data N(mu, diag(std^2)): E[x|z] = mu + a std^2 / (a^2 std^2 + s^2) (z - a mu)."""

    def __init__(self, mu: torch.Tensor, std: torch.Tensor, kind: str = "v", **kw: float):
        super().__init__(kind, **kw)
        self.mu, self.std = mu.double(), std.double()

    def x_hat(self, z: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        var = self.std**2
        return self.mu + a * var / (a**2 * var + s**2) * (z - a * self.mu)


class GMMNet(AnalyticNet):
    """Equal-weight isotropic mixture (modes (K, C, H, W), per-mode std s0), as GMMDenoiser."""

    def __init__(self, modes: torch.Tensor, s0: float = 0.2, kind: str = "v", **kw: float):
        super().__init__(kind, **kw)
        self.modes, self.s0 = modes.double(), float(s0)

    def x_hat(self, z: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        a, s = a[:, None], s[:, None]
        zz, mu = z[:, None], self.modes[None]
        var = a**2 * self.s0**2 + s**2
        r = torch.softmax(-((zz - a * mu) ** 2).sum((2, 3, 4), keepdim=True) / (2 * var), dim=1)
        return (r * (mu + a * self.s0**2 / var * (zz - a * mu))).sum(1)
