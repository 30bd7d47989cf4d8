import math

import numpy as np
import pytest
import torch

from fewstep.math.ddim import PerImageNoise, ddim_coefficients, generate, sample_ddim
from fewstep.math.losses import weighted_x_loss
from fewstep.math.param import convert, to_eps, to_v, to_x
from fewstep.math.schedules import cosine_schedule, linear_schedule, make_schedule, timesteps
from fewstep.testing import GaussianDenoiser


@pytest.mark.parametrize("sch", [cosine_schedule(1024), linear_schedule(1000), cosine_schedule(64, -10, 10)])
def test_schedule_is_variance_preserving_and_monotone(sch):
    assert sch.alpha.dtype == np.float64
    np.testing.assert_allclose(sch.alpha**2 + sch.sigma**2, 1.0, atol=1e-12)
    assert sch.alpha[0] == 1.0 and sch.sigma[0] == 0.0
    assert np.all(np.diff(sch.logsnr[1:]) < 0)


def test_cosine_logsnr_clamp():
    sch = cosine_schedule(1024, logsnr_min=-20, logsnr_max=20)
    assert sch.logsnr[-1] == pytest.approx(-20.0, abs=1e-6)  # top step: (near) zero SNR
    assert sch.logsnr[1] < 20.0
    assert sch.logsnr[512] == pytest.approx(0.0, abs=0.05)


def test_schedule_errors():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("quartic", 10)
    with pytest.raises(ValueError, match="logsnr_min"):
        cosine_schedule(10, 5, -5)


def test_schedule_lookup_is_exact_and_stays_on_the_index_device():
    sch = cosine_schedule(1024)
    t = torch.tensor([0, 1, 7, 512, 1024])
    for dtype in (torch.float32, torch.float64):
        a, s = sch.at(t, dtype)
        assert a.dtype == s.dtype == dtype
        assert torch.equal(a, torch.from_numpy(sch.alpha[t.numpy()]).to(dtype))
        assert torch.equal(s, torch.from_numpy(sch.sigma[t.numpy()]).to(dtype))
    # a meta tensor has no values: the lookup can only work if it never copies t to the host,
    # which on a GPU would be a synchronisation in every training and sampling step
    a, s = sch.at(t.to("meta"))
    assert a.device.type == s.device.type == "meta" and a.shape == (5,)


@pytest.mark.parametrize("spacing", ["trailing", "linspace", "quadratic"])
def test_timesteps_descending_and_bounded(spacing):
    for steps in (1, 2, 7, 64, 1024):
        ts = timesteps(1024, steps, spacing)
        assert ts == sorted(set(ts), reverse=True)
        assert ts[0] == 1024 and ts[-1] >= 1 and len(ts) <= steps
    assert timesteps(1024, 4, "trailing") == [1024, 768, 512, 256]
    with pytest.raises(ValueError):
        timesteps(10, 11)
    with pytest.raises(ValueError):
        timesteps(10, 3, "leading")


def test_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    sch = cosine_schedule(100)
    t = torch.randint(1, 101, (8,), generator=g)
    a, s = sch.at(t, torch.float64)
    x = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    z = a.view(-1, 1, 1, 1) * x + s.view(-1, 1, 1, 1) * eps
    v = a.view(-1, 1, 1, 1) * eps - s.view(-1, 1, 1, 1) * x
    truth = {"x": x, "eps": eps, "v": v}
    for src in truth:
        for dst in truth:
            torch.testing.assert_close(convert(truth[src], src, dst, z, a, s), truth[dst], rtol=1e-9, atol=1e-9)


