"""Stage train_teacher: train (or resume) the diffusion teacher, export it, sample a grid.

Outputs: models/teacher/ (safetensors + config.json), checkpoints/teacher/ (resume state),
metrics/teacher.json, plots/teacher_loss.csv, samples/teacher.png.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch

from fewstep import parallel, models, storage
from fewstep.images import save_grid
from fewstep.math.ddim import generate
from fewstep.math.schedules import timesteps
from fewstep.train.teacher import train_teacher
from stages import _common


def write_loss_csv(path: Path, history: list[list[float]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["step", "loss"])
    w.writerows([[int(s), f"{l:.6g}"] for s, l in history])
    storage.atomic_write_bytes(path, buf.getvalue().encode())


def sample_grid(model_dir: Path, out: Path, sp, image_size: int, device: torch.device) -> None:
    """The grid's seeds are sampled sharded over the ranks; rank 0 writes it."""
    den = models.load_denoiser(model_dir, device)
    steps = timesteps(den.schedule.T, min(sp.steps, den.schedule.T), sp.spacing)
    imgs = parallel.map_sharded(lambda s: generate(den, s, (3, image_size, image_size), steps, device=device),
                            range(sp.seed, sp.seed + sp.n))
    if parallel.is_main():
        save_grid(imgs, out, scale=max(1, 64 // image_size))


def main() -> None:
    ap = _common.parser(__doc__)
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--model", default="models/teacher")
    ap.add_argument("--checkpoints", default="checkpoints/teacher")
    ap.add_argument("--metrics", default="metrics/teacher.json")
    ap.add_argument("--loss-csv", default="plots/teacher_loss.csv")
    ap.add_argument("--grid", default="samples/teacher.png")
    args = ap.parse_args()
    with _common.clear_errors("train_teacher") as rec:
        p, device = _common.setup(args)
        result, meta = train_teacher(p, args.data, args.model, args.checkpoints, device,
                                     progress=not args.no_progress)
        sample_grid(Path(args.model), Path(args.grid), p.teacher.sample, p.base.image_size, device)
        if not parallel.is_main():
            return
        write_loss_csv(Path(args.loss_csv), result.history)
        n_params = sum(t.numel() for t in storage.load_tensors(Path(args.model) / models.WEIGHTS).values())
        metrics = {
            "final_loss": result.history[-1][1] if result.history else None,
            "steps": p.teacher.steps,
            "params": n_params,
            "device": device.type,
        }
        if result.steps_run:
            metrics["images_per_s"] = result.steps_run * p.teacher.batch_size / result.seconds
        if parallel.world_size() > 1:
            metrics["world_size"] = parallel.world_size()
        storage.write_json(args.metrics, metrics)
        rec.log_metrics(metrics)
        rec.log_history("loss", result.history)
        rec.log_artifact(args.grid)
        rec.set_tags(weights_sha256=meta["weights_sha256"])
        print(f"train_teacher: loss {metrics['final_loss']}, {n_params} params, weights {meta['weights_sha256'][:12]}")


if __name__ == "__main__":
    main()
