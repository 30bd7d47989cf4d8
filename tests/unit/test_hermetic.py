"""The session's hermetic check (tests/conftest.py) sees what it must: a write into a guarded store
and a process of this session that is still alive."""

import os
import subprocess
import sys

from tests.hermetic import SESSION_MARK, session_processes, snapshot, snapshot_diff


def test_snapshot_sees_created_modified_and_deleted_store_files(tmp_path):
    (tmp_path / "models" / "teacher").mkdir(parents=True)
    (tmp_path / "models" / "teacher" / "w.bin").write_bytes(b"1")
    (tmp_path / "unrelated.txt").write_text("x")
    before = snapshot(tmp_path)
    assert snapshot_diff(before, snapshot(tmp_path)) == []
    (tmp_path / "unrelated.txt").write_text("changed")  # not a store
    (tmp_path / "mlflow.db").write_bytes(b"runs")
    (tmp_path / "mlartifacts").mkdir()
    os.utime(tmp_path / "models" / "teacher" / "w.bin", ns=(1, 1))
    assert snapshot_diff(before, snapshot(tmp_path)) == ["mlartifacts", "mlflow.db", "models/teacher/w.bin"]
    (tmp_path / "models" / "teacher" / "w.bin").unlink()
    assert "models/teacher/w.bin" in snapshot_diff(before, snapshot(tmp_path))


def test_a_live_process_of_the_session_is_found_and_a_finished_one_is_not():
    mark = os.environ[SESSION_MARK]
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert proc.pid in {p.pid for p in session_processes(mark)}
        assert proc.pid not in {p.pid for p in session_processes(mark + "-other")}
    finally:
        proc.kill()
        proc.wait(10)
    assert proc.pid not in {p.pid for p in session_processes(mark)}
