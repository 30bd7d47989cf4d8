"""The evaluate stage on a class-conditional teacher (issue 17): one row per guidance scale, OLSS at
the scale it was fitted at, the evaluator's accuracy and FD/KID per class, the per-class report;
and an unconditional teacher's evaluate.json with exactly the keys it had before.

The toy data (tests.helpers.tiny_images) has two classes told apart by colour; the teacher learns
them in 150 steps (tests/integration/test_conditional_teacher.py measured 1.00 of its samples of the
asked colour) and a 60-step evaluator classifies them, so a conditional row's accuracy is far above
the 0.5 of chance."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import torch

from fewstep import models, storage
from fewstep.config import validate
from tests.helpers import subprocess_env, tiny_images, tiny_params, write_params, write_prepared

EVALUATE = {"n_samples": 32, "batch_size": 32, "reference_steps": 8, "ddim_steps": [4, 8], "eta_steps": [],
            "etas": [], "sigma_hat": False, "peers": [], "study_steps": [], "kid_subsets": 2, "fd_resamples": 20,
            "n_headline": 0, "grid_n": 8, "blur_sigmas": [0.5]}
# the keys evaluate.json had before class conditioning, for an unconditional tree (n_headline 0, no Inception)
TOP_KEYS = {"n_samples", "n_headline", "dup_threshold", "dup_quantile", "fd_resamples", "fd_floor", "fd_blur", "rows",
            "paired_pairs"}  # paired_pairs: the ranking's paired comparisons (issue 18), for every model
ROW_KEYS = {"n", "fd", "fd_lo", "fd_hi", "kid", "kid_se", "precision", "recall", "rmse", "psnr", "rmse_lo", "rmse_hi",
            "dup_rate", "family", "model", "nfe", "gflops", "images_per_s", "kid_se_subsets"}
ROW_OPTIONAL = {"is_reference", "pareto", "note", "paired"}  # paired: absent on the reference row itself


def _evaluate(cwd, params) -> subprocess.CompletedProcess:
    cwd.mkdir(exist_ok=True)
    write_params(cwd / "params.yaml", params)
    cmd = [sys.executable, "-m", "stages.evaluate", "--params", "params.yaml", "--models", "models",
           "--schedulers", "schedulers", "--reports", "reports", "--data", "data", "--no-progress"]
    r = subprocess.run(cmd, cwd=cwd, env=subprocess_env(FEWSTEP_TRACKING="off"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def _data(d) -> None:
    write_prepared(d, n=128)
    imgs, labels = tiny_images(32, 8, seed=1)
    storage.save_array(d / "test_images.npy", imgs)
    storage.save_array(d / "test_labels.npy", labels)


def test_the_evaluate_stage_scores_a_conditional_teacher_per_class_and_leaves_unconditional_rows_alone(
        tmp_path, torch_one_thread):
    from fewstep.olss_fit import fit_olss, write_schedulers
    from fewstep.train.evaluator import train_evaluator
    from fewstep.train.teacher import train_teacher
    from fewstep.trajectories import collect_model

    cond = tmp_path / "cond"
    _data(cond / "data")
    raw = tiny_params(steps=150, lr=3e-3, checkpoint_every=150, log_every=50, conditioning={"p_uncond": 0.1})
    raw["base"]["threads"] = 1
    raw["evaluate"].update(EVALUATE, guidance=[0.0, 1.0], per_class=True)
    raw["evaluator"].update(widths=[8, 16], blocks_per_stage=1, steps=60, batch_size=32, ref_subset=100)
    raw["trajectories"].update(n_fit=16, reference_steps=8, seed_offset=1000, shard_size=16, batch_size=16,
                               guidance=1.0)
    raw["olss"].update(steps=[4], n_holdout=8, max_elements=20000, bisection_iters=10)
    p = validate(raw)
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    train_teacher(p, cond / "data", cond / "models" / "teacher", cond / "ck", cpu, progress=False)
    ev = train_evaluator(p.evaluator, cond / "data", cond / "models" / "evaluator", cond / "ck-ev", 0, cpu,
                         progress=False)
    assert ev["test_accuracy"] >= 0.9  # the evaluator tells red from blue
    den = models.load_denoiser(cond / "models" / "teacher")
    collect_model(den, "teacher", p.trajectories, cond / "traj", cpu, progress=False)
    fit = fit_olss(den, "teacher", cond / "traj", 4, p.olss, 0, cpu)
    out = cond / "schedulers" / "teacher"
    write_schedulers(fit.schedulers, out)
    unscaled = json.loads((out / "olss-4.json").read_text())  # as if fitted before scales were recorded
    del unscaled["meta"]["guidance"]
    (out / "olss-unscaled-4.json").write_text(json.dumps(unscaled))

    r = _evaluate(cond, raw)
    assert "skipped teacher/olss-unscaled-4.json: fitted without a recorded guidance scale" in r.stdout
    got = storage.read_json(cond / "metrics" / "evaluate.json")
    rows = got["rows"]
    assert got["class_names"] == ["red", "blue"] and got["guidance"] == [0.0, 1.0]
    ddim = {f"teacher ddim {s}{w}" for s in (4, 8) for w in ("", " w=1")}
    olss = {k for k in rows if "olss" in k}
    assert ddim <= set(rows) and olss and all(k.endswith(" w=1") for k in olss)  # OLSS: its fitted w only
    assert not any("unscaled" in k for k in rows)
    for name, row in rows.items():
        w = row["guidance"]
        assert row["nfe"] == row["steps"] * (2 if w > 0 else 1)  # guidance counted in NFE
        assert row["accuracy"] >= 0.8 and 0 <= row["accuracy_se"] <= 0.1, (name, row["accuracy"])
        assert set(row["per_class"]) == {"red", "blue"}
        for c, b in row["per_class"].items():
            assert b["n"] == 16 and b["fd_lo"] <= b["fd_hi"] and 0 <= b["accuracy"] <= 1 and b["kid_se"] >= 0
        assert (cond / "reports" / "grids" / f"{name.replace(' ', '-').replace('=', '-')}-classes.png").exists()
    for w in ("", " w=1"):  # the reference at each scale: sampled once, RMSE 0 against itself
        assert rows[f"teacher ddim 8{w}"]["is_reference"] and rows[f"teacher ddim 8{w}"]["rmse"] == 0
    report = (cond / "reports" / "evaluation.md").read_text()
    assert "## Per class (class-conditional models)" in report
    assert "| sampler | w | NFE | acc | red | blue | grid |" in report

    # an unconditional teacher (random weights: only the keys are checked) with the same evaluator
    plain = tmp_path / "plain"
    _data(plain / "data")
    shutil.copytree(cond / "models" / "evaluator", plain / "models" / "evaluator")
    torch.manual_seed(1)
    from fewstep.nets.unet import UNet

    net = UNet(p.teacher.net.unet_config(8)).eval()
    meta = {"role": "teacher", "parameterization": "v", "schedule": {"kind": "cosine", "T": 64}, "image_size": 8,
            "dataset": "toy", "sample_steps": 8, "parent": None}
    models.save_model(plain / "models" / "teacher", net, meta)
    raw_plain = tiny_params()
    raw_plain["base"]["threads"] = 1
    raw_plain["evaluate"].update(EVALUATE, guidance=[0.0, 1.0], per_class=True)  # ignored: no conditional model
    _evaluate(plain, raw_plain)
    got = storage.read_json(plain / "metrics" / "evaluate.json")
    assert set(got) == TOP_KEYS
    assert set(got["rows"]) == {"teacher ddim 4", "teacher ddim 8"}
    for row in got["rows"].values():
        assert ROW_KEYS <= set(row) <= ROW_KEYS | ROW_OPTIONAL
    assert "Per class" not in (plain / "reports" / "evaluation.md").read_text()
