#!/usr/bin/env bash
# rc 0 when every service started by infra/local/start.sh is alive; lists them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
cd "$ROOT"
exec "$PY" infra/local/services.py status "$@"
