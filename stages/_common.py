"""Shared CLI plumbing for the stages: params, profile, device, threads, clear errors, and the
stage's MLflow run.

Every stage body runs inside ``with clear_errors(NAME) as rec:``. The stage puts what it made on
``rec`` (metrics, metric histories such as the loss curve, sample grids and reports) and, when the
stage ends (finished, failed or interrupted), that becomes one MLflow run with the stage's params,
its real start and end times, the git commit and its dvc.lock hash, nested under the pipeline run
($FEWSTEP_PARENT_RUN_ID). $FEWSTEP_TRACKING says how:

    auto      (default) record when mlflow is installed; if the store cannot be reached, warn and
              keep the stage's result (DVC outputs are the source of truth; `register` fails hard)
    required  as auto, but a missing mlflow or an unreachable store fails the stage (rc 2)
    off       never record

A GPU box with torch/numpy/pillow/pyyaml/safetensors only runs every stage unchanged (auto mode).
Only rank 0 of a torch.distributed run records.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from fewstep import parallel, settings
from fewstep.config import Params, ParamsError, load_params
from fewstep.models import resolve_device

ENV_TRACKING = "FEWSTEP_TRACKING"
TRACKING_MODES = ("auto", "required", "off")


@dataclass
class StageRecord:
    """What a stage reports to its MLflow run (kept in memory; written when the stage ends)."""

    stage: str
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    artifacts: list[tuple[str, str | None]] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    def log_metrics(self, metrics: Mapping[str, Any], prefix: str = "") -> None:
        """Numbers, nested dicts flattened with "/" (``{"rmse": {"olss": 0.1}}`` -> ``rmse/olss``);
        anything else (strings, lists, None) is skipped."""
        for k, v in metrics.items():
            key = f"{prefix}{k}"
            if isinstance(v, Mapping):
                self.log_metrics(v, key + "/")
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.metrics[key] = float(v)

    def log_history(self, key: str, history: Sequence[Sequence[float]]) -> None:
        """A metric over steps: [(step, value), ...]."""
        self.histories[key] = [(int(s), float(v)) for s, v in history]

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((str(path), artifact_path))

    def set_tags(self, **tags: Any) -> None:
        self.tags.update({k: str(v) for k, v in tags.items() if v is not None})


_CURRENT: StageRecord | None = None


def parser(doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file")
    ap.add_argument("--profile", default=None, help="merge profiles/NAME.yaml over the params (or $FEWSTEP_PROFILE)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def setup(args: argparse.Namespace) -> tuple[Params, torch.device]:
    """Validate params before any work; pick the device and thread count. Under torchrun
    (WORLD_SIZE > 1) join the process group: this rank's device (cuda:LOCAL_RANK or the CPU)."""
    p = load_params(args.params, args.profile or settings.current().profile)
    if p.base.threads:
        torch.set_num_threads(p.base.threads)
    if _CURRENT is not None:
        _CURRENT.params = {**p.model_dump(mode="json"),
                           "args": {k: v for k, v in vars(args).items() if v is not None}}
    return p, parallel.init(resolve_device(p.base.device))


def tracking_mode() -> str:
    mode = os.environ.get(ENV_TRACKING, "auto").strip().lower() or "auto"
    if mode not in TRACKING_MODES:
        raise ParamsError(f"${ENV_TRACKING}={mode!r}: expected one of {', '.join(TRACKING_MODES)}")
    return mode


def _is_rank0() -> bool:
    try:
        return parallel.env_world()[0] == 0
    except parallel.DistError:  # reported by the stage itself
        return True


def _record(rec: StageRecord, status: str, start_ms: int, error: str | None) -> str | None:
    """Write ``rec`` as the stage's MLflow run; returns an error message when the mode says the
    stage must fail because of it."""
    mode = tracking_mode()
    if mode == "off" or not _is_rank0():
        return None
    try:
        from fewstep import tracking
    except ImportError as e:  # a bare GPU box: torch, numpy, pillow, pyyaml, safetensors only
        if mode == "required":
            return f"${ENV_TRACKING}=required but mlflow cannot be imported ({e})"
        print(f"{rec.stage}: tracking skipped (mlflow not installed)", file=sys.stderr)
        return None
    # a dead tracking server must not hold the stage for minutes of HTTP retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    try:
        env = settings.current()
        run_id = tracking.record_stage(rec.stage, status=status, start_ms=start_ms, end_ms=int(time.time() * 1000),
                                       params=rec.params, metrics=rec.metrics, histories=rec.histories,
                                       artifacts=rec.artifacts, tags=rec.tags, error=error,
                                       experiment=env.experiment, artifact_root=env.artifact_root,
                                       parent_run_id=env.parent_run_id, git_commit=env.git_commit)
    except Exception as e:  # noqa: BLE001 - any store failure: report it, the mode decides
        msg = f"could not record the MLflow run at {tracking.default_tracking_uri()}: {type(e).__name__}: {e}"
        if mode == "required":
            return msg
        print(f"{rec.stage}: warning: {msg[:500]}", file=sys.stderr)
        return None
    print(f"{rec.stage}: MLflow run {run_id} ({status.lower()})", file=sys.stderr)
    return None


@contextmanager
def clear_errors(stage: str, track: bool = True) -> Iterator[StageRecord]:
    """Expected failures (bad params, bad data, diverged training) end with one clear line, rc 2.
    Yields the stage's :class:`StageRecord`; ``track=False`` for stages that open their own MLflow
    run (register, promote)."""
    from fewstep.data import DataError
    from fewstep.storage import StorageError
    from fewstep.train.loop import TrainingDivergedError

    global _CURRENT
    rec = StageRecord(stage)
    _CURRENT = rec if track else None
    t0, start_ms = time.perf_counter(), int(time.time() * 1000)
    if track:
        try:
            tracking_mode()  # a bad $FEWSTEP_TRACKING fails before any work
        except ParamsError as e:
            print(f"{stage}: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    try:
        yield rec
    except (ParamsError, DataError, StorageError, TrainingDivergedError, FileNotFoundError, parallel.DistError) as e:
        print(f"{stage}: error: {e}" + (f" (rank {parallel.rank()})" if parallel.world_size() > 1 else ""), file=sys.stderr)
        if track:
            _record(rec, "FAILED", start_ms, str(e))
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if track:
            _record(rec, "KILLED", start_ms, "interrupted")
        raise
    except SystemExit as e:
        if track and e.code not in (0, None):
            _record(rec, "FAILED", start_ms, f"exit {e.code}")
        raise
    except BaseException as e:
        if track:
            _record(rec, "FAILED", start_ms, f"{type(e).__name__}: {e}")
        raise
    finally:
        _CURRENT = None
        parallel.shutdown()
    rec.metrics.setdefault("stage_seconds", time.perf_counter() - t0)
    if track and (err := _record(rec, "FINISHED", start_ms, None)):
        print(f"{stage}: error: {err}", file=sys.stderr)
        raise SystemExit(2)
    if _is_rank0():
        print(f"{stage}: done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
