"""Which of two evaluated rows is better, and only where their uncertainty says so.

A row (one entry of metrics/evaluate.json's ``rows``, or its ``headline`` block) carries ``n``,
``fd`` with its 95% bootstrap interval ``fd_lo``/``fd_hi``, ``kid`` with its standard error
``kid_se`` and ``rmse`` with ``rmse_lo``/``rmse_hi``. FD depends on n (small-sample bias), so two
rows are compared only at equal n. Used by the evaluation report and by benchmarks/readme.py, so
that no generated sentence claims an order the intervals do not support. Plain Python: no numpy.

Two ways to compare, FD and KID each judged on its own (:func:`verdicts`):

- unpaired: FD when the two 95% intervals do not overlap; KID by a z-test, the difference larger
  than 2 combined standard errors, 2 sqrt(kid_se_a^2 + kid_se_b^2).
- paired: rows sampled from the same x_T seeds at equal n carry ``paired`` (against the reference
  row, fewstep.evaluation.paired_scores): FD(a) - FD(b) with its joint-bootstrap 95% interval
  (``fd_diff_lo``/``fd_diff_hi``, resampling the same image indices for both rows) and KID(a) -
  KID(b) with its paired standard error (``kid_diff_se``). Better or worse where that interval
  excludes 0, or |kid_diff| > 2 kid_diff_se. The rows are strongly correlated image by image, so
  this resolves differences several times smaller than the unpaired test
  (benchmarks/rank_resolution.py measures both).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Mapping

from fewstep.errors import UserError

Key = Literal["fd", "kid", "rmse"]
Verdict = Literal["better", "worse", "within noise"]
Z95 = 1.959963984540054  # two-sided 95% normal quantile, for KID's interval in tables
Z_CLAIM = 2.0  # a KID difference is claimed beyond 2 standard errors of the difference (~95.4%, two-sided)
WITHIN_NOISE = "within noise"


class IncomparableError(UserError, ValueError):
    """Two rows scored at different sample counts (FD is comparable only at equal n)."""


def interval(row: Mapping[str, Any], key: Key = "fd") -> tuple[float, float] | None:
    """(lo, hi) of ``key`` for ``row``: the stored bootstrap interval for fd and rmse, mean +- 1.96
    standard errors for kid; None when the row has none (metrics from before intervals existed)."""
    if key == "kid":
        if row.get("kid_se") is None:
            return None
        return row["kid"] - Z95 * row["kid_se"], row["kid"] + Z95 * row["kid_se"]
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    return None if lo is None or hi is None else (float(lo), float(hi))


def separated(a: Mapping[str, Any], b: Mapping[str, Any], key: Key = "fd") -> bool:
    """True when the intervals of ``key`` of rows ``a`` and ``b`` do not overlap (False when either
    has no interval). Raises IncomparableError for FD or KID at different n."""
    if key != "rmse" and a.get("n") != b.get("n"):
        raise IncomparableError(f"{key} is comparable only at equal sample counts, got n={a.get('n')} and "
                                f"n={b.get('n')}")
    if key == "kid":  # unpaired z-test on the standard errors
        if a.get("kid_se") is None or b.get("kid_se") is None:
            return False
        return abs(a["kid"] - b["kid"]) > Z_CLAIM * math.hypot(a["kid_se"], b["kid_se"])
    ia, ib = interval(a, key), interval(b, key)
    if ia is None or ib is None:
        return False
    return ia[1] < ib[0] or ib[1] < ia[0]


def paired_verdict(p: Mapping[str, Any], key: Key = "fd") -> Verdict | None:
    """Row a against p["ref"] from a's ``paired`` block ``p``: FD by the joint-bootstrap interval of
    FD(a) - FD(b), KID by |kid_diff| > 2 kid_diff_se; None when ``p`` has nothing for ``key``."""
    if key == "fd":
        if p.get("fd_diff_lo") is None or p.get("fd_diff_hi") is None:
            return None
        lo, hi = p["fd_diff_lo"], p["fd_diff_hi"]
        return "better" if hi < 0 else "worse" if lo > 0 else WITHIN_NOISE
    if key == "kid":
        if p.get("kid_diff_se") is None:
            return None
        d = p["kid_diff"]
        return WITHIN_NOISE if abs(d) <= Z_CLAIM * p["kid_diff_se"] else "better" if d < 0 else "worse"
    return None


def _pairing(a: Mapping[str, Any], b: Mapping[str, Any], ref: str | None) -> Mapping[str, Any] | None:
    """a's paired block when it is against row ``ref`` at b's n, else None."""
    p = a.get("paired")
    return p if p and ref is not None and p.get("ref") == ref and a.get("n") == b.get("n") else None


def compare(a: Mapping[str, Any], b: Mapping[str, Any], key: Key = "fd", ref: str | None = None) -> Verdict:
    """``a`` against ``b`` on ``key`` (lower is better): better or worse only when their uncertainty
    separates. With ``ref``, b's row name: paired when a carries a paired block against it, else
    unpaired (module docstring)."""
    p = _pairing(a, b, ref)
    v = paired_verdict(p, key) if p else None
    if v is not None:
        return v
    if not separated(a, b, key):
        return WITHIN_NOISE
    return "better" if a[key] < b[key] else "worse"


def claim(a: Mapping[str, Any], b: Mapping[str, Any], name_b: str, key: Key = "fd", ref: str | None = None) -> str:
    """A phrase for ``a`` against ``b``: ``0.89x <name_b>'s FD (better)`` where their uncertainty
    separates (``..., paired)`` when the paired comparison decided, ``ref`` as in compare), else
    ``within noise of <name_b>``; the one way generated text states an order."""
    verdict = compare(a, b, key, ref)
    if verdict == WITHIN_NOISE:
        return f"{WITHIN_NOISE} of {name_b}"
    ratio = a[key] / b[key] if b[key] else float("inf")
    how = ", paired" if (p := _pairing(a, b, ref)) and paired_verdict(p, key) is not None else ""
    return f"{ratio:.2f}x {name_b}'s {key.upper()} ({verdict}{how})"


def verdicts(a: Mapping[str, Any], b: Mapping[str, Any], ref: str | None = None) -> dict[str, Verdict]:
    """FD's and KID's verdicts for ``a`` against ``b``, separately (``ref`` as in compare)."""
    return {"fd": compare(a, b, "fd", ref), "kid": compare(a, b, "kid", ref)}


def separated_pairs(rows: Mapping[str, Mapping[str, Any]], key: Key = "fd",
                    paired: list[Mapping[str, Any]] | None = None) -> list[tuple[str, str]]:
    """(better, worse) for every pair of ``rows`` (name -> scores at one n, e.g. the rows of one NFE)
    whose uncertainty separates, best first: by the paired comparison of the pair when ``paired``
    (metrics/evaluate.json's ``paired_pairs``: a, b, n and the paired block of a against b) has it,
    else by the unpaired one."""
    by_pair = {(p["a"], p["b"]): p for p in paired or []}
    names = sorted(rows, key=lambda k: rows[k][key])
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            p = by_pair.get((a, b))
            q = by_pair.get((b, a))
            if p is not None and p.get("n") == rows[a].get("n") and (v := paired_verdict(p, key)) is not None:
                ok = v != WITHIN_NOISE
                a_first = v == "better"
            elif q is not None and q.get("n") == rows[a].get("n") and (v := paired_verdict(q, key)) is not None:
                ok = v != WITHIN_NOISE
                a_first = v == "worse"
            else:
                ok, a_first = separated(rows[a], rows[b], key), True
            if ok:
                out.append((a, b) if a_first else (b, a))
    return out
