"""Issue 16, test 2: a tiny `dvc repro` of an import profile. A small diffusers UNet2DModel (8x8,
DDPMScheduler linear betas, T = 1000, epsilon) is the teacher.source; every stage runs on it, and the
registry holds the teacher, the students and the OLSS schedulers with lineage back to the source's
sha256."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fewstep import models, storage
from fewstep.olss_fit import variant_files
from tests.integration.conftest import build_tiny_repo, run

pytest.importorskip("diffusers")

# every stage that reads a model; objective_report (it reads metrics/objective only, no model, the
# same for every family) is left out: test_prefect_deploy.py runs it in the whole micro pipeline
STAGES = {"prepare_data", "train_teacher", "distill@student-8", "distill@student-4", "collect_trajectories@teacher",
          "fit_olss@teacher-4", "train_evaluator", "evaluate", "register", "promote", "redundancy@teachers",
          "ddim_study@teacher"}
TARGETS = ("promote", "redundancy@teachers", "ddim_study@teacher")  # and everything above them


def _source(out: Path) -> tuple[Path, str]:
    """The stand-in source dir and its digest, computed here from the files (the card's contract:
    sha256 of the canonical JSON of {file: sha256})."""
    from fewstep.interop.standin import write_standin

    write_standin(out, image_size=8, channels=8, seed=0)
    files = {rel: storage.sha256_file(out / rel)
             for rel in ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json")}
    return out, storage.sha256_json(files)


def _import_profile(source: Path, digest: str):
    def tweak(p: dict) -> None:
        p["teacher"]["source"] = {"kind": "diffusers", "path": str(source), "sha256": digest}
        p["teacher"]["sample"] = {"n": 2, "steps": 16, "spacing": "trailing", "seed": 0}
        p["distill"]["defaults"].update(train_steps=2, batch_size=4, checkpoint_every=2, log_every=1,
                                        weighting="snr+1")  # an eps student (snr_trunc diverges)
        p["distill"]["defaults"]["sample"]["n"] = 2
        # the teacher takes 16 trailing steps of T = 1000 (62 or 63 apart), student-8 every other one
        p["distill"]["rounds"] = {"student-8": {"parent": "teacher", "steps": 8},
                                  "student-4": {"parent": "student-8", "steps": 4}}
        p["trajectories"].update(reference_steps=16, n_fit=4, shard_size=4, batch_size=4)
        p["olss"].update(steps=[4], max_elements=1000, bisection_iters=5, n_holdout=2)
        p["evaluator"].update(widths=[8], blocks_per_stage=1, steps=5, batch_size=8, ref_subset=16)
        p["evaluate"].update(n_samples=10, batch_size=10, reference_steps=16, ddim_steps=[4, 16], eta_steps=[],
                             etas=[1.0], sigma_hat=False, peers=["ddim"], peer_steps=[4], grid_n=2, kid_subsets=2,
                             study_steps=[], n_headline=0, fd_resamples=20)
        p["redundancy"].update(n_images=4, bins=2, batch_size=4)
        p["ddim_study"].update(n_images=2, recon_steps=[2], consistency_steps=[2, 4], n_consistency=2,
                               interp_steps=2, interp_n=2, interp_pairs=1, batch_size=2)

    return tweak


def test_dvc_repro_of_an_imported_teacher_registers_everything_with_the_source_sha256(tmp_path):
    source, digest = _source(tmp_path / "ddpm-standin")
    repo = build_tiny_repo(tmp_path / "repo", tmp_path / "data", tweak=_import_profile(source, digest))
    r = run([sys.executable, "-m", "dvc", "repro", *TARGETS], repo, timeout=900)
    assert "imported diffusers-unet2d" in r.stdout + r.stderr
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == STAGES

    # the teacher: imported, T = 1000, its source in the card, the metrics and the grid
    teacher = models.load_card(repo / "models/teacher")
    assert teacher.family == "diffusers-unet2d" and teacher.schedule.T == 1000 and teacher.parameterization == "eps"
    assert teacher.lineage.source["sha256"] == digest and teacher.lineage.dataset == "cifar10"
    tm = storage.read_json(repo / "metrics/teacher.json")
    assert tm["imported"] and tm["source_sha256"] == digest and tm["T"] == 1000
    assert (repo / "samples/teacher.png").exists()

    # the students: the same family, halving on the 1000 grid, carrying the source
    s8, s4 = models.load_card(repo / "models/student-8"), models.load_card(repo / "models/student-4")
    assert (s8.family, s8.sample_steps, s4.sample_steps) == ("diffusers-unet2d", 8, 4)
    assert s8.lineage.parent.weights_sha256 == teacher.weights_sha256
    assert s4.lineage.parent.weights_sha256 == s8.weights_sha256
    assert s4.lineage.source["sha256"] == digest
    assert storage.read_json(repo / "metrics/student-8.json")["parent_steps"] == 16

    # OLSS and evaluation ran on it (peers included)
    sched = storage.read_json(repo / "schedulers/teacher/olss-4.json")
    assert sched["meta"]["source_sha256"] == digest
    rows = storage.read_json(repo / "metrics/evaluate.json")["rows"]
    for name in ("teacher ddim 4", "teacher ddim 16", "student-4 ddim 4", "student-8 ddim 8", "teacher olss-4",
                 "teacher olss-paper-4", "diffusers ddim 4"):
        assert name in rows and np.isfinite(rows[name]["fd"]), sorted(rows)

    # the registry: every version made from the source is found by its sha256, with lineage to it
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{repo / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    found = c.search_model_versions(f"tags.source_sha256 = '{digest}'")
    names = sorted({v.name for v in found})
    assert names == ["cifar10-olss-teacher-4step", "cifar10-student-4step", "cifar10-student-8step",
                     "cifar10-teacher"], names
    n_olss = len(variant_files(4))  # every OLSS variant and the headline olss-4
    assert sum(v.name == "cifar10-olss-teacher-4step" for v in found) == n_olss
    chain, cur = [], ("cifar10-student-4step", "1")
    while cur:  # parent_model / parent_version tags, as fewstep.tracking.lineage follows them
        tags = c.get_model_version(*cur).tags
        chain.append((cur[0], tags))
        cur = (tags["parent_model"], tags["parent_version"]) if "parent_version" in tags else None
    assert [n for n, _ in chain] == ["cifar10-student-4step", "cifar10-student-8step", "cifar10-teacher"]
    assert all(t["source_sha256"] == digest for _, t in chain) and chain[-1][1]["family"] == "diffusers-unet2d"
    assert (repo / "registry/promotions.json").exists()

    # the registered pyfunc sampler of a diffusers-family student (loaded in a fresh process, from the
    # registry, with the fewstep code it carries) draws the stage's own samples
    import json
    import os
    import subprocess

    from fewstep.images import to_uint8
    from fewstep.math.ddim import generate
    from fewstep.math.schedules import timesteps
    from tests.mlflow_helpers import LOAD_SAMPLER

    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}
    r = subprocess.run([sys.executable, "-c", LOAD_SAMPLER, json.dumps({"s4": "models:/cifar10-student-4step/1"}),
                        str(tmp_path / "out.npz")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    student = models.load_denoiser(repo / "models/student-4")
    want = to_uint8(generate(student, range(5, 8), student.card.image_shape, timesteps(1000, 4)))
    np.testing.assert_array_equal(np.load(tmp_path / "out.npz")["s4"], want)
    reqs = [f.read_text() for f in (repo / "mlartifacts").rglob("requirements.txt")]
    assert len(reqs) == 3 + n_olss + 1  # 3 models, the OLSS files, the evaluator
    assert sum("diffusers==" in r for r in reqs) == 3 + n_olss  # served elsewhere, every sampler needs diffusers
