"""Which of two evaluated rows is better, and only where their uncertainty says so.

A row (one entry of metrics/evaluate.json's ``rows``, or its ``headline`` block) carries ``n``,
``fd`` with its 95% bootstrap interval ``fd_lo``/``fd_hi``, ``kid`` with its standard error
``kid_se`` and ``rmse`` with ``rmse_lo``/``rmse_hi``. FD depends on n (small-sample bias), so two
rows are compared only at equal n. Used by the evaluation report and by benchmarks/readme.py, so
that no generated sentence claims an order the intervals do not support. Plain Python: no numpy.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

from fewstep.errors import UserError

Key = Literal["fd", "kid", "rmse"]
Z95 = 1.959963984540054  # two-sided 95% normal quantile, for KID's standard error
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
    ia, ib = interval(a, key), interval(b, key)
    if ia is None or ib is None:
        return False
    return ia[1] < ib[0] or ib[1] < ia[0]


def compare(a: Mapping[str, Any], b: Mapping[str, Any], key: Key = "fd") -> Literal["better", "worse", "within noise"]:
    """``a`` against ``b`` on ``key`` (lower is better): better or worse only when separated."""
    if not separated(a, b, key):
        return WITHIN_NOISE
    return "better" if a[key] < b[key] else "worse"


def claim(a: Mapping[str, Any], b: Mapping[str, Any], name_b: str, key: Key = "fd") -> str:
    """A phrase for ``a`` against ``b``: ``0.89x <name_b>'s FD`` where the intervals separate, else
    ``within noise of <name_b>``; the one way generated text states an order."""
    verdict = compare(a, b, key)
    if verdict == WITHIN_NOISE:
        return f"{WITHIN_NOISE} of {name_b}"
    ratio = a[key] / b[key] if b[key] else float("inf")
    return f"{ratio:.2f}x {name_b}'s {key.upper()} ({verdict})"


def separated_pairs(rows: Mapping[str, Mapping[str, Any]], key: Key = "fd") -> list[tuple[str, str]]:
    """(better, worse) for every pair of ``rows`` (name -> scores at one n, e.g. the rows of one NFE)
    whose intervals separate, best first."""
    names = sorted(rows, key=lambda k: rows[k][key])
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if separated(rows[a], rows[b], key)]
