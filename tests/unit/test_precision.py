"""Teacher targets, OLSS trajectories and OLSS fits in IEEE float32 (issue 18.4).

The GPU path (bf16 autocast on CUDA) is emulated on the CPU with ``NetDenoiser.cpu_autocast``: the
emulated forward differs from the float32 one by bf16 rounding, and everything the teacher makes
for another fit to learn from must come out exactly as with a float32 teacher. Each check has its
control: with ``full_precision`` stubbed out, the same call no longer matches.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

import fewstep.olss_fit as olss_fit_mod
import fewstep.trajectories as traj_mod
from fewstep import models
from fewstep.config import OLSSParams
from fewstep.math.distill import distill_target
from fewstep.math.param import NetDenoiser, full_precision, set_autocast
from fewstep.math.schedules import make_schedule, timesteps
from fewstep.math.split import SplitDenoiser
from fewstep.nets.unet import UNet, UNetConfig

SCH = make_schedule("cosine", 64)
SHAPE = (3, 8, 8)


def _net(seed: int = 0, P: int = 1) -> UNet:
    torch.manual_seed(seed)
    net = UNet(UNetConfig(image_size=8, patch_size=P, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                          attn_resolutions=(4,) if P == 1 else (), head_dim=8, dropout=0.0))
    for prm in net.parameters():  # zero-init output layers would make every net predict 0
        torch.nn.init.normal_(prm, std=0.1)
    return net.eval().requires_grad_(False)


def _pair(kind: str = "v", seed: int = 0) -> tuple[NetDenoiser, NetDenoiser]:
    """(float32 teacher, the same weights with the GPU's bf16 autocast emulated on the CPU)."""
    net = _net(seed)
    return NetDenoiser(net, SCH, kind), NetDenoiser(net, SCH, kind, cpu_autocast=True)


def _no_full_precision(monkeypatch, module) -> None:
    monkeypatch.setattr(module, "full_precision", lambda den: contextlib.nullcontext(den))


def _batch(n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.randint(1, SCH.T + 1, (n,), generator=g)


def test_the_emulated_gpu_forward_carries_bf16_rounding_and_full_precision_removes_it():
    fp32, amp = _pair()
    z, t = _batch()
    with torch.no_grad():
        a, b = fp32(z, t), amp(z, t)
        assert a.dtype == b.dtype == torch.float32
        rel = float((a - b).norm() / a.norm())
        assert 1e-4 < rel < 5e-2, rel  # bf16 keeps 8 significant bits
        assert torch.equal(a, fp32.net(z, t.float() / SCH.T))  # the CPU default: the bare float32 net
        with full_precision(amp):
            assert not amp.autocast and torch.equal(amp(z, t), a)
        assert amp.autocast and torch.equal(amp(z, t), b)  # the setting comes back
        # a caller's autocast region reaches neither a full-precision forward nor the CPU default
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with full_precision(amp):
                assert torch.equal(amp(z, t), a)
            assert torch.equal(fp32(z, t), a)


def test_full_precision_and_set_autocast_reach_both_nets_of_a_split_model():
    split = SplitDenoiser(NetDenoiser(_net(1, P=4), SCH, "x"), NetDenoiser(_net(2), SCH, "x"), -1.0)
    z, t = _batch(8)
    with torch.no_grad():
        ref = split(z, t)
        set_autocast(split, True, cpu=True)
        assert split.high.cpu_autocast and split.low.cpu_autocast
        assert not torch.equal(split(z, t), ref)
        with full_precision(split):
            assert torch.equal(split(z, t), ref)
        assert split.high.autocast and split.low.autocast


@pytest.mark.parametrize("kind", ["eps", "x", "v"])
def test_distillation_targets_are_float32_under_emulated_mixed_precision(kind):
    fp32, amp = _pair(kind)
    dt = 4  # a 16-step teacher on T = 64, its 8-step student
    i = torch.tensor([1, 2, 3, 5, 8, 8])  # i = 1: the last student step (t'' = 0)
    t = 2 * dt * i
    x = torch.rand(len(t), *SHAPE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    a, s = SCH.at(t, torch.float32)
    z = a.view(-1, 1, 1, 1) * x + s.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    ref = distill_target(fp32, z, t, dt)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the student's forward runs
        got = distill_target(amp, z, t, dt)
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    rel = float((distill_target(amp, z, t, dt, fp32=False) - ref).norm() / ref.norm())  # control: the old path
    assert rel > 1e-4, rel


def test_trajectories_are_collected_in_float32(monkeypatch):
    fp32, amp = _pair("v")
    t_path = timesteps(SCH.T, 8)
    ref_x, ref_e = traj_mod.collect(fp32, range(5), SHAPE, t_path)
    x, e = traj_mod.collect(amp, range(5), SHAPE, t_path)
    assert torch.equal(x, ref_x) and torch.equal(e, ref_e)
    _no_full_precision(monkeypatch, traj_mod)
    x, _ = traj_mod.collect(amp, range(5), SHAPE, t_path)
    assert not torch.equal(x, ref_x)


def test_the_olss_fit_refit_and_held_out_check_run_in_float32(tmp_path, monkeypatch):
    fp32, amp = _pair("v")
    card = SimpleNamespace(weights_sha256="w" * 64, schedule=models.ScheduleSpec("cosine", SCH.T, -20.0, 20.0),
                           image_shape=SHAPE)
    fp32.card = amp.card = card
    t_path = timesteps(SCH.T, 16)
    traj_mod.write_shards(tmp_path / "traj", fp32, range(100, 116), SHAPE, t_path, shard_size=8, batch_size=8,
                          device=torch.device("cpu"), meta={"model_weights_sha256": card.weights_sha256},
                          progress=False)
    op = OLSSParams(steps=[4], max_elements=4096, n_holdout=3, closed_loop=True)

    def fit(den):
        f = olss_fit_mod.fit_olss(den, "teacher", tmp_path / "traj", 4, op, 0, torch.device("cpu"))
        return f.metrics["rmse_vs_full_step"], {k: s.to_json() for k, s in f.schedulers.items()}

    ref_rmse, ref_sched = fit(fp32)
    got_rmse, got_sched = fit(amp)
    assert got_rmse == ref_rmse and got_sched["olss-4"] == ref_sched["olss-4"]  # olss-4: the closed-loop refit
    _no_full_precision(monkeypatch, olss_fit_mod)
    got_rmse, got_sched = fit(amp)
    assert got_rmse != ref_rmse and got_sched["olss-4"] != ref_sched["olss-4"]
