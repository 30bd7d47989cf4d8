"""Prefect flow `fewstep-pipeline`: the DVC stages as serial tasks, then registration.

DVC owns caching, Prefect owns scheduling, retries and workers (DESIGN.md principle 6). Each
task runs ``python -m dvc repro <stage>`` in the repo, so an up-to-date stage is a ~1 s no-op.
One task per stage, not one ``dvc repro`` for the whole pipeline: a retry of the single big task
would also skip the finished stages (DVC caches them), but it would give a day-long GPU teacher and
a one-minute OLSS fit the same time limit and one shared retry budget, and the UI would not say
which stage failed. Per stage, a retry re-runs exactly the stage that failed, under its own limit
(``timeouts``), with its own log.

Tasks run one after another: DVC allows one command per repo at a time (a second one fails at
once with "is busy"), so there is nothing to gain from running stages of one repo concurrently.

Then the ``after`` steps (default: ``register``), for what the stages made: a step that is a stage
of dvc.yaml runs there (as part of a full run, else as ``dvc repro --single-item <name>``, so it does
not drag in the whole pipeline upstream of it); one that is not runs as ``python -m stages.<name>``
if the repo has that module, and is skipped otherwise. ``after=["register", "promote"]`` adds
promotion.

Run it locally (ephemeral Prefect API, no server):

    python flows/pipeline.py --repo . --stages prepare_data train_teacher
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from fewstep import processes, settings
from fewstep.settings import Settings

DEFAULT_TIMEOUT_S = 6 * 3600.0  # per stage; the GPU teacher is the long one
DEFAULT_RETRIES = 2
DEFAULT_RETRY_DELAY_S = 30.0


class StageError(processes.CommandError):
    """A pipeline command failed or timed out (the message carries its stderr tail), or the repo
    cannot run the pipeline."""


# ----------------------------------------------------------------------------------------------
# What the stage processes get: the worker's environment plus the pipeline's settings


@dataclass(frozen=True)
class StageEnv:
    """``profile=None`` keeps the worker's $FEWSTEP_PROFILE; ``world_size=None`` keeps
    $FEWSTEP_WORLD_SIZE (unset: params' distributed.world_size); ``parent_run_id``: the pipeline's
    MLflow run, under which every stage run nests ($FEWSTEP_PARENT_RUN_ID)."""

    profile: str | None = None
    world_size: int | None = None
    parent_run_id: str | None = None

    def environ(self) -> dict[str, str]:
        """``python`` in dvc.yaml resolves to this interpreter (its bin dir goes first on PATH)."""
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("DVC_NO_ANALYTICS", "1")
        for name in ("profile", "world_size", "parent_run_id"):  # read by the stages and fewstep.launch
            value = getattr(self, name)
            if value is not None:
                env[Settings.env_name(name)] = str(value)
        return env


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The task run's logger (shipped to the Prefect API); a plain logger outside a run."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("fewstep.flows")


def run_logged(cmd: list[str], cwd: str, env: dict[str, str], timeout_s: float, what: str,
               echo: bool = True) -> str:
    """Run ``cmd`` (fewstep.processes.run_streamed), each output line logged as it comes; returns
    stdout. StageError on failure or after ``timeout_s`` (the process tree is stopped first)."""
    log = _logger()
    t0 = time.monotonic()
    on_line = (lambda line: log.info("%s | %s", what, line)) if echo else None
    try:
        out = processes.run_streamed(cmd, cwd=cwd, env=env, timeout_s=timeout_s, what=what, on_line=on_line)
    except processes.CommandError as e:
        raise StageError(str(e)) from None
    log.info("%s finished in %.1f s", what, time.monotonic() - t0)
    return out


# ----------------------------------------------------------------------------------------------
# Stage discovery: `dvc dag --dot` lists nodes in dvc.yaml order and edges upstream -> downstream

_NODE = re.compile(r'^"([^"]+)";$')
_EDGE = re.compile(r'^"([^"]+)" -> "([^"]+)";$')


def order_stages(dot: str) -> list[str]:
    """Topological order of a ``dvc dag --dot`` graph; ties keep dvc.yaml order. ``.dvc`` file
    nodes (data added with ``dvc add``) have nothing to reproduce and are left out."""
    nodes: list[str] = []
    ups: dict[str, set[str]] = {}
    for line in map(str.strip, dot.splitlines()):
        if m := _EDGE.match(line):
            ups.setdefault(m[2], set()).add(m[1])
        elif m := _NODE.match(line):
            nodes.append(m[1])
    order: list[str] = []
    pending = list(nodes)
    while pending:
        ready = next((n for n in pending if not ups.get(n, set()) - set(order)), None)
        if ready is None:
            raise StageError(f"dvc dag has a cycle among {pending}")
        order.append(ready)
        pending.remove(ready)
    return [n for n in order if not n.endswith(".dvc")]


@task(name="list-stages", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def list_stages(repo: str) -> list[str]:
    """Every stage of the repo's dvc.yaml (foreach/matrix expanded), upstream first."""
    dot = run_logged([sys.executable, "-m", "dvc", "dag", "--dot"], repo, StageEnv(None, 1).environ(), 300, "dvc dag",
                     echo=False)
    stages = order_stages(dot)
    get_run_logger().info("stages in dependency order: %s", ", ".join(stages))
    return stages


# ----------------------------------------------------------------------------------------------
# Tasks


# Prefect's own result cache stays off: DVC decides what is up to date.
@task(name="dvc-repro", cache_policy=NO_CACHE)
def dvc_repro(repo: str, stage: str, env: StageEnv, timeout_s: float, single: bool = False) -> dict[str, Any]:
    """``dvc repro <stage>``: its upstream too unless ``single`` (the flow already ran it); the
    result says whether the stage 'ran' or was 'cached'."""
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "dvc", "repro", *(["--single-item"] if single else []), stage]
    out = run_logged(cmd, repo, env.environ(), timeout_s, f"dvc repro {stage}")
    ran = "Running stage" in out
    return {"stage": stage, "status": "ran" if ran else "cached", "seconds": round(time.monotonic() - t0, 1)}


