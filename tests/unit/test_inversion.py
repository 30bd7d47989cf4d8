"""DDIM inversion (encode/decode) and slerp, against the analytic Gaussian denoiser."""

import math

import pytest
import torch

from fewstep.math.inversion import decode, encode, interpolate_images, interpolate_latents, reconstruct, slerp, slerp_path
from fewstep.math.param import convert
from fewstep.math.schedules import cosine_schedule, linear_schedule, timesteps
from fewstep.testing import GaussianDenoiser

SHAPE = (3, 4, 4)


def _gaussian(sch, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = 0.3 * torch.randn(SHAPE, generator=g, dtype=torch.float64)
    std = 0.2 + 0.5 * torch.rand(SHAPE, generator=g, dtype=torch.float64)
    x0 = mu + std * torch.randn(16, *SHAPE, generator=g, dtype=torch.float64)
    return GaussianDenoiser(sch, mu, std), x0


class _As:
    """The Gaussian denoiser re-expressed in another parameterisation (same x and eps after conversion)."""

    def __init__(self, den, kind):
        self.den, self.kind, self.schedule = den, kind, den.schedule

    def __call__(self, z, t):
        a, s = self.schedule.at(t, torch.float64)
        return convert(self.den(z, t), "x", self.kind, z, a, s)


def _mse(a, b):
    return float(((a - b) ** 2).mean())


@pytest.mark.parametrize("sch", [cosine_schedule(1024), linear_schedule(1000)], ids=["cosine", "linear"])
def test_encode_decode_error_falls_with_steps_and_is_tiny_at_many(sch):
    den, x0 = _gaussian(sch)
    errs = [_mse(reconstruct(den, x0, timesteps(sch.T, n)), x0) for n in (10, 20, 50, 100, 250, sch.T)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    # first-order solver both ways: MSE falls about as 1/S^2 (a 25x step ratio gives > 100x here)
    assert errs[1] / errs[4] > 100, errs
    var = float(x0.var())
    assert errs[-1] < 1e-4 * var, errs  # full grid: RMSE ~1% of the data's std at most
    assert errs[0] > 10 * errs[-1]


def test_encode_is_the_ode_map_to_noise():
    """For Gaussian data the probability-flow ODE is the whitening map: x_T = (x0 - mu) / std."""
    sch = cosine_schedule(1024)
    den, x0 = _gaussian(sch, seed=1)
    zT = encode(den, x0, timesteps(1024, 1024)[::-1])
    white = (x0 - den.mu) / den.std
    assert float((zT - white).abs().max()) < 0.02
    assert abs(float(zT.std()) - float(white.std())) < 0.01
    coarse = encode(den, x0, timesteps(1024, 8)[::-1])
    assert _mse(coarse, white) > 10 * _mse(zT, white)  # fewer steps, further from the exact map


@pytest.mark.parametrize("kind", ["eps", "v"])
def test_encode_decode_do_not_depend_on_the_parameterisation(kind):
    sch = cosine_schedule(256)
    den, x0 = _gaussian(sch, seed=2)
    steps = timesteps(256, 32)
    other = _As(den, kind)
    torch.testing.assert_close(encode(other, x0, steps[::-1]), encode(den, x0, steps[::-1]), rtol=1e-8, atol=1e-8)
    z = torch.randn(4, *SHAPE, dtype=torch.float64)
    torch.testing.assert_close(decode(other, z, steps), decode(den, z, steps), rtol=1e-8, atol=1e-8)


def test_encode_callback_and_first_step_keeps_the_image():
    sch = cosine_schedule(64)
    den, x0 = _gaussian(sch)
    seen = []
    encode(den, x0, [8, 32, 64], callback=seen.append)
    assert [(d["s"], d["t"]) for d in seen] == [(0, 8), (8, 32), (32, 64)]
    assert torch.equal(seen[0]["x_hat"], x0)  # index 0 is clean: x_hat is the image itself
    # every step lands on the level it names: z_t = alpha_t x_hat + sigma_t eps_hat
    for d in seen:
        t = d["t"]
        torch.testing.assert_close(d["z_next"], sch.alpha[t] * d["x_hat"] + sch.sigma[t] * d["eps_hat"])


def test_encode_rejects_bad_steps():
    den, x0 = _gaussian(cosine_schedule(64))
    for bad in ([64, 32], [0, 8], [], [8, 8], [8, 65]):
        with pytest.raises(ValueError):
            encode(den, x0, bad)


def test_slerp_endpoints_norm_and_parallel_fallback():
    g = torch.Generator().manual_seed(0)
    d = 3 * 32 * 32
    a, b = torch.randn(3, 32, 32, generator=g), torch.randn(3, 32, 32, generator=g)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    for t in (0.25, 0.5, 0.75):
        n = float(slerp(a, b, t).norm())
        assert abs(n / math.sqrt(d) - 1) < 0.05, (t, n)  # on the Gaussian shell, unlike lerp:
    assert float((0.5 * a + 0.5 * b).norm()) / math.sqrt(d) < 0.75
    bb = b * (a.norm() / b.norm())  # equal norms: the midpoint is at equal angles, on the same sphere
    mid = slerp(a, bb, 0.5)
    cos = lambda u, v: float((u.flatten() @ v.flatten()) / (u.norm() * v.norm()))  # noqa: E731
    assert cos(mid, a) == pytest.approx(cos(mid, bb), abs=1e-5)
    assert float(mid.norm()) == pytest.approx(float(a.norm()), rel=1e-5)
    # nearly parallel (and identical) vectors: finite, between the ends
    c = a * (1 + 1e-9)
    out = slerp(a, c, 0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(slerp(a, a, 0.3), a)
    torch.testing.assert_close(slerp(a, 2 * a, 0.5), 1.5 * a)  # parallel, different norms: linear
    path = slerp_path(a, b, 5)
    assert path.shape == (5, *a.shape) and torch.equal(path[0], slerp(a, b, 0.0))
    with pytest.raises(ValueError):
        slerp(a, b[:2], 0.5)
    with pytest.raises(ValueError):
        slerp_path(a, b, 1)


def test_interpolation_rows_end_on_their_endpoints():
    sch = cosine_schedule(128)
    den, x0 = _gaussian(sch)
    steps = timesteps(128, 128)
    z = torch.randn(2, *SHAPE, dtype=torch.float64)
    row = interpolate_latents(den, z[0], z[1], 5, steps, clip=False)
    torch.testing.assert_close(row[[0, -1]], decode(den, z, steps))
    rows = interpolate_images(den, x0[0], x0[1], 4, steps)
    assert rows.shape == (4, *SHAPE)
    assert _mse(rows[[0, -1]], x0[:2]) < 1e-3 * float(x0.var())  # the ends reconstruct the two images
    assert _mse(rows[1], x0[0]) > 100 * _mse(rows[0], x0[0])  # and the middle is neither
