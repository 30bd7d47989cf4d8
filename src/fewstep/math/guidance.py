"""Class conditioning and classifier-free guidance behind the plain denoiser contract.

A class-conditional denoiser (a :class:`~fewstep.math.param.NetDenoiser` over a net with
``num_classes``; label index ``num_classes`` is the null label, "no class") takes labels as a third
argument, ``den(z, t, y)``. :class:`GuidedDenoiser` holds the labels y (B,) and the guidance scale
w >= 0 and presents the plain ``den(z, t)`` contract (and ``continuous(z, tc)`` for the diffusers
peers), so every sampler (DDIM, OLSS, the peers) samples guided unchanged.

Classifier-free guidance (Ho & Salimans 2022, eq. 6), with c = the conditional and u = the
unconditional (null-label) prediction at the same (z_t, t):

    pred~ = (1 + w) c - w u  =  u + s (c - u),   s = 1 + w   (diffusers' ``guidance_scale``)

so w = 0 (s = 1) is plain conditional sampling and takes one conditional pass; w > 0 takes the
conditional and unconditional evaluations as one batched forward of 2B images.

Which form the combination is made in: the model's own parameterisation (eps, x or v), and that is
no choice. At a fixed (z_t, t) each conversion between eps, x and v is affine in the prediction
with the same coefficients for c and u (e.g. x = alpha z - sigma v, eps = (z - alpha x) / sigma),
and the guidance weights (1 + w) and -w sum to 1, so the conversion commutes with the combination:
guiding the native output and converting equals Ho & Salimans' eps-form guidance and equals
x-form guidance, exactly in exact arithmetic (tests/unit/test_conditional.py checks both to
float rounding). The native form is the cheapest and adds no division by alpha or sigma; any
clipping of x-hat (PD A.3) happens after guidance, in the sampler, as in diffusers.

Network evaluations are counted honestly: ``evals_per_call`` is 2 for w > 0 (the batched forward
costs two images' FLOPs per image) and 1 for w = 0, and ``network_evals`` sums evaluations over
images (one image at one call with guidance counts 2); :func:`evals_per_call` gives the factor of
any denoiser (1 for a plain one), which multiplies a sampler's NFE (fewstep.samplers).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from fewstep.errors import UserError


class GuidanceError(UserError, ValueError):
    """Bad conditioning input: a negative or non-finite guidance scale, a class label out of range,
    labels that do not match the batch, or conditioning asked of an unconditional model."""


def num_classes_of(den: object) -> int | None:
    """The class count of a class-conditional denoiser (None: unconditional or unknown)."""
    return getattr(den, "num_classes", None)


def evals_per_call(den: object) -> int:
    """Network evaluations per image of one ``den(z, t)`` call: 2 for a guided denoiser at w > 0,
    else 1 (a sampler's NFE at ``steps`` is its registry ``nfe(steps)`` times this)."""
    return int(getattr(den, "evals_per_call", 1))


def check_guidance_scale(w: float) -> float:
    """w as a float, or a GuidanceError for a negative or non-finite scale."""
    try:
        w = float(w)
    except (TypeError, ValueError):
        raise GuidanceError(f"guidance scale must be a number >= 0, got {w!r}") from None
    if not math.isfinite(w) or w < 0:
        raise GuidanceError(f"guidance scale w must be finite and >= 0 (w = 0: plain conditional sampling; "
                            f"diffusers' guidance_scale s = 1 + w), got {w}")
    return w


def distilled_scale(den: object) -> float | None:
    """The guidance scale a guided-distilled student was distilled at (its card's ``guidance``;
    None: not a student of a conditional parent)."""
    return getattr(getattr(den, "card", None), "guidance", None)


def check_can_guide(den: object, w: float) -> None:
    """Refuse guidance w > 0 of a model that cannot be guided: a guided-distilled student (its single
    conditional forward already is the guided prediction; its null label was never distilled) or a
    conditional-only model without a null label (an imported diffusers UNet whose
    ``teacher.source.null_label`` was not given)."""
    g = distilled_scale(den)
    if g is not None:
        raise GuidanceError(f"guidance w={w:g} asked of a student distilled at w={g:g}: its conditional output "
                            "already is the teacher's guided prediction (one network evaluation per step); sample "
                            "it with guidance 0 and labels")
    if not getattr(den, "has_null_label", True):
        raise GuidanceError(f"guidance w={w:g} needs the model's unconditional (null-label) prediction, but this model "
                            "is conditional only: it was imported without teacher.source.null_label (the label index "
                            "it was trained with for dropped labels); set it, or sample at guidance 0")


def check_labels(labels: int | Sequence[int] | torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels as a 1-D long CPU tensor, each a real class 0..num_classes-1 (the null label is not a
    class to sample: sample the bare denoiser for the unconditional model)."""
    y = torch.as_tensor(labels)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise GuidanceError(f"class labels must be integers, got dtype {y.dtype}")
    y = y.to("cpu", torch.long).reshape(-1) if y.ndim == 0 else y.to("cpu", torch.long)
    if y.ndim != 1 or y.numel() == 0:
        raise GuidanceError(f"class labels must be an int or a non-empty 1-D sequence, got shape {tuple(y.shape)}")
    bad = y[(y < 0) | (y >= num_classes)]
    if bad.numel():
        raise GuidanceError(f"class label {int(bad[0])} out of range: this model has {num_classes} classes "
                            f"(labels 0..{num_classes - 1})")
    return y


class GuidedDenoiser(torch.nn.Module):
    """A class-conditional denoiser at fixed labels and guidance scale, as a plain ``den(z, t)``.

    ``labels``: one int (every image) or (B,) ints in 0..num_classes-1; ``w``: the guidance scale
    (Ho & Salimans' w >= 0; diffusers' s = 1 + w). Keeps ``kind``, ``schedule`` (and ``card``) of the
    wrapped denoiser; the prediction is of the same kind (see the module doc for why guidance in the
    native parameterisation is exact)."""

    def __init__(self, den: torch.nn.Module, labels: int | Sequence[int] | torch.Tensor, w: float = 0.0):
        super().__init__()
        n = num_classes_of(den)
        if not n:
            what = getattr(getattr(den, "card", None), "family", type(den).__name__)
            raise GuidanceError(f"class labels and guidance need a class-conditional model; this {what} model is "
                                "unconditional (its card's conditioning has no num_classes)")
        self.w = check_guidance_scale(w)
        if self.w > 0:
            check_can_guide(den, self.w)
        self.labels = check_labels(labels, n)
        self.den, self.num_classes = den, n
        self.kind, self.schedule = den.kind, den.schedule
        if hasattr(den, "card"):
            self.card = den.card
        self.calls = 0
        self.network_evals = 0  # summed over images: B per conditional pass, 2B per guided call

    @property
    def evals_per_call(self) -> int:
        return 1 if self.w == 0 else 2

    def extra_repr(self) -> str:
        return f"w={self.w:g}, num_classes={self.num_classes}, labels={self.labels.numel()}"

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._guided(self.den, z, t)

    def continuous(self, z: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        """Guided prediction at continuous time tc in [0, 1] (the diffusers peers query this)."""
        return self._guided(self.den.continuous, z, tc)

    def _labels_for(self, z: torch.Tensor) -> torch.Tensor:
        B, y = z.shape[0], self.labels
        if y.numel() == 1:
            y = y.expand(B)
        elif y.numel() != B:
            raise GuidanceError(f"{y.numel()} class labels for a batch of {B} images")
        return y.to(z.device)

    def _guided(self, fn: Callable[..., torch.Tensor], z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = self._labels_for(z)
        B = z.shape[0]
        self.calls += 1
        self.network_evals += self.evals_per_call * B
        if self.w == 0:
            return fn(z, t, y)
        null = torch.full_like(y, self.num_classes)
        pred = fn(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, null]))  # one forward of 2B
        c, u = pred[:B], pred[B:]
        return u + (1.0 + self.w) * (c - u)  # = (1 + w) c - w u (Ho & Salimans eq. 6)


def cycle_labels(seeds: Sequence[int], first_seed: int, num_classes: int) -> list[int]:
    """The class of the image drawn from each seed: (seed - first_seed) mod num_classes, so a grid or
    an evaluation set of seeds first_seed, first_seed + 1, ... holds every class equally often and a
    seed's class does not depend on how the seeds are batched or sharded."""
    return [(int(s) - int(first_seed)) % num_classes for s in seeds]


def maybe_guided(den: torch.nn.Module, labels: Sequence[int] | torch.Tensor | None, w: float = 0.0) -> object:
    """``den`` itself when ``labels`` is None (and w = 0), else :class:`GuidedDenoiser` at them.
    A guidance scale without labels is refused (there is nothing to guide towards)."""
    if labels is None:
        if check_guidance_scale(w) != 0:
            raise GuidanceError(f"guidance scale {w:g} without class labels: give labels of a class-conditional model")
        return den
    return GuidedDenoiser(den, labels, w)


@dataclass(frozen=True)
class ClassGuidance:
    """How a class-conditional model samples a set of seeds: the image of seed s is of class
    (s - first_seed) mod num_classes (:func:`cycle_labels`), at guidance scale ``w``. Recorded in
    what the samples make (trajectories' meta, an OLSS scheduler's meta) as ``to_dict()``."""

    num_classes: int
    w: float = 0.0
    first_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "w", check_guidance_scale(self.w))
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise GuidanceError(f"num_classes must be a positive integer, got {self.num_classes!r}")

    @classmethod
    def for_model(cls, den: object, w: float, first_seed: int) -> "ClassGuidance | None":
        """The guidance of ``den`` at scale ``w`` (None for an unconditional model at w = 0; a
        guidance scale for an unconditional model is refused; a guided-distilled student is sampled
        at w = 0, as its evaluation rows are)."""
        n = num_classes_of(den)
        if not n:
            if check_guidance_scale(w) > 0:
                raise GuidanceError(f"guidance scale {w:g} asked of an unconditional model (its card's conditioning "
                                    "has no num_classes); set it to 0 or use a class-conditional model")
            return None
        if distilled_scale(den) is not None:  # a guided-distilled student: its plain conditional output is guided
            w = 0.0
        return cls(int(n), w, int(first_seed))

    def labels(self, seeds: Sequence[int]) -> list[int]:
        return cycle_labels(seeds, self.first_seed, self.num_classes)

    def wrap(self, den: torch.nn.Module, seeds: Sequence[int]) -> GuidedDenoiser:
        """``den`` guided at the labels of ``seeds``."""
        return GuidedDenoiser(den, self.labels(seeds), self.w)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "class", "num_classes": self.num_classes, "scale": self.w, "first_seed": self.first_seed,
                "labels": "(seed - first_seed) mod num_classes"}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "ClassGuidance | None":
        if not d:
            return None
        return cls(int(d["num_classes"]), float(d["scale"]), int(d["first_seed"]))


