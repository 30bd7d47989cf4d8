"""A real distillation round on the session's tiny teacher (trains for ~25 s on 2 cores): the
student beats its teacher at equal steps."""

import pytest
import torch

from fewstep import models
from fewstep.config import validate
from fewstep.math.ddim import generate
from fewstep.math.schedules import timesteps
from fewstep.train.distill import distill_round
from tests.helpers import tiny_params


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
