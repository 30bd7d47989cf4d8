"""Which registered versions take the `champion` alias after an evaluation (stage promote).

For every version that `register` wrote, the evaluation row of the same artifact gives its FD
(row names from the sampler registry, ``fewstep.samplers.row_for_version``); the
evaluation id is the hash of that evaluation (params, the evaluator's weights, the rows). Every
version of a name is a candidate, oldest first; the decision itself (beat the current champion,
re-measured in this same evaluation, by the margin) is ``fewstep.tracking.promote``, passed in.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from fewstep import storage
from fewstep.samplers import row_for_version


def evaluation_id(evaluate_params: Mapping[str, Any], rows: Mapping[str, Any], evaluator_config: Path) -> str:
    """16 hex digits naming one evaluation: its params, its row names and the evaluator's weights."""
    return storage.sha256_json({"evaluate": dict(evaluate_params), "rows": sorted(rows),
                                "evaluator": storage.read_json(evaluator_config)["weights_sha256"]
                                if evaluator_config.exists() else None})[:16]


def promote_versions(versions: Sequence[Mapping[str, Any]], rows: Mapping[str, Mapping[str, Any]], eval_id: str,
                     margin: float, partial: bool, promote: Callable[..., Any],
                     log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One decision per candidate version (the evaluator itself is skipped: it has no FD).
    ``promote(name, version, fd, eval_id, margin=, remeasured=, partial=)`` returns an object with
    ``decision``, ``reason`` and ``champion_version`` (fewstep.tracking.promote)."""
    by_name: dict[str, list[Mapping[str, Any]]] = {}
    for v in versions:
        if v.get("role") == "evaluator":  # measures the others; it has no FD of its own to promote on
            continue
        by_name.setdefault(v["name"], []).append(v)
    decisions = []
    for name, vs in by_name.items():
        fds = {v["version"]: rows.get(row_for_version(v), {}).get("fd") for v in vs}
        remeasured = {k: f for k, f in fds.items() if f is not None and math.isfinite(f)}
        for cand in sorted(vs, key=lambda v: int(v["version"])):
            res = promote(name, cand["version"], fds.get(cand["version"]), eval_id, margin=margin,
                          remeasured=remeasured, partial=partial)
            decisions.append({"name": name, "candidate": cand["version"], "decision": res.decision,
                              "reason": res.reason, "champion": res.champion_version,
                              "candidate_fd": fds.get(cand["version"])})
            (log or (lambda s: print(s, file=sys.stderr)))(
                f"{name} v{cand['version']}: {res.decision} ({res.reason})")
    return decisions
