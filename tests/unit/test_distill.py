import dataclasses

import pytest
import torch

from fewstep import models
from fewstep.config import validate
from fewstep.math.ddim import sample_ddim
from fewstep.math.distill import ddim_to, distill_target
from fewstep.math.param import convert
from fewstep.math.schedules import cosine_schedule, timesteps
from fewstep.testing import GaussianDenoiser
from fewstep.train.distill import distill_round
from tests.helpers import tiny_params


def test_one_student_step_lands_on_the_teachers_two_step_result():
    sch = cosine_schedule(64)
    mu = torch.full((1, 3, 2, 2), 0.3)
    std = torch.full((1, 3, 2, 2), 0.4)
    teacher = GaussianDenoiser(sch, mu, std)
    dt = 8
    t = torch.tensor([16, 32, 48, 64, 16])  # includes the last student step (t'' = 0)
    z = torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_tilde = distill_target(teacher, z, t, dt)
    # teacher: two DDIM steps t -> t' -> t''
    a = lambda i: sch.at(i, torch.float64)
    (a_t, s_t), (a_1, s_1), (a_2, s_2) = a(t), a(t - dt), a(t - 2 * dt)
    z1 = ddim_to(teacher(z, t), z, a_t, s_t, a_1, s_1)
    z2 = ddim_to(teacher(z1, t - dt), z1, a_1, s_1, a_2, s_2)
    # student: one DDIM step t -> t'' with x_tilde
    student = ddim_to(x_tilde, z, a_t, s_t, a_2, s_2)
    torch.testing.assert_close(student, z2, rtol=1e-10, atol=1e-10)


class _Converted:
    """The Gaussian-data teacher answering as an ``kind`` model (eps, x or v prediction)."""

    def __init__(self, base: GaussianDenoiser, kind: str):
        self.base, self.kind, self.schedule = base, kind, base.schedule

    def __call__(self, z, t):
        a, s = self.schedule.at(t, torch.float64)
        return convert(self.base(z, t), "x", self.kind, z, a, s)


class _Fixed:
    """An x model that answers ``x`` whatever it is asked: a student whose prediction is the target."""

    kind = "x"

    def __init__(self, schedule, x):
        self.schedule, self.x = schedule, x

    def __call__(self, z, t):
        return self.x


def _ddim_latent(den, z, steps, at_step):
    """sample_ddim (unclipped) from z over ``steps``: the latent after step ``at_step`` (1-based)."""
    out = {}
    final = sample_ddim(den, z, steps, clip=False, callback=lambda d: out.setdefault(d["i"], d["z_next"]))
    return out[at_step - 1] if at_step <= len(steps) else final


