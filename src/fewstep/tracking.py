"""MLflow for fewstep: stage runs, the model registry, lineage tags and champion promotion.

The only module that imports mlflow (besides the pyfunc class in sampler_pyfunc.py, which MLflow
itself loads). Configuration comes from the environment:

    MLFLOW_TRACKING_URI     default sqlite:///<cwd>/mlflow.db (never a file store: mlops.md 4a)
    FEWSTEP_EXPERIMENT      default "fewstep"
    FEWSTEP_ARTIFACT_ROOT   the experiment's artifact_location, fixed at creation (e.g.
                            s3://bucket/mlflow); default file://<cwd>/mlartifacts, or the server's
                            proxied store when the tracking URI is an http(s) server
    FEWSTEP_PARENT_RUN_ID   stage runs nest under this (pipeline) run
    FEWSTEP_GIT_COMMIT      overrides `git rev-parse HEAD` (images without .git)

Registered names: ``<dataset>-teacher``, ``<dataset>-student-<k>step`` and
``<dataset>-olss-<model>-<n>step``; a student or OLSS name is a budget (one step count), so the OLSS
variants of a model and step count (closed-loop, open-loop, OLSS-P) are versions of one name and
compete for its champion alias. Every version carries lineage tags (data_hash, weights_sha256,
params_hash, git_commit, role, sample_steps, nfe, parent_model + parent_version) and is found again
by its weights / scheduler hash, so registering is idempotent. The ``champion`` alias moves only on
a complete evaluation that beats the champion's FD, measured in the same evaluation, by a relative
margin (:func:`promote`).
"""

from __future__ import annotations

from fewstep.errors import UserError

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import mlflow
import yaml
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

# fewstep.models / fewstep.storage import torch: they are imported where needed, so that promote()
# in a flow process costs only the mlflow import.

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_EXPERIMENT = "FEWSTEP_EXPERIMENT"
ENV_ARTIFACT_ROOT = "FEWSTEP_ARTIFACT_ROOT"
ENV_PARENT_RUN = "FEWSTEP_PARENT_RUN_ID"
ENV_GIT_COMMIT = "FEWSTEP_GIT_COMMIT"
DEFAULT_EXPERIMENT = "fewstep"
CHAMPION = "champion"
SAMPLER_ARTIFACT = "sampler"

MAX_PARAMS_PER_BATCH, MAX_METRICS_PER_BATCH, MAX_PARAM_LEN = 100, 1000, 6000


class LineageError(UserError, RuntimeError):
    """A model or scheduler cannot be registered with complete lineage (unregistered parent,
    weights that do not match their config, a scheduler fitted on another model version)."""


# --------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class Tracking:
    uri: str
    experiment: str
    experiment_id: str
    artifact_location: str
    client: MlflowClient = field(repr=False, compare=False)


def default_tracking_uri(cwd: str | Path | None = None) -> str:
    return os.environ.get(ENV_TRACKING_URI) or f"sqlite:///{Path(cwd or os.getcwd()).resolve() / 'mlflow.db'}"


def default_artifact_root(tracking_uri: str | None = None, cwd: str | Path | None = None) -> str | None:
    """FEWSTEP_ARTIFACT_ROOT, else file://<cwd>/mlartifacts; None for an http(s) tracking server
    (its --artifacts-destination then holds the artifacts and the client needs no store keys)."""
    root = os.environ.get(ENV_ARTIFACT_ROOT)
    if root:
        return root.rstrip("/")
    if (tracking_uri or "").startswith(("http://", "https://")):
        return None
    return (Path(cwd or os.getcwd()).resolve() / "mlartifacts").as_uri()


_CONFIGURED: dict[tuple[str, str, str | None], Tracking] = {}


