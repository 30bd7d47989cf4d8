"""Real `dvc repro` of the pipeline on a tiny profile inside a temp git repo."""

import json
import sys

import pytest
import yaml

from fewstep import models, storage
from tests.helpers import write_params
from tests.integration.conftest import build_tiny_repo, run

# what the test reproduces: every stage but redundancy and objective_report (neither feeds another
# stage nor an assertion here; both run, to COMPLETED, in the whole micro pipeline of
# test_prefect_deploy.py, and redundancy's outputs are checked in test_patch_study.py)
TARGETS = ("promote", "ddim_study@teacher")


def _run(cmd, cwd, timeout=600):
    r = run(cmd, cwd, timeout=timeout)
    return r.stdout + r.stderr


def _status(repo) -> dict:
    """`dvc status --json` of TARGETS and their upstream: each stage a repro would run, with why."""
    return json.loads(run([sys.executable, "-m", "dvc", "status", "--json", "--with-deps", *TARGETS], repo).stdout)


def _would_run(repo, *targets: str, force_downstream: bool = False) -> set[str]:
    """The stages `dvc repro --dry [--force-downstream] targets` would run (none is run)."""
    out = _run([sys.executable, "-m", "dvc", "repro", "--dry", *(["--force-downstream"] if force_downstream else []),
                *targets], repo)
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


def _tiny_eval(p: dict) -> None:
    """The shared tiny profile plus a small evaluation, registration and promotion."""
    p["teacher"]["sample"]["steps"] = 16  # the registered teacher samples with 16 DDIM steps (a row of evaluate)
    p["evaluator"] = {"widths": [8, 16], "blocks_per_stage": 1, "steps": 40, "batch_size": 16, "lr": 2e-3,
                      "weight_decay": 0.0, "ref_subset": 48}
    p["evaluate"] = {"n_samples": 40, "batch_size": 20, "seed": 0, "reference_steps": 16, "ddim_steps": [1, 16],
                     "eta_steps": [4], "etas": [1.0], "sigma_hat": True, "peers": ["dpmpp_2m"],
                     "peer_steps": [2], "grid_n": 4, "kid_subsets": 3, "fd_resamples": 20}
    p["ddim_study"].update(n_images=4, recon_steps=[2, 64], consistency_steps=[2, 64], n_consistency=2,
                           interp_steps=2, interp_n=3, interp_pairs=1, batch_size=4)


@pytest.fixture
def repo(tmp_path):
    return build_tiny_repo(tmp_path / "repo", tmp_path / "data", tweak=_tiny_eval)


