"""Stage ddim_study@MODEL: DDIM inversion, consistency and interpolation on one model (DDIM paper 5.2-5.4).

Outputs: metrics/ddim_study.json (reconstruction MSE per step count, consistency distances, timings);
DVC plots plots/ddim_reconstruction.csv (steps -> MSE), plots/ddim_consistency.csv (steps -> pixel RMSE
to the full-step image) and plots/ddim_consistency_features.csv (steps -> evaluator-feature distance to
it); grids samples/ddim_reconstruction.png (originals, then one row per step count),
samples/ddim_consistency.png (one row per x_T, one column per step count) and
samples/ddim_interpolation.png (slerp rows between two x_T, then between two encoded test images).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from fewstep import models, storage
from fewstep.ddim_study import run_study
from fewstep.math.param import set_autocast
from stages._common import StageContext, run_stage


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="models/teacher")
    ap.add_argument("--evaluator", default="models/evaluator")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--metrics", default="metrics/ddim_study.json")
    ap.add_argument("--plots", default="plots")
    ap.add_argument("--samples", default="samples")


def body(ctx: StageContext) -> None:
    a = ctx.args
    den = models.load_denoiser(a.model, ctx.device)
    set_autocast(den, False)  # float32 on CUDA too: bf16 outputs would put a floor under the reconstruction error
    out = {"model": str(a.model), **run_study(den, Path(a.data), Path(a.evaluator),
                                              ctx.params.ddim_study, ctx.device, Path(a.samples), Path(a.plots),
                                              ctx.progress)}
    storage.write_json(a.metrics, out)
    for n, r in out["reconstruction"].items():
        print(f"ddim_study: reconstruction {n:>5s} steps  MSE {r['mse']:.3g} ([0,1] scale {r['mse_01']:.3g})")
    for n, r in out["consistency"]["rows"].items():
        fd = f"  feature dist {r['feat_dist']:.3g} (rel {r['feat_dist_rel']:.3g})" if "feat_dist" in r else ""
        print(f"ddim_study: consistency {n:>5s} steps  RMSE to {out['consistency']['reference_steps']} "
              f"{r['rmse']:.3g}{fd}")
    print(f"ddim_study: seconds {out['seconds']}")


def main(argv: Sequence[str] | None = None) -> None:
    run_stage(lambda a: f"ddim_study@{Path(a.model).name}", argv, add_args, body)  # the DVC stage's name


if __name__ == "__main__":
    main()
