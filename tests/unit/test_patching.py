"""Patched diffusion: the routed two-network denoiser, split model dirs, FLOPs against P,
training on one side of the boundary, per-network cost in the evaluation rows."""

import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fewstep import models
from fewstep.math.ddim import sample_ddim
from fewstep.math.param import NetDenoiser
from fewstep.math.schedules import make_schedule, timesteps
from fewstep.math.split import SplitDenoiser, SplitNet, boundary_index
from fewstep.nets.unet import UNet, UNetConfig
from fewstep.train.split import init_matching, side_ranges
from fewstep.train.teacher import diffusion_loss

SCH = make_schedule("cosine", 64)
LAM = math.log(0.25)


def _net(P: int, ch: int = 8, seed: int = 0, size: int = 8) -> UNet:
    torch.manual_seed(seed)
    net = UNet(UNetConfig(image_size=size, patch_size=P, channels=ch, channel_mult=(1, 2), num_res_blocks=1,
                          attn_resolutions=(), head_dim=8, dropout=0.0))
    for prm in net.parameters():  # zero-init output layers would make every net predict 0
        torch.nn.init.normal_(prm, std=0.05)
    return net.eval()


def _split(kind: str = "v") -> SplitDenoiser:
    high = NetDenoiser(_net(4, seed=1), SCH, kind)
    low = NetDenoiser(_net(2, seed=2), SCH, kind)
    return SplitDenoiser(high, low, LAM).eval().requires_grad_(False)


def _hook_calls(den: SplitDenoiser) -> dict[str, list[torch.Tensor]]:
    """Forward hooks on both networks: the continuous times each one was called with."""
    calls = {"high": [], "low": []}
    for side in calls:
        getattr(den, side).net.register_forward_hook(lambda m, args, out, s=side: calls[s].append(args[1].clone()))
    return calls


def test_boundary_index_splits_the_schedule_at_the_snr():
    tb = boundary_index(SCH, LAM)
    assert SCH.logsnr[tb] >= LAM > SCH.logsnr[tb + 1]
    assert 1 <= tb < SCH.T
    assert side_ranges(SCH.T, tb) == {"high": (tb + 1, SCH.T), "low": (1, tb)}


def test_routed_denoiser_calls_only_the_network_of_each_side():
    den = _split()
    tb = den.t_boundary
    calls = _hook_calls(den)
    z = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        den(z, torch.full((6,), SCH.T, dtype=torch.long))  # all high noise
    assert len(calls["high"]) == 1 and not calls["low"]
    calls["high"].clear()
    with torch.no_grad():
        den(z, torch.full((6,), tb, dtype=torch.long))  # the last low-noise index
    assert len(calls["low"]) == 1 and not calls["high"]
    calls["low"].clear()
    # a mixed batch (as in training or distillation): each element goes to its own side, once
    t = torch.tensor([1, tb + 1, tb, SCH.T, 5, tb + 7])
    with torch.no_grad():
        out = den(z, t)
    assert len(calls["high"]) == 1 and len(calls["low"]) == 1
    assert sorted((calls["high"][0] * SCH.T).round().long().tolist()) == [tb + 1, tb + 7, SCH.T]
    assert sorted((calls["low"][0] * SCH.T).round().long().tolist()) == [1, 5, tb]
    with torch.no_grad():
        ref = torch.cat([(den.high if int(ti) > tb else den.low)(z[i : i + 1], t[i : i + 1]) for i, ti in enumerate(t)])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert den.evaluations == {"high": 6 + 3, "low": 6 + 3}
    # continuous time (off-grid solvers) routes the same way
    calls["high"].clear(), calls["low"].clear()
    with torch.no_grad():
        den.continuous(z[:2], torch.tensor([(tb + 0.5) / SCH.T, tb / SCH.T]))
    assert [c.numel() for c in calls["high"]] == [1] and [c.numel() for c in calls["low"]] == [1]


def test_split_needs_one_parameterisation_and_schedule():
    with pytest.raises(ValueError, match="parameterisation"):
        SplitDenoiser(NetDenoiser(_net(4), SCH, "x"), NetDenoiser(_net(2), SCH, "v"), LAM)
    with pytest.raises(ValueError, match="schedule"):
        SplitDenoiser(NetDenoiser(_net(4), make_schedule("cosine", 32), "v"), NetDenoiser(_net(2), SCH, "v"), LAM)


