"""Stage train_evaluator: the feature network for FD/KID and the training split's reference stats.

Outputs models/evaluator/ (weights, config with test accuracy, ref_stats.safetensors with the
mean, covariance and a feature subset of the training split) and metrics/evaluator.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from fewstep import storage
from fewstep.outputs import write_loss_csv
from fewstep.train.evaluator import train_evaluator
from stages._common import StageContext, run_stage


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--out", default="models/evaluator")


def body(ctx: StageContext) -> None:
    p = ctx.params
    m = train_evaluator(p.evaluator, Path(ctx.args.data), Path(ctx.args.out), Path("checkpoints/evaluator"),
                        p.base.seed, ctx.device, progress=ctx.progress)
    history = m.pop("history")
    write_loss_csv(Path("plots/evaluator_loss.csv"), history)
    ctx.record.log_history("loss", history)
    ctx.record.log_metrics(m)
    storage.write_json("metrics/evaluator.json", m)
    print("train_evaluator: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))


def main(argv: Sequence[str] | None = None) -> None:
    run_stage("train_evaluator", argv, add_args, body)


if __name__ == "__main__":
    main()