def has_module(repo: str, module: str, env: dict[str, str]) -> bool:
    """Whether ``module`` imports from ``repo`` (checked in a subprocess: this process's sys.path
    and module cache stay untouched)."""
    probe = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    r = subprocess.run([sys.executable, "-c", probe], cwd=repo, env=env, capture_output=True, timeout=120)
    return r.returncode == 0


@task(name="stage-module", cache_policy=NO_CACHE)
def run_stage_module(repo: str, name: str, env: StageEnv, timeout_s: float) -> dict[str, Any]:
    """``python -m stages.<name>`` (register, promote, ...) when the repo has it; else skipped."""
    module = f"stages.{name}"
    environ = env.environ()
    if not has_module(repo, module, environ):
        get_run_logger().info("%s: no module %s in %s, skipped", name, module, repo)
        return {"stage": name, "status": "skipped", "seconds": 0.0}
    t0 = time.monotonic()
    run_logged([sys.executable, "-m", module], repo, environ, timeout_s, f"python -m {module}")
    return {"stage": name, "status": "ran", "seconds": round(time.monotonic() - t0, 1)}


def resolve_repo(repo: str) -> str:
    path = Path(repo).expanduser().resolve()
    if not (path / "dvc.yaml").is_file():
        raise StageError(f"repo {repo!r} ({path}) has no dvc.yaml: pass the DVC repo's path "
                         "(deployments: set FEWSTEP_ROOT for the worker, see prefect.yaml)")
    return str(path)


# ----------------------------------------------------------------------------------------------
# Steps: what the flow runs, in order


@dataclass(frozen=True)
class Step:
    """One task of the flow: a DVC stage (``dvc repro [--single-item] <name>``) or a stage module
    that is not in dvc.yaml (``python -m stages.<name>``)."""

    name: str
    kind: Literal["dvc", "module"]
    single_item: bool = False

    @property
    def task_name(self) -> str:
        return f"repro {self.name}" if self.kind == "dvc" else self.name


@dataclass(frozen=True)
class Limits:
    """Retries and time limits per task; ``timeouts`` overrides ``timeout_s`` by stage name
    (``distill@student-1``), then by group (``distill``)."""

    retries: int = DEFAULT_RETRIES
    retry_delay_s: float = DEFAULT_RETRY_DELAY_S
    timeout_s: float = DEFAULT_TIMEOUT_S
    timeouts: dict[str, float] | None = None

    def timeout_for(self, stage: str) -> float:
        timeouts = self.timeouts or {}
        return float(timeouts.get(stage, timeouts.get(stage.split("@", 1)[0], self.timeout_s)))


def plan_steps(dag: list[str], stages: list[str] | None, after: list[str] | None) -> list[Step]:
    """The stages (all of ``dag`` in its order, each ``--single-item``; or the named ones, each with
    its upstream), then the ``after`` steps not among them: a stage of dvc.yaml runs there, another
    name as a module."""
    todo, single = (list(stages), False) if stages else (list(dag), True)
    steps = [Step(stage, "dvc", single) for stage in todo]
    for name in ["register"] if after is None else after:
        if name not in todo:
            steps.append(Step(name, "dvc", True) if name in dag else Step(name, "module"))
    return steps


def run_steps(repo: str, steps: list[Step], env: StageEnv, limits: Limits) -> list[dict[str, Any]]:
    """Each step as its own task, one after another (one dvc per repo), under its own limit."""
    results = []
    for step in steps:
        limit = limits.timeout_for(step.name)
        fn = dvc_repro if step.kind == "dvc" else run_stage_module
        task_fn = fn.with_options(name=step.task_name, retries=limits.retries,
                                  retry_delay_seconds=limits.retry_delay_s,
                                  timeout_seconds=limit + 60)  # backstop; run_logged stops at `limit`
        extra = {"single": step.single_item} if step.kind == "dvc" else {}
        results.append(task_fn(repo, step.name, env, limit, **extra))
    return results


# ----------------------------------------------------------------------------------------------
# Flow