@pytest.mark.parametrize("kind", ["eps", "x", "v"])
def test_the_target_makes_one_student_ddim_step_equal_two_teacher_ddim_steps_of_sample_ddim(kind):
    """Independent of fewstep.math.distill's own ddim_to: the teacher runs sample_ddim for two
    steps t -> t - dt -> t - 2 dt, the student (predicting x_tilde) for one step t -> t - 2 dt."""
    sch = cosine_schedule(64)
    mu = torch.linspace(-0.5, 0.5, 12, dtype=torch.float64).view(1, 3, 2, 2)
    teacher = _Converted(GaussianDenoiser(sch, mu, torch.full((1, 3, 2, 2), 0.4)), kind)
    dt = 8
    for t in (16, 32, 48, 64):  # 16: the last student step (t'' = 0)
        z = torch.randn(3, 3, 2, 2, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        x_tilde = distill_target(teacher, z, torch.full((3,), t), dt)
        tail = [t - 2 * dt] if t > 2 * dt else []
        z2 = _ddim_latent(teacher, z, [t, t - dt, *tail], 2)  # the latent at t''
        one = _ddim_latent(_Fixed(sch, x_tilde), z, [t, *tail], 1)
        # measured: max |one - z2| <= 7e-16 for every kind and t; the one-step x of the teacher instead of
        # x_tilde misses by 0.02 (t = 64) to 0.32 (t = 16)
        torch.testing.assert_close(one, z2, rtol=1e-10, atol=1e-10)
        assert not torch.allclose(x_tilde, teacher.base(z, torch.full((3,), t)), atol=1e-3)  # not the 1-step x


def test_distill_params_validate_the_chain():
    p = tiny_params()
    p["distill"]["rounds"] = {"s2": {"parent": "teacher", "steps": 2}, "s1": {"parent": "s2", "steps": 2}}
    with pytest.raises(ValueError, match="not half"):
        validate(p)
    p["distill"]["rounds"] = {"s2": {"parent": "nope", "steps": 2}}
    with pytest.raises(ValueError, match="neither"):
        validate(p)
    p["distill"]["rounds"] = {"s3": {"parent": "teacher", "steps": 3}}  # 6 trailing steps of T=64: allowed
    validate(p)
    p["distill"]["rounds"] = {"s40": {"parent": "teacher", "steps": 40}}  # 80 teacher steps > T=64
    with pytest.raises(ValueError, match="exceed"):
        validate(p)


@pytest.mark.parametrize("T,N", [(1000, 16), (1000, 20), (1024, 16), (64, 6)])
def test_the_halving_rule_puts_the_student_on_its_own_trailing_grid(T, N):
    """The teacher's N trailing steps of T; every other point is the N/2-step student's own trailing
    grid (what it samples on); uniform dt = T/N exactly when N divides T (the paper's rule)."""
    from fewstep.train.distill import teacher_grid

    g = teacher_grid(T, N)
    assert g[0] == 0 and g[-1] == T and len(g) == N + 1 and g == sorted(set(g))
    assert g[2::2] == sorted(timesteps(T, N // 2, "trailing"))
    steps = {b - a for a, b in zip(g, g[1:])}
    assert steps == ({T // N} if T % N == 0 else {T // N, T // N + 1})


def test_the_target_on_an_uneven_grid_equals_two_teacher_ddim_steps():
    """T = 1000 (a diffusers model), student 8 steps, teacher 16: t' is not the midpoint."""
    from fewstep.math.distill import distill_target_path
    from fewstep.math.schedules import linear_schedule
    from fewstep.train.distill import teacher_grid

    sch = linear_schedule(1000)
    mu = torch.linspace(-0.5, 0.5, 12, dtype=torch.float64).view(1, 3, 2, 2)
    teacher = _Converted(GaussianDenoiser(sch, mu, torch.full((1, 3, 2, 2), 0.4)), "eps")
    g = teacher_grid(1000, 16)
    for i in (1, 3, 8):
        t, t1, t2 = g[2 * i], g[2 * i - 1], g[2 * i - 2]
        assert t - t1 != t1 - t2 or i == 8
        z = torch.randn(3, 3, 2, 2, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        x_tilde = distill_target_path(teacher, z, *(torch.full((3,), k) for k in (t, t1, t2)))
        tail = [t2] if t2 > 0 else []
        z2 = _ddim_latent(teacher, z, [t, t1, *tail], 2)
        one = _ddim_latent(_Fixed(sch, x_tilde), z, [t, *tail], 1)
        torch.testing.assert_close(one, z2, rtol=1e-9, atol=1e-9)


def _eps_teacher(path):
    from fewstep.nets.unet import UNet, UNetConfig

    net = UNet(UNetConfig(image_size=8, patch_size=1, channels=8, channel_mult=(1,), num_res_blocks=1,
                          attn_resolutions=(), head_dim=8, dropout=0.0))
    meta = {"role": "teacher", "parameterization": "eps", "weighting": "snr", "schedule": {"kind": "cosine", "T": 64},
            "image_size": 8, "dataset": "toy", "sample_steps": 64, "parent": None}
    models.save_model(path, net, meta)


def test_a_round_from_an_eps_teacher_with_snr_trunc_weighting_is_refused_before_any_work(tmp_path):
    from fewstep.config import DistillRoundParams
    from fewstep.errors import UserError
    from fewstep.train.distill import DistillSetupError, check_round

    _eps_teacher(tmp_path / "teacher")
    rp = DistillRoundParams(parent="teacher", steps=4, train_steps=1, batch_size=2)
    assert rp.weighting == "snr_trunc"  # the default: exactly PD Table 1's diverging pair for an eps teacher
    with pytest.raises(DistillSetupError) as e:  # no data dir exists: refused before loading anything else
        distill_round(tmp_path / "teacher", tmp_path / "s", tmp_path / "ck", tmp_path / "no-data", 4, rp, 0,
                      torch.device("cpu"), progress=False)
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg
    assert "eps-prediction with snr_trunc weighting diverges" in msg and "Table 1" in msg
    assert not (tmp_path / "s").exists() and not (tmp_path / "ck").exists()
    card = models.load_card(tmp_path / "teacher")
    for ok in ("snr", "snr+1", "constant", "sqrt_snr"):
        check_round(card, tmp_path / "teacher", 4, ok)  # any other weighting may distil an eps teacher
    check_round(dataclasses.replace(card, parameterization="v"), tmp_path / "teacher", 4, "snr_trunc")
