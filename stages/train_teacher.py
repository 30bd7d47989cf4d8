"""Stage train_teacher: train (or resume) the diffusion teacher, export it, sample a grid; or, when
params teacher.source is set, import a pretrained (diffusers) teacher instead (fewstep.teacher_source).

Outputs: models/teacher/ (safetensors + config.json), checkpoints/teacher/ (resume state; empty for
an import), metrics/teacher.json (an import: its source and source_sha256), plots/teacher_loss.csv
(an import: the header only), samples/teacher.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from fewstep import models, parallel, storage
from fewstep.outputs import sample_grid, write_loss_csv
from fewstep.teacher_source import import_metrics, import_source
from fewstep.train.teacher import train_teacher
from stages._common import StageContext, run_stage


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--model", default="models/teacher")
    ap.add_argument("--checkpoints", default="checkpoints/teacher")
    ap.add_argument("--metrics", default="metrics/teacher.json")
    ap.add_argument("--loss-csv", default="plots/teacher_loss.csv")
    ap.add_argument("--grid", default="samples/teacher.png")


def _n_params(model_dir: Path) -> int:
    return sum(t.numel() for t in storage.load_tensors(model_dir / models.WEIGHTS).values())


def imported(ctx: StageContext) -> None:
    """teacher.source is set: import the teacher (rank 0), then the same grid and metrics files."""
    a, p, device = ctx.args, ctx.params, ctx.device
    if parallel.is_main():
        card = import_source(p, a.model)
        Path(a.checkpoints).mkdir(parents=True, exist_ok=True)  # the declared out: nothing to resume
    parallel.barrier()
    if models.load_card(a.model).conditioning.kind == "text":  # a latent text-to-image pipeline (issue 17)
        if parallel.is_main():
            from fewstep.interop.sd import text_grid
            from fewstep.prompts import stage_prompts

            den = models.load_denoiser(a.model, device)
            prompts = stage_prompts(p.trajectories.prompts, den, Path(a.model), Path("trajectories"))
            text_grid(Path(a.model), Path(a.grid), p.teacher.sample, prompts, device)
    else:
        sample_grid(Path(a.model), Path(a.grid), p.teacher.sample, device)
    if not parallel.is_main():
        return
    write_loss_csv(Path(a.loss_csv), [])
    metrics = import_metrics(card, p, _n_params(Path(a.model)), device.type)
    storage.write_json(a.metrics, metrics)
    ctx.record.log_metrics(metrics)
    ctx.record.log_artifact(a.grid)
    ctx.record.set_tags(weights_sha256=card.weights_sha256, source=metrics["source"],
                        source_sha256=metrics["source_sha256"])
    pin = "" if p.teacher.source.sha256 else " (pin it as teacher.source.sha256 so DVC sees a changed source)"
    print(f"train_teacher: imported {metrics['family']} from {metrics['source']}, T={metrics['T']}, "
          f"{metrics['parameterization']}, source sha256 {str(metrics['source_sha256'])[:12]}{pin}")


def body(ctx: StageContext) -> None:
    if ctx.params.teacher.source is not None:
        return imported(ctx)
    a, p, device = ctx.args, ctx.params, ctx.device
    result, card = train_teacher(p, a.data, a.model, a.checkpoints, device, progress=ctx.progress)
    sample_grid(Path(a.model), Path(a.grid), p.teacher.sample, device)
    if not parallel.is_main():
        return
    write_loss_csv(Path(a.loss_csv), result.history)
    n_params = _n_params(Path(a.model))
    metrics = {
        "final_loss": result.history[-1][1] if result.history else None,
        "steps": p.teacher.steps,
        "params": n_params,
        "device": device.type,
    }
    if result.steps_run:
        metrics["images_per_s"] = result.steps_run * p.teacher.batch_size / result.seconds
        metrics["train_seconds"] = result.seconds  # this process's steps (benchmarks/stock_recipe.py)
    if parallel.world_size() > 1:
        metrics["world_size"] = parallel.world_size()
    storage.write_json(a.metrics, metrics)
    ctx.record.log_metrics(metrics)
    ctx.record.log_history("loss", result.history)
    ctx.record.log_artifact(a.grid)
    ctx.record.set_tags(weights_sha256=card.weights_sha256)
    print(f"train_teacher: loss {metrics['final_loss']}, {n_params} params, weights {card.weights_sha256[:12]}")


def main(argv: Sequence[str] | None = None) -> None:
    run_stage("train_teacher", argv, add_args, body)


if __name__ == "__main__":
    main()