def configure(
    tracking_uri: str | None = None, experiment: str | None = None, artifact_root: str | None = None
) -> Tracking:
    """Point MLflow at the tracking store and make sure the experiment exists with an explicit
    artifact location. Cheap to call again: the result is cached per (uri, experiment, root)."""
    uri = tracking_uri or default_tracking_uri()
    name = experiment or os.environ.get(ENV_EXPERIMENT) or DEFAULT_EXPERIMENT
    root = artifact_root or default_artifact_root(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    key = (uri, name, root)
    if key in _CONFIGURED:
        return _CONFIGURED[key]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    with _store_lock(uri):
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                client.create_experiment(name, artifact_location=root)
            except MlflowException as e:  # created by a process racing us (server store)
                if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
                    raise
            exp = client.get_experiment_by_name(name)
        elif exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
    if root and exp.artifact_location.rstrip("/") != root:
        warnings.warn(f"experiment {name!r} stores artifacts at {exp.artifact_location} (fixed when it was created), "
                      f"not at {root}; use another FEWSTEP_EXPERIMENT to change it", stacklevel=2)
    t = Tracking(uri, name, exp.experiment_id, exp.artifact_location, client)
    _CONFIGURED[key] = t
    return t


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    p = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(p) if p and p != ":memory:" else None


_LOCKS: dict[Path, tuple[threading.RLock, list[int]]] = {}
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def _store_lock(uri: str, timeout: float = 120.0) -> Iterator[bool]:
    """An exclusive lock beside a local SQLite store (flock on ``<db>.fewstep.lock``), so read-decide-
    write sequences of processes sharing the file do not interleave; re-entrant within a process.
    Yields whether it is locked; other stores get the optimistic checks in :func:`promote` only."""
    path = _sqlite_path(uri)
    if path is None:
        yield False
        return
    path = path.resolve()
    with _LOCKS_GUARD:
        rlock, depth = _LOCKS.setdefault(path, (threading.RLock(), [0]))
    with rlock:
        if depth[0]:
            depth[0] += 1
            try:
                yield True
            finally:
                depth[0] -= 1
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(path.name + ".fewstep.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"registry lock beside {path} held for more than {timeout:.0f}s") from None
                    time.sleep(0.05)
            depth[0] = 1
            try:
                yield True
            finally:
                depth[0] = 0
        finally:
            os.close(fd)  # closing the descriptor releases the flock


def registry_lock(tracking: Tracking | None = None, timeout: float = 120.0) -> contextlib.AbstractContextManager[bool]:
    """The lock :func:`promote` and registration hold (a no-op for server stores)."""
    return _store_lock((tracking or configure()).uri, timeout)


# --------------------------------------------------------------------------------------------
# provenance: git and dvc.lock


def git_commit(repo: str | Path = ".") -> str | None:
    if os.environ.get(ENV_GIT_COMMIT):
        return os.environ[ENV_GIT_COMMIT]
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = r.stdout.strip()
    return out if r.returncode == 0 and out else None


def _read_lock(lock: str | Path) -> dict[str, Any]:
    from fewstep import storage

    if not Path(lock).exists():
        return {}
    with storage.open_read(lock) as f:
        return (yaml.safe_load(f.read()) or {}).get("stages", {}) or {}


def dvc_lock_entry(stage: str, lock: str | Path = "dvc.lock") -> dict[str, Any] | None:
    return _read_lock(lock).get(stage)


def dvc_lock_hash(stage: str, lock: str | Path = "dvc.lock") -> str | None:
    """sha256 of the stage's dvc.lock entry as canonical YAML (sorted keys); None if absent."""
    entry = dvc_lock_entry(stage, lock)
    return None if entry is None else _entry_hash(entry)


def _entry_hash(entry: Any) -> str:
    from fewstep import storage

    return storage.sha256_bytes(yaml.safe_dump(entry, sort_keys=True).encode())


def dvc_producer(out: str | Path, lock: str | Path = "dvc.lock") -> dict[str, str] | None:
    """{dvc_stage, dvc_lock_sha256, dvc_out_md5} of the stage whose outs include ``out``."""
    lock = Path(lock)
    if not lock.exists():
        return None
    rel = os.path.relpath(Path(out).resolve(), lock.resolve().parent)
    for stage, entry in _read_lock(lock).items():
        for o in entry.get("outs", []) or []:
            if os.path.normpath(str(o.get("path", ""))) == os.path.normpath(rel):
                return {"dvc_stage": stage, "dvc_lock_sha256": _entry_hash(entry), "dvc_out_md5": str(o.get("md5", ""))}
    return None


# --------------------------------------------------------------------------------------------
# stage runs


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1, "c": [1, 2]}} -> {"a.b": "1", "a.c": "[1, 2]"}; pydantic models are dumped."""
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if hasattr(v, "model_dump"):
            v = v.model_dump()
        if isinstance(v, Mapping):
            out.update(flatten_params(v, key + "."))
        else:
            s = v if isinstance(v, str) else json.dumps(v, default=str)
            out[key] = s[:MAX_PARAM_LEN]
    return out


@dataclass
class StageRun:
    """An open MLflow run: params, metrics (with step history), artifacts, tags."""

    tracking: Tracking
    run_id: str

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, v) for k, v in flatten_params(params).items()]
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


def _run_tags(t: Tracking, stage: str, repo: str | Path, dvc_lock: str | Path | None, parent_run_id: str | None,
              tags: Mapping[str, Any] | None) -> dict[str, Any]:
    """fewstep.stage, the git commit, the sha256 of the stage's dvc.lock entry and the parent run."""
    all_tags: dict[str, Any] = {"fewstep.stage": stage}
    commit = git_commit(repo)
    if commit:
        all_tags.update({"git_commit": commit, "mlflow.source.git.commit": commit})
    lock_hash = dvc_lock_hash(stage, Path(dvc_lock) if dvc_lock else Path(repo) / "dvc.lock")
    if lock_hash:
        all_tags["dvc_lock_sha256"] = lock_hash
    parent = parent_run_id or os.environ.get(ENV_PARENT_RUN) or None
    if parent:
        try:
            t.client.get_run(parent)
            all_tags["mlflow.parentRunId"] = parent
        except MlflowException:
            warnings.warn(f"parent run {parent} not found in {t.uri}; {stage} is not nested", stacklevel=4)
    all_tags.update({k: v for k, v in (tags or {}).items() if v is not None})
    return all_tags


