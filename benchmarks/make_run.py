"""`make run` from a fresh clone, timed end to end (issue 19.2: under 15 minutes on 2 cores, install included).

Clones the repository (its committed HEAD) into DIR (whose parent must hold ``shared/`` with the
CIFAR-10 tarballs, as the default's ``../shared/data`` paths expect), runs ``make run`` there, and
writes what the run took: the whole wall time, the install (until the first stage's MLflow run
started), every stage's wall time from its MLflow run (as benchmarks/stage_times.py reads them), and
the rest (DVC and each stage process's start between the stages).

    python benchmarks/make_run.py /work/fresh-clone                  # clone, run, write the JSON
    python benchmarks/make_run.py /work/fresh-clone --collect --started EPOCH --ended EPOCH
                                                                      # a clone already run by hand

Run it alone on the machine: the point is the time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def stage_runs(db: Path) -> list[tuple[str, float, float]]:
    """(stage, start s, end s) of the newest FINISHED MLflow run of each stage in a clone's SQLite store."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT t.value, r.start_time, r.end_time FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE t.key = 'fewstep.stage' AND r.status = 'FINISHED' AND t.value != 'pipeline' "
            "ORDER BY r.start_time DESC").fetchall()
    finally:
        con.close()
    newest: dict[str, tuple[float, float]] = {}
    for stage, start, end in rows:
        newest.setdefault(stage, (start / 1000.0, end / 1000.0))
    return sorted(((s, a, b) for s, (a, b) in newest.items()), key=lambda r: r[1])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect(clone: Path, started: float, ended: float, rc: int | None = None) -> dict[str, Any]:
    runs = stage_runs(clone / "mlflow.db")
    if not runs:
        raise SystemExit(f"make_run: error: no finished stage runs in {clone / 'mlflow.db'}")
    stages = {s: b - a for s, a, b in runs}
    install = runs[0][1] - started
    total = ended - started
    head = subprocess.run(["git", "-C", str(clone), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    return {"date": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": head, "cpu": cpu_name(), "cores": os.cpu_count(),
            "rc": rc, "total_s": total, "install_s": install, "stages_s": sum(stages.values()),
            "between_stages_s": total - install - sum(stages.values()), "stages": stages}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path, help="the fresh clone's directory (must not exist unless --collect)")
    ap.add_argument("--collect", action="store_true", help="only read back a clone that already ran")
    ap.add_argument("--started", type=float, default=None, help="with --collect: the run's start (epoch s)")
    ap.add_argument("--ended", type=float, default=None, help="with --collect: the run's end (epoch s)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "make_run.json")
    a = ap.parse_args(argv)
    if a.collect:
        if a.started is None or a.ended is None:
            ap.error("--collect needs --started and --ended")
        out = collect(a.dir, a.started, a.ended)
    else:
        if a.dir.exists():
            ap.error(f"{a.dir} exists; give a new directory")
        if not (a.dir.resolve().parent / "shared").is_dir():
            ap.error(f"{a.dir.resolve().parent / 'shared'} is missing: the default reads ../shared/data")
        subprocess.run(["git", "clone", "-q", str(ROOT), str(a.dir)], check=True)
        started = time.time()
        rc = subprocess.run(["make", "run"], cwd=a.dir).returncode
        out = collect(a.dir, started, time.time(), rc)
    print(f"make run: {out['total_s']:.0f} s ({out['total_s'] / 60:.1f} min): install {out['install_s']:.0f} s, "
          f"stages {out['stages_s']:.0f} s, between stages {out['between_stages_s']:.0f} s")
    for s, sec in out["stages"].items():
        print(f"  {s:<32} {sec:7.1f} s")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.json}")
    if out.get("rc"):
        sys.exit(out["rc"])
    return out


if __name__ == "__main__":
    main()
