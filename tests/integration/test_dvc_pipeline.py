"""Real `dvc repro` of the pipeline on a tiny profile inside a temp git repo."""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fewstep import models, storage
from tests.helpers import ROOT, tiny_images, tiny_params, write_params

COPY = ["dvc.yaml", "stages", "src", "profiles", "pyproject.toml"]


def _env():
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(DVC_NO_ANALYTICS="1", CI="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    env.pop("FEWSTEP_PROFILE", None)
    return env


def _run(cmd, cwd, timeout=600):
    r = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def _image_tar(path: Path, n: int) -> Path:
    imgs, labels = tiny_images(n, 8)
    with tarfile.open(path, "w:gz") as tar:
        for i, (im, lab) in enumerate(zip(imgs, labels)):
            f = path.parent / "tmp.png"
            Image.fromarray(im).save(f)
            tar.add(f, arcname=f"train/{['red', 'blue'][lab]}/{i:04d}.png")
    return path


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(src, repo / name)
    p = tiny_params(steps=30, checkpoint_every=10)
    p["prepare"].update(train_source=str(_image_tar(tmp_path / "train.tar.gz", 48)),
                        test_source=str(_image_tar(tmp_path / "test.tar.gz", 16)), classes=None,
                        max_per_class=None, test_max_per_class=None)
    write_params(repo / "params.yaml", p)
    _run(["git", "init", "-q", "-b", "main"], repo)
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    _run([sys.executable, "-m", "dvc", "config", "core.check_update", "false"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "init"], repo)
    return repo


def test_dvc_repro_runs_the_stages_and_caches(repo):
    _run([sys.executable, "-m", "dvc", "repro"], repo)
    m = storage.read_json(repo / "data/prepared/manifest.json")
    assert m["splits"]["train"]["count"] == 48
    cfg = models.load_config(repo / "models/teacher")
    assert cfg["data_hash"] == m["content_hash"]
    assert (repo / "samples/teacher.png").exists() and (repo / "plots/teacher_loss.csv").exists()
    assert "metrics/teacher.json" in _run([sys.executable, "-m", "dvc", "metrics", "show"], repo)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"prepare_data", "train_teacher"}

    out = _run([sys.executable, "-m", "dvc", "repro"], repo)
    assert "didn't change, skipping" in out and "Running stage" not in out

    # a teacher param change re-runs the teacher only
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["teacher"]["lr"] = 1e-3
    write_params(repo / "params.yaml", p)
    out = _run([sys.executable, "-m", "dvc", "repro"], repo)
    assert "Running stage 'train_teacher'" in out and "Running stage 'prepare_data'" not in out
