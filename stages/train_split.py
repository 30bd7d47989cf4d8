"""Stage train_split@<name>: a two-network model split by noise level (PDM, distill_pdm.md B.7).

split.models.<name>: the high-noise net (log-SNR below log(boundary_snr)) is trained first, the
low-noise net starts from it where shapes match; both are saved as one model dir models/<name>
that load_denoiser returns as a routed denoiser. Outputs: models/<name>/, checkpoints/<name>/,
metrics/study/<name>.json (per-network GFLOPs, boundary index, train time), samples/<name>.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from fewstep import models, storage
from fewstep.evaluation import gflops_per_net
from fewstep.outputs import sample_grid, write_loss_csv
from fewstep.train.split import train_split
from stages._common import StageContext, StageError, run_stage


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--name", required=True, help="a key of split.models (the model dir name)")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--models", default="models")
    ap.add_argument("--checkpoints", default="checkpoints")


def body(ctx: StageContext) -> None:
    a, p, device = ctx.args, ctx.params, ctx.device
    if a.name not in p.split.models:
        raise StageError(f"split.models has no {a.name!r} (have {sorted(p.split.models)})")
    model_dir = Path(a.models) / a.name
    results, card = train_split(p, a.name, a.data, model_dir, Path(a.checkpoints) / a.name, device,
                                progress=ctx.progress)
    for side, res in results.items():
        write_loss_csv(Path(f"plots/study/{a.name}-{side}_loss.csv"), res.history)
    sample_grid(model_dir, Path(f"samples/{a.name}.png"), p.teacher.sample, device)
    den = models.load_denoiser(model_dir, "cpu")
    split = card.arch.split
    metrics = {"boundary_snr": split.boundary_snr, "t_boundary": split.t_boundary,
               "gflops_per_call": gflops_per_net(den, den.card.image_shape)}
    if "setup" in split.sides:  # setup: paper (the PDM release); absent = the project's setup
        metrics["setup"] = split.sides["setup"]
    for side, res in results.items():
        metrics[side] = {k: split.sides[side][k] for k in ("t_range", "patch_size", "train_steps", "init")}
        metrics[side]["final_loss"] = res.history[-1][1] if res.history else None
        if res.steps_run:
            metrics[side]["train_seconds"] = res.seconds
    storage.write_json(f"metrics/study/{a.name}.json", metrics)
    print(f"{ctx.name}: boundary index {metrics['t_boundary']}, GFLOPs/call "
          + ", ".join(f"{k} {v:.4f}" for k, v in metrics["gflops_per_call"].items()))


def main(argv: Sequence[str] | None = None) -> None:
    run_stage("train_split@{name}", argv, add_args, body)


if __name__ == "__main__":
    main()
