"""Start and stop fewstep's services as plain local processes (no Docker).

The same code serves two callers:

* ``infra/local/start.sh`` / ``stop.sh`` (``python infra/local/services.py start|stop|status``):
  long-lived services for a workstation, detached into their own sessions, with pid files,
  logs and an ``env.sh`` to source under the state dir (default ``.services/``);
* tests/integration/servers.py: the same services attached to the test process
  (``attached=True``: own process group, ``PR_SET_PDEATHSIG`` so they die with it, killed by
  group in teardown; reference mlops.md sections 6-7).

Services: moto S3 (``/moto-api/``), MLflow tracking server with S3 artifacts and SQLite
(``/health``), Prefect server (``/api/health``) and a Prefect process worker (``/health`` of its
healthcheck webserver). Ports come from binding port 0 unless given.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

from fewstep import processes, settings

PY = sys.executable
HOST = "127.0.0.1"
READY_TIMEOUT_S = 120.0

# mlops.md section 1: no telemetry, no prompts, no UI (tests, ephemeral Prefect APIs), lean MLflow, fast
# worker polls. The server of infra/local/start.sh gets its UI all the same (start_prefect_server's `ui`).
QUIET_ENV = {
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_CLI_PROMPT": "false",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "PREFECT_WORKER_QUERY_SECONDS": "2",
}
# moto accepts any keys; a real S3/MinIO needs real ones in the environment instead.
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class Service:
    name: str
    proc: subprocess.Popen | None  # None when only known from a pid file
    pid: int  # also the process group id (each service leads its own group)
    base: str  # http://127.0.0.1:PORT
    ready_path: str
    log: Path

    @property
    def url(self) -> str:
        return self.base + self.ready_path


# ----------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


_libc = ctypes.CDLL("libc.so.6", use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _libc is not None:
        _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: fires when the spawning *thread* ends


def launch(cmd: list[str], log: Path, env: Mapping[str, str], attached: bool) -> subprocess.Popen:
    """Start ``cmd`` as the leader of a new process group, output to ``log``.

    attached: dies with this process (tests); otherwise a new session that outlives it (scripts).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        kw: dict = {"process_group": 0, "preexec_fn": _die_with_parent} if attached else {"start_new_session": True}
        p = subprocess.Popen(cmd, env=dict(env), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
    if attached and (pgid_file := settings.current().pgid_file):
        with open(pgid_file, "a") as f:  # CI's trap kills these groups whatever happens
            f.write(f"{p.pid}\n")
    return p


def _tail(log: Path, n: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def wait_ready(svc: Service, timeout_s: float = READY_TIMEOUT_S) -> Service:
    """Poll ``svc.url`` until HTTP 200; fail at once with the log tail if the process exits."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if svc.proc is not None and svc.proc.poll() is not None:
            raise RuntimeError(f"{svc.name} exited with code {svc.proc.returncode} before it was ready "
                               f"({svc.url}); log {svc.log}:\n{_tail(svc.log)}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(svc.url, timeout=2) as r:
                if r.status == 200:
                    return svc
        time.sleep(0.2)
    stop(svc)
    raise TimeoutError(f"{svc.name} not ready at {svc.url} after {timeout_s:.0f} s; log {svc.log}:\n{_tail(svc.log)}")


def ready(start: Callable[[], Service], tries: int = 2) -> Service:
    """``start()`` then wait_ready; a service that exits early (a port taken between the bind-0
    probe and its own bind) is started again on a new port."""
    return ready_together({"": start}, tries)[""]


def ready_together(starters: Mapping[str, Callable[[], Service]], tries: int = 2) -> dict[str, Service]:
    """Start all, then wait for each (servers that start together share the start-up time)."""
    procs = {k: f() for k, f in starters.items()}
    out: dict[str, Service] = {}
    try:
        for k, svc in procs.items():
            for attempt in range(tries):
                try:
                    out[k] = wait_ready(svc)
                    break
                except RuntimeError:
                    stop(svc)
                    if attempt == tries - 1:
                        raise
                    svc = procs[k] = starters[k]()
    except BaseException:
        for svc in procs.values():
            stop(svc)
        raise
    return out


def stop(svc: Service, grace_s: float = 10.0) -> None:
    """SIGTERM the service's process group and every descendant (a worker's flow runs live in their
    own sessions), wait, then SIGKILL what is left (fewstep.processes.stop_tree)."""
    processes.stop_tree(svc.pid, group=True, grace_s=grace_s)
    if svc.proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            svc.proc.wait(5)


def _alive(svc: Service) -> bool:
    """Whether any non-zombie process is left in the service's group."""
    return processes.group_alive(svc.pid)


def _start(name: str, cmd: list[str], ready_path: str, port: int, state: Path, env: Mapping[str, str],
           attached: bool) -> Service:
    p = launch(cmd, state / "logs" / f"{name}.log", env, attached)
    svc = Service(name, p, p.pid, f"http://{HOST}:{port}", ready_path, state / "logs" / f"{name}.log")
    if not attached:
        (state / "pids").mkdir(parents=True, exist_ok=True)
        (state / "pids" / f"{name}.pid").write_text(f"{p.pid}\n")
    return svc


def base_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default os.environ) with the quiet settings and, where unset, moto's test keys."""
    out = dict(os.environ if env is None else env)
    out.update(QUIET_ENV)
    for k, v in TEST_CREDENTIALS.items():
        out.setdefault(k, v)
    return out


