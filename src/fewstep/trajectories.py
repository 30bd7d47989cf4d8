"""Full-step DDIM trajectories for OLSS: collection, sharded safetensors, subsampled loading.

A shard holds, for b images: x (N+1, b, C, H, W) latents (x[0] = x_T, x[N] = clean result),
e (N, b, C, H, W) model outputs in x-form, seeds (b,). The 1000-step reference for thousands of
images does not fit in memory, so collection writes shard by shard and the fit loads a fixed,
seeded subsample of elements from each shard (``load_subsample``) or a few steps in full.

Distributed (fewstep.parallel): shards are dealt to ranks in groups of one shard per rank, gathered
on rank 0, which alone writes. A trajectory depends only on its seed, so the files are the same
for any world size and batch size. The model runs in IEEE float32 (``full_precision``) on every
device: the trajectories are the data OLSS fits its weights to (issue 18.4).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import torch
from fewstep.progress import progress as progress_bar

from fewstep import parallel, storage
from fewstep.math.ddim import PerImageNoise, sample_ddim
from fewstep.math.param import Denoiser, full_precision
from fewstep.math.schedules import timesteps


@torch.no_grad()
def collect(denoiser: Denoiser, seeds: Sequence[int], shape: tuple[int, int, int], t_path: Sequence[int],
            device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic, unclipped DDIM over ``t_path`` in float32: (x (N+1, B, ...), e (N, B, ...)) on the CPU."""
    noise = PerImageNoise(seeds, device)
    xs, es = [], []

    def cb(d: dict) -> None:
        xs.append(d["z"].float().cpu())
        es.append(d["x_hat"].float().cpu())

    with full_precision(denoiser):
        x0 = sample_ddim(denoiser, noise.randn(*shape), t_path, clip=False, callback=cb)
    return torch.stack(xs + [x0.float().cpu()]), torch.stack(es)


def write_shards(out: Path, denoiser: Denoiser, seeds: Sequence[int], shape: tuple[int, int, int],
                 t_path: Sequence[int], shard_size: int, batch_size: int, device: torch.device,
                 meta: dict, progress: bool = True) -> None:
    seeds = list(seeds)
    world, rank, main = parallel.world_size(), parallel.rank(), parallel.is_main()
    starts = list(range(0, len(seeds), shard_size))

    def compute(chunk: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [collect(denoiser, chunk[i : i + batch_size], shape, t_path, device)
                 for i in range(0, len(chunk), batch_size)]
        return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)

    with storage.atomic_dir(out) if main else contextlib.nullcontext() as tmp:
        groups = range(0, len(starts), world)  # one shard per rank per group
        for g in progress_bar(groups, desc="trajectories", enabled=progress and main):
            chunks = [seeds[lo : lo + shard_size] for lo in starts[g : g + world]]
            if world == 1:
                x, e = compute(chunks[0])
            else:
                counts = [len(c) for c in chunks] + [0] * (world - len(chunks))
                x, e = compute(chunks[rank]) if rank < len(chunks) else (torch.empty(0), torch.empty(0))
                x, e = parallel.gather_cat(x, counts, dim=1), parallel.gather_cat(e, counts, dim=1)
            if not main:
                continue
            lo = 0
            for k, chunk in enumerate(chunks, start=g):
                sl = slice(lo, lo + len(chunk))
                lo += len(chunk)
                storage.save_tensors(tmp / f"shard-{k:05d}.safetensors",
                                     {"x": x[:, sl].contiguous(), "e": e[:, sl].contiguous(),
                                      "seeds": torch.tensor(chunk, dtype=torch.int64)})
        if main:
            storage.write_json(tmp / "meta.json", {**meta, "timesteps": list(map(int, t_path)), "seeds": seeds,
                                                   "shards": len(starts), "shape": list(shape)})
    parallel.barrier()  # the shards are in place before any rank goes on


def shards(directory: Path) -> list[Path]:
    found = sorted(Path(directory).glob("shard-*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no trajectory shards in {directory}; run collect_trajectories first")
    return found


def load_subsample(directory: Path, max_elements: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """X (N+1, M) and E (N, M) float32 with M <= max_elements, drawn evenly from every shard."""
    files = shards(directory)
    meta = storage.read_json(Path(directory) / "meta.json")
    per_image = 1
    for s in meta["shape"]:
        per_image *= s
    total = len(meta["seeds"]) * per_image
    frac = min(1.0, max_elements / total)
    xs, es = [], []
    for k, f in enumerate(files):
        t = storage.load_tensors(f)
        x, e = t["x"].flatten(1), t["e"].flatten(1)
        m = x.shape[1]
        take = m if frac >= 1.0 else max(1, int(round(frac * m)))
        idx = torch.randperm(m, generator=torch.Generator().manual_seed(seed * 100_003 + k))[:take].sort().values
        xs.append(x[:, idx])
        es.append(e[:, idx])
    return torch.cat(xs, 1), torch.cat(es, 1)


def load_steps(directory: Path, indices: Sequence[int]) -> Iterator[torch.Tensor]:
    """Full latents x[i] (B, C, H, W) for the given reference indices, all images."""
    files = shards(directory)
    loaded = [storage.load_tensors(f)["x"] for f in files]
    for i in indices:
        yield torch.cat([x[i] for x in loaded])


def collect_model(den: Denoiser, name: str, tp, out: Path, device: torch.device,
                  progress: bool = True) -> int:
    """The trajectories of model ``name`` for OLSS (trajectories params ``tp``): deterministic DDIM on
    the trailing grid of min(tp.reference_steps, the model's own sample steps) steps, seeds
    tp.seed_offset.., in the card's image shape, written to ``out`` with the model's weights hash.
    Returns the step count."""
    card = den.card  # type: ignore[attr-defined]
    n_ref = min(tp.reference_steps, card.sample_steps)
    t_path = timesteps(den.schedule.T, n_ref, "trailing")
    seeds = range(tp.seed_offset, tp.seed_offset + tp.n_fit)
    meta = {"model": name, "model_weights_sha256": card.weights_sha256, "reference_steps": n_ref,
            "sampler": "ddim eta=0 unclipped", "output": "x"}
    write_shards(out, den, seeds, card.image_shape, t_path, tp.shard_size, tp.batch_size, device, meta,
                 progress=progress)
    return n_ref
