"""Stage redundancy@teachers (on with params redundancy.scope: [teachers]): the x-prediction error of
every teacher against the noise level, on the test split (the patched-diffusion paper's redundancy
argument: at high noise the optimal x is blurry, so the curves of coarse, patched nets and
full-resolution nets should coincide there).

Every model dir under models/ with role teacher (the teacher, the study's teacher-p<P>, split
models) is scored on the same test images, timesteps and noise per log-SNR bin (redundancy.*).
Outputs: metrics/redundancy.json, plots/redundancy.csv (DVC plot: model, patch, logsnr, mse),
study/redundancy.png (one curve per model), study/redundancy.md (the table).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from fewstep import storage
from fewstep.reports import redundancy_markdown, redundancy_plot, write_redundancy_csv
from fewstep.study import images_from_uint8, redundancy
from stages._common import StageContext, StageError, run_stage


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--models", default="models")
    ap.add_argument("--out", default="study")


def body(ctx: StageContext) -> None:
    a, rp = ctx.args, ctx.params.redundancy
    test = Path(a.data) / "test_images.npy"
    if not test.exists():
        raise StageError(f"{test}: the redundancy analysis needs the test split (prepare.test_source)")
    images = images_from_uint8(storage.load_array(test), rp.n_images)
    results, boundary = redundancy(Path(a.models), images, rp, ctx.device,
                                   log=lambda line: print(f"redundancy: {line}", flush=True))
    out = Path(a.out)
    storage.write_json("metrics/redundancy.json", {"n_images": int(images.shape[0]), "models": results})
    write_redundancy_csv(results, Path("plots/redundancy.csv"))
    redundancy_plot(results, out / "redundancy.png", boundary)
    storage.atomic_write_bytes(out / "redundancy.md", redundancy_markdown(results).encode())


def main(argv: Sequence[str] | None = None) -> None:
    run_stage("redundancy@teachers", argv, add_args, body)  # the DVC stage's name (redundancy.scope: [teachers])


if __name__ == "__main__":
    main()
