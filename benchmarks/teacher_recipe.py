"""Two teachers scored in one run: the same seeds, the same DDIM steps, the same evaluator, equal n (issue 19.2).

A recipe change is claimed only as measured here: both teachers sample image i from the same x_T
(seed evaluate.seed + i), so FD(candidate) / FD(baseline) gets a paired 95% basic-bootstrap interval
from the joint resampling of the same image indices (math.metrics.fd_resampled), beside each FD's own
interval. The evaluator is one model dir for both (its feature space names the verdict).

    python benchmarks/teacher_recipe.py --baseline OLD_TEACHER_DIR          # vs models/teacher
    python benchmarks/teacher_recipe.py --baseline A --candidate B --evaluator E --n 500 --steps 64 \\
        --json benchmarks/results/teacher_recipe.json

A baseline that is no longer in the work tree comes back from the DVC cache: `git show
<commit>:dvc.lock` names its md5, or `git checkout <commit> -- dvc.lock && dvc checkout train_teacher`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep import models, samplers
from fewstep.evaluation import feature_scores
from fewstep.math import metrics as M

ROOT = Path(__file__).resolve().parents[1]


def paired_ratio(a: tuple[float, np.ndarray], b: tuple[float, np.ndarray], level: float = 0.95
                 ) -> tuple[float, float, float]:
    """FD(a) / FD(b) and its basic-bootstrap interval from two fd_resampled results on the same indices."""
    (fa, va), (fb, vb) = a, b
    if len(va) != len(vb):
        raise ValueError(f"a paired ratio needs the same resamples, got {len(va)} and {len(vb)}")
    ratio = fa / fb
    lo, hi = M.basic_interval(ratio, np.asarray(va) / np.asarray(vb), level)
    return ratio, lo, hi


CONFIDENT = 0.9  # "recognisable": the evaluator gives one class at least this softmax probability


@torch.no_grad()
def confident_fraction(evaluator: torch.nn.Module, feats: np.ndarray, threshold: float = CONFIDENT) -> float:
    """The fraction of images whose evaluator softmax puts >= ``threshold`` on one class: a proxy for
    "recognisable as one of the classes", read beside the same fraction for real images."""
    logits = evaluator.head(torch.as_tensor(feats, dtype=torch.float32))
    return float((logits.softmax(1).max(1).values >= threshold).float().mean())


def describe(card: models.ModelCard) -> dict[str, Any]:
    arch = getattr(card.arch, "cfg", None)
    return {"parameterization": card.parameterization, "weighting": card.weighting,
            "train_steps": card.lineage.train_steps if card.lineage else None,
            "net": None if arch is None else {"patch_size": arch.patch_size, "channels": arch.channels,
                                               "channel_mult": list(arch.channel_mult),
                                               "num_res_blocks": arch.num_res_blocks}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, required=True, help="the teacher model dir to beat")
    ap.add_argument("--candidate", type=Path, default=ROOT / "models" / "teacher")
    ap.add_argument("--evaluator", type=Path, default=ROOT / "models" / "evaluator")
    ap.add_argument("--n", type=int, default=500, help="samples per teacher (equal n)")
    ap.add_argument("--steps", type=int, default=64, help="DDIM steps")
    ap.add_argument("--seed", type=int, default=0, help="image i uses seed seed + i (both teachers)")
    ap.add_argument("--resamples", type=int, default=200, help="bootstrap resamples")
    ap.add_argument("--kid-subsets", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label", nargs=2, default=("baseline", "candidate"), metavar=("BASELINE", "CANDIDATE"))
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    for d in (a.baseline, a.candidate, a.evaluator):
        if not d.is_dir():
            ap.error(f"{d} is not a directory")
    if a.n < 2 or a.resamples < 2:
        ap.error("--n and --resamples must be >= 2")
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    from fewstep.train.evaluator import features, load_evaluator

    evaluator, stats = load_evaluator(a.evaluator)
    seeds = list(range(a.seed, a.seed + a.n))
    rows: dict[str, dict[str, Any]] = {}
    kept: dict[str, tuple[float, np.ndarray]] = {}
    for label, d in zip(a.label, (a.baseline, a.candidate)):
        den = models.load_denoiser(d)
        imgs = samplers.generate("ddim", den, seeds, den.card.image_shape, steps=a.steps, batch_size=a.batch_size)
        f = features(evaluator, imgs.clamp(-1, 1))
        s = feature_scores(f, stats, a.kid_subsets, a.seed, resamples=a.resamples)
        kept[label] = M.fd_resampled(f, stats["mu"], stats["sigma"], resamples=a.resamples, seed=a.seed)
        rows[label] = {"dir": str(d), **describe(den.card), **s, "confident": confident_fraction(evaluator, f)}
    real_confident = confident_fraction(evaluator, stats["subset"])
    b, c = a.label
    ratio, lo, hi = paired_ratio(kept[c], kept[b])
    diff, dlo, dhi = M.fd_diff_interval(kept[c], kept[b])
    print(f"# {c} vs {b}: DDIM {a.steps} steps, n = {a.n} on the same seeds, evaluator {a.evaluator}")
    print(f"| teacher | parameterisation | train steps | FD [95% interval] | KID ± s.e. | p >= {CONFIDENT} |")
    print("|---|---|---:|---|---|---:|")
    for k, r in rows.items():
        print(f"| {k} ({r['dir']}) | {r['parameterization']} | {r['train_steps']} | {r['fd']:.3f} "
              f"[{r['fd_lo']:.3f}, {r['fd_hi']:.3f}] | {r['kid']:.4f} ± {r['kid_se']:.4f} | {r['confident']:.3f} |")
    print(f"| real training images (the evaluator's reference subset) | | | | | {real_confident:.3f} |")
    print(f"\nFD({c}) / FD({b}) = {ratio:.3f} [{lo:.3f}, {hi:.3f}] (paired 95%); "
          f"FD({b}) / FD({c}) = {1 / ratio:.2f}x; FD difference {diff:.3f} [{dlo:.3f}, {dhi:.3f}]")
    payload = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "n": a.n, "steps": a.steps, "seed": a.seed,
               "resamples": a.resamples, "evaluator": str(a.evaluator), "rows": rows,
               "confident_threshold": CONFIDENT, "real_confident": real_confident,
               "ratio": {"candidate_over_baseline": ratio, "lo": lo, "hi": hi, "improvement": 1 / ratio},
               "fd_diff": {"diff": diff, "lo": dlo, "hi": dhi},
               "argv": sys.argv[1:] if argv is None else list(argv)}
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(payload, indent=2, default=float) + "\n")
        print(f"wrote {a.json}")
    return payload


if __name__ == "__main__":
    main()
