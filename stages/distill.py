"""Stage distill@ROUND: one progressive-distillation round (N -> N/2 sampling steps).

Reads distill.defaults + distill.rounds.ROUND; the parent is models/teacher or an earlier round's
student. Outputs models/ROUND, checkpoints/ROUND, metrics/ROUND.json, plots/ROUND_loss.csv and
samples/ROUND.png. The metrics compare, on the same noise, the student's N/2-step samples and the
parent's own N/2-step DDIM samples against the parent's N-step samples (RMSE).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fewstep import parallel, models, storage
from fewstep.images import save_grid
from fewstep.math import metrics
from fewstep.math.ddim import generate
from fewstep.math.schedules import timesteps
from fewstep.train.distill import distill_round
from stages import _common
from stages.train_teacher import write_loss_csv


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return metrics.rmse(a.numpy(), b.numpy())


def main() -> None:
    ap = _common.parser(__doc__)
    ap.add_argument("--round", required=True, help="round name (a key of distill.rounds)")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--models", default="models")
    args = ap.parse_args()
    name = args.round
    with _common.clear_errors(f"distill@{name}") as rec:
        p, device = _common.setup(args)
        rp = p.distill.round(name)
        parent_dir = Path(args.models) / rp.parent
        out_dir = Path(args.models) / name
        result, meta = distill_round(parent_dir, out_dir, Path("checkpoints") / name, args.data, rp.steps, rp,
                                     p.base.seed, device, progress=not args.no_progress)
        parent = models.load_denoiser(parent_dir, device)
        student = models.load_denoiser(out_dir, device)
        T, S = parent.schedule.T, rp.steps
        shape = (3, p.base.image_size, p.base.image_size)
        seeds = range(rp.sample.seed, rp.sample.seed + rp.sample.n)

        def sharded(den, n):  # seeds sharded over the ranks, gathered on rank 0
            return parallel.map_sharded(lambda s: generate(den, s, shape, timesteps(T, n), device=device), seeds)

        ref, parent_half, stud = sharded(parent, 2 * S), sharded(parent, S), sharded(student, S)
        if not parallel.is_main():
            return
        write_loss_csv(Path("plots") / f"{name}_loss.csv", result.history)
        save_grid(stud, Path("samples") / f"{name}.png", scale=max(1, 64 // p.base.image_size))
        metrics = {
            "student_steps": S,
            "parent_steps": 2 * S,
            "rmse_student_vs_parent": rmse(stud, ref),
            "rmse_parent_half_steps_vs_parent": rmse(parent_half, ref),
            "final_loss": result.history[-1][1] if result.history else None,
        }
        if result.steps_run:
            metrics["seconds"] = result.seconds
        storage.write_json(Path("metrics") / f"{name}.json", metrics)
        rec.log_metrics(metrics)
        rec.log_history("loss", result.history)
        rec.log_artifact(Path("samples") / f"{name}.png")
        rec.set_tags(weights_sha256=meta["weights_sha256"], parent=rp.parent)
        print(f"distill@{name}: {2 * S}->{S} steps, RMSE to parent: student {metrics['rmse_student_vs_parent']:.4f} "
              f"vs parent at {S} steps {metrics['rmse_parent_half_steps_vs_parent']:.4f}")


if __name__ == "__main__":
    main()
