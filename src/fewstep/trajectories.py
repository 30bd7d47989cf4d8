"""Full-step DDIM trajectories for OLSS: collection, sharded safetensors, subsampled loading.

A shard holds, for b images: x (N+1, b, C, H, W) latents (x[0] = x_T, x[N] = clean result),
e (N, b, C, H, W) the model's x predictions (x_hat), o (N, b, C, H, W) the network's own outputs
in its parameterisation (eps, v or x: the paper's OLSS basis), seeds (b,). The 1000-step reference
for thousands of images does not fit in memory, so collection writes shard by shard and the fit
loads a fixed, seeded subsample of elements from each shard (``load_subsample``) or a few steps in
full. Shards written before "o" existed raise StaleTrajectoriesError when "o" is asked for.

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
from fewstep.errors import UserError
from fewstep.math.ddim import PerImageNoise, sample_ddim
from fewstep.math.guidance import ClassGuidance
from fewstep.math.param import Denoiser, full_precision
from fewstep.math.schedules import timesteps


KEYS = ("x", "e", "o")  # latents, x predictions, the network's own outputs


class StaleTrajectoriesError(UserError):
    """The trajectories were recorded from another version of the model or of this code."""


@torch.no_grad()
def collect_all(denoiser: Denoiser, seeds: Sequence[int], shape: tuple[int, int, int], t_path: Sequence[int],
                device: torch.device | str = "cpu", guidance=None) -> dict[str, torch.Tensor]:
    """Deterministic, unclipped DDIM over ``t_path``, the model in IEEE float32, results float32 on the
    CPU: x (N+1, B, ...) latents, e (N, B, ...) x predictions, o (N, B, ...) raw network outputs
    (kind ``denoiser.kind``; guided: the guided combination). ``guidance``: a class-conditional
    model sampled at its seeds' labels and scale (ClassGuidance), or a text one at its seeds'
    prompts (fewstep.prompts.TextGuidance): anything with ``wrap(den, seeds)`` and ``to_dict()``."""
    noise = PerImageNoise(seeds, device)
    if guidance is not None:
        denoiser = guidance.wrap(denoiser, seeds)
    with full_precision(denoiser):
        t = trajectory(denoiser, noise.randn(*shape), t_path)
    return {k: v.float().cpu() for k, v in t.items()}


@torch.no_grad()
def trajectory(denoiser: Denoiser, x_T: torch.Tensor, t_path: Sequence[int]) -> dict[str, torch.Tensor]:
    """Deterministic, unclipped DDIM from ``x_T`` over ``t_path``, in x_T's dtype and device (e.g.
    float64 for the analytic mixtures of the OLSS tests): x (N+1, B, ...) latents, e (N, B, ...) x
    predictions, o (N, B, ...) raw outputs (kind ``denoiser.kind``)."""
    xs, es, os_ = [], [], []

    def cb(d: dict) -> None:
        xs.append(d["z"])
        es.append(d["x_hat"])
        os_.append(d["pred"])

    x0 = sample_ddim(denoiser, x_T, t_path, clip=False, callback=cb)
    return {"x": torch.stack(xs + [x0]), "e": torch.stack(es), "o": torch.stack(os_)}


def collect(denoiser: Denoiser, seeds: Sequence[int], shape: tuple[int, int, int], t_path: Sequence[int],
            device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(x (N+1, B, ...), e (N, B, ...)) of collect_all."""
    t = collect_all(denoiser, seeds, shape, t_path, device)
    return t["x"], t["e"]


def write_shards(out: Path, denoiser: Denoiser, seeds: Sequence[int], shape: tuple[int, int, int],
                 t_path: Sequence[int], shard_size: int, batch_size: int, device: torch.device,
                 meta: dict, progress: bool = True, guidance=None) -> None:
    seeds = list(seeds)
    world, rank, main = parallel.world_size(), parallel.rank(), parallel.is_main()
    starts = list(range(0, len(seeds), shard_size))

    def compute(chunk: list[int]) -> dict[str, torch.Tensor]:
        parts = [collect_all(denoiser, chunk[i : i + batch_size], shape, t_path, device, guidance)
                 for i in range(0, len(chunk), batch_size)]
        return {k: torch.cat([p[k] for p in parts], 1) for k in KEYS}

    with storage.atomic_dir(out) if main else contextlib.nullcontext() as tmp:
        groups = range(0, len(starts), world)  # one shard per rank per group
        for g in progress_bar(groups, desc="trajectories", enabled=progress and main):
            chunks = [seeds[lo : lo + shard_size] for lo in starts[g : g + world]]
            if world == 1:
                got = compute(chunks[0])
            else:
                counts = [len(c) for c in chunks] + [0] * (world - len(chunks))
                got = compute(chunks[rank]) if rank < len(chunks) else {k: torch.empty(0) for k in KEYS}
                got = {k: parallel.gather_cat(got[k], counts, dim=1) for k in KEYS}
            if not main:
                continue
            lo = 0
            for k, chunk in enumerate(chunks, start=g):
                sl = slice(lo, lo + len(chunk))
                lo += len(chunk)
                storage.save_tensors(tmp / f"shard-{k:05d}.safetensors",
                                     {**{key: got[key][:, sl].contiguous() for key in KEYS},
                                      "seeds": torch.tensor(chunk, dtype=torch.int64)})
        if main:
            cond = {"conditioning": guidance.to_dict()} if guidance is not None else {}  # absent: unconditional
            storage.write_json(tmp / "meta.json", {**meta, "timesteps": list(map(int, t_path)), "seeds": seeds,
                                                   "shards": len(starts), "shape": list(shape), **cond})
    parallel.barrier()  # the shards are in place before any rank goes on


