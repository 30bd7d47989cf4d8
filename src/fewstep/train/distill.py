"""One progressive-distillation round: a teacher sampling in N steps -> a student in N/2.

The student starts as a copy of the teacher (dropout off), learns the two-step target of
fewstep.math.distill, with lr annealed linearly to 0 within the round, optional EMA, grad clip.
Student step i (1..N/2) sits at grid index t = 2 i T / N, so the student's N/2-step trailing
DDIM grid starts at T (zero SNR end), exactly as it is trained. A split teacher's student is a split
model started from both nets, routed at the teacher's boundary (fewstep.math.split.SplitNet).

The student's parameterisation is its teacher's, so a round is refused (before any work) where that
parameterisation with the round's weighting is a combination the PD paper shows diverges.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fewstep import models, storage
from fewstep.parallel import BatchPart
from fewstep.math.distill import distill_target
from fewstep.errors import UserError
from fewstep.math.losses import DEFAULT_WEIGHTING, divergence, weighted_x_loss
from fewstep.math.param import NetDenoiser
from fewstep.train.loop import LoopConfig, LoopResult, train
from fewstep.train.teacher import draw_like, sample_batch, save_on_main


class DistillSetupError(UserError, ValueError):
    """A distillation round that cannot start from its parent: wrong step count, or a
    parameterisation / weighting pair that diverges."""


def check_round(parent: models.ModelCard, parent_dir: str | Path, student_steps: int, weighting: str) -> None:
    """Refuse a round its parent cannot start: a student parent must sample in 2x the round's steps,
    and the parent's parameterisation (the student's) with ``weighting`` must not diverge."""
    parent_steps = 2 * student_steps
    if parent.role == "student" and parent.sample_steps != parent_steps:
        raise DistillSetupError(
            f"parent {parent_dir} samples in {parent.sample_steps} steps; a round to {student_steps} steps "
            f"needs a {parent_steps}-step parent (each round halves)"
        )
    reason = divergence(parent.parameterization, weighting)
    if reason:
        raise DistillSetupError(f"distill round from {parent_dir}: {reason} (the student predicts its teacher's "
                                f"{parent.parameterization}); set the round's weighting, e.g. "
                                f"{DEFAULT_WEIGHTING[parent.parameterization]}")


def distill_loss(
    teacher: NetDenoiser, data: torch.Tensor, student_steps: int, weighting: str, batch_size: int, hflip: bool
) -> Callable[[torch.nn.Module, torch.Generator], torch.Tensor]:
    sch, kind = teacher.schedule, teacher.kind
    T = sch.T
    N = 2 * student_steps
    if T % N:
        raise ValueError(f"schedule T={T} is not divisible by the teacher's step count {N}")
    dt = T // N
    dev = data.device

    def loss_fn(student: torch.nn.Module, gen: torch.Generator, part: BatchPart = BatchPart()) -> torch.Tensor:
        rows = part.rows(batch_size)  # this rank's rows of the global batch (fewstep.train.loop)
        x = sample_batch(data, batch_size, hflip, gen, rows)
        i = torch.randint(1, student_steps + 1, (batch_size,), generator=gen, device=dev)[rows]
        t = 2 * dt * i
        eps = draw_like(batch_size, tuple(x.shape[1:]), rows, gen, dev)
        alpha, sigma = sch.at(t, torch.float32)
        z = alpha[:, None, None, None] * x + sigma[:, None, None, None] * eps
        x_tgt = distill_target(teacher, z, t, dt)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            pred = student(z, t.float() / T)
        return weighted_x_loss(pred.float(), kind, z, x_tgt, alpha, sigma, weighting).sum() / batch_size

    return loss_fn


def distill_round(
    parent_dir: str | Path,
    out_dir: str | Path,
    ckpt_dir: str | Path,
    data_dir: str | Path,
    student_steps: int,
    rp: Any,  # fewstep.config.DistillRoundParams
    seed: int,
    device: torch.device,
    progress: bool = True,
) -> tuple[LoopResult, models.ModelCard]:
    parent = models.load_card(parent_dir)
    check_round(parent, parent_dir, student_steps, rp.weighting)
    parent_steps = 2 * student_steps
    teacher = models.load_denoiser(parent_dir, device).requires_grad_(False)
    images = storage.load_array(Path(data_dir) / "train_images.npy")
    data = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)

    student = models.student_start(teacher)  # a copy of the teacher, both nets of a split one (PD Alg. 2)
    loop = LoopConfig(steps=rp.train_steps, lr=rp.lr, warmup=0, lr_decay="linear", grad_clip=rp.grad_clip,
                      ema_decay=rp.ema_decay, checkpoint_every=rp.checkpoint_every, keep_checkpoints=2,
                      log_every=rp.log_every, seed=seed)
    run_hash = storage.sha256_json({"parent": parent.weights_sha256, "round": rp.model_dump(),
                                    "steps": student_steps, "seed": seed})
    loss_fn = distill_loss(teacher, data, student_steps, rp.weighting, rp.batch_size, rp.hflip)
    result = train(student, loss_fn, loop, ckpt_dir, run_hash, device, progress=progress,
                   desc=f"distill {parent_steps}->{student_steps}")
    pl = parent.lineage
    card = models.ModelCard(
        arch=models.student_arch(result.net, parent), role="student", parameterization=parent.parameterization,
        schedule=parent.schedule, image_size=parent.image_size, sample_steps=student_steps, weighting=rp.weighting,
        conditioning=parent.conditioning,
        lineage=models.Lineage(dataset=pl.dataset, class_names=pl.class_names, data_hash=pl.data_hash,
                               params_hash=storage.sha256_json(rp.model_dump()), run_hash=run_hash,
                               train_steps=rp.train_steps, source=pl.source,
                               parent=models.Parent(str(parent_dir), parent.weights_sha256, parent_steps, parent.role,
                                                    parent.variant)),
    )
    return result, save_on_main(out_dir, card, lambda: result.net.to("cpu").float().state_dict())
