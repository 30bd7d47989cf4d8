"""Stage objective@<variant>-<P>: one teacher of the objective study (eps / x / v prediction under
PDM's sqrt-SNR x weighting and the distillation paper's truncated-SNR and SNR+1 weightings), at
patch size P; variant = <parameterization>-<weighting> (fewstep.math.losses.WEIGHTINGS).

The teacher section overridden by objective.teacher and objective.nets.p<P>. Scores: the
x-prediction MSE on the test split per log-SNR bin (redundancy.* bins, objective.n_test images) and,
when models/evaluator exists and objective.n_samples > 0, FD/KID of DDIM samples at
objective.sample_steps. Outputs: study/objective/<variant>-p<P>/ (model dir, outside models/ so
evaluate and register leave it alone), checkpoints/objective-<variant>-p<P>/,
metrics/objective/<variant>-p<P>.json.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

from fewstep import storage
from fewstep.study import objective_study
from stages._common import StageContext, run_stage


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--variant", required=True, help="<eps|x|v>-<weighting>, one of objective.variants")
    ap.add_argument("--patch-size", type=int, required=True, choices=(1, 2, 4, 8))
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--out", default="study/objective")
    ap.add_argument("--evaluator", default="models/evaluator")


def body(ctx: StageContext) -> None:
    a, p = ctx.args, ctx.params
    name = f"{a.variant}-p{a.patch_size}"
    out = objective_study(p, a.variant, a.patch_size, Path(a.data), Path(a.out) / name,
                          Path("checkpoints") / f"objective-{name}", Path(a.evaluator), ctx.device,
                          progress=ctx.progress)
    storage.write_json(f"metrics/objective/{name}.json", out)
    fd = out.get("fd", math.nan)
    print(f"{ctx.name}: x-MSE {out['x_mse']:.4f} (high noise {out['x_mse_high_noise']:.4f}, "
          f"low noise {out['x_mse_low_noise']:.4f}), FD {fd:.3f}")


def main(argv: Sequence[str] | None = None) -> None:
    run_stage("objective@{variant}-p{patch_size}", argv, add_args, body)


if __name__ == "__main__":
    main()
