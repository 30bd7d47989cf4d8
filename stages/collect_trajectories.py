"""Stage collect_trajectories: full-step deterministic DDIM trajectories per model, for OLSS.

For each model in trajectories.models: trajectories/<model>/shard-*.safetensors + meta.json
(timesteps, seeds, model weights hash). A student's reference is its own step count when that is
smaller than trajectories.reference_steps. Under torchrun the shards are computed across the
ranks and written by rank 0 (the same files for any world size). A text-conditional model (a
``diffusers-sd`` teacher) takes its prompts from trajectories.prompts (fewstep.prompts.resolve_prompts:
plain prompts are encoded once into <out>/.prompts/).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from fewstep import models, parallel
from fewstep.prompts import stage_prompts
from fewstep.trajectories import collect_model
from stages._common import StageContext, run_stage


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None, help="one model name (default: every trajectories.models entry)")
    ap.add_argument("--models", default="models")
    ap.add_argument("--out", default="trajectories")


def body(ctx: StageContext) -> None:
    a, p = ctx.args, ctx.params
    tp = p.trajectories
    for name in [a.model] if a.model else tp.models:
        den = models.load_denoiser(Path(a.models) / name, ctx.device)
        prompts = stage_prompts(tp.prompts, den, Path(a.models) / name, Path(a.out))
        n_ref = collect_model(den, name, tp, Path(a.out) / name, ctx.device, ctx.progress, prompts=prompts)
        ctx.record.log_metrics({f"{name}/trajectories": tp.n_fit, f"{name}/reference_steps": n_ref})
        if parallel.is_main():
            print(f"collect_trajectories: {name}: {tp.n_fit} trajectories x {n_ref} steps "
                  f"({parallel.world_size()} process(es))")


def main(argv: Sequence[str] | None = None) -> None:
    run_stage(lambda a: "collect_trajectories" + (f"@{a.model}" if a.model else ""), argv, add_args, body)


if __name__ == "__main__":
    main()
