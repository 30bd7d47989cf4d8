"""fewstep's teacher vs the stock diffusers recipe given the same seconds on the same images (issue 19.2).

Trains the stock recipe (fewstep.interop.stock: ``UNet2DModel`` 2.69M parameters, eps-prediction,
DDPMScheduler linear betas, AdamW 3e-4, batch 64) on the prepared training images for as many wall
seconds as the pipeline's teacher trained (``train_seconds`` of metrics/teacher.json, or
steps x batch / images_per_s for an older file; ``--seconds`` overrides), at the same torch thread
count (base.threads), then samples both models from the same x_T (seeds evaluate.seed..) with DDIM at
the same step count (evaluate.reference_steps: the pipeline's "teacher ddim 64" row for fewstep,
diffusers' DDIMScheduler for the recipe), and scores both with the pipeline's evaluator
(models/evaluator) at the same n: FD with its 95% bootstrap interval (evaluate.fd_resamples), KID.
The ratio FD(stock) / FD(fewstep) (> 1: fewstep's teacher is better) comes from this one run.

    python benchmarks/stock_recipe.py                        # the CPU default's models and data
    python benchmarks/stock_recipe.py --seconds 229 --n 500 --json benchmarks/results/stock_recipe.json
    python benchmarks/stock_recipe.py --seconds 5 --n 32 --steps 8 --resamples 20   # a smoke run

The teacher's seconds are its training loop's; the recipe's are its loop's too (data drawing,
forward, backward, AdamW), on the same machine but not at the same time: on a shared machine quote
the ratio with the load it ran under.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep import models, samplers, storage
from fewstep.config import load_params
from fewstep.evaluation import feature_scores
from fewstep.images import save_grid
from fewstep.math import precision
from fewstep.math.ddim import PerImageNoise

ROOT = Path(__file__).resolve().parents[1]


def teacher_seconds(path: Path, batch_size: int) -> float:
    """The teacher's training seconds from its metrics file (train_seconds, else steps x batch / images/s)."""
    if not path.exists():
        raise SystemExit(f"stock_recipe: error: {path} not found; train the teacher first (dvc repro train_teacher) "
                         "or pass --seconds")
    m = storage.read_json(path)
    if m.get("train_seconds"):
        return float(m["train_seconds"])
    if m.get("images_per_s") and m.get("steps"):
        return float(m["steps"]) * batch_size / float(m["images_per_s"])
    raise SystemExit(f"stock_recipe: error: {path} has neither train_seconds nor images_per_s (an imported or "
                     "resumed teacher); pass --seconds")


