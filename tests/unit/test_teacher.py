"""Teacher training as a library: resume by code fingerprint, NaN handling, params validation.
The stage run in a process (SIGKILL and resume) is in tests/integration/test_teacher_stage.py."""

import pytest
import torch

from fewstep import storage
from fewstep.config import ParamsError, load_params, validate
from fewstep.train import checkpoint
from fewstep.train.loop import LoopConfig, TrainingDivergedError, train
from tests.helpers import tiny_params


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


def test_code_fingerprint_covers_the_whole_package_and_the_stage_runner(tmp_path, monkeypatch):
    """The checkpoint fingerprint hashes what DVC lists as every stage's code deps (src/fewstep,
    stages/_common.py, the stage module): a change to a package file outside math/nets/train
    (models.py, config.py, ...) must stop a resume. Measured on a temp copy of the package."""
    import shutil
    from pathlib import Path

    import stages._common  # noqa: F401  (loaded, as in every stage process)
    from fewstep.train import loop

    copy = tmp_path / "fewstep"
    shutil.copytree(Path(loop.__file__).resolve().parents[1], copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(loop, "__file__", str(copy / "train" / "loop.py"))
    files = set(loop.code_files())
    assert set(copy.rglob("*.py")) <= files
    assert Path(stages._common.__file__).resolve() in files
    before = loop.code_fingerprint()
    for rel in ("models.py", "config.py", "storage.py", "images.py", "math/ddim.py"):
        f = copy / rel
        original = f.read_bytes()
        f.write_bytes(original.replace(b"import ", b"import  ", 1))  # one code byte
        assert loop.code_fingerprint() != before, rel
        f.write_bytes(original)
    assert loop.code_fingerprint() == before
