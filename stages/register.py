"""Stage register: every model dir under models/ and every OLSS scheduler under schedulers/ becomes a
pyfunc sampler version in the MLflow registry, tagged with its lineage.

Names: <dataset>-teacher, <dataset>-student-<k>step, <dataset>-olss-<model>-<n>step. Idempotent: a
model whose weights_sha256 (a scheduler whose sha256) is already registered is not registered
again. Parents are registered before their students. The tracking store comes from
MLFLOW_TRACKING_URI (default sqlite:///<cwd>/mlflow.db), the experiment from FEWSTEP_EXPERIMENT,
artifacts from FEWSTEP_ARTIFACT_ROOT (see src/fewstep/settings.py). Writes --out: one line per
version (name, version, created, role, nfe, parent).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Sequence

from fewstep import storage
from stages._common import StageContext, run_stage


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--models", default="models", help="model dirs (each with model.safetensors + config.json)")
    ap.add_argument("--schedulers", default="schedulers", help="OLSS schedulers: <dir>/<model>/olss-*.json")
    ap.add_argument("--out", default="registry/versions.json", help="summary of the registered versions")
    ap.add_argument("--repo", default=".", help="repository root (git commit, dvc.lock)")


def _row(r: Any) -> dict[str, Any]:
    return {"name": r.name, "version": r.version, "created": r.created, "role": r.tags.get("role"),
            "nfe": r.tags.get("nfe"), "weights_sha256": r.tags.get("weights_sha256"),
            "model": r.tags.get("model"), "scheduler_file": r.tags.get("scheduler_file"),
            "parent": f"{r.tags['parent_model']}/{r.tags['parent_version']}" if "parent_version" in r.tags else None}


def body(ctx: StageContext) -> None:
    a, p = ctx.args, ctx.params
    if a.no_progress:  # MLflow's own variable, read when it uploads artifacts
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from fewstep import tracking  # imports mlflow (~1 s): only once params are valid

    env = ctx.settings
    t = tracking.configure(experiment=env.experiment, artifact_root=env.artifact_root)
    with tracking.stage_run("register", repo=a.repo, parent_run_id=env.parent_run_id, git_commit=env.git_commit,
                            tracking=t, params={"models": a.models, "schedulers": a.schedulers}) as run:
        # study teachers and split models (teacher-*) sample by default at evaluate's largest study row
        steps = {d.name: max(p.evaluate.study_steps) for d in Path(a.models).glob("teacher-*")
                 if p.evaluate.study_steps}
        regs = tracking.register_all(a.models, a.schedulers, run_id=run.run_id, repo=a.repo,
                                     default_steps={**steps, "teacher": p.teacher.sample.steps},
                                     dataset=p.base.dataset, git_commit=env.git_commit, tracking=t)
        run.log_metrics({"versions": len(regs), "created": sum(r.created for r in regs)})
    rows = [_row(r) for r in regs]
    storage.write_json(Path(a.out), {"tracking_uri": t.uri, "run_id": run.run_id, "versions": rows})
    for r in rows:
        print(f"register: {r['name']} v{r['version']} ({'new' if r['created'] else 'unchanged'})"
              + (f" <- {r['parent']}" if r["parent"] else ""))


def main(argv: Sequence[str] | None = None) -> None:
    run_stage("register", argv, add_args, body, track=False)


if __name__ == "__main__":
    main()
