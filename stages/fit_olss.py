"""Stage fit_olss@MODEL-N: the OLSS schedulers with N steps for one model.

Writes schedulers/MODEL/<variant>-N.json for every variant of fewstep.olss_fit.VARIANTS, always all
of them (the outs dvc.yaml declares):

    olss-paper-N   the paper's method: the network's own outputs as basis, teacher-forced search and fit
    olss-p-N       OLSS-P (the paper's ablation): the same fit on the uniform path
    olss-open-N    beyond the paper: x-hat basis, teacher-forced (open-loop) fit
    olss-closed-N  beyond the paper: x-hat basis, weights refit closed loop on the sampler's own trajectory
    olss-ridge-N   beyond the paper: olss-open with ridge olss.ridge_variant (0 = plain least squares)

and olss-N, a copy of the variant with the lowest RMSE on held-out seeds (its meta says which:
``chosen_from``). metrics/olss/MODEL-N.json: RMSE to the full-step DDIM result on held-out seeds for
DDIM and every variant, which one olss-N is, the searched path of each basis, the bound D and the
fit time. A text-conditional model's fit reads the prompt file its trajectories were collected
with (trajectories.prompts; the same sha256).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from fewstep import models, storage
from fewstep.olss_fit import fit_olss, write_schedulers
from fewstep.prompts import stage_prompts
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
    prompts = stage_prompts(p.trajectories.prompts, den, Path(a.models) / name, Path(a.trajectories))
    fit = fit_olss(den, name, Path(a.trajectories) / name, n, p.olss, p.base.seed, ctx.device, prompts=prompts)
    out = Path(a.out) / name
    write_schedulers(fit.schedulers, out)
    storage.write_json(Path(a.metrics) / f"{name}-{n}.json", fit.metrics)
    ctx.record.log_metrics(fit.metrics)
    ctx.record.log_history("fit_error", list(enumerate(fit.best.fit_mse)))
    ctx.record.log_artifact(out / f"olss-{n}.json")
    m = fit.metrics
    ctx.record.set_tags(olss_chosen=f"{m['chosen']}-{n}")
    res = m["rmse_vs_full_step"]
    paths = ", ".join(f"{b} basis {s['path']}" for b, s in m["search"].items())
    print(f"{ctx.name}: olss-{n} = {m['chosen']}-{n} ({m['chosen_label']}); searched paths: {paths}; held-out RMSE "
          + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))


def main(argv: Sequence[str] | None = None) -> None:
    run_stage("fit_olss@{model}-{steps}", argv, add_args, body)


if __name__ == "__main__":
    main()
