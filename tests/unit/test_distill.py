import pytest
import torch

from fewstep import models
from fewstep.config import validate
from fewstep.math.ddim import generate
from fewstep.math.distill import ddim_to, distill_target
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


def test_distill_params_validate_the_chain():
    p = tiny_params()
    p["distill"]["rounds"] = {"s2": {"parent": "teacher", "steps": 2}, "s1": {"parent": "s2", "steps": 2}}
    with pytest.raises(ValueError, match="not half"):
        validate(p)
    p["distill"]["rounds"] = {"s2": {"parent": "nope", "steps": 2}}
    with pytest.raises(ValueError, match="neither"):
        validate(p)
    p["distill"]["rounds"] = {"s3": {"parent": "teacher", "steps": 3}}
    with pytest.raises(ValueError, match="not divisible"):
        validate(p)


@pytest.mark.slow
def test_student_beats_the_teacher_at_equal_steps(tmp_path, tiny_teacher):
    """After one round, the student's N/2-step samples are closer to the teacher's N-step samples
    (same noise) than the teacher's own N/2-step DDIM samples are."""
    dev = torch.device("cpu")
    tt = tiny_teacher
    raw = tiny_params()
    raw["distill"] = {"defaults": {"train_steps": 200, "lr": 1e-3, "batch_size": 32, "checkpoint_every": 200},
                      "rounds": {"student-2": {"parent": "teacher", "steps": 2}}}
    rp = validate(raw).distill.round("student-2")
    result, meta = distill_round(tt / "teacher", tmp_path / "student", tmp_path / "ck_s", tt / "data",
                                 2, rp, 0, dev, progress=False)
    assert meta.lineage.parent.weights_sha256 == models.load_card(tt / "teacher").weights_sha256
    assert meta.sample_steps == 2 and meta.role == "student"
    teacher = models.load_denoiser(tt / "teacher")
    student = models.load_denoiser(tmp_path / "student")
    seeds = range(1000, 1064)  # not the seeds used in training
    ref = generate(teacher, seeds, (3, 8, 8), timesteps(64, 4))
    t_half = generate(teacher, seeds, (3, 8, 8), timesteps(64, 2))
    s_half = generate(student, seeds, (3, 8, 8), timesteps(64, 2))
    err_teacher = (t_half - ref).pow(2).mean().sqrt()
    err_student = (s_half - ref).pow(2).mean().sqrt()
    assert err_student < 0.8 * err_teacher, (float(err_student), float(err_teacher))
