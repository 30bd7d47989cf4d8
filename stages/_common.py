"""The one runner of every stage: arguments, params, device, clear errors, and the stage's MLflow run.

    def main(argv=None):
        run_stage("fit_olss@{model}-{steps}", argv, add_args, body)

``run_stage`` parses ``argv`` (the common ``--params``, ``--profile``, ``--no-progress`` plus the
stage's own ``add_args``), reads the settings (:mod:`fewstep.settings`), validates the params before
any work, picks the device and thread count (under torchrun: joins the process group) and calls
``body(ctx)`` with a :class:`StageContext`. The stage puts what it made on ``ctx.record`` (metrics,
histories such as the loss curve, sample grids and reports); when the stage ends (finished, failed
or interrupted) that becomes one MLflow run with the stage's params, its real start and end times,
the git commit and its dvc.lock hash, nested under the pipeline run ($FEWSTEP_PARENT_RUN_ID).
$FEWSTEP_TRACKING says how:

    auto      (default) record when mlflow is installed; if the store cannot be reached, warn and
              keep the stage's result (DVC outputs are the source of truth; `register` fails hard)
    required  as auto, but a missing mlflow or an unreachable store fails the stage (rc 2)
    off       never record

Every :class:`fewstep.errors.UserError` (bad params, data, settings, lineage, a diverged training,
a missing input file) ends the stage with one line ``NAME: error: ...`` on stderr and exit code 2;
anything else is a bug and keeps its traceback. A GPU box with torch/numpy/pillow/pyyaml/safetensors
only runs every stage unchanged (auto mode). Only rank 0 of a torch.distributed run records.
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
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from fewstep import parallel
from fewstep.config import Params, load_params
from fewstep.errors import UserError
from fewstep.math import precision
from fewstep.models import resolve_device
from fewstep.settings import Settings, current


class StageError(UserError):
    """A stage-level user error (a name not in params, a missing input): one line, exit code 2."""


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


@dataclass
class StageContext:
    """What a stage body gets: its arguments, validated params, device, settings and run record."""

    name: str
    args: argparse.Namespace
    params: Params
    device: torch.device
    settings: Settings
    record: StageRecord

    @property
    def progress(self) -> bool:
        """Show progress (a bar on a terminal, log lines elsewhere) unless --no-progress."""
        return not self.args.no_progress


def parser(doc: str | None, prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file")
    ap.add_argument("--profile", default=None, help="merge profiles/NAME.yaml over the params (or $FEWSTEP_PROFILE)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def _is_rank0() -> bool:
    try:
        return parallel.env_world()[0] == 0
    except parallel.DistError:  # reported by the stage itself
        return True


def one_line(msg: object) -> str:
    """A message on one line (a ParamsError lists each invalid param on its own line)."""
    return "; ".join(part.strip() for part in str(msg).splitlines() if part.strip())


def _fail(name: str, msg: object) -> None:
    rank = f" (rank {parallel.rank()})" if parallel.world_size() > 1 else ""
    print(f"{name}: error: {one_line(msg)}{rank}", file=sys.stderr)


@contextmanager
def user_errors(name: str) -> Iterator[None]:
    """A :class:`UserError` (or a missing input file) -> one line on stderr, exit code 2. For the
    command-line tools that are not DVC stages (ddim_tools, profile); stages get it from run_stage."""
    try:
        yield
    except (UserError, FileNotFoundError) as e:
        _fail(name, e)
        raise SystemExit(2) from None


def _record(rec: StageRecord, settings: Settings, status: str, start_ms: int, error: str | None) -> str | None:
    """Write ``rec`` as the stage's MLflow run; returns an error message when the tracking mode says
    the stage must fail because of it."""
    mode = settings.tracking
    if mode == "off" or not _is_rank0():
        return None
    try:
        from fewstep import tracking
    except ImportError as e:  # a bare GPU box: torch, numpy, pillow, pyyaml, safetensors only
        if mode == "required":
            return f"$FEWSTEP_TRACKING=required but mlflow cannot be imported ({e})"
        print(f"{rec.stage}: tracking skipped (mlflow not installed)", file=sys.stderr)
        return None
    # a dead tracking server must not hold the stage for minutes of HTTP retries (MLflow's own variables)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    try:
        run_id = tracking.record_stage(
            rec.stage, status=status, start_ms=start_ms, end_ms=int(time.time() * 1000), params=rec.params,
            metrics=rec.metrics, histories=rec.histories, artifacts=rec.artifacts, tags=rec.tags, error=error,
            experiment=settings.experiment, artifact_root=settings.artifact_root,
            parent_run_id=settings.parent_run_id, git_commit=settings.git_commit)
    except Exception as e:  # noqa: BLE001 - any store failure: report it, the mode decides
        msg = f"could not record the MLflow run at {tracking.default_tracking_uri()}: {type(e).__name__}: {e}"
        if mode == "required":
            return msg
        print(f"{rec.stage}: warning: {msg[:500]}", file=sys.stderr)
        return None
    print(f"{rec.stage}: MLflow run {run_id} ({status.lower()})", file=sys.stderr)
    return None


def _stage_name(name: str | Callable[[argparse.Namespace], str], args: argparse.Namespace) -> str:
    return name(args) if callable(name) else name.format(**vars(args))


def _context(name: str, args: argparse.Namespace, settings: Settings, rec: StageRecord) -> StageContext:
    """Validate params before any work; pick the device, thread count and CPU precision policy
    (base.cpu_bf16, base.channels_last: fewstep.math.precision). Under torchrun (WORLD_SIZE > 1)
    join the process group: this rank's device (cuda:LOCAL_RANK or the CPU)."""
    p = load_params(args.params, args.profile or settings.profile)
    if p.base.threads:
        torch.set_num_threads(p.base.threads)
    cpu = precision.configure_from(p.base)
    rec.params = {**p.model_dump(mode="json"), "args": {k: v for k, v in vars(args).items() if v is not None}}
    rec.set_tags(**{"fewstep.cpu_bf16": cpu.bf16, "fewstep.cpu_channels_last": cpu.channels_last,
                    "fewstep.cpu_native_bf16": precision.detect().native_bf16})
    return StageContext(name, args, p, parallel.init(resolve_device(p.base.device)), settings, rec)


