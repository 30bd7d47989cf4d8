"""How small a difference the evaluation can rank (issue 18.7): unpaired vs paired, FD and KID.

    python benchmarks/rank_resolution.py [--models models] [--schedulers schedulers] [--n 2000]
        [--cache /tmp/rank_feats.npz] [--out benchmarks/rank_resolution.json]

Samples every ranked row of the evaluation (fewstep.evaluation.is_headline: the teacher's DDIM at the
reference and the students' steps, the students, every OLSS variant) on seeds evaluate.seed.. exactly
as the evaluate stage does, takes evaluator features (cached in ``--cache``, so the analysis reruns
in seconds) and, at n = n/4, n/2 and n (the first images of the same seeds), measures for each row
against the reference row (the teacher's reference-steps DDIM):

- FD unpaired: the two 95% bootstrap intervals stop overlapping once |FD_a - FD_ref| exceeds the sum
  of their half-widths, so the resolvable relative difference is (hw_a + hw_ref) / FD_ref;
- FD paired: the joint bootstrap of FD_a - FD_ref (same image indices): half-width / FD_ref;
- KID unpaired (z-test on each row's standard error): 2 sqrt(se_a^2 + se_ref^2) / KID_ref;
- KID paired: 2 se(KID_a - KID_ref) / KID_ref.

Then the median and worst over rows, the exponent of resolution ~ n^-alpha fitted over the three n,
and the n at which the worst row resolves 5%: n_5% = n (res_n / 0.05)^(1 / alpha). Also the CPU
seconds of scoring one row the old way (FD interval, subset KID) and the new way (plus KID's
influence and the paired blocks), so the evaluate stage's cost is known.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fewstep import samplers  # noqa: E402
from fewstep.config import load_params  # noqa: E402
from fewstep.evaluation import Resampled, build_rows, feature_scores, is_headline, paired_scores, run_row  # noqa: E402
from fewstep.math import metrics as M  # noqa: E402
from fewstep.progress import progress  # noqa: E402
from fewstep.train.evaluator import features, load_evaluator  # noqa: E402

TARGET = 0.05


def sample_features(models: Path, schedulers: Path, ep, n: int, cache: Path,
                    only: list[str] | None = None) -> dict[str, np.ndarray]:
    """Evaluator features of every ranked row (or of the ranked rows named in ``only``) on seeds
    ep.seed..ep.seed+n-1; ``cache`` (npz) keeps each row as soon as it is sampled, and rows it holds
    at this n are not sampled again."""
    out: dict[str, np.ndarray] = {}
    if cache.exists():
        z = np.load(cache)
        out = {k: z[k][:n] for k in z.files if len(z[k]) >= n}
    dev = torch.device("cpu")
    evaluator, _ = load_evaluator(models / "evaluator", dev)
    rows, dens = build_rows(models, schedulers, ep, dev)
    teacher = dens["teacher"]
    n_ref = min(ep.reference_steps, teacher.schedule.T)
    steps = {r.nfe for r in rows if r.family == "student"}
    heads = [r for r in rows if is_headline(r, n_ref, steps) and (only is None or r.name in only)]
    seeds = list(range(ep.seed, ep.seed + n))
    bar = progress([r for r in heads if r.name not in out], desc="sample ranked rows")
    for r in bar:
        images, _ = run_row(r, seeds, teacher.card.image_shape, ep.batch_size, dev)
        out[r.name] = features(evaluator, images)
        bar.set_postfix(row=r.name)
        np.savez(cache, **out)
    return {r.name: out[r.name] for r in heads}


def _half(lo: float, hi: float) -> float:
    return (hi - lo) / 2


def analyse(feats: dict[str, np.ndarray], stats: dict, ref: str, ep, n: int) -> dict:
    """Per-row resolutions at the first ``n`` images (module docstring) and the CPU seconds of scoring."""
    keep: dict[str, Resampled] = {}
    scores: dict[str, dict] = {}
    t_new = 0.0
    for name, f in feats.items():
        k: list[Resampled] = []
        t0 = time.process_time()
        scores[name] = feature_scores(f[:n], stats, ep.kid_subsets, ep.seed, ep.fd_resamples, k)
        t_new += time.process_time() - t0
        keep[name] = k[0]
    t0 = time.process_time()
    for f in feats.values():  # the scoring as it was: FD interval and the subset KID only
        M.fd_bootstrap(f[:n], stats["mu"], stats["sigma"], resamples=ep.fd_resamples, seed=ep.seed)
        M.kid(f[:n], stats["subset"], subsets=ep.kid_subsets, subset_size=min(1000, n), seed=ep.seed)
    t_old = time.process_time() - t0
    r0 = scores[ref]
    rows = {}
    for name, s in scores.items():
        if name == ref:
            continue
        t0 = time.process_time()
        p = paired_scores(keep[name], keep[ref], ref)
        t_new += time.process_time() - t0
        rows[name] = {
            "fd": s["fd"], "fd_rel_diff": s["fd"] / r0["fd"] - 1, "kid_rel_diff": s["kid"] / r0["kid"] - 1,
            "fd_unpaired": (_half(s["fd_lo"], s["fd_hi"]) + _half(r0["fd_lo"], r0["fd_hi"])) / r0["fd"],
            "fd_paired": _half(p["fd_diff_lo"], p["fd_diff_hi"]) / r0["fd"],
            "kid_unpaired": 2 * math.hypot(s["kid_se"], r0["kid_se"]) / r0["kid"],
            "kid_unpaired_subsets_se": 2 * math.hypot(s["kid_se_subsets"], r0["kid_se_subsets"]) / r0["kid"],
            "kid_paired": 2 * p["kid_diff_se"] / r0["kid"],
            "paired": p,
        }
    methods = ("fd_unpaired", "fd_paired", "kid_unpaired", "kid_paired", "kid_unpaired_subsets_se")
    summary = {m: {"median": statistics.median(r[m] for r in rows.values()), "max": max(r[m] for r in rows.values())}
               for m in methods}
    return {"n": n, "rows": rows, "summary": summary, "cpu_s_scoring": {"old": t_old, "new": t_new}}


def fit_n(results: list[dict], method: str, stat: str) -> dict:
    """resolution ~ c n^-alpha fitted (least squares in logs) over the measured n; n for 5%."""
    ns = np.array([r["n"] for r in results], float)
    res = np.array([r["summary"][method][stat] for r in results])
    alpha = -float(np.polyfit(np.log(ns), np.log(res), 1)[0])
    n_top, r_top = ns[-1], res[-1]
    return {"alpha": alpha, "n_for_5pct": int(math.ceil(n_top * (r_top / TARGET) ** (1 / alpha))) if alpha > 0 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="models")
    ap.add_argument("--schedulers", default="schedulers")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--cache", default="/tmp/rank_resolution_feats.npz")
    ap.add_argument("--out", default="benchmarks/rank_resolution.json")
    ap.add_argument("--rows", nargs="*", help="only these ranked rows (the reference row is always sampled)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ep = load_params(a.params).evaluate
    ref = samplers.row_name("teacher", "ddim", steps=ep.reference_steps)
    only = [*a.rows, ref] if a.rows else None
    feats = sample_features(Path(a.models), Path(a.schedulers), ep, a.n, Path(a.cache), only)
    _, stats = load_evaluator(Path(a.models) / "evaluator", torch.device("cpu"))
    results = [analyse(feats, stats, ref, ep, n) for n in (a.n // 4, a.n // 2, a.n)]
    fits = {m: {s: fit_n(results, m, s) for s in ("median", "max")} for m in results[-1]["summary"]}
    top = results[-1]
    print(f"n={top['n']}: smallest relative difference resolvable vs {ref} (median / worst over "
          f"{len(top['rows'])} rows); n for 5% (worst row) from resolution ~ n^-alpha")
    print("| method | " + " | ".join(f"n={r['n']}" for r in results) + " | alpha | n for 5% (worst row) |")
    for m in top["summary"]:
        cells = [f"{100 * r['summary'][m]['median']:.1f}% / {100 * r['summary'][m]['max']:.1f}%" for r in results]
        print(f"| {m} | " + " | ".join(cells) + f" | {fits[m]['max']['alpha']:.2f} | {fits[m]['max']['n_for_5pct']} |")
    print(f"| row | FD vs ref | KID vs ref | FD unpaired | FD paired | KID unpaired | KID paired |")
    for name, r in sorted(top["rows"].items(), key=lambda kv: kv[1]["fd_rel_diff"]):
        print(f"| {name} | {100 * r['fd_rel_diff']:+.1f}% | {100 * r['kid_rel_diff']:+.1f}% | "
              f"{100 * r['fd_unpaired']:.1f}% | {100 * r['fd_paired']:.1f}% | {100 * r['kid_unpaired']:.1f}% | "
              f"{100 * r['kid_paired']:.1f}% |")
    print("CPU s scoring all ranked rows: " + ", ".join(f"n={r['n']} old {r['cpu_s_scoring']['old']:.1f} new "
                                                          f"{r['cpu_s_scoring']['new']:.1f}" for r in results))
    Path(a.out).write_text(json.dumps({"reference": ref, "target": TARGET, "by_n": results, "fits": fits},
                                      indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
