"""Session-wide setup and the fixtures shared by unit and integration tests.

Hermetic by check, not by hope: ``_hermetic`` snapshots the repository's own stores (``mlflow.db``,
``models/``, ``mlartifacts/``, ...) before the session and fails it if any of them changed, and fails
it if a process the session started is still alive at the end (every process started from this
session inherits ``FEWSTEP_TEST_SESSION``; the check finds them even when re-parented).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import torch

from tests.helpers import ROOT
from tests.hermetic import SESSION_MARK, describe, session_processes, snapshot, snapshot_diff
from tests.mlflow_helpers import build_tree, configure_env, one_thread, store_env, use_env

os.environ[SESSION_MARK] = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session", autouse=True)
def _hermetic() -> Iterator[None]:
    before = snapshot(ROOT)
    yield
    changed = snapshot_diff(before, snapshot(ROOT))
    mark = os.environ[SESSION_MARK]
    deadline = time.monotonic() + 10  # a process in its own teardown gets a moment to exit
    while (left := session_processes(mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    names = [describe(p) for p in left]
    for proc in left:  # never leave them behind, even when failing
        try:
            proc.kill()
        except psutil.Error:
            pass
    problems = []
    if changed:
        problems.append(f"the suite wrote into the repository's stores: {changed[:10]}")
    if names:
        problems.append(f"the suite left {len(names)} process(es) running: {names}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture
def torch_one_thread() -> Iterator[None]:
    """Tiny nets: on a busy 2-core box a second torch thread only contends."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A tiny teacher trained once per session (8x8 toy squares, ~20 s on 2 cores)."""
    from fewstep.config import validate
    from fewstep.train.teacher import train_teacher
    from tests.helpers import tiny_params, write_prepared

    d = tmp_path_factory.mktemp("tiny_teacher")
    torch.manual_seed(0)
    write_prepared(d / "data", n=128)
    p = validate(tiny_params(steps=300, lr=3e-3, checkpoint_every=300, log_every=50))
    train_teacher(p, d / "data", d / "teacher", d / "ck", torch.device("cpu"), progress=False)
    return d


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    """An MLflow SQLite DB with the migrations run, made once: copying it costs milliseconds,
    migrating a fresh one seconds (mlops.md 4a)."""
    from mlflow.tracking import MlflowClient

    d = tmp_path_factory.mktemp("mlflow_template")
    MlflowClient(tracking_uri=f"sqlite:///{d / 'mlflow.db'}").search_experiments()  # runs the migrations
    return d / "mlflow.db"


@pytest.fixture
def store(tmp_path, migrated_db, monkeypatch):
    """A fresh MLflow store in tmp_path (copied from ``migrated_db``): returned configured, and
    set in the env for the entry-point processes a test starts."""
    pytest.importorskip("fewstep.tracking")
    shutil.copy(migrated_db, tmp_path / "mlflow.db")
    use_env(monkeypatch, store_env(tmp_path))
    return configure_env(store_env(tmp_path))


@pytest.fixture(scope="session")
def tree(tiny_teacher, tmp_path_factory) -> Path:
    """models/{teacher, student-4}, trajectories/*, schedulers/*/olss-2.json and a dvc.lock naming the
    student's stage and the student's trajectories (the student is the teacher, slightly perturbed:
    lineage and sampling are what is tested here, not distillation)."""
    d = tmp_path_factory.mktemp("tree")
    with one_thread():
        build_tree(tiny_teacher, d)
    return d


@pytest.fixture(scope="session")
def registry(tree, migrated_db, tmp_path_factory):
    """One registry with everything in ``tree`` registered (shared by the tests that only read it)."""
    d = tmp_path_factory.mktemp("registry")
    shutil.copy(migrated_db, d / "mlflow.db")
    env = {**store_env(d), "FEWSTEP_GIT_COMMIT": "c0ffee" * 6 + "c0ff"}
    with one_thread():
        regs = pytest.importorskip("fewstep.tracking").register_all(tree / "models", tree / "schedulers", repo=tree,
                                     git_commit=env["FEWSTEP_GIT_COMMIT"], tracking=configure_env(env))
    return env, {r.name: r for r in regs}