def run_stage(name: str | Callable[[argparse.Namespace], str], argv: Sequence[str] | None,
              add_args: Callable[[argparse.ArgumentParser], None] | None,
              body: Callable[[StageContext], None], *, track: bool = True) -> None:
    """Run one stage (see the module docstring). ``name`` is the stage's name, formatted with the
    parsed arguments (``"fit_olss@{model}-{steps}"``) or computed from them by a callable.
    ``track=False`` for stages that open their own MLflow run (register)."""
    base = name.split("@")[0] if isinstance(name, str) else getattr(body, "__module__", "stage").rsplit(".", 1)[-1]
    doc = sys.modules[body.__module__].__doc__ if body.__module__ in sys.modules else None
    ap = parser(doc, prog=f"python -m {body.__module__}" if body.__module__ != "__main__" else None)
    if add_args is not None:
        add_args(ap)
    args = ap.parse_args(None if argv is None else list(argv))
    with user_errors(base):
        settings = current()  # a bad $FEWSTEP_* fails before any work
    stage = _stage_name(name, args)
    rec = StageRecord(stage)
    t0, start_ms = time.perf_counter(), int(time.time() * 1000)
    try:
        body(_context(stage, args, settings, rec))
    except (UserError, FileNotFoundError) as e:
        _fail(stage, e)
        if track:
            _record(rec, settings, "FAILED", start_ms, str(e))
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if track:
            _record(rec, settings, "KILLED", start_ms, "interrupted")
        raise
    except SystemExit as e:
        if track and e.code not in (0, None):
            _record(rec, settings, "FAILED", start_ms, f"exit {e.code}")
        raise
    except BaseException as e:
        if track:
            _record(rec, settings, "FAILED", start_ms, f"{type(e).__name__}: {e}")
        raise
    finally:
        parallel.shutdown()
    rec.metrics.setdefault("stage_seconds", time.perf_counter() - t0)
    if track and (err := _record(rec, settings, "FINISHED", start_ms, None)):
        _fail(stage, err)
        raise SystemExit(2)
    if _is_rank0():
        print(f"{stage}: done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
