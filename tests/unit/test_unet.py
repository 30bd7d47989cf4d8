import pytest
import torch

from fewstep import models
from fewstep.math.param import NetDenoiser
from fewstep.math.schedules import cosine_schedule
from fewstep.nets.unet import UNet, UNetConfig, count_params


def _cfg(P, **kw):
    base = dict(image_size=16, patch_size=P, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(4,), head_dim=8, dropout=0.0)
    base.update(kw)
    return UNetConfig(**base)


@pytest.mark.parametrize("P", [1, 2, 4])
def test_patched_unet_keeps_shapes(P):
    net = UNet(_cfg(P, channel_mult=(1,) if P == 4 else (1, 2)))
    x = torch.randn(3, 3, 16, 16)
    out = net(x, torch.rand(3))
    assert out.shape == x.shape
    # zero-initialised output layer: a fresh net predicts exactly zero
    assert out.abs().max() == 0


def test_patch_sizes_have_comparable_parameter_counts():
    n = {P: count_params(UNet(_cfg(P, channel_mult=(1,), attn_resolutions=()))) for P in (1, 2, 4)}
    # only the in/out convolutions grow with P^2; the trunk is shared
    assert max(n.values()) / min(n.values()) < 1.3


def test_attention_is_placed_at_the_requested_resolution():
    with_attn = count_params(UNet(_cfg(1, attn_resolutions=(8,))))
    without = count_params(UNet(_cfg(1, attn_resolutions=())))
    assert with_attn > without


def test_bad_configs_fail_clearly():
    with pytest.raises(ValueError, match="patch_size"):
        _cfg(3)
    with pytest.raises(ValueError, match="halved"):
        _cfg(8, channel_mult=(1, 2, 2))


def test_save_load_gives_bitwise_identical_outputs(tmp_path):
    torch.manual_seed(0)
    net = UNet(_cfg(2))
    with torch.no_grad():  # make the output non-trivial
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    meta = {"parameterization": "v", "schedule": {"kind": "cosine", "T": 64, "logsnr_min": -20.0, "logsnr_max": 20.0}}
    models.save_model(tmp_path / "m", net, meta)
    den = models.load_denoiser(tmp_path / "m")
    ref = NetDenoiser(net.eval(), cosine_schedule(64), "v")
    z = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([1, 20, 40, 64])
    with torch.no_grad():
        a, b = ref(z, t), den(z, t)
    assert a.abs().max() > 0
    assert torch.equal(a, b)
    assert den.card.weights_sha256 == models.load_card(tmp_path / "m").weights_sha256 is not None
