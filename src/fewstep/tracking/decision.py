"""The champion decision: pure, no MLflow (importable and testable without it).

A candidate takes the champion alias only on a complete evaluation whose FD beats the champion's,
measured in the same evaluation, by the relative ``margin`` (lower FD is better).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

Decision = Literal["promoted", "kept", "rejected", "held", "unchanged"]


@dataclass(frozen=True)
class ChampionState:
    """The current alias holder: its version, recorded FD and the evaluation that measured it."""

    version: str
    fd: float | None
    evaluation_id: str | None


def finite(x: Any) -> bool:
    """Whether ``x`` is a finite number (None, NaN, inf and non-numbers are not)."""
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def fmt(x: float | None) -> str:
    """A float as a tag value ('' for None)."""
    return "" if x is None else repr(float(x))


def decide(
    candidate_version: str,
    candidate_fd: float | None,
    evaluation_id: str,
    champion: ChampionState | None,
    margin: float,
    remeasured: Mapping[str, float],
    partial: bool = False,
) -> tuple[Decision, str, float | None]:
    """(decision, reason, champion FD used). Pure: no I/O. Lower FD is better; the candidate must
    beat the champion's FD from the same evaluation by the relative ``margin``:
    promoted iff FD_cand < FD_champ * (1 - margin).

    The champion's FD is ``remeasured[champion.version]`` when given, else its recorded FD when
    that was measured in ``evaluation_id``; otherwise the decision is "held". A partial evaluation
    or a missing / non-finite candidate FD is "rejected"; with no champion the candidate is promoted."""
    if partial or not finite(candidate_fd):
        why = "partial evaluation" if partial else f"candidate FD {candidate_fd!r} is missing or not finite"
        return "rejected", why, None
    if champion is None:
        return "promoted", "no champion yet", None
    if champion.version == candidate_version:
        return "unchanged", "candidate is already the champion", float(candidate_fd)
    if champion.version in remeasured:
        champ_fd = remeasured[champion.version]
        if not finite(champ_fd):
            return "rejected", f"champion v{champion.version} re-measurement {champ_fd!r} is not finite", None
        source = "re-measured in this evaluation"
    elif champion.evaluation_id == evaluation_id and finite(champion.fd):
        champ_fd, source = champion.fd, "recorded for this evaluation"
    else:
        return ("held", f"champion v{champion.version} was evaluated on {champion.evaluation_id!r}, not "
                f"{evaluation_id!r}; pass its FD re-measured in {evaluation_id!r} as remeasured={{'"
                f"{champion.version}': fd}}", None)
    champ_fd = float(champ_fd)
    bar = champ_fd * (1.0 - margin)
    better = float(candidate_fd) < bar
    why = (f"FD {candidate_fd:.6g} {'<' if better else '>='} {bar:.6g} "
           f"(champion {champ_fd:.6g} {source}, margin {margin})")
    return ("promoted" if better else "kept"), why, champ_fd
