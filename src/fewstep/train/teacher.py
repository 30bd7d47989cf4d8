"""Teacher training: a diffusion model on the prepared data, any parameterisation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fewstep import parallel, models, storage
from fewstep.parallel import BatchPart
from fewstep.config import Params
from fewstep.math.losses import DEFAULT_WEIGHTING, weighted_x_loss
from fewstep.math.schedules import Schedule, make_schedule
from fewstep.nets.unet import UNet
from fewstep.train.loop import LoopConfig, LoopResult, train


def schedule_of(p: Params) -> Schedule:
    return make_schedule(p.schedule.kind, p.schedule.T, **p.schedule.kwargs())


def schedule_spec(p: Params) -> models.ScheduleSpec:
    return models.ScheduleSpec(p.schedule.kind, p.schedule.T, **p.schedule.kwargs())


def sample_batch(data: torch.Tensor, batch_size: int, hflip: bool, gen: torch.Generator,
                 rows: slice = slice(None)) -> torch.Tensor:
    """Rows ``rows`` of a batch in [-1, 1] drawn with replacement from uint8 ``data``, randomly
    flipped; all from ``gen``. The whole batch's draws are made (and the slice taken after), so
    every rank of a distributed step sees its own rows of the same global batch."""
    idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen, device=data.device)
    flip = torch.rand(batch_size, generator=gen, device=data.device) < 0.5 if hflip else None
    x = data[idx[rows]].float() / 127.5 - 1.0
    if flip is not None:
        x = torch.where(flip[rows, None, None, None], x.flip(3), x)
    return x


def draw_like(batch_size: int, shape: tuple[int, ...], rows: slice, gen: torch.Generator,
              device: torch.device) -> torch.Tensor:
    """Rows ``rows`` of a standard normal (batch_size, *shape) drawn whole from ``gen``."""
    return torch.randn((batch_size, *shape), generator=gen, device=device)[rows]


def diffusion_loss(
    data: torch.Tensor, schedule: Schedule, kind: str, weighting: str, batch_size: int, hflip: bool,
    t_range: tuple[int, int] | None = None,
) -> Callable[[torch.nn.Module, torch.Generator], torch.Tensor]:
    """loss_fn(net, gen, part) for the training loop. ``data``: uint8 (N, C, H, W) on the device.

    Timesteps uniform on 1..T, or on ``t_range`` (inclusive indices: one side of a split model's
    log-SNR boundary); every random draw comes from ``gen`` (seeded per step) for the whole global
    batch; the rank computes rows ``part.rows(batch_size)`` and returns their loss sum / batch_size
    (its share of the global mean)."""
    dev = data.device
    T = schedule.T
    lo, hi = t_range or (1, T)
    if not 1 <= lo <= hi <= T:
        raise ValueError(f"t_range {t_range} must satisfy 1 <= lo <= hi <= T={T}")
    channels_last = dev.type == "cuda"

    def loss_fn(net: torch.nn.Module, gen: torch.Generator, part: BatchPart = BatchPart()) -> torch.Tensor:
        rows = part.rows(batch_size)
        x = sample_batch(data, batch_size, hflip, gen, rows)
        t = torch.randint(lo, hi + 1, (batch_size,), generator=gen, device=dev)[rows]
        eps = draw_like(batch_size, tuple(x.shape[1:]), rows, gen, dev)
        alpha, sigma = schedule.at(t, torch.float32)
        z = alpha[:, None, None, None] * x + sigma[:, None, None, None] * eps
        if channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            pred = net(z, t.float() / T)
        return weighted_x_loss(pred.float(), kind, z, x, alpha, sigma, weighting, eps_target=eps).sum() / batch_size

    return loss_fn


def loop_config(tp: Any, seed: int) -> LoopConfig:
    """The training loop's settings from a teacher section (fewstep.config.TeacherParams)."""
    return LoopConfig(
        steps=tp.steps, lr=tp.lr, warmup=tp.warmup, lr_decay=tp.lr_decay, weight_decay=tp.weight_decay,
        grad_clip=tp.grad_clip, ema_decay=tp.ema_decay, checkpoint_every=tp.checkpoint_every,
        keep_checkpoints=tp.keep_checkpoints, log_every=tp.log_every, seed=seed,
    )


