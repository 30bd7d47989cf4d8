"""Every stage is an MLflow run (stages/_common.run_stage): what a stage records, the status of a failed
stage, nesting under the pipeline run, and what happens when the store is unreachable or mlflow is
not installed. Real MLflow on SQLite in a temp dir; the unreachable server is a closed port."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from fewstep.data import DataError
from infra.local.services import free_port
from stages import _common
from tests.helpers import subprocess_env, tiny_params, write_params
from tests.mlflow_helpers import store_env, use_env

tracking = pytest.importorskip("fewstep.tracking")
pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """A test that forgets its store gets an empty one of its own; defaults under <cwd> land in tmp_path."""
    use_env(monkeypatch, store_env(tmp_path / "unconfigured"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def args(tmp_path) -> list[str]:
    write_params(tmp_path / "params.yaml", tiny_params())
    return ["--params", str(tmp_path / "params.yaml"), "--no-progress"]


def _runs(t, stage: str | None = None):
    flt = f"tags.`fewstep.stage` = '{stage}'" if stage else ""
    return t.client.search_runs([t.experiment_id], filter_string=flt)


def test_a_stage_becomes_one_run_with_params_metrics_history_and_artifacts(store, args, tmp_path, monkeypatch):
    parent = tracking.record_stage("pipeline")
    monkeypatch.setenv("FEWSTEP_PARENT_RUN_ID", parent)
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"\x89PNG fake")
    t0 = int(time.time() * 1000)
    seen = []

    def body(ctx: _common.StageContext) -> None:
        rec = ctx.record
        rec.log_metrics({"final_loss": 0.25, "rmse": {"olss": 0.1, "ddim": float("nan")}, "device": "cpu",
                         "ok": True})
        rec.log_history("loss", [(0, 1.0), (25, 0.5), (50, 0.25)])
        rec.log_artifact(grid, "samples")
        rec.set_tags(weights_sha256="abc")
        seen.append(ctx.params)

    _common.run_stage("train_teacher", args, None, body)
    (p,) = seen
    (run,) = _runs(store, "train_teacher")
    assert run.info.status == "FINISHED" and t0 <= run.info.start_time <= run.info.end_time
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["weights_sha256"] == "abc"
    assert run.data.params["teacher.lr"] == str(p.teacher.lr) and run.data.params["args.no_progress"] == "true"
    m = run.data.metrics
    assert m["final_loss"] == 0.25 and m["rmse/olss"] == 0.1 and "rmse/ddim" not in m and "device" not in m
    assert "ok" not in m and m["stage_seconds"] >= 0
    hist = store.client.get_metric_history(run.info.run_id, "loss")
    assert [(h.step, h.value) for h in sorted(hist, key=lambda h: h.step)] == [(0, 1.0), (25, 0.5), (50, 0.25)]
    assert [a.path for a in store.client.list_artifacts(run.info.run_id, "samples")] == ["samples/grid.png"]


def test_a_failed_stage_is_a_failed_run_and_exits_2(store, args, capsys):
    def body(ctx: _common.StageContext) -> None:
        ctx.record.log_metrics({"images": 3})
        raise DataError("12 of 40 images are corrupt")

    with pytest.raises(SystemExit) as e:
        _common.run_stage("prepare_data", args, None, body)
    assert e.value.code == 2
    (run,) = _runs(store, "prepare_data")
    assert run.info.status == "FAILED" and run.data.tags["fewstep.error"] == "12 of 40 images are corrupt"
    assert run.data.metrics["images"] == 3
    assert "prepare_data: error: 12 of 40 images are corrupt" in capsys.readouterr().err

    with pytest.raises(ZeroDivisionError):  # an unexpected error keeps its traceback, and is recorded
        _common.run_stage("evaluate", args, None, lambda ctx: 1 / 0)
    (run,) = _runs(store, "evaluate")
    assert run.info.status == "FAILED" and run.data.tags["fewstep.error"].startswith("ZeroDivisionError")


def test_off_records_nothing_and_a_bad_mode_is_a_clear_error(store, args, monkeypatch, capsys):
    monkeypatch.setenv("FEWSTEP_TRACKING", "off")
    _common.run_stage("train_teacher", args, None, lambda ctx: ctx.record.log_metrics({"x": 1}))
    assert _runs(store) == []
    monkeypatch.setenv("FEWSTEP_TRACKING", "sometimes")

    def body(ctx: _common.StageContext) -> None:
        raise AssertionError("the body must not run")

    with pytest.raises(SystemExit) as e:
        _common.run_stage("train_teacher", args, None, body)
    assert e.value.code == 2 and "FEWSTEP_TRACKING='sometimes'" in capsys.readouterr().err


def test_unreachable_store_keeps_the_result_unless_tracking_is_required(args, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    done = []
    t0 = time.monotonic()

    def body(ctx: _common.StageContext) -> None:
        ctx.record.log_metrics({"fit_seconds": 1.0})
        done.append(1)

    _common.run_stage("fit_olss@teacher-4", args, None, body)
    err = capsys.readouterr().err
    assert done and "warning: could not record the MLflow run at http://127.0.0.1" in err
    assert "fit_olss@teacher-4: done in" in err and time.monotonic() - t0 < 60
    monkeypatch.setenv("FEWSTEP_TRACKING", "required")
    with pytest.raises(SystemExit) as e:
        _common.run_stage("fit_olss@teacher-4", args, None, lambda ctx: None)
    assert e.value.code == 2 and "error: could not record the MLflow run" in capsys.readouterr().err


@pytest.mark.parametrize("mode,rc", [("auto", 0), ("required", 2)])
def test_without_mlflow_installed_stages_still_run(tmp_path, args, mode, rc):
    """The GPU box has no mlflow: simulated by making `import mlflow` fail in a fresh interpreter."""
    code = ("import sys; sys.modules['mlflow'] = None\n"
            "from stages import _common\n"
            f"_common.run_stage('train_teacher', {args!r}, None, lambda ctx: ctx.record.log_metrics({{'x': 1.0}}))\n"
            "assert 'mlflow' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    env = subprocess_env(**store_env(tmp_path), FEWSTEP_TRACKING=mode)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == rc, r.stderr[-2000:]
    if rc == 0:
        assert "tracking skipped (mlflow not installed)" in r.stderr and "done in" in r.stderr
    else:
        assert "FEWSTEP_TRACKING=required but mlflow cannot be imported" in r.stderr
    assert not (tmp_path / "mlflow.db").exists()