def test_ddim_on_a_split_model_counts_each_side_as_it_routes():
    from fewstep.evaluation import count_split_nfe, gflops_per_net

    den = _split()
    steps = timesteps(SCH.T, 8)
    n_high = sum(t > den.t_boundary for t in steps)
    nfe = count_split_nfe(den, lambda x_T, noise: sample_ddim(den, x_T, steps), (3, 8, 8))
    assert nfe == {"high": n_high, "low": len(steps) - n_high} and 0 < n_high < len(steps)
    g = gflops_per_net(den, (3, 8, 8))
    assert set(g) == {"high", "low"} and g["high"] < g["low"]  # P=4 is cheaper than P=2 at equal widths


def test_split_model_dir_saves_and_loads_with_identical_outputs(tmp_path):
    den = _split("x")
    meta = {"role": "teacher", "variant": "split", "parameterization": "x", "schedule": {"kind": "cosine", "T": 64},
            "image_size": 8, "dataset": "toy", "sample_steps": 64, "parent": None,
            "split": {"boundary_logsnr": LAM, "boundary_snr": 0.25}}
    sha = models.save_split(tmp_path / "m", {"high": den.high.net, "low": den.low.net}, meta)
    loaded = models.load_denoiser(tmp_path / "m")
    assert isinstance(loaded, SplitDenoiser) and loaded.t_boundary == den.t_boundary and loaded.kind == "x"
    assert loaded.card.weights_sha256 == sha
    z = torch.randn(5, 3, 8, 8)
    t = torch.tensor([64, 2, den.t_boundary, den.t_boundary + 1, 30])
    with torch.no_grad():
        torch.testing.assert_close(loaded(z, t), den(z, t), rtol=0, atol=0)
    with pytest.raises(ValueError, match="split"):
        models.load_net(tmp_path / "m")


def test_low_net_starts_from_the_high_net_where_shapes_match():
    high, low = _net(4, seed=1), _net(2, seed=2)
    copied, total = init_matching(low, high)
    assert total - copied == 3  # only conv_in.weight, conv_out.weight and conv_out.bias depend on P
    hs = high.state_dict()
    for k, v in low.state_dict().items():
        assert torch.equal(v, hs[k]) == (hs[k].shape == v.shape)


def test_training_draws_timesteps_only_on_its_side():
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, z, tc):
            seen.append((tc * SCH.T).round().long())
            return z * self.w

    data = torch.randint(0, 255, (16, 3, 8, 8), dtype=torch.uint8)
    tb = boundary_index(SCH, LAM)
    for lo, hi in side_ranges(SCH.T, tb).values():
        seen.clear()
        loss = diffusion_loss(data, SCH, "x", "constant", 64, False, t_range=(lo, hi))
        for k in range(4):
            loss(Probe(), torch.Generator().manual_seed(k))
        t = torch.cat(seen)
        assert lo <= int(t.min()) and int(t.max()) <= hi and len(set(t.tolist())) > 10
    with pytest.raises(ValueError, match="t_range"):
        diffusion_loss(data, SCH, "x", "constant", 4, False, t_range=(0, 10))


def _conv_flops(P: int, ch: int) -> tuple[float, float]:
    net = _net(P, ch=ch, size=32)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(torch.zeros(1, 3, 32, 32), torch.ones(1))
    conv = sum(v for k, v in fc.get_flop_counts()["Global"].items() if "convolution" in str(k))
    return conv, fc.get_total_flops()


def test_conv_flops_fall_as_one_over_p_squared_at_fixed_widths():
    from fewstep.evaluation import gflops_per_call

    ch, H = 16, 32
    conv = {P: _conv_flops(P, ch)[0] for P in (1, 2, 4, 8)}
    # conv_in (3 P^2 -> ch) and conv_out (ch -> 3 P^2), 3x3 on the (H/P)^2 grid: 2*27*ch*H^2 each, whatever P
    io = 2 * (2 * 27 * ch * H * H)
    trunk = {P: conv[P] - io for P in conv}
    assert all(trunk[P] > 0 for P in trunk)
    for P in (2, 4, 8):
        assert trunk[1] / trunk[P] == pytest.approx(P * P, rel=1e-9), conv  # exactly 1/P^2 at fixed widths
    assert 3.3 < conv[1] / conv[2] < 4 and 3.3 < conv[2] / conv[4] < 4  # overall: about 1/P^2
    g = [gflops_per_call(NetDenoiser(_net(P, size=32), SCH, "v"), (3, 32, 32)) for P in (1, 2, 4, 8)]
    assert all(x > y for x, y in zip(g, g[1:])), g
    assert np.isclose(g[0] * 1e9, _conv_flops(1, 8)[1])


