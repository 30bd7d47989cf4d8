#!/usr/bin/env bash
# Start fewstep's services as plain local processes (no Docker): moto S3, an MLflow tracking
# server (SQLite backend, artifacts in s3://fewstep/mlflow, job execution off, 1 worker), a Prefect
# server with its web UI and a Prefect process worker on the `local` pool. Prints their URLs, the
# Prefect and MLflow UIs last; pids, logs and an env file for clients go to $FEWSTEP_SERVICES_DIR
# (default .services/).
#
#   infra/local/start.sh                                   # all four
#   infra/local/start.sh --no-ui                           # a headless Prefect server
#   infra/local/start.sh --services moto,mlflow            # a subset
#   infra/local/start.sh --s3-endpoint http://minio:9000   # an existing S3 instead of moto
#   source .services/env.sh                                # AWS_ENDPOINT_URL, MLFLOW_TRACKING_URI, PREFECT_API_URL ...
#   infra/local/stop.sh
#
# The same code (infra/local/services.py) starts the servers in tests/integration.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
cd "$ROOT"
exec "$PY" infra/local/services.py start --ui "$@"
