"""Guided progressive distillation on the two-class toy (issue 17; Meng et al. 2023, stage two at a
fixed w): a class-conditional teacher (label dropout) is distilled by the distill stage at w = W
(distill.defaults.guidance) from 8 guided DDIM steps to a 4-step student, sampled at guidance 0 with
the same labels.

RMSE to the guided teacher's 64-step DDIM (same 64 seeds and labels, clipped images), measured on
this 2-core box (teacher 150 steps, one stage round of 150 steps at batch 32; ~63 s of CPU in all,
120 s wall under a load of 10):

    guided teacher DDIM 8 steps (w=2, 16 NFE)   0.043   (the round's target sampler)
    guided teacher DDIM 4 steps (w=2,  8 NFE)   0.097
    guided 4-step student (w=0,  4 NFE)         0.081   (0.077 after 300 round steps)

and 1.00 of the student's samples have the colour of their label (chance 0.5; the toy's classes
are a red and a blue square)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fewstep import models, samplers, storage
from fewstep.config import validate
from fewstep.math.ddim import PerImageNoise, sample_ddim
from fewstep.math.guidance import GuidanceError, cycle_labels, guided
from fewstep.math.schedules import timesteps
from fewstep.train.teacher import train_teacher
from tests.helpers import subprocess_env, tiny_params, write_params, write_prepared

W = 2.0


def _colour_class(x: torch.Tensor) -> torch.Tensor:
    return (x[:, 2].mean((1, 2)) > x[:, 0].mean((1, 2))).long()


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().sqrt().item()


@pytest.mark.usefixtures("torch_one_thread")
def test_a_guided_4_step_student_beats_the_guided_teachers_4_step_ddim_and_keeps_its_class(tmp_path):
    torch.manual_seed(0)
    write_prepared(tmp_path / "data", n=128)
    raw = tiny_params(steps=150, lr=3e-3, checkpoint_every=150, log_every=50, conditioning={"p_uncond": 0.1})
    raw["distill"] = {"defaults": {"train_steps": 150, "lr": 2e-3, "batch_size": 32, "checkpoint_every": 150,
                                   "log_every": 50, "weighting": "snr+1", "guidance": W},
                      "rounds": {"student-4": {"parent": "teacher", "steps": 4}}}
    raw["distill"]["defaults"]["sample"] = {"n": 8, "steps": 0, "spacing": "trailing", "seed": 0}
    raw["base"]["threads"] = 1
    p = validate(raw)
    train_teacher(p, tmp_path / "data", tmp_path / "models" / "teacher", tmp_path / "ck", torch.device("cpu"),
                  progress=False)
    write_params(tmp_path / "params.yaml", raw)
    cmd = [sys.executable, "-m", "stages.distill", "--round", "student-4", "--params", str(tmp_path / "params.yaml"),
           "--data", str(tmp_path / "data"), "--models", str(tmp_path / "models"), "--no-progress"]
    r = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    card = models.load_card(tmp_path / "models" / "student-4")
    assert card.guidance == W and card.conditioning == models.Conditioning(2)
    m = storage.read_json(tmp_path / "metrics" / "student-4.json")
    assert m["guidance"] == W and m["rmse_student_vs_parent"] < m["rmse_parent_half_steps_vs_parent"], m

    teacher = models.load_denoiser(tmp_path / "models" / "teacher")
    student = models.load_denoiser(tmp_path / "models" / "student-4")
    seeds = list(range(500, 564))
    labels = cycle_labels(seeds, seeds[0], 2)
    x_T = PerImageNoise(seeds).randn(3, 8, 8)
    with torch.no_grad():
        g = guided(teacher, labels, W)
        ref = sample_ddim(g, x_T, timesteps(64, 64), clip=True)
        ddim = {n: sample_ddim(guided(teacher, labels, W), x_T, timesteps(64, n), clip=True) for n in (4, 8)}
        stud = sample_ddim(guided(student, labels, 0.0), x_T, timesteps(64, 4), clip=True)
    r = {"student 4": _rmse(stud, ref), **{f"teacher ddim {n} w={W:g}": _rmse(x, ref) for n, x in ddim.items()}}
    acc = (_colour_class(stud) == torch.tensor(labels)).float().mean().item()
    print("RMSE to the guided teacher's 64-step DDIM:", r, "student class accuracy:", acc)
    assert r["student 4"] < r[f"teacher ddim 4 w={W:g}"], r
    assert acc >= 0.9, f"only {acc:.2f} of the student's samples have the asked class"
    # the student's NFE is its steps; guidance on it is refused
    assert samplers.generate("ddim", student, seeds[:2], (3, 8, 8), steps=4, labels=labels[:2]).shape[0] == 2
    with pytest.raises(GuidanceError, match="distilled at w=2"):
        samplers.generate("ddim", student, seeds[:2], (3, 8, 8), steps=4, labels=labels[:2], guidance=W)
