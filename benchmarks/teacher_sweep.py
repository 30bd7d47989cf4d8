"""One point of the teacher-recipe sweep (issue 19.2): a teacher trained with overrides of a params
file, scored by DDIM at 64 and 8 steps on seeds 0..n-1 with a fixed evaluator (FD with its 95% basic
bootstrap interval), one JSON line appended to the results file.

    python benchmarks/teacher_sweep.py NAME '{"teacher": {"steps": 1500, "lr": 0.004}}' [--threads 1]

The overrides apply over params.yaml merged with --profile (default cpu-full: the previous default,
whose teacher section is the sweep's baseline: 3,000 steps, lr 1e-3, uniform t), so a point names
only what it changes. Two points at one thread each share 2 cores; the seconds a point reports are
then under that load (compare steps, not seconds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="the point's name (its run dir under --out)")
    ap.add_argument("overrides", type=json.loads, help="params overrides as JSON, e.g. '{\"teacher\": {\"lr\": 0.004}}'")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--profile", default="cpu-full", help="merged over --params before the overrides ('' = none)")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "prepared")
    ap.add_argument("--evaluator", type=Path, default=ROOT / "models" / "evaluator")
    ap.add_argument("--out", type=Path, default=Path("/tmp/fewstep-sweep"), help="scratch dir for the runs")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "teacher_sweep.jsonl")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    import yaml

    from fewstep import models, samplers
    from fewstep.config import deep_merge, validate
    from fewstep.evaluation import feature_scores
    from fewstep.images import save_grid
    from fewstep.train.evaluator import features, load_evaluator
    from fewstep.train.teacher import train_teacher

    raw = yaml.safe_load(a.params.read_text())
    if a.profile:
        raw = deep_merge(raw, yaml.safe_load((a.params.parent / "profiles" / f"{a.profile}.yaml").read_text()) or {})
    p = validate(deep_merge(raw, a.overrides))
    out = a.out / a.name
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    _, card = train_teacher(p, a.data, out / "model", out / "ckpt", torch.device("cpu"), progress=False)
    r: dict[str, Any] = {"name": a.name, "over": a.overrides, "train_s": time.time() - t0, "threads": a.threads,
                         "profile": a.profile, "teacher": p.teacher.model_dump(mode="json")}
    den = models.load_denoiser(out / "model")
    ev, stats = load_evaluator(a.evaluator, torch.device("cpu"))
    for steps in (64, 8):
        imgs = samplers.generate("ddim", den, list(range(a.n)), card.image_shape, steps=steps, batch_size=250)
        s = feature_scores(features(ev, imgs.clamp(-1, 1)), stats, 20, 0, resamples=200)
        r[f"fd{steps}"] = [round(s["fd"], 3), round(s["fd_lo"], 3), round(s["fd_hi"], 3)]
        if steps == 64:
            save_grid(imgs[:64], out / "grid64.png")
    print(json.dumps(r), flush=True)
    a.results.parent.mkdir(parents=True, exist_ok=True)
    with a.results.open("a") as fh:
        fh.write(json.dumps(r) + "\n")
    return r


if __name__ == "__main__":
    main()
