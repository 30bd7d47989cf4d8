"""Shared integration fixtures: a tiny-profile DVC repo in a temp git repo, and the service env.

``build_tiny_repo`` builds the repo every pipeline test uses: the project's dvc.yaml, stages, src and profiles, tiny params, tiny image
tarballs, then ``git init`` + ``dvc init`` + a first commit. Server fixtures live in servers.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable, Iterable

import pytest
from PIL import Image

from tests.helpers import ROOT, tiny_images, tiny_params, write_params
from tests.integration.servers import mlflow_server, moto_server, prefect_server, service_env, state_dir  # noqa: F401

COPY = ("dvc.yaml", "stages", "src", "profiles", "pyproject.toml")
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def repo_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for dvc/git/stage subprocesses: the venv first on PATH, no analytics."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(DVC_NO_ANALYTICS="1", CI="1", DO_NOT_TRACK="1", **GIT_ENV)
    env.pop("FEWSTEP_PROFILE", None)
    return env


def run(cmd: list[str], cwd: Path, timeout: float = 600, env: dict[str, str] | None = None, check: bool = True):
    r = subprocess.run(cmd, cwd=cwd, env=env or repo_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{cmd}: rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def image_tar(path: Path, n: int, seed: int = 0) -> Path:
    """A .tar.gz ImageFolder of ``n`` 8x8 PNGs in two classes (red, blue)."""
    imgs, labels = tiny_images(n, 8, seed)
    tmp = path.parent / f".{path.name}.png"
    with tarfile.open(path, "w:gz") as tar:
        for i, (im, lab) in enumerate(zip(imgs, labels)):
            Image.fromarray(im).save(tmp)
            tar.add(tmp, arcname=f"train/{['red', 'blue'][lab]}/{i:04d}.png")
    tmp.unlink()
    return path


def tiny_pipeline_params(train_source: str, test_source: str | None) -> dict:
    """The tiny profile of test_dvc_pipeline.py: every stage runs in seconds on a CPU."""
    p = tiny_params(steps=30, checkpoint_every=10)
    p["distill"] = {"defaults": {"train_steps": 10, "batch_size": 8, "checkpoint_every": 5, "log_every": 5,
                                 "sample": {"n": 4, "steps": 0, "spacing": "trailing", "seed": 0}},
                    "rounds": {"student-2": {"parent": "teacher", "steps": 2},
                               "student-1": {"parent": "student-2", "steps": 1}}}
    p["trajectories"] = {"models": ["teacher"], "reference_steps": 8, "n_fit": 8, "seed_offset": 1000,
                         "shard_size": 4, "batch_size": 4}
    p["olss"] = {"models": ["teacher"], "steps": [2, 3], "max_elements": 2000, "bisection_iters": 10, "n_holdout": 4,
                 "ridge": 0.0, "ridge_variant": 1e-4, "closed_loop": True}
    p["prepare"].update(train_source=train_source, test_source=test_source, classes=None, max_per_class=None,
                        test_max_per_class=None)
    p["study"]["patch_sizes"] = []  # the patch study and split models are off here (test_patch_study.py runs them)
    p["split"]["models"] = {}
    p["objective"]["variants"] = []
    p["redundancy"].update(scope=["teachers"], n_images=16, bins=4, batch_size=16)  # on (off in the CPU default)
    p["ddim_study"]["models"] = ["teacher"]
    # one torch thread per stage: 8x8 nets gain little from a second one, and on 2 cores shared with
    # anything else (the servers, another job) two OpenMP threads wait on each other (a tiny conv
    # measured 1.7 ms on one thread, 62 ms on two, under a load of 6)
    p["base"]["threads"] = 1
    return p


TINY_STAGES = ["prepare_data", "train_teacher", "distill@student-2", "distill@student-1",
               "collect_trajectories@teacher", "fit_olss@teacher-2", "fit_olss@teacher-3"]


def build_tiny_repo(repo: Path, data_dir: Path, extra: Iterable[str] = (),
                    tweak: Callable[[dict], None] | None = None) -> Path:
    """Copy the project (plus ``extra`` top-level paths) into ``repo`` and commit the tiny profile
    (``tweak(params)`` may edit it in place first)."""
    repo.mkdir(parents=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in (*COPY, *extra):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(src, repo / name)
    keep = repo / "metrics/objective/.gitkeep"  # objective_report's input dir exists even with the study off
    keep.parent.mkdir(parents=True, exist_ok=True)
    keep.touch()
    params = tiny_pipeline_params(str(image_tar(data_dir / "train.tar.gz", 48)),
                                  str(image_tar(data_dir / "test.tar.gz", 16, seed=1)))
    if tweak is not None:
        tweak(params)
    write_params(repo / "params.yaml", params)
    run(["git", "init", "-q", "-b", "main"], repo)
    run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    run([sys.executable, "-m", "dvc", "config", "core.check_update", "false"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "init"], repo)
    return repo


def micro(p: dict) -> None:
    """A tweak for build_tiny_repo: the smallest pipeline with every stage kind (5 stages,
    about 25 s of `dvc repro` on 2 idle cores): teacher, one distillation round, trajectories,
    one OLSS fit."""
    p["teacher"].update(steps=10, checkpoint_every=10, log_every=5)
    p["teacher"]["sample"].update(n=2, steps=2)
    p["distill"]["defaults"].update(train_steps=4, checkpoint_every=4, log_every=2)
    p["distill"]["defaults"]["sample"]["n"] = 2
    p["distill"]["rounds"] = {"student-1": {"parent": "teacher", "steps": 1}}
    p["trajectories"].update(reference_steps=4, n_fit=4, shard_size=4, batch_size=4)
    p["olss"].update(steps=[2], max_elements=1000, bisection_iters=5, n_holdout=2)
    if "evaluator" in p:  # sections added as the pipeline grows: shrunk when present
        p["evaluator"].update(widths=[8], blocks_per_stage=1, steps=5, batch_size=8, ref_subset=16)
    if "evaluate" in p:
        p["evaluate"].update(n_samples=10, batch_size=10, reference_steps=4, ddim_steps=[2], eta_steps=[2],
                             etas=[1.0], sigma_hat=False, peers=[], peer_steps=[2], grid_n=4, kid_subsets=2,
                             n_headline=0, fd_resamples=20)
    if "ddim_study" in p:
        p["ddim_study"].update(n_images=2, recon_steps=[2], consistency_steps=[2, 4], n_consistency=2,
                               interp_steps=2, interp_n=2, interp_pairs=1, batch_size=2)


MICRO_STAGES = ["prepare_data", "train_teacher", "distill@student-1", "collect_trajectories@teacher",
                "fit_olss@teacher-2"]


@pytest.fixture(scope="session", autouse=True)
def _integration_env(service_env):  # noqa: F811
    """Every integration test runs with the env of servers.service_env (fake AWS keys, no
    telemetry, quiet Prefect, a fresh PREFECT_HOME)."""
    return service_env


@pytest.fixture
def make_tiny_repo(tmp_path) -> Callable[..., Path]:
    """Factory: ``make_tiny_repo(extra=("flows", "prefect.yaml"), tweak=micro, name="repo")``."""

    def make(extra: Iterable[str] = (), tweak: Callable[[dict], None] | None = None, name: str = "repo") -> Path:
        return build_tiny_repo(tmp_path / name, tmp_path / f"{name}-data", extra, tweak)

    return make
