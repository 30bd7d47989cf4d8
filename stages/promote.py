"""Stage promote: move each registered sampler's `champion` alias by this evaluation's FD.

For every version that `register` wrote (registry/versions.json), the row of the same artifact in
metrics/evaluate.json gives its FD; the evaluation id is the hash of that evaluation (params, the
evaluator's weights, the sample count). A version takes `champion` only when its FD beats the
current champion's, re-measured in this same evaluation, by promote.margin; a missing row or an
incomplete evaluation never moves an alias (fewstep.tracking.promote records why).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from fewstep import settings, storage
from stages import _common


def row_for(version: dict) -> str | None:
    """The evaluate row of a registered version (row names from fewstep.evaluation.build_rows)."""
    name, role, nfe = version["name"], version.get("role"), version.get("nfe")
    if role == "teacher":  # the teacher, a patch-study teacher (teacher-p<P>) or a split model
        return f"{version.get('model') or 'teacher'} ddim {nfe}"
    if role == "student":
        model = name.split("-", 1)[1].removesuffix("step")  # <dataset>-student-<k>step -> student-<k>
        return f"{model} ddim {nfe}"
    if role == "olss" and version.get("scheduler_file"):  # each variant is its own row
        return f"{version['model']} {Path(version['scheduler_file']).stem}"
    return None


def main() -> None:
    ap = _common.parser(__doc__)
    ap.add_argument("--versions", default="registry/versions.json")
    ap.add_argument("--evaluation", default="metrics/evaluate.json")
    ap.add_argument("--out", default="registry/promotions.json")
    args = ap.parse_args()
    with _common.clear_errors("promote") as rec:
        p, _ = _common.setup(args)
        from fewstep import tracking

        env = settings.current()
        t = tracking.configure(experiment=env.experiment, artifact_root=env.artifact_root)

        ev = storage.read_json(args.evaluation)
        rows = ev.get("rows", {})
        partial = ev.get("n_samples") != p.evaluate.n_samples or not rows
        evaluator_cfg = Path("models/evaluator/config.json")
        eval_id = storage.sha256_json({"evaluate": p.evaluate.model_dump(), "rows": sorted(rows),
                                       "evaluator": storage.read_json(evaluator_cfg)["weights_sha256"]
                                       if evaluator_cfg.exists() else None})[:16]
        versions = storage.read_json(args.versions)["versions"]
        by_name: dict[str, list[dict]] = {}
        for v in versions:
            if v.get("role") == "evaluator":  # measures the others; it has no FD of its own to promote on
                continue
            by_name.setdefault(v["name"], []).append(v)
        decisions = []
        for name, vs in by_name.items():
            fds = {v["version"]: rows.get(row_for(v), {}).get("fd") for v in vs}
            remeasured = {k: f for k, f in fds.items() if f is not None and math.isfinite(f)}
            # every version of a name (e.g. the OLSS variants) is a candidate, oldest first
            for cand in sorted(vs, key=lambda v: int(v["version"])):
                res = tracking.promote(name, cand["version"], fds.get(cand["version"]), eval_id,
                                       margin=p.promote.margin, remeasured=remeasured, partial=partial,
                                       tracking=t)
                decisions.append({"name": name, "candidate": cand["version"], "decision": res.decision,
                                  "reason": res.reason, "champion": res.champion_version,
                                  "candidate_fd": fds.get(cand["version"])})
                print(f"promote: {name} v{cand['version']}: {res.decision} ({res.reason})", file=sys.stderr)
        storage.write_json(args.out, {"evaluation_id": eval_id, "decisions": decisions})
        rec.set_tags(evaluation_id=eval_id, partial_evaluation=partial)
        rec.log_metrics({"candidates": len(decisions),
                         "promoted": sum(d["decision"] == "promoted" for d in decisions)})


if __name__ == "__main__":
    main()