@task(name="apply profile", retries=0)
def apply_profile(repo: str, profile: str) -> None:
    r = subprocess.run([sys.executable, "-m", "stages.profile", profile], cwd=repo, capture_output=True, text=True,
                       timeout=120)
    if r.returncode:
        raise RuntimeError(f"applying profile {profile!r} failed: {(r.stderr or r.stdout)[-2000:]}")
    print(r.stdout.strip())


@flow(name="fewstep-pipeline", log_prints=True)
def pipeline(
    repo: str = ".",
    stages: list[str] | None = None,
    profile: str | None = None,
    world_size: int | None = None,
    retries: int = DEFAULT_RETRIES,
    retry_delay_s: float = DEFAULT_RETRY_DELAY_S,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    timeouts: dict[str, float] | None = None,
    after: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Reproduce the DVC pipeline in ``repo`` stage by stage, then run the ``after`` steps.

    Args:
        repo: the DVC repo (relative paths are taken from the working directory, which the
            deployment's pull step sets to $FEWSTEP_ROOT).
        stages: stage names or groups (``distill`` = every round) to reproduce, each with its
            upstream; None = every stage of dvc.yaml in dependency order.
        profile: profiles/<profile>.yaml merged over params.yaml ($FEWSTEP_PROFILE for the
            stages); None keeps the worker's $FEWSTEP_PROFILE, "default" forces params.yaml alone.
        world_size: processes for the training and sampling stages (python -m fewstep.launch), passed
            as $FEWSTEP_WORLD_SIZE; 0 = one per visible GPU; None = params' distributed.world_size.
        retries, retry_delay_s: per task.
        timeout_s: per task; ``timeouts`` overrides it by stage name or group.
        after: steps run after the stages (see the module docstring); default ``["register"]``
            (MLflow registration); add "promote" for promotion; ``[]`` for none.
    """
    if world_size is not None and world_size < 0:
        raise ValueError(f"world_size must be >= 0 (0 = one per GPU) or None, got {world_size}")
    repo = resolve_repo(repo)
    # Listed here: in dependency order, so each stage's upstream is done when it starts (`--single-item`
    # skips re-checking it). Named by the caller: each with its upstream, whatever the order.
    steps = plan_steps(list_stages(repo), stages, after)
    limits = Limits(retries, retry_delay_s, timeout_s, timeouts)
    with pipeline_mlflow_run(repo, profile) as parent_run_id:
        if profile and profile != "default":
            # DVC tracks params.yaml, not $FEWSTEP_PROFILE: write the profile into params.yaml so DVC
            # re-runs what it changes (stages/profile.py), then the stages read params.yaml alone.
            apply_profile(repo, profile)
            profile = "default"
        results = run_steps(repo, steps, StageEnv(profile, world_size, parent_run_id), limits)
    for r in results:
        print(f"{r['stage']:<32} {r['status']:<8} {r['seconds']:>8.1f} s")
    return results


@contextlib.contextmanager
def pipeline_mlflow_run(repo: str, profile: str | None) -> Iterator[str | None]:
    """One MLflow run for the flow run; yields its id, which the stage processes get as
    $FEWSTEP_PARENT_RUN_ID so their runs nest under it (None: no run). Skipped when
    $FEWSTEP_TRACKING=off or mlflow is missing; a store that cannot be reached is a warning here
    (the stages and `register` decide for themselves)."""
    env = settings.current()
    if env.tracking == "off":
        yield None
        return
    try:
        from fewstep import tracking
    except ImportError:
        yield None
        return
    tags: dict[str, Any] = {"fewstep.profile": profile or env.profile or "default"}
    try:
        from prefect.runtime import deployment, flow_run

        tags.update({"prefect.flow_run_id": flow_run.id, "prefect.flow_run_name": flow_run.name,
                     "prefect.deployment": deployment.name})
    except Exception:  # noqa: BLE001 - outside a flow run (tests calling the function)
        pass
    with contextlib.ExitStack() as stack:
        run_id = None
        try:  # the stages run in `repo`: their default store is <repo>/mlflow.db, so the parent's is too
            uri = tracking.default_tracking_uri(repo)
            t = tracking.configure(uri, env.experiment, env.artifact_root or tracking.default_artifact_root(uri, repo))
            run = stack.enter_context(tracking.pipeline_run("pipeline", tags=tags, repo=repo,
                                                            git_commit=env.git_commit, tracking=t))
            run_id = run.run_id
        except Exception as e:  # noqa: BLE001
            print(f"pipeline: warning: no MLflow pipeline run ({type(e).__name__}: {str(e)[:300]})")
        yield run_id


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=".")
    ap.add_argument("--stages", nargs="*", default=None)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--world-size", type=int, default=None)
    ap.add_argument("--retries", type=int, default=DEFAULT_RETRIES)
    ap.add_argument("--retry-delay-s", type=float, default=DEFAULT_RETRY_DELAY_S)
    ap.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S)
    ap.add_argument("--after", nargs="*", default=None)
    a = ap.parse_args()
    pipeline(repo=a.repo, stages=a.stages or None, profile=a.profile, world_size=a.world_size, retries=a.retries,
             retry_delay_s=a.retry_delay_s, timeout_s=a.timeout_s, after=a.after)


if __name__ == "__main__":
    main()
