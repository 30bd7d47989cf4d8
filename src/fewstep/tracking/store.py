"""The tracking store: which MLflow store and experiment, and the lock beside a local SQLite store.

Everything comes in as arguments. The defaults are MLflow's own convention for the store
(``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``; never a file store: mlops.md 4a),
the experiment ``fewstep`` and artifacts under ``file://<cwd>/mlartifacts`` (or, for an http(s)
tracking server, the server's proxied artifact store).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

MLFLOW_TRACKING_URI = "MLFLOW_TRACKING_URI"  # MLflow's own variable, honoured as MLflow does
DEFAULT_EXPERIMENT = "fewstep"


@dataclass(frozen=True)
class Tracking:
    """A configured store: its URI, the experiment (id and artifact location) and a client."""

    uri: str
    experiment: str
    experiment_id: str
    artifact_location: str
    client: MlflowClient = field(repr=False, compare=False)


def default_tracking_uri(cwd: str | Path | None = None) -> str:
    """$MLFLOW_TRACKING_URI (MLflow's convention), else ``sqlite:///<cwd>/mlflow.db``."""
    return os.environ.get(MLFLOW_TRACKING_URI) or f"sqlite:///{Path(cwd or os.getcwd()).resolve() / 'mlflow.db'}"


def default_artifact_root(tracking_uri: str | None = None, cwd: str | Path | None = None) -> str | None:
    """``file://<cwd>/mlartifacts``; None for an http(s) tracking server (its --artifacts-destination
    then holds the artifacts and the client needs no store keys)."""
    if (tracking_uri or "").startswith(("http://", "https://")):
        return None
    return (Path(cwd or os.getcwd()).resolve() / "mlartifacts").as_uri()


_CONFIGURED: dict[tuple[str, str, str | None], Tracking] = {}


def configure(
    tracking_uri: str | None = None, experiment: str | None = None, artifact_root: str | None = None
) -> Tracking:
    """Point MLflow at the tracking store and make sure the experiment exists with an explicit
    artifact location (``artifact_root``, fixed when the experiment is created). None = the
    defaults above. Cheap to call again: the result is cached per (uri, experiment, root)."""
    uri = tracking_uri or default_tracking_uri()
    name = experiment or DEFAULT_EXPERIMENT
    root = artifact_root.rstrip("/") if artifact_root else default_artifact_root(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    key = (uri, name, root)
    if key in _CONFIGURED:
        return _CONFIGURED[key]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    with store_lock(uri):
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
                      f"not at {root}; use another experiment name to change it", stacklevel=2)
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
def store_lock(uri: str, timeout: float = 120.0) -> Iterator[bool]:
    """An exclusive lock beside a local SQLite store (flock on ``<db>.fewstep.lock``), so read-decide-
    write sequences of processes sharing the file do not interleave; re-entrant within a process.
    Yields whether it is locked; other stores get the optimistic checks of promotion only."""
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
            _flock(fd, path, timeout)
            depth[0] = 1
            try:
                yield True
            finally:
                depth[0] = 0
        finally:
            os.close(fd)  # closing the descriptor releases the flock


def _flock(fd: int, path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"registry lock beside {path} held for more than {timeout:.0f}s") from None
            time.sleep(0.05)


def registry_lock(tracking: Tracking | None = None, timeout: float = 120.0) -> contextlib.AbstractContextManager[bool]:
    """The lock promotion and registration hold (a no-op for server stores)."""
    return store_lock((tracking or configure()).uri, timeout)
