"""Every ``FEWSTEP_*`` environment variable, read in one place.

Only entry points import this module: the stages (``stages/``), the flows (``flows/``), the
launcher (``python -m fewstep.launch``) and the local service scripts (``infra/local``). The library
takes plain arguments, so a notebook or a test calls it without touching the environment.
An S3-compatible endpoint (MinIO, moto) is botocore's own ``AWS_ENDPOINT_URL``: boto3, s3fs and
MLflow's artifact client honour it by themselves, so fewstep has no variable of its own for it.

    FEWSTEP_PROFILE          merge profiles/NAME.yaml over params.yaml (stages, launcher, flows)
    FEWSTEP_TRACKING         auto | required | off: how a stage records its MLflow run
    FEWSTEP_EXPERIMENT       MLflow experiment name (default "fewstep")
    FEWSTEP_ARTIFACT_ROOT    the experiment's artifact location when it is created (e.g. s3://b/mlflow)
    FEWSTEP_PARENT_RUN_ID    stage runs nest under this (pipeline) run
    FEWSTEP_GIT_COMMIT       overrides `git rev-parse HEAD` (images without .git)
    FEWSTEP_TRAIN_SOURCE     overrides prepare.train_source
    FEWSTEP_TEST_SOURCE      overrides prepare.test_source
    FEWSTEP_WORLD_SIZE       processes for training/sampling stages (0 = one per GPU)
    FEWSTEP_NNODES           nodes of a multi-node run
    FEWSTEP_RDZV_ENDPOINT    host:port of node 0 for a multi-node rendezvous
    FEWSTEP_RUN_ID           rendezvous id of a multi-node run
    FEWSTEP_ROOT             the checkout a flow runs the pipeline in
    FEWSTEP_SERVICES_DIR     state folder of the local services (infra/local)
    FEWSTEP_PGID_FILE        tests/CI: file that collects the process groups of started servers
"""

from __future__ import annotations

from fewstep.errors import UserError

import os
from dataclasses import dataclass, fields
from typing import Mapping

TRACKING_MODES = ("auto", "required", "off")


class SettingsError(UserError, ValueError):
    """An environment variable holds a value that cannot be used."""


@dataclass(frozen=True)
class Settings:
    profile: str | None = None
    tracking: str = "auto"
    experiment: str | None = None
    artifact_root: str | None = None
    parent_run_id: str | None = None
    git_commit: str | None = None
    train_source: str | None = None
    test_source: str | None = None
    world_size: int | None = None
    nnodes: int | None = None
    rdzv_endpoint: str | None = None
    run_id: str | None = None
    root: str | None = None
    services_dir: str | None = None
    pgid_file: str | None = None

    @staticmethod
    def env_name(field_name: str) -> str:
        return "FEWSTEP_" + field_name.upper()


def _int(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"${name} must be an integer, got {raw!r}") from None


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """The settings in ``env`` (default ``os.environ``); empty strings count as unset."""
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    for f in fields(Settings):
        name = Settings.env_name(f.name)
        raw = (env.get(name) or "").strip()
        if not raw:
            continue
        values[f.name] = _int(name, raw) if f.name in ("world_size", "nnodes") else raw
    mode = str(values.get("tracking", "auto")).lower()
    if mode not in TRACKING_MODES:
        raise SettingsError(f"$FEWSTEP_TRACKING={mode!r}: expected one of {', '.join(TRACKING_MODES)}")
    values["tracking"] = mode
    return Settings(**values)  # type: ignore[arg-type]


def current() -> Settings:
    """The settings of this process, read from the environment now (cheap; not cached, so a test
    or a flow that changes the environment sees the change)."""
    return from_env()
