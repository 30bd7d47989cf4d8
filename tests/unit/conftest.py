"""Unit tests never reach a store outside their temp dirs: every test starts with MLflow and the
artifact root pointed at a session temp store, whatever the user's shell exports (a test that needs
its own store sets it over this one), and with no inherited pipeline run or profile."""

from __future__ import annotations

from pathlib import Path

import pytest

INHERITED = ("FEWSTEP_PARENT_RUN_ID", "FEWSTEP_GIT_COMMIT", "FEWSTEP_PROFILE", "FEWSTEP_WORLD_SIZE",
             "FEWSTEP_NNODES", "FEWSTEP_TRACKING", "FEWSTEP_RUN_ID", "FEWSTEP_RDZV_ENDPOINT", "FEWSTEP_TRAIN_SOURCE", "FEWSTEP_TEST_SOURCE",
             "FEWSTEP_S3_ENDPOINT_URL")


@pytest.fixture(scope="session")
def session_store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("session_store")


@pytest.fixture(autouse=True)
def _temp_stores(session_store, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{session_store / 'mlflow.db'}")
    monkeypatch.setenv("FEWSTEP_ARTIFACT_ROOT", (session_store / "mlartifacts").as_uri())
    monkeypatch.setenv("FEWSTEP_EXPERIMENT", "fewstep-unit")
    for k in INHERITED:
        monkeypatch.delenv(k, raising=False)
