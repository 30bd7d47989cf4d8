"""Champion promotion: move a registered model's ``champion`` alias by the pure rule of
:mod:`fewstep.tracking.decision`, recording every decision on the candidate version."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping

from fewstep.tracking.decision import ChampionState, decide, finite, fmt
from fewstep.tracking.names import CHAMPION
from fewstep.tracking.store import Tracking, configure, store_lock


@dataclass(frozen=True)
class Promotion:
    name: str
    candidate_version: str
    decision: str  # promoted | kept | rejected | held | unchanged
    reason: str
    evaluation_id: str
    candidate_fd: float | None
    champion_fd: float | None  # the FD the candidate was compared with
    previous_champion: str | None
    champion_version: str | None  # the alias holder when promote returned

    @property
    def promoted(self) -> bool:
        return self.decision == "promoted"


def _alias_version(t: Tracking, name: str, alias: str) -> str | None:
    v = t.client.get_registered_model(name).aliases.get(alias)
    return None if v is None else str(v)


def champion(name: str, alias: str = CHAMPION, tracking: Tracking | None = None):
    """The ModelVersion holding ``alias`` or None."""
    t = tracking or configure()
    v = _alias_version(t, name, alias)
    return None if v is None else t.client.get_model_version(name, v)


def _read_champion(t: Tracking, name: str, alias: str) -> ChampionState | None:
    v = _alias_version(t, name, alias)
    if v is None:
        return None
    tags = t.client.get_model_version(name, v).tags
    fd = float(tags["fd"]) if finite(tags.get("fd")) else None
    return ChampionState(v, fd, tags.get("evaluation_id"))


def _set_version_tags(t: Tracking, name: str, version: str, tags: Mapping[str, Any]) -> None:
    for k, v in tags.items():
        t.client.set_model_version_tag(name, version, k, "" if v is None else str(v))


def _sync_champion_tags(t: Tracking, name: str, alias: str, rounds: int = 5) -> None:
    """Registered-model tags champion.version/fd/evaluation_id mirror the alias holder's tags."""
    for _ in range(rounds):
        champ = _read_champion(t, name, alias)
        if champ is None:
            return
        for k, v in (("version", champ.version), ("fd", fmt(champ.fd)), ("evaluation_id", champ.evaluation_id)):
            t.client.set_registered_model_tag(name, f"{alias}.{k}", v or "")
        if _alias_version(t, name, alias) == champ.version:
            return


def promote(
    name: str,
    candidate_version: str | int,
    candidate_fd: float | None,
    evaluation_id: str,
    *,
    margin: float,
    remeasured: Mapping[str | int, float] | None = None,
    partial: bool = False,
    alias: str = CHAMPION,
    settle_s: float = 0.2,
    max_rounds: int = 10,
    tracking: Tracking | None = None,
) -> Promotion:
    """Move ``alias`` of registered model ``name`` to ``candidate_version`` if its FD beats the
    champion's by the relative ``margin``, both measured in evaluation ``evaluation_id``.

    The champion's FD comes from ``remeasured[champion_version]`` (the FD of the current champion
    re-measured in this evaluation; required when its recorded evaluation_id tag differs) or from its
    tags when they carry this evaluation id; otherwise the decision is "held" and nothing moves.
    A partial evaluation (``partial=True``) or a missing / non-finite FD never moves the alias. With
    no champion yet the candidate becomes champion.

    Recorded on the candidate version: fd + evaluation_id (valid measurements only) and
    promotion.{decision, reason, evaluation_id, candidate_fd, champion_fd, champion_version, margin,
    time}; on the registered model: <alias>.{version, fd, evaluation_id} of the holder.

    Concurrency: with a local SQLite store the whole read-decide-write runs under a file lock. For
    any store the alias is re-read before and after it is set; if another process changed it the
    decision is taken again against the new champion (optimistic; without the lock a very narrow
    window remains, since MLflow has no compare-and-set on aliases)."""
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin is a relative improvement in [0, 1), got {margin}")
    t = tracking or configure()
    cand = str(candidate_version)
    t.client.get_model_version(name, cand)  # fails clearly on an unknown version
    remeasured = {str(k): v for k, v in (remeasured or {}).items()}
    valid = not partial and finite(candidate_fd)
    with store_lock(t.uri) as locked:
        if valid:
            _set_version_tags(t, name, cand, {"fd": fmt(candidate_fd), "evaluation_id": evaluation_id})
        champ, decision, reason, champ_fd = _decide_and_move(t, name, alias, cand, candidate_fd, evaluation_id,
                                                             margin, remeasured, partial, locked, settle_s, max_rounds)
        before = champ.version if champ else None
        if champ is not None and champ.version in remeasured and finite(remeasured[champ.version]) \
                and decision in ("promoted", "kept"):
            # the champion's FD measured in this evaluation is now its latest valid measurement
            _set_version_tags(t, name, champ.version, {"fd": fmt(remeasured[champ.version]),
                                                        "evaluation_id": evaluation_id})
        _set_version_tags(t, name, cand, {
            "promotion.decision": decision, "promotion.reason": reason, "promotion.evaluation_id": evaluation_id,
            "promotion.candidate_fd": fmt(candidate_fd) if finite(candidate_fd) else str(candidate_fd),
            "promotion.champion_fd": fmt(champ_fd), "promotion.champion_version": before or "",
            "promotion.margin": repr(float(margin)), "promotion.partial": str(bool(partial)).lower(),
            "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        _sync_champion_tags(t, name, alias)
        holder = _alias_version(t, name, alias)
    return Promotion(name, cand, decision, reason, evaluation_id, float(candidate_fd) if valid else None, champ_fd,
                     before, holder)


def _decide_and_move(t: Tracking, name: str, alias: str, cand: str, candidate_fd: float | None, evaluation_id: str,
                     margin: float, remeasured: Mapping[str, float], partial: bool, locked: bool, settle_s: float,
                     max_rounds: int) -> tuple[ChampionState | None, str, str, float | None]:
    """Decide against the current champion and move the alias on "promoted"; when the alias changed
    meanwhile (another process), decide again against the new holder."""
    for _ in range(max_rounds):
        champ = _read_champion(t, name, alias)
        before = champ.version if champ else None
        decision, reason, champ_fd = decide(cand, candidate_fd, evaluation_id, champ, margin, remeasured, partial)
        if decision == "promoted":
            if _alias_version(t, name, alias) != before:
                continue  # changed while we decided
            t.client.set_registered_model_alias(name, alias, cand)
            if not locked and settle_s:
                time.sleep(settle_s)
            if _alias_version(t, name, alias) != cand:
                continue  # another promotion moved it after us: decide again against it
        elif _alias_version(t, name, alias) != before:
            continue
        return champ, decision, reason, champ_fd
    raise RuntimeError(f"{name}@{alias} kept changing during {max_rounds} promotion rounds")