# ----------------------------------------------------------------------------------------------
# The services (each returns a started process; call wait_ready on it)


def start_moto(state: Path, env: Mapping[str, str], port: int | None = None, attached: bool = True) -> Service:
    port = port or free_port()
    cmd = [PY, "-m", "moto.server", "-H", HOST, "-p", str(port)]
    return _start("moto", cmd, "/moto-api/", port, state, env, attached)


def create_bucket(endpoint: str, bucket: str, env: Mapping[str, str] | None = None) -> None:
    """Create ``bucket`` (if missing) with the credentials in ``env`` (default os.environ)."""
    import boto3

    env = os.environ if env is None else env
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
                      aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
                      region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"))
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
        s3.create_bucket(Bucket=bucket)


def start_mlflow(state: Path, env: Mapping[str, str], s3_endpoint: str | None, artifacts: str,
                 port: int | None = None, backend: str | None = None, attached: bool = True) -> Service:
    """MLflow tracking server proxying artifacts to ``artifacts`` (an s3:// prefix); SQLite
    backend under ``state`` unless ``backend`` names a database URI. Job execution off and one
    worker (mlops.md 4b: ~500 MiB instead of 1-2 GiB)."""
    port = port or free_port()
    env = dict(env)
    if s3_endpoint:
        env["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint
    backend = backend or f"sqlite:///{state / 'mlflow.db'}"
    cmd = [PY, "-m", "mlflow", "server", "--backend-store-uri", backend, "--artifacts-destination", artifacts,
           "--host", HOST, "--port", str(port), "--workers", "1"]
    return _start("mlflow", cmd, "/health", port, state, env, attached)


def prefect_env(env: Mapping[str, str], home: Path, api_url: str | None = None) -> dict[str, str]:
    out = dict(env)
    out["PREFECT_HOME"] = str(home)
    if api_url:
        out["PREFECT_API_URL"] = api_url
    return out


def start_prefect_server(state: Path, env: Mapping[str, str], port: int | None = None,
                         attached: bool = True, ui: bool = False) -> Service:
    """Prefect server with its SQLite DB in ``$PREFECT_HOME`` (``state/prefect-home``); ``ui``: its web
    UI at the server's base URL (tests leave it off: it costs start-up time and memory)."""
    port = port or free_port()
    env = prefect_env(env, state / "prefect-home")
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_SERVER_UI_ENABLED"] = "true" if ui else "false"
    cmd = [PY, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]
    return _start("prefect", cmd, "/api/health", port, state, env, attached)


def prefect_cli(args: list[str], env: Mapping[str, str], cwd: Path | None = None, timeout: float = 120,
                check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([PY, "-m", "prefect", *args], env=dict(env), cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise RuntimeError(f"prefect {shlex.join(args)}: exit code {r.returncode}\n"
                           f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def create_work_pool(name: str, env: Mapping[str, str], pool_type: str = "process",
                     base_job_template: Path | None = None) -> None:
    args = ["work-pool", "create", name, "--type", pool_type, "--overwrite"]
    if base_job_template:
        args += ["--base-job-template", str(base_job_template)]
    prefect_cli(args, env)


def start_worker(state: Path, env: Mapping[str, str], pool: str = "local", name: str = "worker",
                 port: int | None = None, attached: bool = True, run_once: bool = False) -> Service:
    """``prefect worker start --pool POOL`` (process type) with a healthcheck webserver on ``port``.
    Flow runs inherit this environment (AWS_*, MLFLOW_TRACKING_URI, FEWSTEP_ROOT ...)."""
    port = port or free_port()
    env = dict(env, PREFECT_WORKER_WEBSERVER_HOST=HOST, PREFECT_WORKER_WEBSERVER_PORT=str(port))
    cmd = [PY, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process", "--name", name,
           "--with-healthcheck"] + (["--run-once"] if run_once else [])
    return _start(name, cmd, "/health", port, state, env, attached)


ALL = ("moto", "mlflow", "prefect", "worker")


def start_all(state: Path, env: Mapping[str, str] | None = None, bucket: str = "fewstep",
              s3_endpoint: str | None = None, pool: str = "local", services: Iterable[str] = ALL,
              attached: bool = False, ui: bool = False) -> tuple[dict[str, Service], dict[str, str]]:
    """Start the chosen services (MLflow and Prefect together: ~13 s instead of ~18 s in sequence)
    and return them with the client environment (what ``env.sh`` exports)."""
    services = set(services)
    state.mkdir(parents=True, exist_ok=True)
    if not (state / ".gitignore").exists():
        (state / ".gitignore").write_text("*\n")  # pids, logs, databases: never committed
    env = base_env(env)
    started: dict[str, Service] = {}
    client: dict[str, str] = {}
    try:
        if "moto" in services:
            started["moto"] = ready(lambda: start_moto(state, env, attached=attached))
            s3_endpoint = started["moto"].base
        if s3_endpoint:
            client["AWS_ENDPOINT_URL"] = client["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint
            env.update(client)
        starters = {}
        if "mlflow" in services:
            if s3_endpoint:  # with no endpoint (real AWS) the bucket must exist already
                create_bucket(s3_endpoint, bucket, env)
            starters["mlflow"] = lambda: start_mlflow(state, env, s3_endpoint, f"s3://{bucket}/mlflow",
                                                      attached=attached)
        if "prefect" in services:
            starters["prefect"] = lambda: start_prefect_server(state, env, attached=attached, ui=ui)
        started.update(ready_together(starters))
        if "mlflow" in started:
            client["MLFLOW_TRACKING_URI"] = started["mlflow"].base
        if "prefect" in started:
            client["PREFECT_API_URL"] = started["prefect"].base + "/api"
            client["PREFECT_HOME"] = str(state / "prefect-home")
        if "worker" in services:
            wenv = prefect_env(dict(env, **client), state / "prefect-home", client.get("PREFECT_API_URL"))
            create_work_pool(pool, wenv)
            started["worker"] = ready(lambda: start_worker(state, wenv, pool=pool, attached=attached))
    except BaseException:
        for svc in reversed(list(started.values())):
            stop(svc)
        for pid_file in (state / "pids").glob("*.pid") if not attached else ():
            pid_file.unlink()
        raise
    return started, client


# ----------------------------------------------------------------------------------------------
# CLI for infra/local/*.sh


def _write_env(state: Path, client: dict[str, str]) -> Path:
    quiet = {k: v for k, v in QUIET_ENV.items() if k != "PREFECT_SERVER_UI_ENABLED"}  # a user's server keeps its UI
    lines = [f"export {k}={shlex.quote(v)}" for k, v in {**quiet, **client}.items()]
    lines += [f"export {k}=${{{k}:-{v}}}" for k, v in TEST_CREDENTIALS.items()]
    path = state / "env.sh"
    path.write_text("# source me: clients for the services started by infra/local/start.sh\n" + "\n".join(lines) + "\n")
    return path


def _pid_services(state: Path) -> list[Service]:
    order = ["worker", "prefect", "mlflow", "moto"]
    pids = sorted((state / "pids").glob("*.pid"), key=lambda p: order.index(p.stem) if p.stem in order else -1)
    return [Service(p.stem, None, int(p.read_text()), "", "", state / "logs" / f"{p.stem}.log") for p in pids]


def cmd_start(a: argparse.Namespace) -> int:
    state = Path(a.state_dir).resolve()
    running = [s for s in _pid_services(state) if _alive(s)] if (state / "pids").exists() else []
    if running:
        print(f"already running ({', '.join(s.name for s in running)}); run infra/local/stop.sh first", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    started, client = start_all(state, bucket=a.bucket, s3_endpoint=a.s3_endpoint, pool=a.pool,
                                services=a.services.split(","), attached=False, ui=a.ui)
    env_file = _write_env(state, client)
    (state / "services.json").write_text(json.dumps({n: {"pid": s.pid, "url": s.base, "log": str(s.log)}
                                                     for n, s in started.items()}, indent=2))
    for name, svc in started.items():
        what = {"prefect": "API " + svc.base + "/api", "worker": "health " + svc.url}.get(name, svc.base)
        print(f"{name:<8} {what:<40} pid {svc.pid:<8} log {svc.log}")
    print(f"ready in {time.monotonic() - t0:.1f} s; clients: source {env_file}")
    for line in ui_lines(started, prefect_ui=a.ui):
        print(line)
    return 0


def ui_lines(started: Mapping[str, Service], prefect_ui: bool = True) -> list[str]:
    """The web UIs to open: MLflow's (always served at its base URL) and Prefect's (when on)."""
    lines = []
    if "prefect" in started and prefect_ui:
        lines.append(f"Prefect UI: {started['prefect'].base}/")
    if "mlflow" in started:
        lines.append(f"MLflow UI:  {started['mlflow'].base}/")
    return lines


def cmd_stop(a: argparse.Namespace) -> int:
    state = Path(a.state_dir).resolve()
    if not (state / "pids").exists():
        print("nothing to stop")
        return 0
    for svc in _pid_services(state):
        was = _alive(svc)
        stop(svc)
        (state / "pids" / f"{svc.name}.pid").unlink()
        print(f"{svc.name:<8} pid {svc.pid:<8} {'stopped' if was else 'was not running'}")
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    state = Path(a.state_dir).resolve()
    svcs = _pid_services(state) if (state / "pids").exists() else []
    for svc in svcs:
        print(f"{svc.name:<8} pid {svc.pid:<8} {'running' if _alive(svc) else 'dead'}")
    return 0 if svcs and all(_alive(s) for s in svcs) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state-dir", default=settings.current().services_dir or ".services")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start the services detached, write pids, logs and env.sh")
    s.add_argument("--services", default="moto,mlflow,prefect,worker", help="comma-separated subset")
    s.add_argument("--bucket", default="fewstep", help="bucket for MLflow artifacts (created if missing)")
    s.add_argument("--s3-endpoint", default=None, help="an existing S3 endpoint instead of moto (e.g. MinIO)")
    s.add_argument("--pool", default="local", help="process work pool the worker serves")
    s.add_argument("--ui", action=argparse.BooleanOptionalAction, default=True,
                   help="the Prefect server's web UI (default: on; --no-ui for a headless server)")
    sub.add_parser("stop", help="stop what start started (process groups, SIGTERM then SIGKILL)")
    sub.add_parser("status", help="rc 0 when every started service is alive")
    a = ap.parse_args(argv)
    return {"start": cmd_start, "stop": cmd_stop, "status": cmd_status}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
