"""Stage train_split@<name>: a two-network model split by noise level (PDM, distill_pdm.md B.7).

split.models.<name>: the high-noise net (log-SNR below log(boundary_snr)) is trained first, the
low-noise net starts from it where shapes match; both are saved as one model dir models/<name>
that load_denoiser returns as a routed denoiser. Outputs: models/<name>/, checkpoints/<name>/,
metrics/study/<name>.json (per-network GFLOPs, boundary index, train time), samples/<name>.png.
"""

from __future__ import annotations

from pathlib import Path

from fewstep import models, storage
from fewstep.train.split import train_split
from stages import _common
from stages.train_teacher import sample_grid, write_loss_csv


def main() -> None:
    ap = _common.parser(__doc__)
    ap.add_argument("--name", required=True, help="a key of split.models (the model dir name)")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--models", default="models")
    ap.add_argument("--checkpoints", default="checkpoints")
    args = ap.parse_args()
    with _common.clear_errors(f"train_split@{args.name}"):
        p, device = _common.setup(args)
        if args.name not in p.split.models:
            raise FileNotFoundError(f"split.models has no {args.name!r} (have {sorted(p.split.models)})")
        model_dir = Path(args.models) / args.name
        results, meta = train_split(p, args.name, args.data, model_dir, Path(args.checkpoints) / args.name, device,
                                    progress=not args.no_progress)
        for side, res in results.items():
            write_loss_csv(Path(f"plots/study/{args.name}-{side}_loss.csv"), res.history)
        sample_grid(model_dir, Path(f"samples/{args.name}.png"), p.teacher.sample, p.base.image_size, device)
        from fewstep.evaluation import gflops_per_net

        den = models.load_denoiser(model_dir, "cpu")
        size = p.base.image_size
        metrics = {"boundary_snr": meta["split"]["boundary_snr"], "t_boundary": meta["split"]["t_boundary"],
                   "gflops_per_call": gflops_per_net(den, (3, size, size))}
        for side, res in results.items():
            metrics[side] = {k: meta["split"][side][k] for k in ("t_range", "patch_size", "train_steps", "init")}
            metrics[side]["final_loss"] = res.history[-1][1] if res.history else None
            if res.steps_run:
                metrics[side]["train_seconds"] = res.seconds
        storage.write_json(f"metrics/study/{args.name}.json", metrics)
        print(f"train_split@{args.name}: boundary index {metrics['t_boundary']}, GFLOPs/call "
              + ", ".join(f"{k} {v:.4f}" for k, v in metrics["gflops_per_call"].items()))


if __name__ == "__main__":
    main()
