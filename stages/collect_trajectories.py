"""Stage collect_trajectories: full-step deterministic DDIM trajectories per model, for OLSS.

For each model in trajectories.models: trajectories/<model>/shard-*.safetensors + meta.json
(timesteps, seeds, model weights hash). A student's reference is its own step count when that is
smaller than trajectories.reference_steps. Under torchrun the shards are computed across the
ranks and written by rank 0 (the same files for any world size).
"""

from __future__ import annotations

from pathlib import Path

from fewstep import parallel, models
from fewstep.math.schedules import timesteps
from fewstep.trajectories import write_shards
from stages import _common


def main() -> None:
    ap = _common.parser(__doc__)
    ap.add_argument("--model", default=None, help="one model name (default: every trajectories.models entry)")
    ap.add_argument("--models", default="models")
    ap.add_argument("--out", default="trajectories")
    args = ap.parse_args()
    with _common.clear_errors("collect_trajectories" + (f"@{args.model}" if args.model else "")) as rec:
        p, device = _common.setup(args)
        tp = p.trajectories
        for name in [args.model] if args.model else tp.models:
            den = models.load_denoiser(Path(args.models) / name, device)
            cfg = den.config
            n_ref = min(tp.reference_steps, int(cfg["sample_steps"]))
            t_path = timesteps(den.schedule.T, n_ref, "trailing")
            seeds = range(tp.seed_offset, tp.seed_offset + tp.n_fit)
            size = p.base.image_size
            meta = {"model": name, "model_weights_sha256": cfg["weights_sha256"], "reference_steps": n_ref,
                    "sampler": "ddim eta=0 unclipped", "output": "x"}
            write_shards(Path(args.out) / name, den, seeds, (3, size, size), t_path, tp.shard_size, tp.batch_size,
                         device, meta, progress=not args.no_progress)
            rec.log_metrics({f"{name}/trajectories": tp.n_fit, f"{name}/reference_steps": n_ref})
            if parallel.is_main():
                print(f"collect_trajectories: {name}: {tp.n_fit} trajectories x {n_ref} steps "
                      f"({parallel.world_size()} process(es))")


if __name__ == "__main__":
    main()
