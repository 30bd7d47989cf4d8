"""Stage runs: one MLflow run per stage execution, tagged with its provenance.

Each run carries ``fewstep.stage``, the git commit, the sha256 of the stage's dvc.lock entry and,
when a parent run id is given, ``mlflow.parentRunId`` (stage runs nest under the pipeline's run).
"""

from __future__ import annotations

import contextlib
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException

from fewstep import provenance
from fewstep.tracking.decision import finite
from fewstep.tracking.store import Tracking, configure

MAX_PARAMS_PER_BATCH, MAX_METRICS_PER_BATCH = 100, 1000
MAX_PARAM_LEN = provenance.MAX_PARAM_LEN


@dataclass
class StageRun:
    """An open MLflow run: params, metrics (with step history), artifacts, tags."""

    tracking: Tracking
    run_id: str

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, v) for k, v in provenance.flatten_params(params).items()]
        for lo in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.tracking.client.log_batch(self.run_id, params=items[lo : lo + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float | Sequence[tuple[int, float]]], step: int = 0) -> None:
        """A value is a number (logged at ``step``) or a history: a list of (step, value)."""
        now = int(time.time() * 1000)
        items: list[Metric] = []
        for key, v in metrics.items():
            hist = v if isinstance(v, (list, tuple)) else [(step, v)]  # numpy / torch scalars too
            items += [Metric(key, float(val), now, int(s)) for s, val in hist]
        for lo in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.tracking.client.log_batch(self.run_id, metrics=items[lo : lo + MAX_METRICS_PER_BATCH])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.tracking.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.tracking.client.log_artifact(self.run_id, str(p), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        for lo in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.tracking.client.log_batch(self.run_id, tags=items[lo : lo + MAX_PARAMS_PER_BATCH])


def run_tags(t: Tracking, stage: str, *, repo: str | Path = ".", dvc_lock: str | Path | None = None,
             parent_run_id: str | None = None, git_commit: str | None = None,
             tags: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """fewstep.stage, the git commit (``git_commit``, else ``git rev-parse HEAD`` in ``repo``), the
    sha256 of the stage's dvc.lock entry and the parent run (when it exists in the store)."""
    all_tags: dict[str, Any] = {"fewstep.stage": stage}
    commit = git_commit or provenance.git_commit(repo)
    if commit:
        all_tags.update({"git_commit": commit, "mlflow.source.git.commit": commit})
    lock_hash = provenance.dvc_lock_hash(stage, Path(dvc_lock) if dvc_lock else Path(repo) / "dvc.lock")
    if lock_hash:
        all_tags["dvc_lock_sha256"] = lock_hash
    if parent_run_id:
        try:
            t.client.get_run(parent_run_id)
            all_tags["mlflow.parentRunId"] = parent_run_id
        except MlflowException:
            warnings.warn(f"parent run {parent_run_id} not found in {t.uri}; {stage} is not nested", stacklevel=4)
    all_tags.update({k: v for k, v in (tags or {}).items() if v is not None})
    return all_tags


@contextlib.contextmanager
def stage_run(
    stage: str,
    *,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    git_commit: str | None = None,
    run_name: str | None = None,
    repo: str | Path = ".",
    dvc_lock: str | Path | None = None,
    tracking: Tracking | None = None,
) -> Iterator[StageRun]:
    """One MLflow run per stage execution, tagged with the git commit, the sha256 of the stage's
    dvc.lock entry (as it stands when the run starts), and nested under ``parent_run_id``.
    Ends FINISHED, FAILED on an exception, KILLED on Ctrl-C."""
    t = tracking or configure()
    all_tags = run_tags(t, stage, repo=repo, dvc_lock=dvc_lock, parent_run_id=parent_run_id, git_commit=git_commit,
                        tags=tags)
    run = t.client.create_run(t.experiment_id, run_name=run_name or stage,
                              tags={k: str(v) for k, v in all_tags.items()})
    sr = StageRun(t, run.info.run_id)
    try:
        if params:
            sr.log_params(params)
        yield sr
    except KeyboardInterrupt:
        t.client.set_terminated(sr.run_id, RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        t.client.set_terminated(sr.run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    t.client.set_terminated(sr.run_id, RunStatus.to_string(RunStatus.FINISHED))


def pipeline_run(name: str = "pipeline", **kw: Any) -> contextlib.AbstractContextManager[StageRun]:
    """The parent run of a pipeline (a :func:`stage_run` named ``pipeline``). The caller passes its
    run id to the stage processes it starts (the flows set $FEWSTEP_PARENT_RUN_ID in their env)."""
    return stage_run(name, **kw)


_METRIC_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-./ ]")


def metric_key(name: str) -> str:
    """A row name such as ``teacher ddim 4 eta=1`` as a valid MLflow metric key."""
    return _METRIC_KEY_BAD.sub("_", name)[:250]


def record_stage(
    stage: str,
    *,
    status: str = "FINISHED",
    start_ms: int | None = None,
    end_ms: int | None = None,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    histories: Mapping[str, Sequence[tuple[int, float]]] | None = None,
    artifacts: Sequence[tuple[str | Path, str | None]] = (),
    tags: Mapping[str, Any] | None = None,
    error: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    artifact_root: str | None = None,
    parent_run_id: str | None = None,
    git_commit: str | None = None,
    repo: str | Path = ".",
    tracking: Tracking | None = None,
) -> str:
    """Record a finished stage execution as one MLflow run, after the fact: its real start and end
    times, status (FINISHED / FAILED / KILLED), params, metrics, metric histories (step, value),
    artifacts (sample grids, reports) and the lineage tags of :func:`stage_run`. The stage runner
    calls it at the end, so a stage's work never waits on, or is lost to, the tracking store.
    ``tracking_uri`` / ``experiment`` / ``artifact_root`` go to :func:`configure` (unless ``tracking``
    is given); None means the defaults. Returns the run id."""
    t = tracking or configure(tracking_uri, experiment, artifact_root)
    all_tags = run_tags(t, stage, repo=repo, parent_run_id=parent_run_id, git_commit=git_commit, tags=tags)
    if error:
        all_tags["fewstep.error"] = error[:MAX_PARAM_LEN]
    run = t.client.create_run(t.experiment_id, start_time=start_ms, run_name=stage,
                              tags={k: str(v) for k, v in all_tags.items()})
    sr = StageRun(t, run.info.run_id)
    try:
        if params:
            sr.log_params(params)
        clean = {metric_key(k): float(v) for k, v in (metrics or {}).items() if finite(v)}
        hist = {metric_key(k): [(int(s), float(v)) for s, v in h if finite(v)] for k, h in (histories or {}).items()}
        sr.log_metrics({**clean, **{k: h for k, h in hist.items() if h}})
        for path, artifact_path in artifacts:
            if Path(path).exists():
                sr.log_artifact(path, artifact_path)
    except BaseException:
        t.client.set_terminated(sr.run_id, RunStatus.to_string(RunStatus.FAILED), end_time=end_ms)
        raise
    t.client.set_terminated(sr.run_id, status, end_time=end_ms)
    return sr.run_id
