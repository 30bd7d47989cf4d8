"""The patch-size study as DVC stages on the tiny profile: one teacher per P (a foreach stage), a
split model, and the redundancy analysis over them."""

import math
import sys

import yaml

from fewstep import models, storage
from fewstep.math.split import SplitDenoiser
from tests.integration.conftest import build_tiny_repo, run

TINY_TRAIN = {"steps": 4, "warmup": 1, "checkpoint_every": 4, "log_every": 2, "sample": {"n": 2, "steps": 2}}


def _study(p: dict) -> None:
    p["study"] = {"patch_sizes": [1, 2], "teacher": TINY_TRAIN,
                  "nets": {"p1": {"channels": 8, "attn_resolutions": []}, "p2": {"channels": 8}}}
    p["split"]["models"] = {"teacher-split": {"boundary_snr": 0.25, "high": {**TINY_TRAIN, "net": {"patch_size": 4}},
                                              "low": {**TINY_TRAIN, "net": {"patch_size": 2}}}}


def test_study_stages_make_one_teacher_per_patch_size_and_the_redundancy_plot(tmp_path):
    repo = build_tiny_repo(tmp_path / "repo", tmp_path / "data", tweak=_study)
    run([sys.executable, "-m", "dvc", "repro", "study_teacher", "train_split"], repo)
    run([sys.executable, "-m", "dvc", "repro", "--single-item", "redundancy@teachers"], repo)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert {"study_teacher@1", "study_teacher@2", "train_split@teacher-split", "redundancy@teachers"} <= set(lock["stages"])
    assert "train_teacher" not in lock["stages"]  # the study does not need the main teacher
    gflops = {}
    for P in (1, 2):
        card = models.load_card(repo / f"models/teacher-p{P}")
        assert card.patch_sizes == [P] and card.variant == f"p{P}" and card.role == "teacher"
        gflops[P] = storage.read_json(repo / f"metrics/study/teacher-p{P}.json")["gflops_per_call"]
    assert gflops[2] < gflops[1]
    split = models.load_denoiser(repo / "models/teacher-split")
    assert isinstance(split, SplitDenoiser) and split.card.arch.split.sides["low"]["init"]["tensors_copied"] > 0
    red = storage.read_json(repo / "metrics/redundancy.json")
    assert set(red["models"]) == {"teacher-p1", "teacher-p2", "teacher-split"}
    for r in red["models"].values():
        bins = [b for b in r["bins"] if b["n"]]
        assert len(bins) >= 3 and all(math.isfinite(b["mse"]) and b["n"] == 16 for b in bins)
    assert (repo / "study/redundancy.png").stat().st_size > 1000
    assert len((repo / "plots/redundancy.csv").read_text().splitlines()) > 3 * 3
