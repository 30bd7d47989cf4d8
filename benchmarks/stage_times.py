"""Per-stage wall time of the last pipeline run, read back from the MLflow stage runs.

Every stage records its run when it ends (stages/_common.py), with its real start and end times,
so the store already holds where the time of a `dvc repro` or a flow run went. This prints, for the
newest FINISHED run of each stage (or of each stage under one pipeline run, ``--pipeline-run``),
its wall time and share, in pipeline order.

    python benchmarks/stage_times.py                         # ./mlflow.db, experiment "fewstep"
    python benchmarks/stage_times.py --since 2026-11-23T19:00 --json stage_times.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["prepare_data", "train_teacher", "distill", "collect_trajectories", "fit_olss", "train_evaluator",
         "evaluate", "register", "promote"]


def _rank(stage: str) -> tuple[int, str]:
    base = stage.split("@", 1)[0]
    return (ORDER.index(base) if base in ORDER else len(ORDER), stage)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db")
    ap.add_argument("--experiment", default=None, help="default: $FEWSTEP_EXPERIMENT or fewstep")
    ap.add_argument("--pipeline-run", default=None, help="only the stage runs nested under this run id")
    ap.add_argument("--since", default=None, help="ISO time: only runs that started after it")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    from fewstep import tracking

    from fewstep import settings

    env = settings.current()
    t = tracking.configure(a.tracking_uri, a.experiment or env.experiment, env.artifact_root)
    flt = ["attributes.status = 'FINISHED'"]
    if a.pipeline_run:
        flt.append(f"tags.`mlflow.parentRunId` = '{a.pipeline_run}'")
    if a.since:
        ms = int(dt.datetime.fromisoformat(a.since).replace(tzinfo=dt.timezone.utc).timestamp() * 1000)
        flt.append(f"attributes.start_time > {ms}")
    runs = t.client.search_runs([t.experiment_id], " and ".join(flt), order_by=["attributes.start_time DESC"],
                                max_results=5000)
    newest: dict[str, object] = {}
    for r in runs:
        stage = r.data.tags.get("fewstep.stage")
        if stage and stage != "pipeline" and stage not in newest:
            newest[stage] = r
    if not newest:
        raise SystemExit(f"no finished stage runs in {t.uri} (experiment {t.experiment})")
    rows = sorted(((s, (r.info.end_time - r.info.start_time) / 1000.0) for s, r in newest.items()),
                  key=lambda x: _rank(x[0]))
    total = sum(s for _, s in rows)
    print(f"stage wall times from {t.uri} (experiment {t.experiment}), newest finished run per stage\n")
    print(f"| {'stage':<32} | {'seconds':>8} | {'share':>6} |")
    print(f"|{'-' * 34}|{'-' * 9}:|{'-' * 7}:|")
    for stage, sec in rows:
        print(f"| {stage:<32} | {sec:8.1f} | {sec / total:6.1%} |")
    print(f"| {'total':<32} | {total:8.1f} | {1:6.1%} |")
    if a.json:
        a.json.write_text(json.dumps({"tracking_uri": t.uri, "stages": dict(rows), "total_s": total}, indent=2))


if __name__ == "__main__":
    main()