def shards(directory: Path) -> list[Path]:
    found = sorted(Path(directory).glob("shard-*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no trajectory shards in {directory}; run collect_trajectories first")
    return found


def _get(t: dict[str, torch.Tensor], key: str, f: Path) -> torch.Tensor:
    if key not in t:
        if key in KEYS:
            raise StaleTrajectoriesError(f"{f} has no {key!r} (written before the network's own outputs were "
                                         "recorded); re-run collect_trajectories")
        raise ValueError(f"unknown trajectory key {key!r}; expected one of {KEYS}")
    return t[key]


def load_subsample(directory: Path, max_elements: int, seed: int = 0,
                   keys: Sequence[str] = ("x", "e")) -> tuple[torch.Tensor, ...]:
    """The arrays ``keys`` flattened, float32, on one subsample of M <= max_elements elements drawn
    evenly from every shard: by default X (N+1, M) and E (N, M); ("x", "e", "o") adds O (N, M)."""
    files = shards(directory)
    meta = storage.read_json(Path(directory) / "meta.json")
    per_image = 1
    for s in meta["shape"]:
        per_image *= s
    total = len(meta["seeds"]) * per_image
    frac = min(1.0, max_elements / total)
    parts: list[list[torch.Tensor]] = [[] for _ in keys]
    for k, f in enumerate(files):
        t = storage.load_tensors(f)
        arrays = [_get(t, key, f).flatten(1) for key in keys]
        m = arrays[0].shape[1]
        take = m if frac >= 1.0 else max(1, int(round(frac * m)))
        idx = torch.randperm(m, generator=torch.Generator().manual_seed(seed * 100_003 + k))[:take].sort().values
        for part, a in zip(parts, arrays):
            part.append(a[:, idx])
    return tuple(torch.cat(p, 1) for p in parts)


def load_steps(directory: Path, indices: Sequence[int], key: str = "x") -> Iterator[torch.Tensor]:
    """Full arrays ``key``[i] (B, C, H, W) for the given reference indices, all images (key "x":
    latents, "e": x predictions, "o": network outputs)."""
    files = shards(directory)
    loaded = [_get(storage.load_tensors(f), key, f) for f in files]
    for i in indices:
        yield torch.cat([x[i] for x in loaded])


def collect_model(den: Denoiser, name: str, tp, out: Path, device: torch.device,
                  progress: bool = True, prompts=None) -> int:
    """The trajectories of model ``name`` for OLSS (trajectories params ``tp``): deterministic DDIM on
    the trailing grid of min(tp.reference_steps, the model's own sample steps) steps, seeds
    tp.seed_offset.., in the card's image shape, written to ``out`` with the model's weights hash.
    A class-conditional model samples seed s as class (s - tp.seed_offset) mod num_classes at
    guidance scale tp.guidance (recorded in meta.json as ``conditioning``). A text-conditional model
    (card conditioning kind "text", e.g. fewstep.interop.sd) samples seed s at prompt (s -
    tp.seed_offset) mod N of ``prompts`` (a fewstep.prompts.PromptSet), guided at tp.guidance; its
    latents are the trajectories, and meta.json records the prompt file (``prompts``, its sha256 in
    ``conditioning``). Returns the step count."""
    from fewstep.prompts import TextGuidance, text_conditioning

    if text_conditioning(den) is not None:
        guidance = TextGuidance.for_model(den, prompts, tp.guidance, tp.seed_offset)
    else:
        guidance = ClassGuidance.for_model(den, tp.guidance, tp.seed_offset)
    card = den.card  # type: ignore[attr-defined]
    n_ref = min(tp.reference_steps, card.sample_steps)
    t_path = timesteps(den.schedule.T, n_ref, "trailing")
    seeds = range(tp.seed_offset, tp.seed_offset + tp.n_fit)
    meta = {"model": name, "model_weights_sha256": card.weights_sha256, "reference_steps": n_ref,
            "sampler": "ddim eta=0 unclipped", "output": "x", "network_output": den.kind,
            "keys": {"x": "latents", "e": "x_hat", "o": f"network output ({den.kind})"}}
    if prompts is not None and text_conditioning(den) is not None:
        meta["prompts"] = prompts.artifact()
    write_shards(out, den, seeds, card.image_shape, t_path, tp.shard_size, tp.batch_size, device, meta,
                 progress=progress, guidance=guidance)
    return n_ref
