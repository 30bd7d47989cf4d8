"""What the session's hermetic check looks at (tests/conftest.py ``_hermetic``): the repository's
own stores, and the processes the session started."""

from __future__ import annotations

import os
from pathlib import Path

import psutil

SESSION_MARK = "FEWSTEP_TEST_SESSION"
GUARDED = ("mlflow.db", "mlflow.db.fewstep.lock", "mlruns", "mlartifacts", "models", "checkpoints", "registry")


def snapshot(root: Path, names: tuple[str, ...] = GUARDED) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under ``root/name`` for each name, (-1, 0) for each directory
    (so an empty one created counts too); a missing path is absent."""
    out: dict[str, tuple[int, int]] = {}
    for name in names:
        top = root / name
        paths = [top] if top.is_file() else [top, *sorted(top.rglob("*"))] if top.is_dir() else []
        for f in paths:
            st = f.stat()
            out[str(f.relative_to(root))] = (st.st_size, st.st_mtime_ns) if f.is_file() else (-1, 0)
    return out


def snapshot_diff(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    """Paths created, deleted or modified between two snapshots."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def _exits_with_us(proc: psutil.Process) -> bool:
    """This process's own multiprocessing resource tracker (started by ``mp.spawn``): it reads a pipe
    from this process and exits when this process does, so it is not left behind."""
    return proc.ppid() == os.getpid() and "multiprocessing.resource_tracker" in " ".join(proc.cmdline())


def session_processes(mark: str) -> list[psutil.Process]:
    """Live processes (other than this one and its resource tracker) whose environment carries
    ``SESSION_MARK=mark``."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        try:
            if (proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(SESSION_MARK) == mark
                    and not _exits_with_us(proc)):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid}: {' '.join(proc.cmdline())[:200]}"
    except psutil.Error:
        return f"pid {proc.pid}"
