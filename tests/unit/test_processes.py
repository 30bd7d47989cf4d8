"""fewstep.processes, the runner the flows and infra/local share: streamed lines, a clear error with
the stderr tail, and a deadline or an interrupt that stops the whole process tree."""

from __future__ import annotations

import os
import sys
import time

import psutil
import pytest

from fewstep import processes

PY = sys.executable


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_lines_stream_and_a_failure_carries_the_stderr_tail(tmp_path):
    lines: list[str] = []
    code = "import sys; print('a'); sys.stdout.write('10%\\r50%\\r100%\\n'); print('oops', file=sys.stderr)"
    out = processes.run_streamed([PY, "-c", code], cwd=str(tmp_path), env=os.environ, timeout_s=60, what="ok",
                                 on_line=lines.append)
    assert out.splitlines() == ["a", "100%"]  # of a progress bar's \r frames, the last
    assert sorted(lines) == ["100%", "a", "oops"]
    with pytest.raises(processes.CommandError, match=r"(?s)bad failed with exit code 3 .*no such thing"):
        processes.run_streamed([PY, "-c", "import sys; print('no such thing', file=sys.stderr); sys.exit(3)"],
                               cwd=str(tmp_path), env=os.environ, timeout_s=60, what="bad")


def test_a_deadline_stops_the_command_and_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; "
            f"c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
            f"open({str(pid_file)!r}, 'w').write(str(c.pid)); print('started', flush=True); time.sleep(300)")
    t0 = time.monotonic()
    with pytest.raises(processes.CommandError, match="timed out after 3 s"):
        processes.run_streamed([PY, "-c", code], cwd=str(tmp_path), env=os.environ, timeout_s=3, what="slow")
    assert time.monotonic() - t0 < 30
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(child)  # the grandchild did not outlive the command
