"""One progressive-distillation round: a teacher sampling in N steps -> a student in N/2.

The student starts as a copy of the teacher (dropout off), learns the two-step target of
fewstep.math.distill, with lr annealed linearly to 0 within the round, optional EMA, grad clip.
The halving rule, for any T (1024, or a diffusers model's 1000): the teacher takes the N trailing
steps of the T grid, tau_k = round(k T / N) (k = 0..N, numpy's round half to even), and student step
i (1..N/2) is trained at t = tau_2i to land where the teacher's two steps tau_2i -> tau_2i-1 ->
tau_2i-2 land. tau_2i = round(i T / (N/2)) is exactly the student's own N/2-step trailing grid, so the
student samples on the grid it was trained on, starting at T (the zero-SNR end), and the next round
halves again from there. When N divides T (T = 1024, or T = 1000 with N = 20, 10, 8, 4, 2) the steps
are the uniform dt = T/N of the paper; otherwise (T = 1000, N = 16: 62.5) the teacher's two steps
differ by one index at most. A round needs N <= T. A split teacher's student is a split
model started from both nets, routed at the teacher's boundary (fewstep.math.split.SplitNet).

The student's parameterisation is its teacher's, so a round is refused (before any work) where that
parameterisation with the round's weighting is a combination the PD paper shows diverges.

Class-conditional parents (issue 17; Meng et al. 2023, "On distillation of guided diffusion models",
their stage two with a fixed w): every training row draws a label y uniformly from 0..K-1 (never the
null label: the student has no label dropout), the target is the parent's two DDIM steps at y and
the student's one conditional forward at y learns it.

- ``guidance: w`` (round or distill.defaults) with a teacher that is not itself distilled: the
  target is the teacher guided at w, (1 + w) c - w u (fewstep.math.guidance.GuidedDenoiser: two
  evaluations, one batched forward, in full precision as every target), and the student's card
  records ``guidance: w``. Its conditional output is then the guided prediction (NFE = steps), so
  later rounds distil it as a plain conditional model (their round's ``guidance``, inherited from
  the defaults, must be null or the same w) and sampling it with guidance > 0 is refused.
- ``guidance`` null with a conditional parent: plain conditional distillation (w = 0: target and
  student both conditional at y). The student's card records ``guidance: 0.0`` (it was distilled at
  w = 0; its null label was never distilled, so it too is refused guidance > 0).
- An unconditional parent with ``guidance`` set is refused; without it nothing changes (bitwise:
  no label is drawn from the generator).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fewstep import models, storage
from fewstep.parallel import BatchPart
from fewstep.math.distill import distill_target_path
from fewstep.math.guidance import GuidedDenoiser
from fewstep.math.schedules import timesteps
from fewstep.errors import UserError
from fewstep.math.losses import DEFAULT_WEIGHTING, divergence, weighted_x_loss
from fewstep.math.param import NetDenoiser
from fewstep.train.loop import LoopConfig, LoopResult, train
from fewstep.train.teacher import draw_like, sample_batch, save_on_main


class DistillSetupError(UserError, ValueError):
    """A distillation round that cannot start from its parent: wrong step count, or a
    parameterisation / weighting pair that diverges."""


def round_guidance(parent: models.ModelCard, parent_dir: str | Path, guidance: float | None) -> float | None:
    """The guidance scale w the round's target is guided at (None: an unconditional round; 0: the
    parent's plain conditional prediction), refusing what cannot be distilled: ``guidance`` for an
    unconditional parent, or another w than the one a guided-distilled parent already carries."""
    kind = parent.conditioning.kind
    if kind == "none":
        if guidance is not None:
            raise DistillSetupError(f"distill round from {parent_dir}: guidance {guidance:g} needs a class-conditional "
                                    "parent, but this one is unconditional; set the round's guidance to null")
        return None
    if kind != "class":
        raise DistillSetupError(f"parent {parent_dir} is {kind}-conditional; distillation supports unconditional and "
                                "class-conditional parents")
    done = parent.guidance  # a student distilled at done: its conditional output is already guided
    if done is not None:
        if guidance is not None and float(guidance) != done:
            raise DistillSetupError(f"distill round from {parent_dir}: guidance {guidance:g}, but the parent was "
                                    f"distilled at w={done:g} and its output is already guided at that scale; set "
                                    f"the round's guidance to {done:g} or null")
        return 0.0
    if guidance and not getattr(parent.arch, "has_null_label", True):
        raise DistillSetupError(f"distill round from {parent_dir}: guidance {guidance:g} needs the parent's "
                                "unconditional (null-label) prediction, but it was imported without "
                                "teacher.source.null_label (conditional only); set it, or distil at guidance null")
    return 0.0 if guidance is None else float(guidance)


def student_guidance(parent: models.ModelCard, guidance: float | None) -> float | None:
    """The card's ``guidance`` of the round's student: the parent's if it was distilled at one, else
    the round's w (0 for a plain conditional round), None for an unconditional round."""
    if parent.conditioning.kind == "none":
        return None
    if parent.guidance is not None:
        return parent.guidance
    return 0.0 if guidance is None else float(guidance)


def check_round(parent: models.ModelCard, parent_dir: str | Path, student_steps: int, weighting: str,
                guidance: float | None = None) -> None:
    """Refuse a round its parent cannot start: a student parent must sample in 2x the round's steps,
    the parent's parameterisation (the student's) with ``weighting`` must not diverge, and the round's
    ``guidance`` must fit the parent (:func:`round_guidance`)."""
    round_guidance(parent, parent_dir, guidance)
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