@contextlib.contextmanager
def stage_run(
    stage: str,
    *,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    repo: str | Path = ".",
    dvc_lock: str | Path | None = None,
    tracking: Tracking | None = None,
) -> Iterator[StageRun]:
    """One MLflow run per stage execution, tagged with the git commit, the sha256 of the stage's
    dvc.lock entry (as it stands when the run starts), and nested under ``parent_run_id`` or
    $FEWSTEP_PARENT_RUN_ID. Ends FINISHED, FAILED on an exception, KILLED on Ctrl-C."""
    t = tracking or configure()
    all_tags = _run_tags(t, stage, repo, dvc_lock, parent_run_id, tags)
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
    repo: str | Path = ".",
    tracking: Tracking | None = None,
) -> str:
    """Record a finished stage execution as one MLflow run, after the fact: its real start and end
    times, status (FINISHED / FAILED / KILLED), params, metrics, metric histories (step, value),
    artifacts (sample grids, reports) and the lineage tags of :func:`stage_run`. Used by every
    stage (stages/_common.py) so that a stage's work never waits on, or is lost to, the tracking
    store. Returns the run id."""
    t = tracking or configure()
    all_tags = _run_tags(t, stage, repo, None, None, tags)
    if error:
        all_tags["fewstep.error"] = error[:MAX_PARAM_LEN]
    run = t.client.create_run(t.experiment_id, start_time=start_ms, run_name=stage,
                              tags={k: str(v) for k, v in all_tags.items()})
    sr = StageRun(t, run.info.run_id)
    try:
        if params:
            sr.log_params(params)
        clean = {metric_key(k): float(v) for k, v in (metrics or {}).items() if _finite(v)}
        hist = {metric_key(k): [(int(s), float(v)) for s, v in h if _finite(v)] for k, h in (histories or {}).items()}
        sr.log_metrics({**clean, **{k: h for k, h in hist.items() if h}})
        for path, artifact_path in artifacts:
            if Path(path).exists():
                sr.log_artifact(path, artifact_path)
    except BaseException:
        t.client.set_terminated(sr.run_id, RunStatus.to_string(RunStatus.FAILED), end_time=end_ms)
        raise
    t.client.set_terminated(sr.run_id, status, end_time=end_ms)
    return sr.run_id


@contextlib.contextmanager
def pipeline_run(name: str = "pipeline", **kw: Any) -> Iterator[StageRun]:
    """A parent run; while it is open $FEWSTEP_PARENT_RUN_ID names it, so stage processes started
    inside (dvc repro, Prefect tasks) nest under it."""
    with stage_run(name, **kw) as run:
        old = os.environ.get(ENV_PARENT_RUN)
        os.environ[ENV_PARENT_RUN] = run.run_id
        try:
            yield run
        finally:
            if old is None:
                os.environ.pop(ENV_PARENT_RUN, None)
            else:
                os.environ[ENV_PARENT_RUN] = old


# --------------------------------------------------------------------------------------------
# registry: names, lookup, the pyfunc artifact


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    created: bool  # False: an existing version with the same hash was found
    tags: dict[str, str]


def model_registry_name(cfg: Mapping[str, Any]) -> str:
    """``<dataset>-teacher`` (``<dataset>-teacher-<variant>`` for a patch-study teacher or a split
    model) or ``<dataset>-student-<k>step`` for a model config."""
    if cfg["role"] == "teacher":
        return f"{cfg['dataset']}-teacher" + (f"-{cfg['variant']}" if cfg.get("variant") else "")
    if cfg["role"] == "student":
        return f"{cfg['dataset']}-student-{int(cfg['sample_steps'])}step"
    raise ValueError(f"unknown model role {cfg['role']!r}")


