"""The compute projection (fewstep.budget): counts follow the params, FLOPs match the evaluation's
count, and the GPU profile fits its 60-minute H100 goal at the peer calibration."""

from __future__ import annotations

from pathlib import Path

import pytest

from fewstep import budget
from fewstep.config import deep_merge, load_params, validate
from fewstep.evaluation import gflops_per_call
from fewstep.math.param import NetDenoiser
from fewstep.math.schedules import make_schedule
from fewstep.nets.unet import UNet

ROOT = Path(__file__).resolve().parents[2]


def _params(split_off: bool = False, **over):
    import yaml

    raw = deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()), over)
    if split_off:
        raw["split"]["models"] = {}
    return validate(raw)


def _stage(work, stage):
    return [w for w in work if w.stage == stage]


def test_unet_gflops_is_the_evaluation_tables_count():
    p = _params()
    net = UNet(p.teacher.net.unet_config(p.base.image_size))
    size = p.base.image_size
    direct = gflops_per_call(NetDenoiser(net, make_schedule("cosine", 1024), "v"), (3, size, size))
    assert budget.unet_gflops(p.teacher, size) == pytest.approx(direct, rel=1e-9)
    # patch size 2 halves the grid: fewer FLOPs than the same widths at P=1
    p1 = _params(teacher={"net": {"patch_size": 1}})
    assert budget.unet_gflops(p1.teacher, size) > 2 * budget.unet_gflops(p.teacher, size)


def test_counts_follow_the_params():
    p = _params()
    w = _stage(budget.project(p), "train_teacher")[0]
    assert w.train == p.teacher.steps * p.teacher.batch_size
    assert w.gflop == pytest.approx(w.gflops * (3 * w.train + w.forward))
    q = _params(teacher={"steps": 2 * p.teacher.steps})
    a, b = budget.by_stage(budget.project(p)), budget.by_stage(budget.project(q))
    assert b["train_teacher"] > 1.9 * a["train_teacher"]
    assert all(a[s] == pytest.approx(b[s]) for s in a if s != "train_teacher")
    # a distillation round: student forward+backward plus two float32 teacher forwards per image
    r = p.distill.round("student-4")
    d = _stage(budget.project(p), "distill@student-4")[0]
    assert d.train == r.train_steps * r.batch_size and d.fp32_forward == 2 * d.train
    assert d.gflop == pytest.approx(d.gflops * (3 * d.train + d.forward + budget.FP32_FORWARD_COST * d.fp32_forward))
    # the study (on in profiles/cpu-full.yaml): turning it off removes its stages and its evaluation rows
    import yaml

    full = yaml.safe_load((ROOT / "profiles/cpu-full.yaml").read_text())
    on = budget.project(_params(**full))
    assert {"study_teacher@1", "study_teacher@4", "train_split@teacher-split", "redundancy@teachers",
            "ddim_study@teacher"} <= {w.stage for w in on}
    off = budget.project(_params(split_off=True, **{**full, "study": {**full["study"], "patch_sizes": []}}))
    assert not [w for w in off if w.stage.startswith(("study_teacher", "train_split"))]
    assert budget.by_stage(off)["evaluate"] < budget.by_stage(on)["evaluate"]
    # the CPU default has them off, and the redundancy and DDIM studies with them
    assert not [w for w in budget.project(p) if w.stage.startswith(("study_teacher", "train_split", "redundancy",
                                                                    "ddim_study"))]


def test_the_reference_row_is_counted_once():
    h = {"n_headline": 2000}  # the ranked rows at more samples than the table (cpu-full; off in the default)
    p = _params(evaluate=h)
    ref = p.evaluate.reference_steps
    with_ref = _params(evaluate={**h, "ddim_steps": [16, ref]})
    without = _params(evaluate={**h, "ddim_steps": [16]})
    ev = lambda q: sum(w.forward for w in budget.project(q) if w.net == "teacher rows")  # noqa: E731
    assert ev(with_ref) == ev(without)
    # DDIM at a student's step count (4: student-4) is a ranked row (n_headline samples); at another
    # count (8: no student-8 in the default's 8 -> 4 -> 2), n_samples
    assert {p.distill.round(n).steps for n in p.distill.rounds} == {4, 2}
    assert ev(_params(evaluate={**h, "ddim_steps": [16, 4]})) == ev(without) + 4 * p.evaluate.headline_n
    assert ev(_params(evaluate={**h, "ddim_steps": [16, 8]})) == ev(without) + 8 * p.evaluate.n_samples
    assert p.evaluate.headline_n > p.evaluate.n_samples


def test_gpu_profile_fits_an_hour_of_h100_at_the_peer_rate():
    pytest.importorskip("diffusers")
    g = budget.peer_gflops()
    assert 5 < g < 20  # DDPM's CIFAR-10 UNet: about 6 GMACs per image
    rate = budget.rate_from_peer(budget.H100_PEER_TRAIN_IMAGES_PER_S, g)
    gpu = load_params(ROOT / "params.yaml", "gpu")
    minutes = sum(budget.by_stage(budget.project(gpu)).values()) / rate / 60
    # the projection is a lower bound (no data loading, checkpoints, small-net inefficiency): keep a margin
    assert minutes < 45, f"profiles/gpu.yaml projects to {minutes:.0f} min of H100 time"
    full = load_params(ROOT / "params.yaml", "gpu-full")
    assert sum(budget.by_stage(budget.project(full)).values()) / rate / 60 > minutes


def test_the_ddpm_profile_counts_the_imported_teacher_and_fits_45_minutes_of_h100():
    """profiles/ddpm-cifar10.yaml: no teacher training, the DDPM UNet's FLOPs and T = 1000 (no source
    dir here: the DDPM CIFAR-10 figures), under the same margin as the GPU profile."""
    pytest.importorskip("diffusers")
    p = load_params(ROOT / "params.yaml", "ddpm-cifar10")
    work = budget.project(p)
    g = budget.peer_gflops()
    teacher = [w for w in work if w.stage == "train_teacher"]
    assert len(teacher) == 1 and teacher[0].train == 0 and teacher[0].gflops == g
    ddim = [w for w in work if w.stage == "ddim_study@teacher"][0]
    assert ddim.forward > 2 * p.ddim_study.n_images * 1000  # the 1000-step grid is counted (T = 1000, not 1024)
    minutes = sum(budget.by_stage(work).values()) / budget.rate_from_peer(budget.H100_PEER_TRAIN_IMAGES_PER_S, g) / 60
    assert 10 < minutes < 45, f"profiles/ddpm-cifar10.yaml projects to {minutes:.0f} min of H100 time"
