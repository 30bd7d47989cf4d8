"""benchmarks/stock_recipe.py end to end on toy data (issue 19.2): the stock diffusers recipe trained
for a few seconds beside a tiny fewstep teacher, both scored by one evaluator at one n."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fewstep import storage
from fewstep.config import validate
from fewstep.train.evaluator import train_evaluator
from fewstep.train.teacher import train_teacher
from tests.helpers import ROOT, subprocess_env, tiny_params, write_params, write_prepared

pytest.importorskip("diffusers")


def test_stock_recipe_trains_for_the_teachers_seconds_and_scores_both(tmp_path, torch_one_thread):
    data, models_dir = tmp_path / "data", tmp_path / "models"
    write_prepared(data, n=64)
    p = tiny_params(steps=20, checkpoint_every=20, log_every=10)
    params = validate(p)
    train_teacher(params, data, models_dir / "teacher", tmp_path / "ck", torch.device("cpu"), progress=False)
    ep = params.evaluator.model_copy(update={"steps": 10, "batch_size": 16, "widths": [8, 16], "ref_subset": 64})
    train_evaluator(ep, data, models_dir / "evaluator", tmp_path / "ck-ev", 0, torch.device("cpu"), progress=False)
    storage.write_json(tmp_path / "teacher.json", {"steps": 300, "train_seconds": 3.0})
    p["base"]["threads"] = 1
    params = write_params(tmp_path / "params.yaml", p)
    out = tmp_path / "stock.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "stock_recipe.py"), "--params", str(params),
           "--data", str(data), "--models", str(models_dir), "--teacher-metrics",
           str(tmp_path / "teacher.json"), "--n", "24", "--steps", "4", "--resamples", "20", "--json", str(out),
           "--grid", str(tmp_path / "stock.png"), "--no-progress"]
    r = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["seconds"] == 3.0 and res["n"] == 24 and res["steps"] == 4
    stock = res["rows"]["stock"]
    assert stock["train_seconds"] >= 3.0 and stock["train_steps"] >= 1
    assert 2.6e6 < stock["params"] < 2.8e6  # the recipe's UNet2DModel
    for k in ("fewstep", "stock"):
        s = res["scores"][k]
        assert s["n"] == 24 and s["fd"] > 0 and 0 <= s["fd_lo"] < s["fd_hi"], s  # the basic bootstrap's interval
    assert res["fd_ratio_stock_over_fewstep"] == pytest.approx(res["scores"]["stock"]["fd"] / res["scores"]["fewstep"]["fd"])
    assert "FD(stock) / FD(fewstep)" in r.stdout and (tmp_path / "stock.png").exists()

    # no seconds to match: one clear line, no traceback
    r = subprocess.run(cmd[:8] + ["--teacher-metrics", str(tmp_path / "missing.json")], cwd=tmp_path,
                       env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "pass --seconds" in r.stderr and "Traceback" not in r.stderr


def test_teacher_recipe_scores_two_teachers_on_the_same_seeds(tmp_path, torch_one_thread):
    """benchmarks/teacher_recipe.py: equal n, the same seeds, one evaluator; a teacher against itself is
    exactly 1.0 (the pairing), two teachers get a paired interval around their FD ratio."""
    data, models_dir = tmp_path / "data", tmp_path / "models"
    write_prepared(data, n=64)
    for name, steps in (("a", 20), ("b", 4)):
        params = validate(tiny_params(steps=steps, checkpoint_every=20, log_every=10))
        train_teacher(params, data, models_dir / name, tmp_path / f"ck-{name}", torch.device("cpu"), progress=False)
    ep = params.evaluator.model_copy(update={"steps": 10, "batch_size": 16, "widths": [8, 16], "ref_subset": 64})
    train_evaluator(ep, data, models_dir / "evaluator", tmp_path / "ck-ev", 0, torch.device("cpu"), progress=False)
    script = str(ROOT / "benchmarks" / "teacher_recipe.py")

    def run(base: str, cand: str) -> dict:
        out = tmp_path / f"{base}-{cand}.json"
        r = subprocess.run([sys.executable, script, "--baseline", str(models_dir / base), "--candidate",
                            str(models_dir / cand), "--evaluator", str(models_dir / "evaluator"), "--n", "24",
                            "--steps", "4", "--resamples", "20", "--threads", "1", "--json", str(out)],
                           cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(out.read_text())

    same = run("a", "a")
    assert same["ratio"]["candidate_over_baseline"] == 1.0 and same["ratio"]["lo"] == same["ratio"]["hi"] == 1.0
    res = run("a", "b")
    rows, ratio = res["rows"], res["ratio"]
    assert rows["baseline"]["train_steps"] == 20 and rows["candidate"]["train_steps"] == 4
    assert ratio["candidate_over_baseline"] == pytest.approx(rows["candidate"]["fd"] / rows["baseline"]["fd"])
    assert ratio["lo"] < ratio["hi"] and 0.0 <= rows["candidate"]["confident"] <= 1.0
    assert res["fd_diff"]["diff"] == pytest.approx(rows["candidate"]["fd"] - rows["baseline"]["fd"])
