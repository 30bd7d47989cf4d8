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
import collections
import contextlib
import logging
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

DEFAULT_TIMEOUT_S = 6 * 3600.0  # per stage; the GPU teacher is the long one
DEFAULT_RETRIES = 2
DEFAULT_RETRY_DELAY_S = 30.0
TAIL_LINES = 40
_KILL_GRACE_S = 10.0


class StageError(RuntimeError):
    """A pipeline command failed or timed out; the message carries its stderr tail."""


# ----------------------------------------------------------------------------------------------
# Subprocesses: streamed logs, a deadline, and the whole process tree stopped on any exit


def stage_env(profile: str | None, world_size: int | None) -> dict[str, str]:
    """The worker's environment plus what the stages read. ``python`` in dvc.yaml resolves to
    this interpreter (its bin dir goes first on PATH); ``profile=None`` keeps $FEWSTEP_PROFILE;
    ``world_size=None`` keeps $FEWSTEP_WORLD_SIZE (unset: params' distributed.world_size)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    if profile is not None:
        env["FEWSTEP_PROFILE"] = profile
    if world_size is not None:
        env["FEWSTEP_WORLD_SIZE"] = str(world_size)  # read by python -m fewstep.launch
    return env


def _kill_tree(pid: int) -> None:
    """SIGTERM the process and all its descendants (dvc runs the stage as its child), then
    SIGKILL what is left. Killing only the dvc PID would leave the stage running as an orphan."""
    import psutil  # a dependency of dvc

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=_KILL_GRACE_S)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def _lines(buf: bytes) -> tuple[list[str], bytes]:
    """Complete lines of ``buf`` and the rest; of a progress bar's \\r updates keep the last."""
    *done, rest = buf.split(b"\n")
    return [d.rsplit(b"\r", 1)[-1].decode(errors="replace").rstrip() for d in done], rest


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The task run's logger (shipped to the Prefect API); a plain logger outside a run."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("fewstep.flows")


def run_logged(cmd: list[str], cwd: str, env: dict[str, str], timeout_s: float, what: str,
               echo: bool = True) -> str:
    """Run ``cmd``, log its stdout/stderr line by line as it runs, return stdout.

    Raises StageError with the exit code and stderr tail on failure, or when ``timeout_s`` passes
    (the process tree is stopped first). Any exception here (Prefect's own timeout, a cancel)
    also stops the tree, so no stage outlives its task.
    """
    log = _logger()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out: list[str] = []
    err_tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    sel = selectors.DefaultSelector()
    bufs = {"out": b"", "err": b""}
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    timed_out = False
    drain_until = None  # a background grandchild may hold the pipes open after the command exits
    try:
        while sel.get_map():
            now = time.monotonic()
            if now - t0 > timeout_s:
                timed_out = True
                break
            if drain_until is None and proc.poll() is not None:
                drain_until = now + 5
            elif drain_until is not None and now > drain_until:
                break
            for key, _ in sel.select(timeout=0.5):  # short waits: Prefect can interrupt between them
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    chunk = b"\n" if bufs[key.data] else b""
                lines, bufs[key.data] = _lines(bufs[key.data] + chunk)
                for line in filter(None, lines):
                    (out if key.data == "out" else err_tail).append(line)
                    if echo:
                        log.info("%s | %s", what, line)
        while not timed_out and proc.poll() is None:
            if time.monotonic() - t0 > timeout_s:
                timed_out = True
            else:
                time.sleep(0.2)
    finally:
        sel.close()
        if proc.poll() is None:
            _kill_tree(proc.pid)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    took = time.monotonic() - t0
    tail = "\n".join(err_tail) or "(no stderr)"
    if timed_out:
        raise StageError(f"{what} timed out after {timeout_s:.0f} s (stopped) in {cwd}; stderr tail:\n{tail}")
    if proc.returncode != 0:
        raise StageError(f"{what} failed with exit code {proc.returncode} after {took:.1f} s in {cwd}; "
                         f"stderr tail:\n{tail}")
    log.info("%s finished in %.1f s", what, took)
    return "\n".join(out)


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
    dot = run_logged([sys.executable, "-m", "dvc", "dag", "--dot"], repo, stage_env(None, 1), 300, "dvc dag",
                     echo=False)
    stages = order_stages(dot)
    get_run_logger().info("stages in dependency order: %s", ", ".join(stages))
    return stages


# ----------------------------------------------------------------------------------------------
# Tasks


# Prefect's own result cache stays off: DVC decides what is up to date.
@task(name="dvc-repro", cache_policy=NO_CACHE)
def dvc_repro(repo: str, stage: str, profile: str | None, world_size: int | None, timeout_s: float,
              single: bool = False) -> dict[str, Any]:
    """``dvc repro <stage>``: its upstream too unless ``single`` (the flow already ran it); the
    result says whether the stage 'ran' or was 'cached'."""
    t0 = time.monotonic()
    env = stage_env(profile, world_size)
    cmd = [sys.executable, "-m", "dvc", "repro", *(["--single-item"] if single else []), stage]
    out = run_logged(cmd, repo, env, timeout_s, f"dvc repro {stage}")
    ran = "Running stage" in out
    return {"stage": stage, "status": "ran" if ran else "cached", "seconds": round(time.monotonic() - t0, 1)}


