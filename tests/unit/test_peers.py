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
