"""The check after a progressive-distillation round (Salimans & Ho 2022): on the same noise, how
close the student's S-step samples and the parent's own S-step DDIM samples come to the parent's
2S-step samples (the target the student was trained to reach in half the steps).

A class-conditional round samples seed s at class (s - sp.seed) mod K (math.guidance.cycle_labels),
the parent guided at the round's w (its target) and the student at guidance 0 (its one conditional
forward already approximates the guided prediction)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep import parallel
from fewstep.config import SampleParams
from fewstep.math import metrics as M
from fewstep.math.ddim import generate
from fewstep.math.guidance import cycle_labels, num_classes_of
from fewstep.math.param import Denoiser
from fewstep.math.schedules import timesteps


@dataclass
class StudentCheck:
    student_images: torch.Tensor | None  # the student's S-step samples (None on ranks other than 0)
    metrics: dict[str, float | int]


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return M.rmse(a.numpy(), b.numpy())


def student_vs_parent(parent: Denoiser, student: Denoiser, steps: int, sp: SampleParams,
                      device: torch.device, guidance: float | None = None) -> StudentCheck:
    """Samples of seeds sp.seed.. (sharded over the ranks, gathered on rank 0): the parent at 2S and
    S steps and the student at S steps (in the student card's image shape); RMSE of the latter two to the first.
    ``guidance``: the scale w the parent is sampled at (a class-conditional round; module doc)."""
    T, shape = parent.schedule.T, student.card.image_shape  # type: ignore[attr-defined]
    seeds = range(sp.seed, sp.seed + sp.n)
    K = num_classes_of(parent)

    def sharded(den: Denoiser, n: int, w: float = 0.0) -> torch.Tensor | None:
        if not K:
            return parallel.map_sharded(lambda s: generate(den, s, shape, timesteps(T, n), device=device), seeds)
        return parallel.map_sharded(lambda s: generate(den, s, shape, timesteps(T, n), device=device,
                                                       labels=cycle_labels(s, sp.seed, K), guidance=w), seeds)

    w = guidance or 0.0
    ref, parent_half, stud = sharded(parent, 2 * steps, w), sharded(parent, steps, w), sharded(student, steps)
    if not parallel.is_main():
        return StudentCheck(None, {})
    return StudentCheck(stud, {"student_steps": steps, "parent_steps": 2 * steps,
                               "rmse_student_vs_parent": rmse(stud, ref),
                               "rmse_parent_half_steps_vs_parent": rmse(parent_half, ref)})
