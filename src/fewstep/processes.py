"""Child processes for the entry points (the Prefect flows, infra/local's services): run a command
with its output streamed line by line under a deadline, and stop a process tree (SIGTERM, a grace
period, SIGKILL) so that nothing outlives its caller.

A tree is the process, all its descendants (``dvc repro`` runs the stage as its child; a Prefect
worker's flow runs live in their own sessions) and, with ``group=True``, every process of the
process group it leads (the services start as group leaders).
"""

from __future__ import annotations

import collections
import contextlib
import os
import selectors
import signal
import subprocess
import time
from typing import Callable, Mapping, Sequence

TAIL_LINES = 40
KILL_GRACE_S = 10.0


class CommandError(RuntimeError):
    """A command failed or timed out; the message carries its stderr tail."""


# ----------------------------------------------------------------------------------------------
# stopping a tree


def descendants(pid: int) -> list:
    """psutil.Process objects of every descendant of ``pid`` ([] when it is gone)."""
    import psutil  # a dependency of dvc

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _running(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in process group ``pgid`` (a detached leader is not
    our child, so when it dies it may stay a zombie until something reaps it)."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    import psutil

    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(p.pid) == pgid and _running(p):
                return True
    return False


def _signal_tree(pid: int, tree: Sequence, group: bool, sig: int) -> None:
    import psutil

    if group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
    for p in tree:
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)


def stop_tree(pid: int, *, group: bool = False, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM ``pid``, its descendants and (``group``) its process group; wait up to ``grace_s``
    for them to end, then SIGKILL whatever is left."""
    import psutil

    try:
        tree = [*descendants(pid), psutil.Process(pid)]
    except psutil.Error:
        tree = descendants(pid)
    _signal_tree(pid, tree, group, signal.SIGTERM)
    end = time.monotonic() + grace_s
    while time.monotonic() < end and (any(map(_running, tree)) or (group and group_alive(pid))):
        time.sleep(0.1)
    _signal_tree(pid, tree, group, signal.SIGKILL)
    psutil.wait_procs(tree, timeout=5)  # reaps our own children


# ----------------------------------------------------------------------------------------------
# running a command with streamed output


def complete_lines(buf: bytes) -> tuple[list[str], bytes]:
    """Complete lines of ``buf`` and the rest; of a progress bar's \\r updates keep the last."""
    *done, rest = buf.split(b"\n")
    return [d.rsplit(b"\r", 1)[-1].decode(errors="replace").rstrip() for d in done], rest


def run_streamed(cmd: Sequence[str], *, cwd: str, env: Mapping[str, str], timeout_s: float, what: str,
                 on_line: Callable[[str], None] | None = None) -> str:
    """Run ``cmd``, pass each line of its stdout/stderr to ``on_line`` as it comes, return stdout.

    Raises CommandError with the exit code and stderr tail on failure, or when ``timeout_s`` passes
    (the process tree is stopped first). Any exception here (a Prefect timeout, a cancel) also
    stops the tree, so no command outlives its caller.
    """
    t0 = time.monotonic()
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out: list[str] = []
    err_tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    try:
        timed_out = _pump(proc, t0, timeout_s, out, err_tail, on_line)
    finally:
        if proc.poll() is None:
            stop_tree(proc.pid)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    took = time.monotonic() - t0
    tail = "\n".join(err_tail) or "(no stderr)"
    if timed_out:
        raise CommandError(f"{what} timed out after {timeout_s:.0f} s (stopped) in {cwd}; stderr tail:\n{tail}")
    if proc.returncode != 0:
        raise CommandError(f"{what} failed with exit code {proc.returncode} after {took:.1f} s in {cwd}; "
                           f"stderr tail:\n{tail}")
    return "\n".join(out)


def _pump(proc: subprocess.Popen, t0: float, timeout_s: float, out: list[str],
          err_tail: collections.deque[str], on_line: Callable[[str], None] | None) -> bool:
    """Read both pipes until they close (or the deadline); returns whether the deadline passed."""
    sel = selectors.DefaultSelector()
    bufs = {"out": b"", "err": b""}
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    drain_until = None  # a background grandchild may hold the pipes open after the command exits
    try:
        while sel.get_map():
            now = time.monotonic()
            if now - t0 > timeout_s:
                return True
            if drain_until is None and proc.poll() is not None:
                drain_until = now + 5
            elif drain_until is not None and now > drain_until:
                break
            for key, _ in sel.select(timeout=0.5):  # short waits: the caller can be interrupted between them
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    chunk = b"\n" if bufs[key.data] else b""
                lines, bufs[key.data] = complete_lines(bufs[key.data] + chunk)
                for line in filter(None, lines):
                    (out if key.data == "out" else err_tail).append(line)
                    if on_line is not None:
                        on_line(line)
        while proc.poll() is None:
            if time.monotonic() - t0 > timeout_s:
                return True
            time.sleep(0.2)
        return False
    finally:
        sel.close()