def scheduler_registry_name(dataset: str, model: str, steps: int) -> str:
    return f"{dataset}-olss-{model}-{int(steps)}step"


def _quote(v: str) -> str:
    if "'" in v:
        raise ValueError(f"quote in a registry filter value: {v!r}")
    return f"'{v}'"


def find_version(name: str, tags: Mapping[str, str], tracking: Tracking | None = None):
    """The oldest version of ``name`` whose tags include ``tags`` (ModelVersion), or None."""
    t = tracking or configure()
    filt = " and ".join([f"name = {_quote(name)}"] + [f"tags.`{k}` = {_quote(str(v))}" for k, v in tags.items()])
    found = list(t.client.search_model_versions(filt))
    return min(found, key=lambda mv: int(mv.version)) if found else None


def _pip_requirements() -> list[str]:
    """Explicit pins (requirement inference is slow and adds stray packages: mlops.md 4a)."""
    reqs = []
    for dist in ("mlflow", "torch", "numpy", "safetensors", "tqdm", "pillow"):
        try:
            reqs.append(f"{dist}=={importlib.metadata.version(dist).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def _log_sampler(
    t: Tracking,
    artifacts: dict[str, str],
    model_config: dict[str, Any],
    run_id: str | None,
    tags: dict[str, str],
    module: str = "fewstep.sampler_pyfunc",
) -> str:
    """Save the pyfunc sampler (models from code + fewstep as code_paths), upload it as a logged
    model; returns its model id. ``module``: the models-from-code file (the evaluator has its own)."""
    code_file = importlib.util.find_spec(module).origin
    pkg_dir = Path(code_file).parent
    with tempfile.TemporaryDirectory(prefix="fewstep-pyfunc-") as tmp:
        pkg_copy = Path(tmp) / "code" / "fewstep"
        shutil.copytree(pkg_dir, pkg_copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        local = Path(tmp) / SAMPLER_ARTIFACT
        mlflow.pyfunc.save_model(
            path=str(local),
            python_model=code_file,
            artifacts=artifacts,
            code_paths=[str(pkg_copy)],
            pip_requirements=_pip_requirements(),
            model_config=model_config,
        )
        lm = t.client.create_logged_model(t.experiment_id, name=SAMPLER_ARTIFACT, source_run_id=run_id,
                                          tags={k: v for k, v in tags.items() if not k.startswith("mlflow.")})
        try:
            t.client.log_model_artifacts(lm.model_id, str(local))
        except BaseException:
            t.client.finalize_logged_model(lm.model_id, "FAILED")
            raise
        t.client.finalize_logged_model(lm.model_id, "READY")
    return lm.model_id


def _create_version(t: Tracking, name: str, model_id: str, run_id: str | None, tags: dict[str, str],
                    kind: str = "sampler"):
    try:
        t.client.create_registered_model(name, tags={"fewstep": kind})
    except MlflowException as e:
        if "ALREADY_EXISTS" not in str(e.error_code):
            raise
    return t.client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, tags=tags,
                                         model_id=model_id)