def test_loss_weightings_match_their_definitions():
    g = torch.Generator().manual_seed(1)
    sch = cosine_schedule(100)
    t = torch.randint(1, 101, (16,), generator=g)
    a, s = sch.at(t, torch.float64)
    x = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64)
    z = a.view(-1, 1, 1, 1) * x + s.view(-1, 1, 1, 1) * eps
    pred_v = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64)
    v = a.view(-1, 1, 1, 1) * eps - s.view(-1, 1, 1, 1) * x
    v_mse = ((pred_v - v) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(weighted_x_loss(pred_v, "v", z, x, a, s, "snr+1"), v_mse)
    eps_hat = to_eps(pred_v, "v", z, a, s)
    torch.testing.assert_close(weighted_x_loss(pred_v, "v", z, x, a, s, "snr"), ((eps_hat - eps) ** 2).mean((1, 2, 3)))
    x_mse = ((to_x(pred_v, "v", z, a, s) - x) ** 2).mean((1, 2, 3))
    snr = (a / s) ** 2
    torch.testing.assert_close(weighted_x_loss(pred_v, "v", z, x, a, s, "snr_trunc"), x_mse * torch.clamp(snr, min=1))


@pytest.mark.parametrize("kind", ["eps", "x", "v"])
def test_sqrt_snr_and_constant_weightings_are_their_formulas(kind):
    """constant: w = 1 (plain x-MSE); sqrt_snr: w = alpha / sigma (PDM's x loss). The reference x-hat
    is written out from z = alpha x + sigma eps, not taken from fewstep.math.param."""
    g = torch.Generator().manual_seed(2)
    sch = cosine_schedule(100)
    t = torch.arange(1, 101, 11)
    a, s = sch.at(t, torch.float64)
    ab, sb = a.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1)
    x = torch.randn(len(t), 3, 4, 4, generator=g, dtype=torch.float64)
    z = ab * x + sb * torch.randn(x.shape, generator=g, dtype=torch.float64)
    pred = torch.randn(x.shape, generator=g, dtype=torch.float64)
    x_hat = {"x": pred, "eps": (z - sb * pred) / ab, "v": ab * z - sb * pred}[kind]
    x_mse = ((x_hat - x) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(weighted_x_loss(pred, kind, z, x, a, s, "constant"), x_mse, rtol=1e-9, atol=0)
    torch.testing.assert_close(weighted_x_loss(pred, kind, z, x, a, s, "sqrt_snr"), x_mse * a / s, rtol=1e-9, atol=0)
    assert (a / s).min() < 0.5 and (a / s).max() > 2  # both sides of SNR = 1: the weights really differ


# --------------------------------------------------------------------------------------------
# DDIM against the exact denoiser of Gaussian data


def _gaussian(T=256):
    sch = cosine_schedule(T)
    mu = torch.tensor([0.5, -0.3, 0.1]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    std = torch.tensor([0.2, 0.5, 0.05]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    return sch, mu, std, GaussianDenoiser(sch, mu, std)


def test_full_step_ddim_maps_noise_to_the_data_distribution():
    sch, mu, std, den = _gaussian()
    x_T = torch.randn(4000, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 = sample_ddim(den, x_T, timesteps(sch.T, sch.T), clip=False)
    torch.testing.assert_close(x0.mean(0, keepdim=True), mu.double(), atol=0.02, rtol=0)
    torch.testing.assert_close(x0.std(0, keepdim=True), std.double(), atol=0.02, rtol=0.05)


def test_ddim_subsequences_converge_to_the_full_step_result():
    sch, mu, std, den = _gaussian()
    x_T = torch.randn(256, 3, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = sample_ddim(den, x_T, timesteps(sch.T, sch.T), clip=False)
    errs = [(sample_ddim(den, x_T, timesteps(sch.T, n), clip=False) - ref).pow(2).mean().sqrt().item()
            for n in (2, 8, 32, 128)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.05 * errs[0]


def test_eta_one_matches_the_ancestral_sampler():
    """DDIM with eta=1 is DDPM's posterior q(x_s | x_t, x0_hat) (DDIM eq. 16 with sigma = beta-tilde)."""
    sch, mu, std, den = _gaussian(64)
    seeds = list(range(32))
    steps = timesteps(sch.T, 16)
    noise = PerImageNoise(seeds)
    x_T = noise.randn(3, 2, 2).double()
    got = sample_ddim(den, x_T, steps, eta=1.0, noise=noise, clip=False)

    noise = PerImageNoise(seeds)
    z = noise.randn(3, 2, 2).double()
    grid = steps + [0]
    for t, s in zip(grid, grid[1:]):
        tt = torch.full((z.shape[0],), t)
        x0 = den(z, tt)
        abar_t, abar_s = sch.alpha[t] ** 2, sch.alpha[s] ** 2
        beta = 1 - abar_t / abar_s
        mean = (math.sqrt(abar_s) * beta / (1 - abar_t)) * x0 + (math.sqrt(abar_t / abar_s) * (1 - abar_s) / (1 - abar_t)) * z
        var = (1 - abar_s) / (1 - abar_t) * beta
        z = mean + math.sqrt(var) * noise.randn(3, 2, 2).double() if s > 0 else mean
    torch.testing.assert_close(got, z, rtol=1e-6, atol=1e-8)


def test_stochastic_sampler_needs_noise_and_valid_steps():
    sch, mu, std, den = _gaussian(64)
    x = torch.randn(2, 3, 2, 2)
    with pytest.raises(ValueError, match="noise"):
        sample_ddim(den, x, [64, 32], eta=0.5)
    with pytest.raises(ValueError, match="descending"):
        sample_ddim(den, x, [32, 64])
    with pytest.raises(ValueError, match="beyond"):
        sample_ddim(den, x, [65, 3])


def test_sigma_hat_variance_is_larger_than_eta_one():
    for t, s in [(100, 50), (1000, 900), (10, 1)]:
        sch = cosine_schedule(1024)
        _, _, n1 = ddim_coefficients(sch.alpha[t], sch.sigma[t], sch.alpha[s], sch.sigma[s], 1.0)
        _, _, nh = ddim_coefficients(sch.alpha[t], sch.sigma[t], sch.alpha[s], sch.sigma[s], 0.0, "hat")
        assert nh > n1 > 0


def test_generate_does_not_depend_on_batch_size():
    sch, mu, std, den = _gaussian(64)
    steps = timesteps(64, 8)
    a = generate(den, range(10), (3, 2, 2), steps, batch_size=3, eta=0.5, clip=False)
    b = generate(den, range(10), (3, 2, 2), steps, batch_size=10, eta=0.5, clip=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
