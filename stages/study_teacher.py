"""Stage study_teacher@P: one teacher of the patched-diffusion study (Luhman & Luhman 2022).

The teacher section overridden by study.teacher and study.nets.p<P> (patch size P). Outputs:
models/teacher-p<P>/ (a registered teacher, variant p<P>), checkpoints/teacher-p<P>/,
metrics/study/teacher-p<P>.json (train time, GFLOPs per network call, parameters),
plots/study/teacher-p<P>_loss.csv, samples/teacher-p<P>.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from fewstep import models, storage
from fewstep.evaluation import gflops_per_call
from fewstep.outputs import sample_grid, write_loss_csv
from fewstep.train.teacher import train_teacher
from stages._common import StageContext, run_stage


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--patch-size", type=int, required=True, choices=(1, 2, 4, 8))
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--models", default="models")
    ap.add_argument("--checkpoints", default="checkpoints")


def body(ctx: StageContext) -> None:
    a, p, device = ctx.args, ctx.params, ctx.device
    P = a.patch_size
    name = f"teacher-p{P}"
    tp = p.study.teacher_for(p.teacher, P)
    model_dir = Path(a.models) / name
    result, meta = train_teacher(p.model_copy(update={"teacher": tp}), a.data, model_dir,
                                 Path(a.checkpoints) / name, device, progress=ctx.progress,
                                 extra_meta={"variant": f"p{P}", "study": "patch"})
    write_loss_csv(Path(f"plots/study/{name}_loss.csv"), result.history)
    sample_grid(model_dir, Path(f"samples/{name}.png"), tp.sample, device)
    den = models.load_denoiser(model_dir, "cpu")
    metrics = {
        "patch_size": P, "channels": tp.net.channels, "channel_mult": tp.net.channel_mult,
        "steps": tp.steps, "final_loss": result.history[-1][1] if result.history else None,
        "params": sum(t.numel() for t in den.parameters()),
        "gflops_per_call": gflops_per_call(den, den.card.image_shape), "device": device.type,
    }
    if result.steps_run:
        metrics.update(train_seconds=result.seconds, images_per_s=result.steps_run * tp.batch_size / result.seconds)
    storage.write_json(f"metrics/study/{name}.json", metrics)
    print(f"{ctx.name}: loss {metrics['final_loss']}, {metrics['params']} params, "
          f"{metrics['gflops_per_call']:.4f} GFLOPs/call")


def main(argv: Sequence[str] | None = None) -> None:
    run_stage("study_teacher@{patch_size}", argv, add_args, body)


if __name__ == "__main__":
    main()