def load_train_data(p: Params, data_dir: str | Path, device: torch.device) -> tuple[dict[str, Any], torch.Tensor]:
    """(manifest, uint8 (N, C, H, W) train images on ``device``), checked against base.image_size."""
    data_dir = Path(data_dir)
    manifest = storage.read_json(data_dir / "manifest.json")
    images = storage.load_array(data_dir / "train_images.npy")
    if images.shape[1] != p.base.image_size:
        raise ValueError(
            f"prepared images are {images.shape[1]}px but base.image_size is {p.base.image_size}; re-run prepare_data"
        )
    return manifest, torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)


def run_hash(p: Params, data_hash: str) -> str:
    """What a checkpoint must match to be resumed: the params that shape the run, and the data."""
    return storage.sha256_json({"teacher": p.teacher.model_dump(), "schedule": p.schedule.model_dump(),
                                "base": p.base.model_dump(exclude={"device", "threads"}), "data": data_hash})


def train_teacher(
    p: Params,
    data_dir: str | Path,
    model_dir: str | Path,
    ckpt_dir: str | Path,
    device: torch.device,
    progress: bool = True,
    on_log: Callable[[int, float], None] | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> tuple[LoopResult, models.ModelCard]:
    """Train (or resume) the teacher and write its model directory. Returns the loop result
    and the model card written beside the weights (``extra_meta``: card keys set on it, e.g. the
    patch study's ``variant`` and ``study``)."""
    tp = p.teacher
    manifest, data = load_train_data(p, data_dir, device)
    schedule = schedule_of(p)
    weighting = tp.weighting or DEFAULT_WEIGHTING[tp.parameterization]
    torch.manual_seed(p.base.seed)
    net = UNet(tp.net.unet_config(p.base.image_size))
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    loop = loop_config(tp, p.base.seed)
    rh = run_hash(p, manifest["content_hash"])
    loss_fn = diffusion_loss(data, schedule, tp.parameterization, weighting, tp.batch_size, tp.hflip)
    result = train(net, loss_fn, loop, ckpt_dir, rh, device, progress=progress, desc="teacher", on_log=on_log)
    card = models.ModelCard(
        arch=models.UNetArch(result.net.cfg), role="teacher", parameterization=tp.parameterization,
        schedule=schedule_spec(p), image_size=p.base.image_size, sample_steps=p.schedule.T, weighting=weighting,
        lineage=models.Lineage(dataset=p.base.dataset, class_names=tuple(manifest["class_names"]),
                               data_hash=manifest["content_hash"], params_hash=storage.sha256_json(p.teacher.model_dump()),
                               run_hash=rh, train_steps=tp.steps),
    )
    if extra_meta:
        card = card.updated(**extra_meta)
    return result, save_on_main(model_dir, card, lambda: result.net.to("cpu").float().state_dict())


def save_on_main(model_dir: str | Path, card: models.ModelCard,
                 state: Callable[[], dict[str, torch.Tensor]], kind: str = "model") -> models.ModelCard:
    """Rank 0 writes the model dir; every rank gets the card with the weights' sha256 (and waits
    until the model is on disk)."""
    sha = models.save(model_dir, card, state(), kind).weights_sha256 if parallel.is_main() else None
    return card.with_weights(broadcast_sha(sha))


def broadcast_sha(sha: str | None) -> str:
    """Rank 0's sha256 hex digest on every rank; ranks wait until rank 0 has written the model."""
    buf = torch.zeros(64, dtype=torch.uint8)
    if parallel.is_main():
        buf[:] = torch.tensor(list(sha.encode()), dtype=torch.uint8)
    return bytes(parallel.broadcast(buf).tolist()).decode()
