"""Stage evaluate: one table sampler x NFE over every model and scheduler the pipeline made.

Rows: the teacher with DDIM at evaluate.ddim_steps, the eta family and sigma-hat, every OLSS
variant, every distilled student, OLSS on students, diffusers' schedulers as peers (same teacher,
same noise, equal NFE); the ranked rows again at evaluate.n_headline samples; the FD sensitivity
check on the test split (noise floor, blur). Outputs: metrics/evaluate.json (DVC metrics), plots/evaluate.csv (DVC
plots: FD and RMSE vs NFE), reports/evaluation.md with PNG plots (FD vs NFE, RMSE vs NFE, FD vs
GFLOPs with its Pareto front) and one sample grid per row under reports/grids/.

A class-conditional model (card conditioning kind "class") gets one row per guidance scale of
evaluate.guidance (a guided-distilled student: w = 0 only; OLSS: the scale it was fitted at), named
"<row> w=<w>" for w > 0, with the evaluator's accuracy on the asked classes and, with
evaluate.per_class, FD/KID per class against the test split (fewstep.per_class), a per-class table
in reports/evaluation.md and a grid per row with one row of images per class (<row>-classes.png).
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Sequence

from fewstep import storage
from fewstep.evaluation import inception_reference, run_evaluation
from fewstep.images import from_uint8
from fewstep.reports import write_evaluation_csv, write_evaluation_report
from stages._common import StageContext, run_stage

SCALARS = ("fd", "fd_lo", "fd_hi", "kid", "kid_se", "recall", "dup_rate", "rmse", "psnr", "nfe", "images_per_s",
           "accuracy", "accuracy_se")  # accuracy: class-conditional rows only


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--models", default="models")
    ap.add_argument("--schedulers", default="schedulers")
    ap.add_argument("--reports", default="reports")
    ap.add_argument("--data", default="data/prepared",
                    help="training split for Inception reference statistics; test split for the FD sensitivity check")


def body(ctx: StageContext) -> None:
    a, p, device = ctx.args, ctx.params, ctx.device
    ep = p.evaluate
    models_dir, out = Path(a.models), Path(a.reports)
    inception = None
    if ep.inception_weights:  # standard FID: the user's Inception weights, same FD/KID code
        inception = partial(inception_reference, ep.inception_weights, Path(a.data) / "train_images.npy",
                            p.evaluator.ref_subset, ep.seed, device)
    test, test_labels = Path(a.data) / "test_images.npy", Path(a.data) / "test_labels.npy"
    test_images = from_uint8(storage.load_array(test)) if (ep.blur_sigmas or ep.per_class) and test.exists() else None
    class_test = None  # a class-conditional model's per-class references (unused for unconditional ones)
    if ep.per_class and test_images is not None and test_labels.exists():
        class_test = (test_images, storage.load_array(test_labels))
    evaluator_cfg = storage.read_json(models_dir / "evaluator" / "config.json")
    done = run_evaluation(models_dir, Path(a.schedulers), ep, models_dir / "evaluator", device,
                          grid_dir=out / "grids", inception=inception,
                          log=lambda line: print(f"evaluate: {line}", flush=True),
                          test_images=test_images if ep.blur_sigmas else None, class_test=class_test,
                          class_names=evaluator_cfg.get("class_names"))
    if done is None:  # another rank of a torchrun
        return
    results = done.rows
    acc = evaluator_cfg.get("test_accuracy")
    write_evaluation_report(results, out, ep.n_samples, acc, done.reference_steps, meta=done.meta)
    storage.write_json("metrics/evaluate.json", {"n_samples": ep.n_samples, **done.meta, "rows": results})
    pick = lambda r: {k: v for k, v in r.items() if k in SCALARS}  # noqa: E731
    ctx.record.log_metrics({name: {**pick(r), **({"headline": pick(r["headline"])} if "headline" in r else {})}
                            for name, r in results.items()})
    ctx.record.log_metrics({k: done.meta[k] for k in ("fd_floor", "fd_blur") if k in done.meta})
    ctx.record.log_artifact(out, "reports")
    write_evaluation_csv(results, Path("plots/evaluate.csv"))


def main(argv: Sequence[str] | None = None) -> None:
    run_stage("evaluate", argv, add_args, body)


if __name__ == "__main__":
    main()