def guidance_scale_of(den: object) -> float:
    """The guidance scale ``den`` samples at (0 for a plain denoiser)."""
    return float(den.w) if isinstance(den, GuidedDenoiser) else 0.0


def fitted_scale(meta: Mapping[str, Any]) -> float:
    """The guidance scale an artifact (an OLSS scheduler) was fitted at, from its meta (0: none)."""
    g = meta.get("guidance")
    return float(g["scale"]) if g else 0.0


def check_fitted_scale(meta: Mapping[str, Any], den: object, what: str, allow_mismatch: bool = False) -> None:
    """Refuse (or with ``allow_mismatch`` warn) using an artifact fitted at one guidance scale with
    a denoiser guided at another: its weights were fitted to that scale's trajectories."""
    fitted, used = fitted_scale(meta), guidance_scale_of(den)
    if fitted == used:
        return
    msg = (f"{what} was fitted on trajectories at guidance scale w={fitted:g} but is used at w={used:g}; its "
           "weights fit that one scale (fit it at this scale, or pass allow_scale_mismatch=True to accept the "
           "error: tests/integration/test_conditional_teacher.py measures it)")
    if not allow_mismatch:
        raise GuidanceError(msg)
    warnings.warn(msg, stacklevel=3)


def guided(den: torch.nn.Module, labels: int | Sequence[int] | torch.Tensor, w: float = 0.0) -> GuidedDenoiser:
    """``den`` at ``labels`` with guidance scale ``w`` (w = 0: conditional, one pass a call)."""
    return GuidedDenoiser(den, labels, w)