def test_evaluation_rows_carry_gflops_per_network_for_split_models(tmp_path):
    from fewstep.config import EvaluateParams
    from fewstep.evaluation import build_rows

    meta = {"role": "teacher", "parameterization": "v", "schedule": {"kind": "cosine", "T": 64}, "image_size": 8,
            "dataset": "toy", "sample_steps": 64, "parent": None}
    models.save_model(tmp_path / "teacher", _net(2), meta)
    models.save_model(tmp_path / "teacher-p4", _net(4), {**meta, "variant": "p4"})
    den = _split()
    models.save_split(tmp_path / "teacher-split", {"high": den.high.net, "low": den.low.net},
                      {**meta, "variant": "split", "split": {"boundary_logsnr": LAM}})
    ep = EvaluateParams(ddim_steps=[2], eta_steps=[], etas=[], sigma_hat=False, peers=[], study_steps=[1, 8])
    rows, dens = build_rows(tmp_path, tmp_path / "none", ep, torch.device("cpu"))
    by = {r.name: r for r in rows}
    assert set(by) == {"teacher ddim 2", "teacher-p4 ddim 1", "teacher-p4 ddim 8", "teacher-split ddim 1",
                       "teacher-split ddim 8"}
    assert all(r.gflops > 0 for r in rows)
    assert by["teacher-p4 ddim 8"].gflops == pytest.approx(8 * by["teacher-p4 ddim 1"].gflops)
    assert by["teacher-p4 ddim 1"].gflops < by["teacher ddim 2"].gflops / 2  # P=4 per call is cheaper than P=2
    one, eight = by["teacher-split ddim 1"], by["teacher-split ddim 8"]
    assert one.nfe_by_net == {"high": 1, "low": 0}  # one step from t = T: high noise only
    n_high = sum(t > den.t_boundary for t in timesteps(64, 8))
    assert eight.nfe_by_net == {"high": n_high, "low": 8 - n_high}
    assert eight.gflops == pytest.approx(sum(eight.gflops_by_net.values()))
    assert eight.gflops_by_net["low"] == pytest.approx(eight.nfe_by_net["low"] * by["teacher ddim 2"].gflops / 2)


