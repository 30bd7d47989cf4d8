"""Small output files the stages share: CSV tables for DVC plots and a model's sample grid."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from fewstep import models, parallel, storage
from fewstep.config import SampleParams
from fewstep.images import save_grid
from fewstep.math.ddim import generate
from fewstep.math.guidance import cycle_labels
from fewstep.math.schedules import timesteps


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A CSV file (header, then rows of already formatted cells), written atomically."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    storage.atomic_write_bytes(path, buf.getvalue().encode())


def write_loss_csv(path: str | Path, history: Sequence[Sequence[float]]) -> None:
    """A training loss curve [(step, loss), ...] as the DVC plot step,loss."""
    write_csv(path, ["step", "loss"], ([int(s), f"{l:.6g}"] for s, l in history))


def write_rows_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> None:
    """``keys`` of each row: integers as they are, other numbers with 6 significant digits."""
    write_csv(path, keys, ([r[k] if isinstance(r[k], int) else f"{r[k]:.6g}" for k in keys] for r in rows))


def sample_grid(model_dir: Path, out: Path, sp: SampleParams, device: torch.device) -> None:
    """DDIM samples of the model in ``model_dir`` (seeds sp.seed.., sp.steps steps, sp.spacing) as a
    PNG grid at about 64 px per image (the image shape is the card's). The seeds are sampled
    sharded over the ranks; rank 0 writes. A class-conditional model's image from seed s is of
    class (s - sp.seed) mod num_classes (math.guidance.cycle_labels), at guidance scale
    sp.guidance."""
    den = models.load_denoiser(model_dir, device)
    shape = den.card.image_shape
    steps = timesteps(den.schedule.T, min(sp.steps, den.schedule.T), sp.spacing)
    n_classes = den.card.conditioning.num_classes

    def shard(seeds: Sequence[int]) -> torch.Tensor:
        labels = cycle_labels(seeds, sp.seed, n_classes) if n_classes else None
        return generate(den, seeds, shape, steps, device=device, labels=labels, guidance=sp.guidance)

    imgs = parallel.map_sharded(shard, range(sp.seed, sp.seed + sp.n))
    if parallel.is_main():
        save_grid(imgs, out, scale=max(1, 64 // shape[-1]))