def sample_stock_all(run: Any, seeds: list[int], shape: tuple[int, int, int], steps: int, batch: int) -> torch.Tensor:
    from fewstep.interop.stock import sample_stock

    out = []
    for lo in range(0, len(seeds), batch):
        x_T = PerImageNoise(seeds[lo : lo + batch], "cpu").randn(*shape)
        out.append(sample_stock(run.unet, run.scheduler, x_T, steps))
    return torch.cat(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--profile", default=None)
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "prepared", help="prepared images")
    ap.add_argument("--models", type=Path, default=ROOT / "models", help="holds teacher/ and evaluator/")
    ap.add_argument("--teacher-metrics", type=Path, default=ROOT / "metrics" / "teacher.json")
    ap.add_argument("--seconds", type=float, default=None, help="training seconds (default: the teacher's)")
    ap.add_argument("--max-steps", type=int, default=None, help="also stop after this many steps")
    ap.add_argument("--n", type=int, default=None, help="samples per model (default evaluate.n_samples)")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default evaluate.reference_steps)")
    ap.add_argument("--resamples", type=int, default=None, help="FD bootstrap resamples (default evaluate.fd_resamples)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default base.threads)")
    ap.add_argument("--seed", type=int, default=0, help="the recipe's training seed")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "stock_recipe.json")
    ap.add_argument("--grid", type=Path, default=None, help="also save the recipe's first 64 samples here (png)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.seconds is not None and a.seconds <= 0:
        ap.error("--seconds must be > 0")
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    p = load_params(a.params, a.profile)
    ep = p.evaluate
    threads = a.threads if a.threads is not None else p.base.threads
    if threads:
        torch.set_num_threads(threads)
    precision.configure_from(p.base)  # the teacher samples as the pipeline would on this CPU
    seconds = a.seconds if a.seconds is not None else teacher_seconds(a.teacher_metrics, p.teacher.batch_size)
    n, steps = a.n or ep.n_samples, a.steps or ep.reference_steps
    resamples = ep.fd_resamples if a.resamples is None else a.resamples
    for d in (a.data / "train_images.npy", a.models / "teacher", a.models / "evaluator"):
        if not d.exists():
            raise SystemExit(f"stock_recipe: error: {d} not found")
    images = storage.load_array(a.data / "train_images.npy")
    teacher = models.load_denoiser(a.models / "teacher", "cpu")
    shape = teacher.card.image_shape
    if images.shape[1:] != (shape[1], shape[2], shape[0]):
        raise SystemExit(f"stock_recipe: error: prepared images are {images.shape[1:]}, the teacher's are {shape}")
    from fewstep.interop.stock import train_stock
    from fewstep.train.evaluator import features, load_evaluator

    print(f"# stock diffusers recipe vs fewstep's teacher: {seconds:.1f} s of training each, {len(images)} images "
          f"{shape[1]}px, torch threads {torch.get_num_threads()}; DDIM {steps} steps, n = {n}", flush=True)
    run = train_stock(images, seconds, seed=a.seed, max_steps=a.max_steps, progress=not a.no_progress)
    print(f"stock recipe: {run.steps} steps in {run.seconds:.1f} s, {run.params:,} params, "
          f"final loss {run.final_loss:.4f}", flush=True)
    seeds = list(range(ep.seed, ep.seed + n))
    t0 = time.perf_counter()
    fewstep_images = samplers.generate("ddim", teacher, seeds, shape, steps=steps, batch_size=ep.batch_size)
    t_fewstep = time.perf_counter() - t0
    t0 = time.perf_counter()
    stock_images = sample_stock_all(run, seeds, shape, steps, ep.batch_size)
    t_stock = time.perf_counter() - t0
    evaluator, stats = load_evaluator(a.models / "evaluator")
    scores = {}
    for name, imgs in (("fewstep", fewstep_images.clamp(-1, 1)), ("stock", stock_images)):
        scores[name] = {"n": n, **feature_scores(features(evaluator, imgs), stats, ep.kid_subsets, ep.seed,
                                                 resamples)}
    ratio = scores["stock"]["fd"] / scores["fewstep"]["fd"]
    tm = storage.read_json(a.teacher_metrics) if a.teacher_metrics.exists() else {}
    rows = {
        "fewstep": {"model": f"fewstep teacher ({teacher.card.parameterization}-prediction, {a.models / 'teacher'})",
                    "train_seconds": tm.get("train_seconds"), "train_steps": teacher.card.lineage.train_steps,
                    "params": sum(t.numel() for t in teacher.parameters()), "sample_seconds": t_fewstep},
        "stock": {"model": "stock diffusers recipe (UNet2DModel, eps, linear betas, AdamW 3e-4, batch 64)",
                  "train_seconds": run.seconds, "train_steps": run.steps, "params": run.params,
                  "sample_seconds": t_stock},
    }
    print()
    print("| model | train s | train steps | params | FD [95% interval] | KID |")
    print("|---|---:|---:|---:|---|---:|")
    for k in ("fewstep", "stock"):
        r, s = rows[k], scores[k]
        ts = f"{r['train_seconds']:.0f}" if r["train_seconds"] else "-"
        ci = f" [{s['fd_lo']:.2f}, {s['fd_hi']:.2f}]" if "fd_lo" in s else ""
        print(f"| {r['model']} | {ts} | {r['train_steps']:,} | {r['params']:,} | {s['fd']:.2f}{ci} | {s['kid']:.4f} |")
    print(f"\nFD(stock) / FD(fewstep) = {ratio:.2f} at n = {n}, DDIM {steps} steps (> 1: fewstep's teacher is better)")
    payload = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
               "cpu": precision.detect().describe(), "threads": torch.get_num_threads(), "seconds": seconds,
               "n": n, "steps": steps, "resamples": resamples, "data": str(a.data), "rows": rows, "scores": scores,
               "fd_ratio_stock_over_fewstep": ratio, "argv": sys.argv[1:] if argv is None else list(argv)}
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(payload, indent=2, default=float) + "\n")
        print(f"wrote {a.json}")
    if a.grid:
        save_grid(stock_images[:64], a.grid)
        print(f"wrote {a.grid}")
    return payload


if __name__ == "__main__":
    main()
