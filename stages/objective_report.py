"""Stage objective_report: the objective study's table from metrics/objective/*.json.

Outputs: study/objective.md (variant x patch size: x-MSE on the test split overall, at high noise
(log-SNR bins <= 0) and low noise (>= 0), FD/KID when scored) and plots/objective.csv.
With objective.variants empty the table says the study is off.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from fewstep import storage
from fewstep.reports import objective_markdown, write_objective_csv
from stages._common import StageContext, run_stage


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--metrics", default="metrics/objective")
    ap.add_argument("--out", default="study/objective.md")


def body(ctx: StageContext) -> None:
    op = ctx.params.objective
    wanted = {f"{v}-p{P}" for v in op.variants for P in op.patch_sizes}
    rows = {f.stem: storage.read_json(f) for f in sorted(Path(ctx.args.metrics).glob("*.json")) if f.stem in wanted}
    md = objective_markdown(rows)
    storage.atomic_write_bytes(Path(ctx.args.out), md.encode())
    write_objective_csv(rows, Path("plots/objective.csv"))
    print(md.rstrip("\n"))


def main(argv: Sequence[str] | None = None) -> None:
    run_stage("objective_report", argv, add_args, body)


if __name__ == "__main__":
    main()
