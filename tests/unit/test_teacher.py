import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fewstep import models, storage
from fewstep.config import ParamsError, load_params, validate
from fewstep.train import checkpoint
from fewstep.train.loop import LoopConfig, TrainingDivergedError, train
from tests.helpers import ROOT, tiny_params, write_params, write_prepared


def _stage(tmp_path, *extra):
    cmd = [sys.executable, "-m", "stages.train_teacher", "--params", str(tmp_path / "params.yaml"),
           "--data", str(tmp_path / "data"), "--model", str(tmp_path / "model"),
           "--checkpoints", str(tmp_path / "ckpt"), "--metrics", str(tmp_path / "metrics.json"),
           "--loss-csv", str(tmp_path / "loss.csv"), "--grid", str(tmp_path / "grid.png"), "--no-progress", *extra]
    return cmd


def _setup(tmp_path, **teacher):
    write_prepared(tmp_path / "data")
    write_params(tmp_path / "params.yaml", tiny_params(**teacher))


def test_teacher_stage_writes_model_metrics_plot_and_grid(tmp_path):
    _setup(tmp_path)
    r = subprocess.run(_stage(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=300)
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
    """SIGKILL a real training process after a checkpoint, resume, compare with a clean run."""
    steps = 400
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        _setup(tmp_path / d, steps=steps, checkpoint_every=20, log_every=20)
    r = subprocess.run(_stage(tmp_path / "a"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]

    proc = subprocess.Popen(_stage(tmp_path / "b"), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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

    r = subprocess.run(_stage(tmp_path / "b"), cwd=ROOT, capture_output=True, text=True, timeout=600)
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
    assert subprocess.run(_stage(tmp_path), cwd=ROOT, capture_output=True, timeout=300).returncode == 0
    write_params(tmp_path / "params.yaml", tiny_params(steps=20, checkpoint_every=10, lr=1e-3))
    r = subprocess.run(_stage(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "starting fresh" in r.stdout + r.stderr


def test_a_checkpoint_of_other_training_code_is_not_resumed(tmp_path, monkeypatch):
    """DVC re-runs a training stage when its code changes; resuming the old code's finished
    checkpoint would return the old weights. (The code change is simulated by the fingerprint.)"""
    from fewstep.train import loop

    net = torch.nn.Linear(4, 1)
    x = torch.randn(16, 4)
    cfg = LoopConfig(steps=10, lr=1e-2, checkpoint_every=5, log_every=5)
    lines = []
    train(net, lambda m, g: m(x).pow(2).mean(), cfg, tmp_path, "run", torch.device("cpu"), progress=False)
    r = train(net, lambda m, g: m(x).pow(2).mean(), cfg, tmp_path, "run", torch.device("cpu"), progress=False,
              log=lines.append)
    assert r.resumed_from == 10 and r.steps_run == 0  # same code: the finished run is resumed
    monkeypatch.setattr(loop, "code_fingerprint", lambda: "0" * 64)
    r = train(net, lambda m, g: m(x).pow(2).mean(), cfg, tmp_path, "run", torch.device("cpu"), progress=False,
              log=lines.append)
    assert r.resumed_from == 0 and r.steps_run == 10
    assert "training code changed" in lines[-1]


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    net = torch.nn.Linear(4, 1)
    x = torch.randn(32, 4)

    calls = []

    def loss_fn(model, gen):
        calls.append(1)
        loss = model(x).pow(2).mean()
        # the fault: the loss turns NaN at update 25 (bad data or numerics)
        return loss * float("nan") if len(calls) == 25 else loss

    cfg = LoopConfig(steps=40, lr=1e-2, checkpoint_every=10, log_every=5, ema_decay=0.9)
    with pytest.raises(TrainingDivergedError, match=r"last good checkpoint is .*step-00000020"):
        train(net, loss_fn, cfg, tmp_path, "run", torch.device("cpu"), progress=False)
    d, meta = checkpoint.latest(tmp_path)
    assert meta["step"] == 20
    state = storage.load_tensors(d / "state.safetensors")
    assert all(torch.isfinite(v).all() for v in state.values())


def test_params_are_validated_with_clear_messages(tmp_path):
    p = tiny_params()
    p["teacher"]["lr"] = -1
    p["teacher"]["bogus"] = 3
    p["teacher"]["net"]["patch_size"] = 3
    p["schedule"]["kind"] = "quartic"
    with pytest.raises(ParamsError) as e:
        validate(p, "params.yaml")
    msg = str(e.value)
    for needle in ("teacher.lr", "teacher.bogus: unknown key", "teacher.net.patch_size", "schedule.kind"):
        assert needle in msg, msg
    (tmp_path / "bad.yaml").write_text("teacher: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")
    p = tiny_params(parameterization="eps", weighting="snr_trunc")
    with pytest.raises(ParamsError, match="diverges"):
        validate(p)
    p = tiny_params()
    p["teacher"]["net"]["channel_mult"] = [1, 2, 2, 2, 2]
    with pytest.raises(ParamsError, match="halved"):
        validate(p).teacher.net.unet_config(8)


def test_a_profile_merges_over_params_and_can_turn_a_section_off(tmp_path):
    from fewstep.config import deep_merge

    base = {"split": {"models": {"teacher-split": {"boundary_snr": 0.25}}}, "teacher": {"steps": 5, "lr": 0.1}}
    merged = deep_merge(base, {"split": {"models": {}}, "teacher": {"steps": 7}})
    assert merged == {"split": {"models": {}}, "teacher": {"steps": 7, "lr": 0.1}}
    assert base["teacher"]["steps"] == 5  # inputs untouched


def test_repo_params_and_gpu_profile_validate(root):
    cpu = load_params(root / "params.yaml")
    cpu.teacher.net.unet_config(cpu.base.image_size)
    gpu = load_params(root / "params.yaml", profile="gpu")
    assert gpu.base.image_size == 32 and gpu.prepare.classes is None
    gpu.teacher.net.unet_config(gpu.base.image_size)
    full = load_params(root / "params.yaml", profile="gpu-full")
    assert full.base.image_size == 32 and full.study.patch_sizes == [1, 2, 4, 8]
