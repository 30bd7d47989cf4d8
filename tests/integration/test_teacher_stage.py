"""The teacher stage as a real process: outputs, SIGKILL mid-run then resume to the uninterrupted
result, and changed params discarding the checkpoint (moved from tests/unit: it trains in
subprocesses). Every process runs in the test's temp dir, so its default MLflow store is there too."""

import signal
import subprocess
import sys
import time

import torch

from fewstep import models, storage
from tests.helpers import subprocess_env, tiny_params, write_params, write_prepared


def _stage(tmp_path, *extra):
    cmd = [sys.executable, "-m", "stages.train_teacher", "--params", str(tmp_path / "params.yaml"),
           "--data", str(tmp_path / "data"), "--model", str(tmp_path / "model"),
           "--checkpoints", str(tmp_path / "ckpt"), "--metrics", str(tmp_path / "metrics.json"),
           "--loss-csv", str(tmp_path / "loss.csv"), "--grid", str(tmp_path / "grid.png"), "--no-progress", *extra]
    return cmd


def _run(d, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(_stage(d), cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=600)


def _setup(tmp_path, **teacher):
    write_prepared(tmp_path / "data")
    write_params(tmp_path / "params.yaml", tiny_params(**teacher))


def test_teacher_stage_writes_model_metrics_plot_and_grid(tmp_path):
    _setup(tmp_path)
    r = _run(tmp_path, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    card = models.load_card(tmp_path / "model")
    assert card.parameterization == "v" and card.lineage.data_hash and card.weights_sha256
    assert card.weights_sha256 == storage.sha256_file(tmp_path / "model" / "model.safetensors")
    lines = (tmp_path / "loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss" and len(lines) == 1 + 6
    losses = [float(l.split(",")[1]) for l in lines[1:]]
    assert losses[-1] < losses[0]  # it learns
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert storage.read_json(tmp_path / "metrics.json")["steps"] == 60


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL a real training process after a checkpoint, resume, compare with a clean run (160
    steps: checkpoints at 20, 40, 60 and 80 are each a moment to kill it in; it resumes over half)."""
    steps = 160
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        _setup(tmp_path / d, steps=steps, checkpoint_every=20, log_every=20)
    r = _run(tmp_path / "a", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]

    proc = subprocess.Popen(_stage(tmp_path / "b"), cwd=tmp_path, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ptr = tmp_path / "b" / "ckpt" / "latest.json"
    deadline = time.monotonic() + 300
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        if ptr.exists():
            step = storage.read_json(ptr)["step"]
            if 20 <= step < steps - 60:
                proc.send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.01)
    proc.wait(30)
    assert killed_at is not None, "training finished before it could be killed; raise steps"
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "b" / "model").exists()

    r = _run(tmp_path / "b", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout + r.stderr
    wa = storage.load_tensors(tmp_path / "a" / "model" / "model.safetensors")
    wb = storage.load_tensors(tmp_path / "b" / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)
    la = (tmp_path / "a" / "loss.csv").read_text()
    assert la == (tmp_path / "b" / "loss.csv").read_text()


def test_changed_params_discard_the_old_checkpoint(tmp_path):
    _setup(tmp_path, steps=20, checkpoint_every=10)
    assert _run(tmp_path, tmp_path).returncode == 0
    write_params(tmp_path / "params.yaml", tiny_params(steps=20, checkpoint_every=10, lr=1e-3))
    r = _run(tmp_path, tmp_path)
    assert r.returncode == 0 and "starting fresh" in r.stdout + r.stderr
