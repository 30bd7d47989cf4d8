"""Stage promote: move each registered sampler's `champion` alias by this evaluation's FD.

For every version that `register` wrote (registry/versions.json), the row of the same artifact in
metrics/evaluate.json gives its FD; the evaluation id is the hash of that evaluation (params, the
evaluator's weights, the sample count). A version takes `champion` only when its FD beats the
current champion's, re-measured in this same evaluation, by promote.margin; a missing row or an
incomplete evaluation never moves an alias (fewstep.tracking.promote records why).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial as partial_fn
from pathlib import Path
from typing import Sequence

from fewstep import storage
from fewstep.champion import evaluation_id, promote_versions
from stages._common import StageContext, run_stage


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--versions", default="registry/versions.json")
    ap.add_argument("--evaluation", default="metrics/evaluate.json")
    ap.add_argument("--out", default="registry/promotions.json")


def body(ctx: StageContext) -> None:
    a, p = ctx.args, ctx.params
    from fewstep import tracking  # imports mlflow (~1 s): only once params are valid

    t = tracking.configure(experiment=ctx.settings.experiment, artifact_root=ctx.settings.artifact_root)
    ev = storage.read_json(a.evaluation)
    rows = ev.get("rows", {})
    partial = ev.get("n_samples") != p.evaluate.n_samples or not rows
    eval_id = evaluation_id(p.evaluate.model_dump(), rows, Path("models/evaluator/config.json"))
    decisions = promote_versions(storage.read_json(a.versions)["versions"], rows, eval_id, p.promote.margin, partial,
                                 partial_fn(tracking.promote, tracking=t),
                                 log=lambda line: print(f"promote: {line}", file=sys.stderr))
    storage.write_json(a.out, {"evaluation_id": eval_id, "decisions": decisions})
    ctx.record.set_tags(evaluation_id=eval_id, partial_evaluation=partial)
    ctx.record.log_metrics({"candidates": len(decisions),
                            "promoted": sum(d["decision"] == "promoted" for d in decisions)})


def main(argv: Sequence[str] | None = None) -> None:
    run_stage("promote", argv, add_args, body)


if __name__ == "__main__":
    main()