@pytest.mark.parametrize("P", [2, 4])
def test_patchify_puts_pixel_i_j_of_patch_a_b_where_the_layout_says(P):
    """Input: pixel (i, j) of patch (a, b), channel c, is token (a, b), channel c P^2 + i P + j of the
    tensor conv_in sees (pixel_unshuffle's layout); output: the same channel of conv_out's result
    lands back on pixel (a P + i, b P + j)."""
    net = _net(P)
    C, H = 3, 8
    x = torch.arange(C * H * H, dtype=torch.float32).view(1, C, H, H)
    seen = {}
    net.conv_in.register_forward_pre_hook(lambda m, args: seen.setdefault("in", args[0].clone()))
    y = torch.arange(C * P * P * (H // P) ** 2, dtype=torch.float32).view(1, C * P * P, H // P, H // P) + 1000
    net.conv_out.register_forward_hook(lambda m, args, out: y)
    with torch.no_grad():
        out = net(x, torch.ones(1))
    h = seen["in"]
    assert h.shape == (1, C * P * P, H // P, H // P) and out.shape == x.shape
    for c in range(C):
        for a in range(H // P):
            for b in range(H // P):
                for i in range(P):
                    for j in range(P):
                        k = c * P * P + i * P + j
                        assert h[0, k, a, b] == x[0, c, a * P + i, b * P + j]
                        assert out[0, c, a * P + i, b * P + j] == y[0, k, a, b]


def test_a_split_students_start_equals_its_teacher_on_both_sides_of_the_boundary():
    den = _split("v")
    student = models.student_start(den)
    assert isinstance(student, SplitNet) and student.t_boundary == den.t_boundary
    assert student.high.cfg.patch_size == 4 and student.low.cfg.patch_size == 2
    tb = den.t_boundary
    t = torch.tensor([SCH.T, tb + 5, tb + 1, tb, tb - 3, 1])  # high, high, high, low, low, low
    z = torch.randn(len(t), 3, 8, 8, generator=torch.Generator().manual_seed(0))
    student.train()  # as the distillation loop runs it: dropout is off in the student's nets
    with torch.no_grad():
        got = student(z, t.float() / SCH.T)
        want = den(z, t)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(den.high(z, t), den.low(z, t))  # the two nets differ: routing matters
    # the student's weights are copies, not the teacher's tensors
    assert all(p.requires_grad for p in student.parameters())
    assert all(not p.requires_grad for p in den.parameters())


def test_a_split_net_gives_every_parameter_a_gradient_when_a_batch_hits_one_side():
    student = models.student_start(_split("v")).train()
    z = torch.randn(2, 3, 8, 8)
    student(z, torch.full((2,), 1.0)).pow(2).sum().backward()  # all high noise
    assert all(p.grad is not None for p in student.parameters())
    assert all(float(p.grad.abs().sum()) == 0 for p in student.low.parameters())


def test_a_split_teacher_distils_into_a_split_student_that_loads_back(tmp_path):
    from fewstep import storage
    from fewstep.config import DistillRoundParams
    from fewstep.sampler_pyfunc import load_sampler
    from fewstep.tracking import model_registry_name
    from fewstep.train.distill import distill_round
    from tests.helpers import write_prepared

    write_prepared(tmp_path / "data", size=8, n=16)
    den = _split("v")
    meta = {"role": "teacher", "variant": "split", "parameterization": "v", "schedule": {"kind": "cosine", "T": 64},
            "image_size": 8, "dataset": "toy", "class_names": ["a", "b"], "data_hash": "d", "sample_steps": 64,
            "parent": None, "split": {"boundary_logsnr": LAM, "boundary_snr": 0.25}}
    models.save_split(tmp_path / "split", {"high": den.high.net, "low": den.low.net}, meta)
    assert model_registry_name(models.load_card(tmp_path / "split")) == "toy-teacher-split"
    rp = DistillRoundParams(parent="teacher-split", steps=4, train_steps=2, batch_size=4, checkpoint_every=2,
                            log_every=1)
    result, card = distill_round(tmp_path / "split", tmp_path / "student", tmp_path / "ckpt", tmp_path / "data", 4,
                                 rp, 0, torch.device("cpu"), progress=False)
    loaded_card = models.load_card(tmp_path / "student")
    assert loaded_card == card and card.family == models.SplitUNetArch.family
    assert card.lineage.parent.variant == "split" and card.sample_steps == 4 and card.role == "student"
    assert card.arch.split.boundary_logsnr == LAM and card.arch.split.t_boundary == den.t_boundary
    assert {s: card.arch.nets[s].patch_size for s in ("high", "low")} == {"high": 4, "low": 2}
    student = models.load_denoiser(tmp_path / "student")
    assert isinstance(student, SplitDenoiser) and student.t_boundary == den.t_boundary
    # the loaded student is the trained net: same outputs on both sides, and it moved from the teacher
    tb = den.t_boundary
    t = torch.tensor([SCH.T, tb + 1, tb, 1])
    z = torch.randn(len(t), 3, 8, 8, generator=torch.Generator().manual_seed(1))
    trained = result.net.eval()
    with torch.no_grad():
        torch.testing.assert_close(student(z, t), trained(z, t.float() / SCH.T), rtol=0, atol=0)
        assert not torch.equal(student(z, t), den(z, t))
    # the MLflow pyfunc loader rebuilds the routed pair from the same artifacts
    s = load_sampler(tmp_path / "student" / models.WEIGHTS, tmp_path / "student" / models.CONFIG, default_steps=4)
    assert isinstance(s.denoiser, SplitDenoiser) and s.shape == (3, 8, 8)
    imgs = s.sample(2, seed=3)
    assert imgs.shape == (2, 8, 8, 3) and imgs.dtype == np.uint8
    assert storage.sha256_file(tmp_path / "student" / models.WEIGHTS) == s.card.weights_sha256


def test_study_split_and_objective_params_are_validated_with_clear_messages():
    from fewstep.config import ParamsError, validate
    from tests.helpers import tiny_params

    p = validate(tiny_params())
    assert p.study.teacher_for(p.teacher, 4).net.patch_size == 4
    cases = [
        (("study", "patch_sizes"), [1, 3], "study.patch_sizes"),
        (("study", "nets"), {"p8": {"channels": 8}, "p1": {}}, None),  # fine: p8 is not in patch_sizes
        (("objective", "variants"), ["x-bogus"], "<eps|x|v>-<weighting>"),
        (("objective", "variants"), ["eps-snr_trunc"], "diverges"),
        (("split", "models"), {"teacher-p4": {}}, "teacher-p<P>"),
        (("split", "models"), {"teacher-s": {"high": {"net": {"patch_size": 4, "channel_mult": [1, 2, 2]}}}},
         "split.models.teacher-s.high at image_size 8"),
        (("split", "models"), {"teacher-s": {"low": {"parameterization": "x"}}}, "one parameterization"),
    ]
    for (section, key), value, needle in cases:
        raw = tiny_params()
        raw[section][key] = value
        if needle is None:
            validate(raw)
            continue
        with pytest.raises(ParamsError) as e:
            validate(raw)
        assert needle in str(e.value), str(e.value)