def test_dvc_repro_runs_the_stages_and_caches(repo):
    _run([sys.executable, "-m", "dvc", "repro", *TARGETS], repo)
    m = storage.read_json(repo / "data/prepared/manifest.json")
    assert m["splits"]["train"]["count"] == 48
    assert models.load_card(repo / "models/teacher").lineage.data_hash == m["content_hash"]
    assert (repo / "samples/teacher.png").exists() and (repo / "plots/teacher_loss.csv").exists()
    assert "metrics/teacher.json" in _run([sys.executable, "-m", "dvc", "metrics", "show"], repo)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"prepare_data", "train_teacher", "distill@student-2", "distill@student-1",
                                   "collect_trajectories@teacher", "fit_olss@teacher-2", "fit_olss@teacher-3",
                                   "train_evaluator", "evaluate", "register", "promote", "ddim_study@teacher"}
    study = storage.read_json(repo / "metrics/ddim_study.json")
    assert study["split"] == "test" and set(study["reconstruction"]) == {"2", "64"}
    assert (repo / "samples/ddim_interpolation.png").exists() and (repo / "plots/ddim_consistency.csv").exists()
    decisions = storage.read_json(repo / "registry/promotions.json")["decisions"]
    promos = {d["name"]: d for d in decisions}
    assert promos["cifar10-teacher"]["decision"] == "promoted"  # first champion
    olss = [d for d in decisions if d["name"] == "cifar10-olss-teacher-2step"]
    assert len(olss) == 6 and all(d["candidate_fd"] is not None for d in olss)  # every variant and olss-N scored
    best = min(olss, key=lambda d: d["candidate_fd"])
    assert olss[-1]["champion"] == best["candidate"] or best["candidate_fd"] > 0.98 * min(
        d["candidate_fd"] for d in olss if d["candidate"] == olss[-1]["champion"])
    assert "cifar10-olss-teacher-2step" in promos and "cifar10-student-1step" in promos
    rows = storage.read_json(repo / "metrics/evaluate.json")["rows"]
    for name in ("teacher ddim 1", "teacher ddim 16", "teacher olss-2", "teacher olss-p-3", "teacher olss-paper-2",
                 "teacher olss-closed-3", "student-1 ddim 1",
                 "student-2 ddim 2", "teacher ddim 4 eta=1", "teacher ddpm 4 sigma-hat", "diffusers dpmpp_2m 2"):
        assert name in rows, sorted(rows)
    # a clearly better sampler ranks above a clearly worse one
    assert rows["teacher ddim 16"]["rmse"] < rows["teacher ddim 1"]["rmse"]
    assert rows["teacher ddim 16"]["fd"] < rows["teacher ddim 1"]["fd"]
    # the reference_steps DDIM row is the reference itself: reused, not sampled twice
    assert rows["teacher ddim 16"].get("is_reference") and rows["teacher ddim 16"]["rmse"] == 0.0
    assert not rows["teacher ddim 1"].get("is_reference")
    assert (repo / "reports/evaluation.md").exists() and (repo / "reports/pareto.png").exists()
    assert (repo / "reports/grids/teacher-ddim-16.png").exists()
    from fewstep.math.olss import OLSSScheduler

    sched = OLSSScheduler.from_json((repo / "schedulers/teacher/olss-3.json").read_text())
    assert sched.steps <= 3
    assert sched.meta["model_weights_sha256"] == models.load_card(repo / "models/teacher").weights_sha256
    m = storage.read_json(repo / "metrics/olss/teacher-2.json")
    assert set(m["rmse_vs_full_step"]) == {"ddim", "olss", "olss_paper", "olss_p", "olss_open", "olss_closed",
                                           "olss_ridge"}
    assert m["rmse_vs_full_step"]["olss"] == min(v["holdout_rmse"] for v in m["variants"].values())
    assert rows["teacher olss-paper-2"]["note"] == "paper" and rows["teacher olss-2"]["note"].startswith(
        f"= {m['chosen']}-2")
    s1 = models.load_card(repo / "models/student-1")
    assert s1.lineage.parent.weights_sha256 == models.load_card(repo / "models/student-2").weights_sha256
    assert storage.read_json(repo / "metrics/student-1.json")["student_steps"] == 1

    # the embedded default: every stage a FINISHED run in <repo>/mlflow.db, no server
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("fewstep").experiment_id])
    stages_run = {r.data.tags["fewstep.stage"]: r for r in runs}
    assert set(lock["stages"]) <= set(stages_run) and all(r.info.status == "FINISHED" for r in runs)
    assert len(stages_run["distill@student-1"].data.tags["git_commit"]) == 40
    assert stages_run["evaluate"].data.metrics["teacher ddim 16/fd"] == rows["teacher ddim 16"]["fd"]

    # a second repro would run only the always-checked registry stages (asked of `dvc status`, which
    # decides as repro does; that register and promote are idempotent on their own second run is
    # tests/integration/test_registry_processes.py::test_register_cli_is_idempotent and
    # tests/unit/test_decision.py::test_no_champion_promotes_and_the_champion_itself_is_unchanged)
    assert _status(repo) == {"register": ["always changed"], "promote": ["always changed"]}

    # changing round 2 re-runs round 2 only (`dvc repro --dry`: DVC's own decision, nothing run):
    # the stages asked for are the ones that must not run and round 2 (the evaluation below it
    # re-runs too; the first repro covers it, so it is not asked for)
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["distill"]["rounds"]["student-1"]["lr"] = 1e-4
    write_params(repo / "params.yaml", p)
    ran = _would_run(repo, "distill@student-1", "distill@student-2", "fit_olss@teacher-2")
    assert ran == {"distill@student-1"}, ran

    # a teacher param change re-runs the teacher and the rounds below it, not the data (asked for the
    # first round below it and the data; --force-downstream: a dry run cannot see the teacher's new
    # weights, so what its change reaches is what DVC's graph puts below it)
    p["teacher"]["lr"] = 1e-3
    write_params(repo / "params.yaml", p)
    ran = _would_run(repo, "distill@student-2", "prepare_data", force_downstream=True)
    assert ran == {"train_teacher", "distill@student-2"}, ran
    assert _status(repo).keys() == {"train_teacher", "distill@student-1", "register", "promote"}  # nothing ran
