"""benchmarks/make_run.py's read-back: install = until the first stage started, stages from their
MLflow runs (the newest finished one per stage), the rest between the stages."""

from __future__ import annotations

import shutil

import pytest

from benchmarks import make_run


def test_collect_splits_the_wall_time_into_install_stages_and_between(tmp_path, migrated_db):
    from mlflow.tracking import MlflowClient

    shutil.copy(migrated_db, tmp_path / "mlflow.db")
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.create_experiment("fewstep")
    t0 = 1_000_000.0

    def run(stage: str, start: float, end: float, status: str = "FINISHED") -> None:
        r = c.create_run(exp, start_time=int(start * 1000), tags={"fewstep.stage": stage})
        c.set_terminated(r.info.run_id, status=status, end_time=int(end * 1000))

    run("prepare_data", t0 + 200, t0 + 214)
    run("train_teacher", t0 + 220, t0 + 460, status="FAILED")  # a failed try, then the one that ended
    run("train_teacher", t0 + 470, t0 + 700)
    run("evaluate", t0 + 710, t0 + 800)
    out = make_run.collect(tmp_path, t0, t0 + 820)
    assert out["total_s"] == pytest.approx(820) and out["install_s"] == pytest.approx(200)
    assert out["stages"] == pytest.approx({"prepare_data": 14, "train_teacher": 230, "evaluate": 90})
    assert list(out["stages"]) == ["prepare_data", "train_teacher", "evaluate"]  # in the order they ran
    assert out["between_stages_s"] == pytest.approx(820 - 200 - 334)


def test_collect_refuses_a_clone_without_stage_runs(tmp_path, migrated_db):
    shutil.copy(migrated_db, tmp_path / "mlflow.db")
    with pytest.raises(SystemExit, match="no finished stage runs"):
        make_run.collect(tmp_path, 0.0, 1.0)
