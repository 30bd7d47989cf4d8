"""Real servers on 127.0.0.1 for integration tests, started by the same code as infra/local/start.sh.

Every server leads its own process group, gets ``PR_SET_PDEATHSIG`` (dies with the test process
even after a SIGKILL), appends its pgid to $FEWSTEP_PGID_FILE when CI sets it, and is stopped by
group in teardown (SIGTERM, 10 s, SIGKILL); teardown then checks that nothing of it is left.
Ports come from binding port 0; a server that dies before it is ready is retried on a new port.
Fixtures here are imported by tests/integration/conftest.py.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest

from infra.local import services
from infra.local.services import Service

# mlops.md section 1, for every integration test (set by the `service_env` fixture)
TEST_ENV = {**services.QUIET_ENV, **services.TEST_CREDENTIALS, "CI": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


def stop_and_check(svc: Service) -> None:
    services.stop(svc)
    assert not services._alive(svc), f"{svc.name} (pgid {svc.pid}) survived teardown"


def http_json(url: str, body: Any | None = None, method: str | None = None, timeout: float = 30) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def moto_reset(moto: Service) -> None:
    """Drop every bucket (state is in memory only)."""
    http_json(f"{moto.base}/moto-api/reset", method="POST")


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := predicate():
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not met after {timeout:.0f} s")


# ----------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def service_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    """os.environ for the whole session: fake AWS keys, no telemetry, quiet Prefect/MLflow, and a
    fresh PREFECT_HOME (prefect is imported lazily in the tests, after this)."""
    mp = pytest.MonkeyPatch()
    for k, v in TEST_ENV.items():
        mp.setenv(k, v)
    mp.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    for k in ("PREFECT_API_URL", "PREFECT_PROFILE", "AWS_ENDPOINT_URL", "AWS_PROFILE", "MLFLOW_TRACKING_URI"):
        mp.delenv(k, raising=False)
    yield dict(os.environ)
    mp.undo()


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def moto_server(service_env, state_dir) -> Iterator[Service]:
    """A moto S3 server for the session (~0.5 s); tests use their own bucket names."""
    svc = services.ready(lambda: services.start_moto(state_dir, service_env))
    yield svc
    stop_and_check(svc)


@pytest.fixture(scope="session")
def prefect_server(service_env, state_dir) -> Iterator[tuple[Service, dict[str, str]]]:
    """A Prefect server with a fresh SQLite DB and the client env (PREFECT_API_URL, PREFECT_HOME).
    The scheduler loops every 2 s so a cron schedule makes runs within seconds of a deploy."""
    env = dict(service_env, PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2")
    svc = services.ready(lambda: services.start_prefect_server(state_dir, env))
    client = services.prefect_env(service_env, state_dir / "prefect-home", svc.base + "/api")
    yield svc, client
    stop_and_check(svc)


MLFLOW_BUCKET = "fewstep-mlflow"


@pytest.fixture(scope="session")
def mlflow_server(moto_server, service_env, state_dir) -> Iterator[Service]:
    """An MLflow tracking server (SQLite backend) proxying artifacts to s3://fewstep-mlflow/mlflow on
    the session's moto; tests keep apart by experiment (FEWSTEP_EXPERIMENT) and model names."""
    services.create_bucket(moto_server.base, MLFLOW_BUCKET, service_env)
    svc = services.ready(lambda: services.start_mlflow(state_dir / "mlflow-server", service_env, moto_server.base,
                                                       f"s3://{MLFLOW_BUCKET}/mlflow"))
    yield svc
    stop_and_check(svc)


def start_worker(state: Path, env: Mapping[str, str], pool: str) -> Service:
    return services.ready(lambda: services.start_worker(state, env, pool=pool, name=f"worker-{pool}"))
