"""Where a result came from, without MLflow: the git commit, a stage's dvc.lock entry and its hash,
the DVC stage that produced an output, and params flattened to ``a.b.c`` keys.

Plain functions of files and arguments; nothing here reads an environment variable (an image
without ``.git`` passes its commit explicitly, see :mod:`fewstep.settings`).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, Mapping

import yaml

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value


def git_commit(repo: str | Path = ".") -> str | None:
    """``git rev-parse HEAD`` in ``repo``; None outside a repository or without git."""
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = r.stdout.strip()
    return out if r.returncode == 0 and out else None


def read_lock(lock: str | Path) -> dict[str, Any]:
    """The ``stages`` mapping of a dvc.lock ({} when the file does not exist)."""
    from fewstep import storage  # imports torch: only when a lock is read

    if not Path(lock).exists():
        return {}
    with storage.open_read(lock) as f:
        return (yaml.safe_load(f.read()) or {}).get("stages", {}) or {}


def entry_hash(entry: Any) -> str:
    """sha256 of a dvc.lock entry as canonical YAML (sorted keys)."""
    from fewstep import storage

    return storage.sha256_bytes(yaml.safe_dump(entry, sort_keys=True).encode())


def dvc_lock_entry(stage: str, lock: str | Path = "dvc.lock") -> dict[str, Any] | None:
    return read_lock(lock).get(stage)


def dvc_lock_hash(stage: str, lock: str | Path = "dvc.lock") -> str | None:
    """sha256 of the stage's dvc.lock entry as canonical YAML (sorted keys); None if absent."""
    entry = dvc_lock_entry(stage, lock)
    return None if entry is None else entry_hash(entry)


def dvc_producer(out: str | Path, lock: str | Path = "dvc.lock") -> dict[str, str] | None:
    """{dvc_stage, dvc_lock_sha256, dvc_out_md5} of the stage whose outs include ``out``."""
    lock = Path(lock)
    if not lock.exists():
        return None
    rel = os.path.relpath(Path(out).resolve(), lock.resolve().parent)
    for stage, entry in read_lock(lock).items():
        for o in entry.get("outs", []) or []:
            if os.path.normpath(str(o.get("path", ""))) == os.path.normpath(rel):
                return {"dvc_stage": stage, "dvc_lock_sha256": entry_hash(entry), "dvc_out_md5": str(o.get("md5", ""))}
    return None


def trajectories_hash(meta: Mapping[str, Any], repo: Path, lock: Path) -> str | None:
    """An OLSS scheduler's trajectories: a hash in its meta, else DVC's dir hash, else the sha256
    of the files."""
    from fewstep import storage

    for key in ("trajectories_sha256", "trajectories_hash"):
        if meta.get(key):
            return str(meta[key])
    tp = meta.get("trajectories")
    if not tp:
        return None
    path = Path(tp) if Path(tp).is_absolute() else repo / tp
    prod = dvc_producer(path, lock)
    if prod and prod["dvc_out_md5"]:
        return f"dvc-md5:{prod['dvc_out_md5']}"
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        return "sha256:" + storage.sha256_json({p.name: storage.sha256_file(p) for p in files})
    return None


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1, "c": [1, 2]}} -> {"a.b": "1", "a.c": "[1, 2]"}; pydantic models are dumped."""
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if hasattr(v, "model_dump"):
            v = v.model_dump()
        if isinstance(v, Mapping):
            out.update(flatten_params(v, key + "."))
        else:
            s = v if isinstance(v, str) else json.dumps(v, default=str)
            out[key] = s[:MAX_PARAM_LEN]
    return out