def has_module(repo: str, module: str, env: dict[str, str]) -> bool:
    """Whether ``module`` imports from ``repo`` (checked in a subprocess: this process's sys.path
    and module cache stay untouched)."""
    probe = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    r = subprocess.run([sys.executable, "-c", probe], cwd=repo, env=env, capture_output=True, timeout=120)
    return r.returncode == 0


@task(name="stage-module", cache_policy=NO_CACHE)
def run_stage_module(repo: str, name: str, profile: str | None, world_size: int | None,
                     timeout_s: float) -> dict[str, Any]:
    """``python -m stages.<name>`` (register, promote, ...) when the repo has it; else skipped."""
    module = f"stages.{name}"
    env = stage_env(profile, world_size)
    if not has_module(repo, module, env):
        get_run_logger().info("%s: no module %s in %s, skipped", name, module, repo)
        return {"stage": name, "status": "skipped", "seconds": 0.0}
    t0 = time.monotonic()
    run_logged([sys.executable, "-m", module], repo, env, timeout_s, f"python -m {module}")
    return {"stage": name, "status": "ran", "seconds": round(time.monotonic() - t0, 1)}


def _timeout_for(stage: str, timeouts: dict[str, float] | None, default: float) -> float:
    """Per-stage limit: exact name (``distill@student-1``), then group (``distill``), then default."""
    timeouts = timeouts or {}
    return float(timeouts.get(stage, timeouts.get(stage.split("@", 1)[0], default)))


def resolve_repo(repo: str) -> str:
    path = Path(repo).expanduser().resolve()
    if not (path / "dvc.yaml").is_file():
        raise StageError(f"repo {repo!r} ({path}) has no dvc.yaml: pass the DVC repo's path "
                         "(deployments: set FEWSTEP_ROOT for the worker, see prefect.yaml)")
    return str(path)


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
    dag = list_stages(repo)
    # Listed here: in dependency order, so each stage's upstream is done when it starts (`--single-item`
    # skips re-checking it). Named by the caller: each with its upstream, whatever the order.
    todo, single = (list(stages), False) if stages else (dag, True)
    steps = [(stage, "dvc", single) for stage in todo]
    for name in ["register"] if after is None else after:
        if name in todo:
            continue  # already one of the stages
        steps.append((name, "dvc", True) if name in dag else (name, "module", False))
    results = []
    with pipeline_mlflow_run(repo, profile):
        _run_steps(repo, steps, profile, world_size, retries, retry_delay_s, timeout_s, timeouts, results)
    for r in results:
        print(f"{r['stage']:<32} {r['status']:<8} {r['seconds']:>8.1f} s")
    return results


@contextlib.contextmanager
def pipeline_mlflow_run(repo: str, profile: str | None) -> Iterator[None]:
    """One MLflow run for the flow run; every stage's run nests under it ($FEWSTEP_PARENT_RUN_ID,
    inherited by the stage processes). Skipped when $FEWSTEP_TRACKING=off or mlflow is missing; a
    store that cannot be reached is a warning here (the stages and `register` decide for themselves)."""
    if os.environ.get("FEWSTEP_TRACKING", "auto").strip().lower() == "off":
        yield
        return
    try:
        from fewstep import tracking
    except ImportError:
        yield
        return
    tags: dict[str, Any] = {"fewstep.profile": profile or os.environ.get("FEWSTEP_PROFILE") or "default"}
    try:
        from prefect.runtime import deployment, flow_run

        tags.update({"prefect.flow_run_id": flow_run.id, "prefect.flow_run_name": flow_run.name,
                     "prefect.deployment": deployment.name})
    except Exception:  # noqa: BLE001 - outside a flow run (tests calling the function)
        pass
    with contextlib.ExitStack() as stack:
        try:  # the stages run in `repo`: their default store is <repo>/mlflow.db, so the parent's is too
            uri = tracking.default_tracking_uri(repo)
            t = tracking.configure(uri, artifact_root=tracking.default_artifact_root(uri, repo))
            stack.enter_context(tracking.pipeline_run("pipeline", tags=tags, repo=repo, tracking=t))
        except Exception as e:  # noqa: BLE001
            print(f"pipeline: warning: no MLflow pipeline run ({type(e).__name__}: {str(e)[:300]})")
        yield


def _run_steps(repo: str, steps: list[tuple[str, str, bool]], profile: str | None, world_size: int, retries: int,
               retry_delay_s: float, timeout_s: float, timeouts: dict[str, float] | None,
               results: list[dict[str, Any]]) -> None:
    if profile and profile != "default":
        # DVC tracks params.yaml, not $FEWSTEP_PROFILE: write the profile into params.yaml so DVC
        # re-runs what it changes (stages/profile.py), then the stages read params.yaml alone.
        apply_profile(repo, profile)
        profile = "default"
    for name, kind, single_item in steps:  # serial: one dvc per repo
        limit = _timeout_for(name, timeouts, timeout_s)
        task_fn = dvc_repro if kind == "dvc" else run_stage_module
        step = task_fn.with_options(name=f"repro {name}" if kind == "dvc" else name, retries=retries,
                                    retry_delay_seconds=retry_delay_s,
                                    timeout_seconds=limit + 60)  # backstop; run_logged stops at `limit`
        args = (repo, name, profile, world_size, limit) + ((single_item,) if kind == "dvc" else ())
        results.append(step(*args))


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