def _clean(tags: Mapping[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in tags.items() if v is not None and v != ""}


def _resolve_parent(cfg: Mapping[str, Any], t: Tracking) -> tuple[str, str]:
    p = cfg["parent"]
    pname = model_registry_name({"dataset": cfg["dataset"], "role": p["role"], "sample_steps": p["sample_steps"],
                                 "variant": p.get("variant")})
    mv = find_version(pname, {"weights_sha256": p["weights_sha256"]}, t)
    if mv is None:
        raise LineageError(f"parent {p.get('path')} ({pname}, weights {p['weights_sha256'][:12]}) is not registered; "
                           f"register it first")
    return pname, str(mv.version)


# --------------------------------------------------------------------------------------------
# registration


def register_model_dir(
    model_dir: str | Path,
    *,
    default_steps: int | None = None,
    run_id: str | None = None,
    repo: str | Path = ".",
    dvc_lock: str | Path | None = None,
    tracking: Tracking | None = None,
) -> Registered:
    """Register a teacher or student model dir as a pyfunc sampler version (idempotent: an existing
    version with the same weights_sha256 is returned). A student's parent must be registered.
    ``default_steps``: the predict default when the request has no "steps" (default: the config's
    sample_steps)."""
    from fewstep import models, storage

    t = tracking or configure()
    model_dir = Path(model_dir)
    cfg = models.load_config(model_dir)
    weights = model_dir / models.WEIGHTS
    sha = storage.sha256_file(weights)
    if sha != cfg["weights_sha256"]:
        raise LineageError(f"{weights}: sha256 {sha[:12]} does not match config.json ({cfg['weights_sha256'][:12]})")
    name = model_registry_name(cfg)
    with _store_lock(t.uri):
        existing = find_version(name, {"weights_sha256": sha}, t)
        if existing is not None:
            return Registered(name, str(existing.version), False, dict(existing.tags))
        steps = int(default_steps or cfg["sample_steps"])
        tags = {
            "role": cfg["role"], "model": model_dir.name, "dataset": cfg["dataset"], "data_hash": cfg.get("data_hash"),
            "weights_sha256": sha, "params_hash": cfg.get("params_hash"), "run_hash": cfg.get("run_hash"),
            "parameterization": cfg.get("parameterization"), "image_size": cfg.get("image_size"),
            "sample_steps": cfg["sample_steps"], "nfe": steps, "git_commit": git_commit(repo),
            "source_dir": str(model_dir),
        }
        if cfg["role"] == "student":
            pname, pver = _resolve_parent(cfg, t)
            tags.update(parent_model=pname, parent_version=pver, parent_weights_sha256=cfg["parent"]["weights_sha256"])
        tags.update(dvc_producer(model_dir, Path(dvc_lock) if dvc_lock else Path(repo) / "dvc.lock") or {})
        tags = _clean(tags)
        artifacts = {"weights": str(weights), "config": str(model_dir / models.CONFIG)}
        model_id = _log_sampler(t, artifacts, {"default_steps": steps}, run_id, tags)
        mv = _create_version(t, name, model_id, run_id, tags)
    return Registered(name, str(mv.version), True, tags)


def register_evaluator(
    model_dir: str | Path,
    dataset: str,
    *,
    run_id: str | None = None,
    repo: str | Path = ".",
    dvc_lock: str | Path | None = None,
    tracking: Tracking | None = None,
) -> Registered:
    """Register the evaluator (the feature network of FD/KID) as ``<dataset>-evaluator``: a pyfunc
    from uint8 images to features (fewstep/evaluator_pyfunc.py), with its reference statistics,
    tagged with the data it was trained on and its test accuracy. Idempotent by weights_sha256."""
    from fewstep import models, storage

    t = tracking or configure()
    model_dir = Path(model_dir)
    cfg = models.load_config(model_dir)
    weights = model_dir / models.WEIGHTS
    sha = storage.sha256_file(weights)
    if sha != cfg["weights_sha256"]:
        raise LineageError(f"{weights}: sha256 {sha[:12]} does not match config.json ({cfg['weights_sha256'][:12]})")
    name = f"{dataset}-evaluator"
    with _store_lock(t.uri):
        existing = find_version(name, {"weights_sha256": sha}, t)
        if existing is not None:
            return Registered(name, str(existing.version), False, dict(existing.tags))
        tags = {"role": "evaluator", "model": model_dir.name, "dataset": dataset, "data_hash": cfg.get("data_hash"),
                "weights_sha256": sha, "test_accuracy": cfg.get("test_accuracy"),
                "feature_dim": cfg.get("feature_dim"), "git_commit": git_commit(repo), "source_dir": str(model_dir)}
        tags.update(dvc_producer(model_dir, Path(dvc_lock) if dvc_lock else Path(repo) / "dvc.lock") or {})
        tags = _clean(tags)
        artifacts = {"weights": str(weights), "config": str(model_dir / models.CONFIG)}
        if (model_dir / "ref_stats.safetensors").exists():
            artifacts["ref_stats"] = str(model_dir / "ref_stats.safetensors")
        model_id = _log_sampler(t, artifacts, {}, run_id, tags, module="fewstep.evaluator_pyfunc")
        mv = _create_version(t, name, model_id, run_id, tags, kind="evaluator")
    return Registered(name, str(mv.version), True, tags)


def _trajectories_hash(meta: Mapping[str, Any], repo: Path, lock: Path) -> str | None:
    """The scheduler's trajectories: a hash in its meta, else DVC's dir hash, else sha256 of the files."""
    from fewstep import storage

    for key in ("trajectories_sha256", "trajectories_hash"):
        if meta.get(key):
            return str(meta[key])
    tp = meta.get("trajectories")
    if not tp:
        return None
    path = Path(tp) if Path(tp).is_absolute() else repo / tp
    prod = dvc_producer(path, lock)
    if prod and prod["dvc_out_md5"]:
        return f"dvc-md5:{prod['dvc_out_md5']}"
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        return "sha256:" + storage.sha256_json({p.name: storage.sha256_file(p) for p in files})
    return None


def register_scheduler(
    scheduler_path: str | Path,
    model_dir: str | Path,
    *,
    run_id: str | None = None,
    repo: str | Path = ".",
    dvc_lock: str | Path | None = None,
    tracking: Tracking | None = None,
) -> Registered:
    """Register an OLSS scheduler JSON (with its model's weights) as ``<dataset>-olss-<model>-<n>step``.
    Idempotent by the scheduler file's sha256; the model's registered version must exist."""
    from fewstep import models, storage
    from fewstep.math.olss import OLSSScheduler


    t = tracking or configure()
    path, model_dir, repo = Path(scheduler_path), Path(model_dir), Path(repo)
    lock = Path(dvc_lock) if dvc_lock else repo / "dvc.lock"
    with storage.open_read(path) as f:
        sched = OLSSScheduler.from_json(f.read().decode())
    cfg = models.load_config(model_dir)
    meta = sched.meta or {}
    if meta.get("model_weights_sha256") not in (None, cfg["weights_sha256"]):
        raise LineageError(f"{path} was fitted on weights {meta['model_weights_sha256'][:12]}, but {model_dir} has "
                           f"{cfg['weights_sha256'][:12]}; re-run fit_olss")
    model = meta.get("model") or model_dir.name
    ssha = storage.sha256_file(path)
    name = scheduler_registry_name(cfg["dataset"], model, sched.steps)
    with _store_lock(t.uri):
        existing = find_version(name, {"scheduler_sha256": ssha, "weights_sha256": cfg["weights_sha256"]}, t)
        if existing is not None:
            return Registered(name, str(existing.version), False, dict(existing.tags))
        pname = model_registry_name(cfg)
        parent = find_version(pname, {"weights_sha256": cfg["weights_sha256"]}, t)
        if parent is None:
            raise LineageError(f"the model of {path} ({pname}, weights {cfg['weights_sha256'][:12]}) is not "
                               "registered; register it first")
        tags = {
            "role": "olss", "model": model, "dataset": cfg["dataset"], "data_hash": cfg.get("data_hash"),
            "weights_sha256": cfg["weights_sha256"], "params_hash": storage.sha256_json(meta),
            "scheduler_sha256": ssha, "scheduler_file": path.name, "olss_variant": meta.get("variant"),
            "sample_steps": sched.steps, "nfe": sched.steps, "timesteps": json.dumps(sched.timesteps),
            "reference_steps": meta.get("reference_steps"), "parent_model": pname,
            "parent_version": str(parent.version),
            "parent_weights_sha256": cfg["weights_sha256"], "trajectories_path": meta.get("trajectories"),
            "trajectories_hash": _trajectories_hash(meta, repo, lock), "git_commit": git_commit(repo),
            "source_dir": str(path),
        }
        tags.update(dvc_producer(path, lock) or {})
        tags = _clean(tags)
        artifacts = {"weights": str(model_dir / models.WEIGHTS), "config": str(model_dir / models.CONFIG),
                     "scheduler": str(path)}
        model_id = _log_sampler(t, artifacts, {"default_steps": sched.steps}, run_id, tags)
        mv = _create_version(t, name, model_id, run_id, tags)
    return Registered(name, str(mv.version), True, tags)


def register_all(
    models_root: str | Path = "models",
    schedulers_root: str | Path = "schedulers",
    *,
    default_steps: Mapping[str, int] | None = None,
    dataset: str | None = None,
    run_id: str | None = None,
    repo: str | Path = ".",
    dvc_lock: str | Path | None = None,
    tracking: Tracking | None = None,
) -> list[Registered]:
    """Every model dir (teachers first, then students from most to fewest steps, so a parent is
    registered before its student), the evaluator (``<dataset>-evaluator``; ``dataset`` defaults to
    the teachers') and every ``<schedulers_root>/<model>/olss-*.json``."""
    from fewstep import models

    t = tracking or configure()
    kw = dict(run_id=run_id, repo=repo, dvc_lock=dvc_lock, tracking=t)
    root = Path(models_root)
    dirs = [d for d in sorted(root.iterdir()) if not d.name.startswith(".") and (d / models.CONFIG).exists()] \
        if root.is_dir() else []
    dirs = [d for d in dirs if _read_role(d / models.CONFIG) in ("teacher", "student")]  # samplers only
    cfgs = {d: models.load_config(d) for d in dirs}
    dirs.sort(key=lambda d: (cfgs[d]["role"] != "teacher", -int(cfgs[d]["sample_steps"]), d.name))
    out = [register_model_dir(d, default_steps=(default_steps or {}).get(d.name), **kw) for d in dirs]
    evaluators = [d for d in sorted(root.iterdir()) if (d / models.CONFIG).exists()
                  and _read_role(d / models.CONFIG) == "evaluator"] if root.is_dir() else []
    for d in evaluators:
        ds = dataset or next((c["dataset"] for c in cfgs.values() if c.get("dataset")), None)
        if ds is None:
            raise LineageError(f"{d}: no dataset name for the evaluator (pass dataset=, or register a teacher)")
        out.append(register_evaluator(d, ds, **kw))
    sroot = Path(schedulers_root)
    for f in sorted(sroot.glob("*/olss-*.json")) if sroot.is_dir() else []:
        out.append(register_scheduler(f, root / f.parent.name, **kw))
    return out


def _read_role(config: Path) -> str | None:
    import json

    return json.loads(config.read_text()).get("role")


def lineage(name: str, version: str | int, tracking: Tracking | None = None) -> list[tuple[str, str, dict[str, str]]]:
    """[(name, version, tags), parent's, grandparent's, ...] following parent_model/parent_version."""
    t = tracking or configure()
    chain, seen = [], set()
    cur: tuple[str, str] | None = (name, str(version))
    while cur and cur not in seen:
        seen.add(cur)
        mv = t.client.get_model_version(*cur)
        chain.append((cur[0], cur[1], dict(mv.tags)))
        cur = (mv.tags["parent_model"], mv.tags["parent_version"]) if "parent_version" in mv.tags else None
    return chain


# --------------------------------------------------------------------------------------------
# promotion


@dataclass(frozen=True)
class Promotion:
    name: str
    candidate_version: str
    decision: str  # promoted | kept | rejected | held | unchanged
    reason: str
    evaluation_id: str
    candidate_fd: float | None
    champion_fd: float | None  # the FD the candidate was compared with
    previous_champion: str | None
    champion_version: str | None  # the alias holder when promote returned

    @property
    def promoted(self) -> bool:
        return self.decision == "promoted"


@dataclass(frozen=True)
class ChampionState:
    version: str
    fd: float | None
    evaluation_id: str | None


def _finite(x: Any) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _fmt(x: float | None) -> str:
    return "" if x is None else repr(float(x))


def decide(
    candidate_version: str,
    candidate_fd: float | None,
    evaluation_id: str,
    champion: ChampionState | None,
    margin: float,
    remeasured: Mapping[str, float],
    partial: bool = False,
) -> tuple[str, str, float | None]:
    """(decision, reason, champion FD used). Pure: no I/O. Lower FD is better; the candidate must
    beat the champion's FD from the same evaluation by the relative ``margin``."""
    if partial or not _finite(candidate_fd):
        why = "partial evaluation" if partial else f"candidate FD {candidate_fd!r} is missing or not finite"
        return "rejected", why, None
    if champion is None:
        return "promoted", "no champion yet", None
    if champion.version == candidate_version:
        return "unchanged", "candidate is already the champion", float(candidate_fd)
    if champion.version in remeasured:
        champ_fd = remeasured[champion.version]
        if not _finite(champ_fd):
            return "rejected", f"champion v{champion.version} re-measurement {champ_fd!r} is not finite", None
        source = "re-measured in this evaluation"
    elif champion.evaluation_id == evaluation_id and _finite(champion.fd):
        champ_fd, source = champion.fd, "recorded for this evaluation"
    else:
        return ("held", f"champion v{champion.version} was evaluated on {champion.evaluation_id!r}, not "
                f"{evaluation_id!r}; pass its FD re-measured in {evaluation_id!r} as remeasured={{'"
                f"{champion.version}': fd}}", None)
    champ_fd = float(champ_fd)
    bar = champ_fd * (1.0 - margin)
    better = float(candidate_fd) < bar
    why = (f"FD {candidate_fd:.6g} {'<' if better else '>='} {bar:.6g} "
           f"(champion {champ_fd:.6g} {source}, margin {margin})")
    return ("promoted" if better else "kept"), why, champ_fd


def _alias_version(t: Tracking, name: str, alias: str) -> str | None:
    v = t.client.get_registered_model(name).aliases.get(alias)
    return None if v is None else str(v)


def champion(name: str, alias: str = CHAMPION, tracking: Tracking | None = None):
    """The ModelVersion holding ``alias`` or None."""
    t = tracking or configure()
    v = _alias_version(t, name, alias)
    return None if v is None else t.client.get_model_version(name, v)


def _read_champion(t: Tracking, name: str, alias: str) -> ChampionState | None:
    v = _alias_version(t, name, alias)
    if v is None:
        return None
    tags = t.client.get_model_version(name, v).tags
    fd = float(tags["fd"]) if _finite(tags.get("fd")) else None
    return ChampionState(v, fd, tags.get("evaluation_id"))


def _set_version_tags(t: Tracking, name: str, version: str, tags: Mapping[str, Any]) -> None:
    for k, v in tags.items():
        t.client.set_model_version_tag(name, version, k, "" if v is None else str(v))


def _sync_champion_tags(t: Tracking, name: str, alias: str, rounds: int = 5) -> None:
    """Registered-model tags champion.version/fd/evaluation_id mirror the alias holder's tags."""
    for _ in range(rounds):
        champ = _read_champion(t, name, alias)
        if champ is None:
            return
        for k, v in (("version", champ.version), ("fd", _fmt(champ.fd)), ("evaluation_id", champ.evaluation_id)):
            t.client.set_registered_model_tag(name, f"{alias}.{k}", v or "")
        if _alias_version(t, name, alias) == champ.version:
            return


def promote(
    name: str,
    candidate_version: str | int,
    candidate_fd: float | None,
    evaluation_id: str,
    *,
    margin: float,
    remeasured: Mapping[str | int, float] | None = None,
    partial: bool = False,
    alias: str = CHAMPION,
    settle_s: float = 0.2,
    max_rounds: int = 10,
    tracking: Tracking | None = None,
) -> Promotion:
    """Move ``alias`` of registered model ``name`` to ``candidate_version`` if its FD beats the
    champion's by the relative ``margin``, both measured in evaluation ``evaluation_id``.

    The champion's FD comes from ``remeasured[champion_version]`` (the FD of the current champion
    re-measured in this evaluation; required when its recorded evaluation_id tag differs) or from its
    tags when they carry this evaluation id; otherwise the decision is "held" and nothing moves.
    A partial evaluation (``partial=True``) or a missing / non-finite FD never moves the alias. With
    no champion yet the candidate becomes champion.

    Recorded on the candidate version: fd + evaluation_id (valid measurements only) and
    promotion.{decision, reason, evaluation_id, candidate_fd, champion_fd, champion_version, margin,
    time}; on the registered model: <alias>.{version, fd, evaluation_id} of the holder.

    Concurrency: with a local SQLite store the whole read-decide-write runs under a file lock. For
    any store the alias is re-read before and after it is set; if another process changed it the
    decision is taken again against the new champion (optimistic; without the lock a very narrow
    window remains, since MLflow has no compare-and-set on aliases)."""
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin is a relative improvement in [0, 1), got {margin}")
    t = tracking or configure()
    cand = str(candidate_version)
    t.client.get_model_version(name, cand)  # fails clearly on an unknown version
    remeasured = {str(k): v for k, v in (remeasured or {}).items()}
    valid = not partial and _finite(candidate_fd)
    with _store_lock(t.uri) as locked:
        if valid:
            _set_version_tags(t, name, cand, {"fd": _fmt(candidate_fd), "evaluation_id": evaluation_id})
        for _ in range(max_rounds):
            champ = _read_champion(t, name, alias)
            before = champ.version if champ else None
            decision, reason, champ_fd = decide(cand, candidate_fd, evaluation_id, champ, margin, remeasured, partial)
            if decision == "promoted":
                if _alias_version(t, name, alias) != before:
                    continue  # changed while we decided
                t.client.set_registered_model_alias(name, alias, cand)
                if not locked and settle_s:
                    time.sleep(settle_s)
                if _alias_version(t, name, alias) != cand:
                    continue  # another promotion moved it after us: decide again against it
            elif _alias_version(t, name, alias) != before:
                continue
            break
        else:
            raise RuntimeError(f"{name}@{alias} kept changing during {max_rounds} promotion rounds")
        if champ is not None and champ.version in remeasured and _finite(remeasured[champ.version]) \
                and decision in ("promoted", "kept"):
            # the champion's FD measured in this evaluation is now its latest valid measurement
            _set_version_tags(t, name, champ.version, {"fd": _fmt(remeasured[champ.version]),
                                                        "evaluation_id": evaluation_id})
        record = {
            "promotion.decision": decision, "promotion.reason": reason, "promotion.evaluation_id": evaluation_id,
            "promotion.candidate_fd": _fmt(candidate_fd) if _finite(candidate_fd) else str(candidate_fd),
            "promotion.champion_fd": _fmt(champ_fd), "promotion.champion_version": before or "",
            "promotion.margin": repr(float(margin)), "promotion.partial": str(bool(partial)).lower(),
            "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _set_version_tags(t, name, cand, record)
        _sync_champion_tags(t, name, alias)
        holder = _alias_version(t, name, alias)
    return Promotion(name, cand, decision, reason, evaluation_id, float(candidate_fd) if valid else None, champ_fd,
                     before, holder)
