"""Stage fit_olss@MODEL-N: an OLSS scheduler with N steps for one model.

Writes schedulers/MODEL/olss-N.json (searched path; closed-loop refit when olss.closed_loop),
olss-open-N.json (the paper's teacher-forced fit), olss-p-N.json (OLSS-P, uniform path),
olss-ridge-N.json (open loop with ridge olss.ridge_variant; 0 = plain least squares), always all
four (the outs dvc.yaml declares), and metrics/olss/MODEL-N.json: RMSE to the full-step DDIM result
on held-out seeds for DDIM, every OLSS variant, with the path, the bound D and the fit time.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from fewstep import models, storage
from fewstep.olss_fit import fit_olss, write_schedulers
from stages._common import StageContext, run_stage


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--models", default="models")
    ap.add_argument("--trajectories", default="trajectories")
    ap.add_argument("--out", default="schedulers")
    ap.add_argument("--metrics", default="metrics/olss")


def body(ctx: StageContext) -> None:
    a, p = ctx.args, ctx.params
    name, n = a.model, a.steps
    den = models.load_denoiser(Path(a.models) / name, ctx.device)
    fit = fit_olss(den, name, Path(a.trajectories) / name, n, p.olss, p.base.seed, ctx.device)
    out = Path(a.out) / name
    write_schedulers(fit.schedulers, out)
    storage.write_json(Path(a.metrics) / f"{name}-{n}.json", fit.metrics)
    ctx.record.log_metrics(fit.metrics)
    ctx.record.log_history("fit_error", list(enumerate(fit.best.fit_mse)))
    ctx.record.log_artifact(out / f"olss-{n}.json")
    res = fit.metrics["rmse_vs_full_step"]
    print(f"{ctx.name}: path {fit.metrics['path']} ({fit.metrics['path_note']}); held-out RMSE "
          + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))


def main(argv: Sequence[str] | None = None) -> None:
    run_stage("fit_olss@{model}-{steps}", argv, add_args, body)


if __name__ == "__main__":
    main()
