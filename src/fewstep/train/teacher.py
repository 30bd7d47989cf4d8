"""Teacher training: a diffusion model on the prepared data, any parameterisation."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fewstep import parallel, models, storage
from fewstep.parallel import BatchPart
from fewstep.config import EXECUTION_KEYS, Params
from fewstep.data import DataError
from fewstep.math import precision
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
    return sample_batch_indexed(data, batch_size, hflip, gen, rows)[0]


def sample_batch_indexed(data: torch.Tensor, batch_size: int, hflip: bool, gen: torch.Generator,
                         rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`sample_batch` (the same draws), also returning the rows' indices into ``data``."""
    idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen, device=data.device)
    flip = torch.rand(batch_size, generator=gen, device=data.device) < 0.5 if hflip else None
    x = data[idx[rows]].float() / 127.5 - 1.0
    if flip is not None:
        x = torch.where(flip[rows, None, None, None], x.flip(3), x)
    return x, idx[rows]


def drop_labels(y: torch.Tensor, p_uncond: float, null_label: int, batch_size: int, rows: slice,
                gen: torch.Generator) -> torch.Tensor:
    """Classifier-free guidance's label dropout (Ho & Salimans 2022, Alg. 1): each of the global
    batch's labels becomes ``null_label`` with probability ``p_uncond``, drawn whole from ``gen``
    (so every rank drops the same rows of the global batch); returns the rows ``rows``."""
    drop = (torch.rand(batch_size, generator=gen, device=y.device) < p_uncond)[rows]
    return torch.where(drop, torch.full_like(y, null_label), y)


def draw_like(batch_size: int, shape: tuple[int, ...], rows: slice, gen: torch.Generator,
              device: torch.device) -> torch.Tensor:
    """Rows ``rows`` of a standard normal (batch_size, *shape) drawn whole from ``gen``."""
    return torch.randn((batch_size, *shape), generator=gen, device=device)[rows]


def diffusion_loss(
    data: torch.Tensor, schedule: Schedule, kind: str, weighting: str, batch_size: int, hflip: bool,
    t_range: tuple[int, int] | None = None, labels: torch.Tensor | None = None, num_classes: int | None = None,
    p_uncond: float = 0.0, logsnr_normal: tuple[float, float] | None = None,
) -> Callable[[torch.nn.Module, torch.Generator], torch.Tensor]:
    """loss_fn(net, gen, part) for the training loop. ``data``: uint8 (N, C, H, W) on the device.

    Timesteps uniform on 1..T, or on ``t_range`` (inclusive indices: one side of a split model's
    log-SNR boundary); every random draw comes from ``gen`` (seeded per step) for the whole global
    batch; the rank computes rows ``part.rows(batch_size)`` and returns their loss sum / batch_size
    (its share of the global mean). ``logsnr_normal`` = (mean, std): timesteps drawn instead as
    log-SNR ~ N(mean, std^2) snapped to the nearest index of ``t_range`` (:func:`logsnr_to_index`).

    ``labels`` (N,) long on the device, classes 0..num_classes-1: a class-conditional net
    ``net(z, t, y)``, each label dropped to the null label ``num_classes`` with probability
    ``p_uncond``; the label draws come after all others, so an unconditional run's are unchanged."""
    if labels is not None:
        if num_classes is None:
            raise ValueError("a conditional diffusion loss needs num_classes (the null label's index)")
        check_train_labels(labels, data.shape[0], num_classes)
    null_label = num_classes
    dev = data.device
    T = schedule.T
    lo, hi = t_range or (1, T)
    if not 1 <= lo <= hi <= T:
        raise ValueError(f"t_range {t_range} must satisfy 1 <= lo <= hi <= T={T}")
    fmt = precision.memory_format(dev)  # channels_last on CUDA; on the CPU by base.channels_last
    draw_t = uniform_t(lo, hi, dev) if logsnr_normal is None else logsnr_normal_t(schedule, lo, hi, *logsnr_normal, dev)

    def loss_fn(net: torch.nn.Module, gen: torch.Generator, part: BatchPart = BatchPart()) -> torch.Tensor:
        rows = part.rows(batch_size)
        x, idx = sample_batch_indexed(data, batch_size, hflip, gen, rows)
        t = draw_t(batch_size, gen)[rows]
        eps = draw_like(batch_size, tuple(x.shape[1:]), rows, gen, dev)
        y = None if labels is None else drop_labels(labels[idx], p_uncond, null_label, batch_size, rows, gen)
        alpha, sigma = schedule.at(t, torch.float32)
        z = alpha[:, None, None, None] * x + sigma[:, None, None, None] * eps
        z = precision.to_format(z, fmt)
        with precision.autocast(dev):  # bf16 on CUDA; on the CPU by base.cpu_bf16 (fewstep.math.precision)
            pred = net(z, t.float() / T) if y is None else net(z, t.float() / T, y)
        return weighted_x_loss(pred.float(), kind, z, x, alpha, sigma, weighting, eps_target=eps).sum() / batch_size

    return loss_fn


def uniform_t(lo: int, hi: int, device: torch.device) -> Callable[[int, torch.Generator], torch.Tensor]:
    """Timesteps uniform on lo..hi (inclusive), the whole batch from ``gen``."""
    return lambda n, gen: torch.randint(lo, hi + 1, (n,), generator=gen, device=device)


