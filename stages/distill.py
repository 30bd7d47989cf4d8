"""Stage distill@ROUND: one progressive-distillation round (N -> N/2 sampling steps).

Reads distill.defaults + distill.rounds.ROUND; the parent is models/teacher or an earlier round's
student. Outputs models/ROUND, checkpoints/ROUND, metrics/ROUND.json, plots/ROUND_loss.csv and
samples/ROUND.png. The metrics compare, on the same noise, the student's N/2-step samples and the
parent's own N/2-step DDIM samples against the parent's N-step samples (RMSE).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from fewstep import models, parallel, storage
from fewstep.distill_eval import student_vs_parent
from fewstep.images import save_grid
from fewstep.outputs import write_loss_csv
from fewstep.train.distill import distill_round, round_guidance
from stages._common import StageContext, run_stage


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--round", required=True, help="round name (a key of distill.rounds)")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--models", default="models")


def body(ctx: StageContext) -> None:
    a, p, device = ctx.args, ctx.params, ctx.device
    name = a.round
    rp = p.distill.round(name)
    parent_dir, out_dir = Path(a.models) / rp.parent, Path(a.models) / name
    result, card = distill_round(parent_dir, out_dir, Path("checkpoints") / name, a.data, rp.steps, rp,
                                 p.base.seed, device, progress=ctx.progress)
    w = round_guidance(models.load_card(parent_dir), parent_dir, rp.guidance)  # the parent's target scale
    check = student_vs_parent(models.load_denoiser(parent_dir, device), models.load_denoiser(out_dir, device),
                              rp.steps, rp.sample, device, guidance=w)
    if not parallel.is_main():
        return
    write_loss_csv(Path("plots") / f"{name}_loss.csv", result.history)
    save_grid(check.student_images, Path("samples") / f"{name}.png", scale=max(1, 64 // check.student_images.shape[-1]))
    metrics = {**check.metrics, "final_loss": result.history[-1][1] if result.history else None}
    if card.guidance is not None:  # a class-conditional round: the scale the student was distilled at
        metrics["guidance"] = card.guidance
    if result.steps_run:
        metrics["seconds"] = result.seconds
    storage.write_json(Path("metrics") / f"{name}.json", metrics)
    ctx.record.log_metrics(metrics)
    ctx.record.log_history("loss", result.history)
    ctx.record.log_artifact(Path("samples") / f"{name}.png")
    ctx.record.set_tags(weights_sha256=card.weights_sha256, parent=rp.parent)
    S = rp.steps
    print(f"{ctx.name}: {2 * S}->{S} steps, RMSE to parent: student {metrics['rmse_student_vs_parent']:.4f} "
          f"vs parent at {S} steps {metrics['rmse_parent_half_steps_vs_parent']:.4f}")


def main(argv: Sequence[str] | None = None) -> None:
    run_stage("distill@{round}", argv, add_args, body)


if __name__ == "__main__":
    main()
