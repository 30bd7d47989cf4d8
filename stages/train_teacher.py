"""Stage train_teacher: train (or resume) the diffusion teacher, export it, sample a grid.

Outputs: models/teacher/ (safetensors + config.json), checkpoints/teacher/ (resume state),
metrics/teacher.json, plots/teacher_loss.csv, samples/teacher.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from fewstep import models, parallel, storage
from fewstep.outputs import sample_grid, write_loss_csv
from fewstep.train.teacher import train_teacher
from stages._common import StageContext, run_stage


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--model", default="models/teacher")
    ap.add_argument("--checkpoints", default="checkpoints/teacher")
    ap.add_argument("--metrics", default="metrics/teacher.json")
    ap.add_argument("--loss-csv", default="plots/teacher_loss.csv")
    ap.add_argument("--grid", default="samples/teacher.png")


def body(ctx: StageContext) -> None:
    a, p, device = ctx.args, ctx.params, ctx.device
    result, card = train_teacher(p, a.data, a.model, a.checkpoints, device, progress=ctx.progress)
    sample_grid(Path(a.model), Path(a.grid), p.teacher.sample, device)
    if not parallel.is_main():
        return
    write_loss_csv(Path(a.loss_csv), result.history)
    n_params = sum(t.numel() for t in storage.load_tensors(Path(a.model) / models.WEIGHTS).values())
    metrics = {
        "final_loss": result.history[-1][1] if result.history else None,
        "steps": p.teacher.steps,
        "params": n_params,
        "device": device.type,
    }
    if result.steps_run:
        metrics["images_per_s"] = result.steps_run * p.teacher.batch_size / result.seconds
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
