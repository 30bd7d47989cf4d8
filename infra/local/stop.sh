#!/usr/bin/env bash
# Stop what infra/local/start.sh started: each service's process group gets SIGTERM, then SIGKILL
# after 10 s (a worker's running flow runs and their dvc stages included).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
cd "$ROOT"
exec "$PY" infra/local/services.py stop "$@"