def logsnr_to_index(schedule: Schedule, logsnr: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The index in lo..hi whose log-SNR is nearest to each of ``logsnr`` (log-SNR falls with t)."""
    lam = torch.from_numpy(schedule.logsnr[lo : hi + 1].copy()).to(logsnr.device, torch.float64)
    asc = lam.flip(0)  # ascending: indices hi..lo
    pos = torch.searchsorted(asc, logsnr.double()).clamp(1, len(asc) - 1) if len(asc) > 1 else torch.zeros_like(
        logsnr, dtype=torch.long)
    if len(asc) > 1:  # the nearer of the two neighbours
        pos = torch.where((logsnr.double() - asc[pos - 1]).abs() <= (asc[pos] - logsnr.double()).abs(), pos - 1, pos)
    return hi - pos


def logsnr_normal_t(schedule: Schedule, lo: int, hi: int, mean: float, std: float,
                    device: torch.device) -> Callable[[int, torch.Generator], torch.Tensor]:
    """Timesteps whose log-SNR is N(mean, std^2) (EDM's log-normal noise levels, Karras et al. 2022)
    truncated to the log-SNR span of lo..hi, snapped to the grid: inverse-CDF draws from uniforms of
    ``gen``, so a split model's side (a narrow ``t_range``) spreads its steps over its own span
    instead of piling the mass outside it on its end."""
    lam = schedule.logsnr
    a = torch.special.ndtr(torch.tensor((float(lam[hi]) - mean) / std, dtype=torch.float64))
    b = torch.special.ndtr(torch.tensor((min(float(lam[lo]), 1e6) - mean) / std, dtype=torch.float64))
    if float(b - a) < 1e-12:
        raise ValueError(f"log-SNR ~ N({mean}, {std}^2) puts no mass on t_range {lo}..{hi} "
                         f"(log-SNR {lam[hi]:.2f}..{lam[lo]:.2f})")

    def draw(n: int, gen: torch.Generator) -> torch.Tensor:
        u = torch.rand(n, generator=gen, device=device, dtype=torch.float64)
        p = (a.to(device) + u * (b - a).to(device)).clamp(1e-300, 1 - 1e-16)
        return logsnr_to_index(schedule, mean + std * torch.special.ndtri(p), lo, hi)
    return draw


def check_train_labels(labels: torch.Tensor, n_images: int, num_classes: int) -> None:
    """One label per training image, each a class 0..num_classes-1 (a DataError otherwise)."""
    if labels.ndim != 1 or labels.shape[0] != n_images:
        raise DataError(f"prepared labels have shape {tuple(labels.shape)}; expected one per image ({n_images},); "
                        "re-run prepare_data")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(f"prepared labels span {int(labels.min())}..{int(labels.max())} but the manifest names "
                        f"{num_classes} classes; re-run prepare_data")


def time_sampling(tp: Any) -> tuple[float, float] | None:
    """(mean, std) of a teacher section's log-normal noise levels; None for uniform t."""
    ts = getattr(tp, "t_sampling", None)
    return (ts.mean, ts.std) if ts is not None and ts.kind == "logsnr_normal" else None


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


def load_train_labels(data_dir: str | Path, n_images: int, num_classes: int, device: torch.device) -> torch.Tensor:
    """The prepared train labels (N,) long on ``device``, checked against the images and classes."""
    path = Path(data_dir) / "train_labels.npy"
    if not path.exists():
        raise DataError(f"a class-conditional teacher needs the prepared labels, but {path} is missing; "
                        "re-run prepare_data")
    labels = torch.from_numpy(np.asarray(storage.load_array(path), dtype=np.int64))
    check_train_labels(labels, n_images, num_classes)
    return labels.to(device)


def run_hash(p: Params, data_hash: str) -> str:
    """What a checkpoint must match to be resumed: the params that shape the run, and the data."""
    return storage.sha256_json({"teacher": p.teacher.model_dump(), "schedule": p.schedule.model_dump(),
                                "base": p.base.model_dump(exclude=set(EXECUTION_KEYS)), "data": data_hash})


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
    labels, num_classes = None, None
    if tp.conditioning is not None:  # class-conditional: the classes are the prepared data's
        num_classes = len(manifest["class_names"])
        labels = load_train_labels(data_dir, data.shape[0], num_classes, device)
    torch.manual_seed(p.base.seed)
    net = UNet(dataclasses.replace(tp.net.unet_config(p.base.image_size), num_classes=num_classes))
    net = net.to(memory_format=precision.memory_format(device))
    loop = loop_config(tp, p.base.seed)
    rh = run_hash(p, manifest["content_hash"])
    loss_fn = diffusion_loss(data, schedule, tp.parameterization, weighting, tp.batch_size, tp.hflip, labels=labels,
                             num_classes=num_classes, p_uncond=tp.conditioning.p_uncond if tp.conditioning else 0.0,
                             logsnr_normal=time_sampling(tp))
    result = train(net, loss_fn, loop, ckpt_dir, rh, device, progress=progress, desc="teacher", on_log=on_log)
    card = models.ModelCard(
        arch=models.UNetArch(result.net.cfg), role="teacher", parameterization=tp.parameterization,
        schedule=schedule_spec(p), image_size=p.base.image_size, sample_steps=p.schedule.T, weighting=weighting,
        conditioning=models.Conditioning(num_classes),
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
