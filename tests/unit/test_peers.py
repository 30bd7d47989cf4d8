import pytest
import torch

from fewstep.math.ddim import sample_ddim
from fewstep.math.param import NetDenoiser
from fewstep.math.schedules import cosine_schedule, timesteps
from fewstep.nets.unet import UNet, UNetConfig

peers = pytest.importorskip("fewstep.peers")


def _den(kind="v"):
    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=8, channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                          head_dim=8, dropout=0.0))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return NetDenoiser(net.eval(), cosine_schedule(64), kind).requires_grad_(False)


@pytest.mark.parametrize("kind", ["v", "x"])
def test_diffusers_ddim_through_the_adapter_reproduces_fewstep_ddim(kind):
    den = _den(kind)
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for n in (2, 4, 8):
        ours = sample_ddim(den, x_T, timesteps(64, n), clip=False).clamp(-1, 1)
        theirs, nfe = peers.sample_peer("ddim", den, x_T, n)
        assert nfe == n
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=2e-4)


def test_time_map_hits_our_grid_on_integer_timesteps():
    den = _den()
    sched = peers.make_scheduler("dpmpp_2m", den)
    f = peers._time_map(den, sched)
    for t in (0, 10, 63):
        assert f(t) == pytest.approx((t + 1) / 64, abs=1e-6)


@pytest.mark.parametrize("name", peers.PEERS)
def test_every_peer_runs_and_stays_finite(name):
    den = _den()
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    x, nfe = peers.sample_peer(name, den, x_T, 4)
    assert torch.isfinite(x).all() and 1 <= nfe <= 5


def test_heun_converges_to_many_step_ddim_on_analytic_optima():
    """On analytic optima (exact off the grid too), Heun through the adapter must converge to
    fewstep's 1024-step DDIM from the same noise. On the Gaussian it is no worse than DDIM at equal
    NFE; on the 8-mode mixture (x_hat changes fast with the noise level) from 19 NFE on. Started at
    the zero-SNR end (VE sigma 2.2e4) it was at RMSE ~0.8 for 3 NFE; from sigma 80 on the uniform
    grid, twice DDIM's error at 7 and 19 NFE on the mixture."""
    from fewstep.testing import GaussianNet, GMMNet

    g = torch.Generator().manual_seed(0)
    mu = torch.rand(3, 4, 4, generator=g, dtype=torch.float64) - 0.5
    std = 0.1 + 0.3 * torch.rand(3, 4, 4, generator=g, dtype=torch.float64)
    modes = torch.rand(8, 3, 4, 4, generator=g, dtype=torch.float64) * 1.6 - 0.8
    for net, min_nfe in ((GaussianNet(mu, std, "v"), 3), (GMMNet(modes, 0.15, "v"), 19)):
        den = NetDenoiser(net, cosine_schedule(1024), "v")
        x_T = torch.randn(64, 3, 4, 4, generator=g)
        ref = sample_ddim(den, x_T, timesteps(1024, 1024), clip=False).clamp(-1, 1)
        err = {}
        for nfe in (3, 7, 19, 39, 99):
            x, calls = peers.sample_peer("heun", den, x_T, nfe)
            assert calls == nfe
            err[nfe] = float((x - ref).pow(2).mean().sqrt())
            ddim = sample_ddim(den, x_T, timesteps(1024, nfe), clip=False).clamp(-1, 1)
            if nfe >= min_nfe:
                assert err[nfe] <= 1.2 * float((ddim - ref).pow(2).mean().sqrt()), (type(net).__name__, nfe, err)
        assert err[3] > err[7] > err[19] > err[39] > err[99] and err[99] < 5e-3, (type(net).__name__, err)


@pytest.mark.parametrize("kind", ["eps", "v"])
def test_on_a_1000_step_linear_schedule_the_ddim_peer_reproduces_fewstep_ddim(kind):
    """T = 1000, DDPM linear betas (a diffusers model's grid, not a power of two): the trained_betas
    handed to diffusers give back our alpha table, and the DDIM peer walks our trailing grid at every
    step count that divides T (diffusers' DDIM steps by T // N, so only those are the same grid)."""
    from fewstep.math.schedules import linear_schedule

    base = _den(kind)
    den = NetDenoiser(base.net, linear_schedule(1000), kind).requires_grad_(False)
    sched = peers.make_scheduler("ddim", den)
    torch.testing.assert_close(sched.alphas_cumprod.double(), torch.from_numpy(den.schedule.alpha[1:] ** 2),
                               rtol=1e-5, atol=1e-7)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    for n in (4, 5, 8, 10):
        ours = sample_ddim(den, x_T, timesteps(1000, n), clip=False).clamp(-1, 1)
        theirs, nfe = peers.sample_peer("ddim", den, x_T, n)
        assert nfe == n
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=2e-4)


def test_an_imported_diffusers_schedule_is_handed_to_the_peers_as_its_own_beta_config():
    """A card schedule of kind "diffusers": the peers get the model's own beta spec, so diffusers'
    alphas_cumprod is bit for bit the float32 table the model was trained with (= ours, widened)."""
    import types

    from fewstep.math.schedules import diffusers_schedule
    from fewstep.models import ScheduleSpec

    spec = ScheduleSpec("diffusers", 1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    den = NetDenoiser(_den("eps").net, diffusers_schedule(1000, **spec.kwargs()), "eps").requires_grad_(False)
    den.card = types.SimpleNamespace(schedule=spec)
    d = peers.load_diffusers()
    own = d.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for name in ("ddim", "dpmpp_2m", "unipc"):
        sched = peers.make_scheduler(name, den)
        assert torch.equal(sched.alphas_cumprod, own.alphas_cumprod)
        torch.testing.assert_close(sched.alphas_cumprod.double(), torch.from_numpy(den.schedule.alpha[1:] ** 2),
                                   rtol=1e-12, atol=0)
    assert peers.make_scheduler("heun", den).config.trained_betas is not None  # Heun keeps its (cut) table