def teacher_grid(T: int, N: int) -> list[int]:
    """[tau_0 = 0, tau_1, ..., tau_N = T]: the N-step trailing grid of a round's teacher, ascending
    (the halving rule in the module docstring); tau_2i is the N/2-step student's own grid."""
    if not 1 <= N <= T:
        raise DistillSetupError(f"a round's teacher takes {N} steps, more than the schedule's T={T}")
    grid = [0] + sorted(timesteps(T, N, "trailing"))
    if len(grid) != N + 1:  # cannot happen for N <= T (consecutive points are >= 1 index apart)
        raise DistillSetupError(f"the {N}-step trailing grid of T={T} has repeated indices")
    return grid


def draw_labels(num_classes: int, batch_size: int, rows: slice, gen: torch.Generator,
                device: torch.device) -> torch.Tensor:
    """Rows ``rows`` of (batch_size,) labels uniform on 0..num_classes-1 (never the null label),
    drawn whole from ``gen`` as every draw of a distributed step."""
    return torch.randint(0, num_classes, (batch_size,), generator=gen, device=device)[rows]


def distill_loss(
    teacher: NetDenoiser, data: torch.Tensor, student_steps: int, weighting: str, batch_size: int, hflip: bool,
    guidance: float | None = None,
) -> Callable[[torch.nn.Module, torch.Generator], torch.Tensor]:
    """loss_fn(student, gen, part): PD Alg. 2. ``guidance``: None for an unconditional teacher; w >= 0
    for a class-conditional one (labels drawn uniformly per row, target the teacher guided at w, the
    student conditional at the same labels; module docstring)."""
    sch, kind = teacher.schedule, teacher.kind
    T = sch.T
    dev = data.device
    grid = torch.tensor(teacher_grid(T, 2 * student_steps), device=dev)  # tau_0..tau_N (module docstring)
    K = teacher.num_classes if guidance is not None else None
    if guidance is not None and not K:
        raise DistillSetupError("a guided distillation round needs a class-conditional teacher")

    def loss_fn(student: torch.nn.Module, gen: torch.Generator, part: BatchPart = BatchPart()) -> torch.Tensor:
        rows = part.rows(batch_size)  # this rank's rows of the global batch (fewstep.train.loop)
        x = sample_batch(data, batch_size, hflip, gen, rows)
        i = torch.randint(1, student_steps + 1, (batch_size,), generator=gen, device=dev)[rows]
        t = grid[2 * i]
        eps = draw_like(batch_size, tuple(x.shape[1:]), rows, gen, dev)
        alpha, sigma = sch.at(t, torch.float32)
        z = alpha[:, None, None, None] * x + sigma[:, None, None, None] * eps
        if K is None:
            x_tgt = distill_target_path(teacher, z, t, grid[2 * i - 1], grid[2 * i - 2])
            y = None
        else:
            y = draw_labels(K, batch_size, rows, gen, dev)
            x_tgt = distill_target_path(GuidedDenoiser(teacher, y, guidance), z, t, grid[2 * i - 1], grid[2 * i - 2])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            pred = student(z, t.float() / T) if y is None else student(z, t.float() / T, y)
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
    guidance = getattr(rp, "guidance", None)
    check_round(parent, parent_dir, student_steps, rp.weighting, guidance)
    w = round_guidance(parent, parent_dir, guidance)
    parent_steps = 2 * student_steps
    teacher_grid(parent.schedule.T, parent_steps)  # refused before any work when 2N > T
    teacher = models.load_denoiser(parent_dir, device).requires_grad_(False)
    images = storage.load_array(Path(data_dir) / "train_images.npy")
    data = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)

    student = models.student_start(teacher)  # a copy of the teacher, both nets of a split one (PD Alg. 2)
    loop = LoopConfig(steps=rp.train_steps, lr=rp.lr, warmup=0, lr_decay="linear", grad_clip=rp.grad_clip,
                      ema_decay=rp.ema_decay, checkpoint_every=rp.checkpoint_every, keep_checkpoints=2,
                      log_every=rp.log_every, seed=seed)
    run_hash = storage.sha256_json({"parent": parent.weights_sha256, "round": rp.model_dump(),
                                    "steps": student_steps, "seed": seed})
    loss_fn = distill_loss(teacher, data, student_steps, rp.weighting, rp.batch_size, rp.hflip, w)
    result = train(student, loss_fn, loop, ckpt_dir, run_hash, device, progress=progress,
                   desc=f"distill {parent_steps}->{student_steps}" + (f" w={w:g}" if w else ""))
    pl = parent.lineage
    card = models.ModelCard(
        arch=models.student_arch(result.net, parent), role="student", parameterization=parent.parameterization,
        schedule=parent.schedule, image_size=parent.image_size, sample_steps=student_steps, weighting=rp.weighting,
        conditioning=parent.conditioning, guidance=student_guidance(parent, guidance),
        lineage=models.Lineage(dataset=pl.dataset, class_names=pl.class_names, data_hash=pl.data_hash,
                               params_hash=storage.sha256_json(rp.model_dump()), run_hash=run_hash,
                               train_steps=rp.train_steps, source=pl.source,
                               parent=models.Parent(str(parent_dir), parent.weights_sha256, parent_steps, parent.role,
                                                    parent.variant)),
    )
    return result, save_on_main(out_dir, card, lambda: result.net.to("cpu").float().state_dict())
