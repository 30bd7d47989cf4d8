"""Export: a model or an OLSS scheduler as a directory diffusers can load (issue 16, "Out").

    python -m stages.export --model models/student-4 --out export/student-4
    python -m stages.export --scheduler schedulers/teacher/olss-4.json --model models/teacher --out export/olss-4
    python -m stages.export --version cifar10-student-4step/3 --out export/student-4
    python -m stages.export --version models:/cifar10-olss-teacher-4step@champion --out export/olss-4

A model dir is exported by its card's family (fewstep-unet: unet/ is a FewstepUNet2DModel wrapper;
fewstep-unet-split: a FewstepSplitUNet2DModel; diffusers-unet2d: a UNet2DModel) with a DDIMScheduler on the model's own schedule and a DDIMPipeline
model_index.json. An OLSS scheduler is exported with its model: scheduler/ holds an
OLSSDiffusersScheduler and model_index.json names a DDPMPipeline. ``--version`` takes a registered
MLflow version (NAME/VERSION, NAME@ALIAS or models:/...), downloads its model (and scheduler) and
exports them. Not a DVC stage; it records no MLflow run.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Sequence

from stages._common import StageContext, StageError, run_stage


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None, help="model dir (teacher or student)")
    ap.add_argument("--scheduler", default=None, help="an OLSS scheduler JSON (fit_olss); needs --model")
    ap.add_argument("--version", default=None, help="a registered version: NAME/VERSION, NAME@ALIAS or models:/...")
    ap.add_argument("--out", required=True, help="the directory to write (replaced if it exists)")


def _export_version(ctx: StageContext, ref: str, out: Path) -> Path:
    from fewstep import tracking  # imports mlflow: only for --version
    from fewstep.interop.export import export_model, export_olss

    t = tracking.configure(experiment=ctx.settings.experiment, artifact_root=ctx.settings.artifact_root)
    with tempfile.TemporaryDirectory(prefix="fewstep-export-") as tmp:
        v = tracking.download_version(ref, Path(tmp), tracking=t)
        if v.scheduler is not None:
            return export_olss(v.scheduler, v.model_dir, out, model_name=v.name, model_version=v.version)
        return export_model(v.model_dir, out)


def body(ctx: StageContext) -> None:
    from fewstep.interop.export import export_model, export_olss

    a = ctx.args
    out = Path(a.out)
    if a.version:
        if a.model or a.scheduler:
            raise StageError("--version exports a registered version: give it without --model/--scheduler")
        done = _export_version(ctx, a.version, out)
    elif a.scheduler:
        if not a.model:
            raise StageError("--scheduler needs --model: the model dir the scheduler was fitted on")
        done = export_olss(Path(a.scheduler), Path(a.model), out)
    elif a.model:
        done = export_model(Path(a.model), out)
    else:
        raise StageError("give --model DIR, --scheduler FILE --model DIR, or --version NAME/VERSION")
    print(f"export: wrote {done}")


def main(argv: Sequence[str] | None = None) -> None:
    run_stage("export", argv, add_args, body, track=False)


if __name__ == "__main__":
    main()
