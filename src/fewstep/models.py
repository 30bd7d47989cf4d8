"""Self-describing model directories: ``model.safetensors`` + ``config.json``, described by a ModelCard.

The card states what is needed to rebuild the denoiser (the architecture ``family`` and its
family-specific network config, the parameterisation, the schedule, the image shape, the
conditioning) and the lineage of what it was made from (data hash, params hash, parent, weights
sha256). Loading never unpickles: weights are safetensors, the card is JSON.

On disk the card is one flat JSON object (the keys of format 1 plus ``family``, ``channels`` and
``conditioning``); format 1 files (no ``family``) still load. A new architecture family is one
class with ``family``, ``to_dict``/``from_dict``, ``channels``, ``patch_sizes`` and ``build``,
registered with :func:`register_family`; a family defined in another module is named in
:data:`LAZY_FAMILIES` and imported on first use (``diffusers-unet2d``: fewstep.interop.unet2d, a
diffusers ``UNet2DModel``; importing it does not import diffusers).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Protocol, get_args

import torch

from fewstep import storage
from fewstep.errors import UserError
from fewstep.math.losses import WEIGHTINGS, Weighting
from fewstep.math.param import KINDS, NetDenoiser, Parameterization
from fewstep.math.schedules import BETA_SCHEDULES, CARD_SCHEDULE_KINDS, DIFFUSERS_KIND, Schedule, make_schedule
from fewstep.math.split import SIDES, SplitDenoiser, SplitNet
from fewstep.nets.unet import UNet, UNetConfig

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: before the card named its family (fewstep UNet or split pair implied)
WEIGHTS, CONFIG = "model.safetensors", "config.json"

Role = Literal["teacher", "student"]
ROLES: tuple[str, ...] = get_args(Role)


class ModelCardError(UserError, ValueError):
    """A model's config.json is malformed, of an unknown format version or of an unknown family."""


# --------------------------------------------------------------------------------------------
# the schedule


@dataclass(frozen=True)
class ScheduleSpec:
    """The noise schedule by name: ``kind``, ``T``, the cosine schedule's log-SNR range, and for kind
    ``diffusers`` (an imported model) diffusers' beta spec: ``beta_schedule``, ``beta_start``,
    ``beta_end`` or ``trained_betas`` (math.schedules.diffusers_schedule)."""

    kind: str
    T: int
    logsnr_min: float | None = None
    logsnr_max: float | None = None
    beta_schedule: str | None = None
    beta_start: float | None = None
    beta_end: float | None = None
    trained_betas: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in CARD_SCHEDULE_KINDS:
            raise ModelCardError(f"unknown schedule kind {self.kind!r}; expected one of {CARD_SCHEDULE_KINDS}")
        if self.trained_betas is not None and not isinstance(self.trained_betas, tuple):
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
        if self.kind == DIFFUSERS_KIND:
            if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
                raise ModelCardError(f"a diffusers schedule needs beta_schedule in {BETA_SCHEDULES} or trained_betas, "
                                     f"got {self.beta_schedule!r}")
            if self.trained_betas is not None and len(self.trained_betas) != self.T:
                raise ModelCardError(f"trained_betas has {len(self.trained_betas)} entries; T is {self.T}")

    def kwargs(self) -> dict[str, Any]:
        if self.kind == DIFFUSERS_KIND:
            if self.trained_betas is not None:
                return {"trained_betas": list(self.trained_betas)}
            d: dict[str, Any] = {"beta_schedule": self.beta_schedule}
            return {**d, **{k: v for k, v in (("beta_start", self.beta_start), ("beta_end", self.beta_end))
                            if v is not None}}
        if self.kind != "cosine":
            return {}
        return {k: v for k, v in (("logsnr_min", self.logsnr_min), ("logsnr_max", self.logsnr_max)) if v is not None}

    def build(self) -> Schedule:
        return make_schedule(self.kind, self.T, **self.kwargs())

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "T": self.T, **self.kwargs()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ScheduleSpec":
        kind = d.get("kind")
        if kind == DIFFUSERS_KIND:
            tb = d.get("trained_betas")
            return cls(kind, int(d["T"]), beta_schedule=d.get("beta_schedule"),
                       beta_start=None if d.get("beta_start") is None else float(d["beta_start"]),
                       beta_end=None if d.get("beta_end") is None else float(d["beta_end"]),
                       trained_betas=None if tb is None else tuple(float(b) for b in tb))
        cos = kind == "cosine"
        return cls(d["kind"], int(d["T"]), *(float(d[k]) if cos and k in d else None
                                             for k in ("logsnr_min", "logsnr_max")))


def schedule_from_dict(d: Mapping[str, Any]) -> Schedule:
    return ScheduleSpec.from_dict(d).build()


# --------------------------------------------------------------------------------------------
# architecture families: the family names the network builder; its config is family-specific


class Architecture(Protocol):
    family: ClassVar[str]

    @property
    def channels(self) -> int: ...

    @property
    def image_size(self) -> int: ...

    @property
    def patch_sizes(self) -> list[int]: ...

    def to_dict(self) -> dict[str, Any]: ...  # the on-disk keys this family owns

    def build(self, card: "ModelCard", state: Mapping[str, torch.Tensor],
              device: torch.device | str) -> torch.nn.Module: ...  # the denoiser, weights loaded


FAMILIES: dict[str, type] = {}
# families defined outside this module, imported on first use by name (so a card of that family loads
# without the caller importing its module first, and without importing e.g. diffusers at import time)
LAZY_FAMILIES: dict[str, str] = {"diffusers-unet2d": "fewstep.interop.unet2d"}


def family_class(family: str) -> type:
    """The registered class of an architecture family, importing a lazily known one on first use."""
    if family not in FAMILIES and family in LAZY_FAMILIES:
        importlib.import_module(LAZY_FAMILIES[family])
    if family not in FAMILIES:
        known = sorted(set(FAMILIES) | set(LAZY_FAMILIES))
        raise ModelCardError(f"unknown architecture family {family!r}; known: {known}")
    return FAMILIES[family]


def register_family(cls: type) -> type:
    """Class decorator: make an architecture family loadable by its ``family`` name."""
    FAMILIES[cls.family] = cls
    return cls


def _unet(d: Mapping[str, Any]) -> UNetConfig:
    try:
        return UNetConfig(**d)
    except (TypeError, ValueError) as e:
        raise ModelCardError(f"bad UNet config {dict(d)!r}: {e}") from None


@register_family
@dataclass(frozen=True)
class UNetArch:
    """One fewstep UNet (nets/unet.py); on disk: ``net``."""

    family: ClassVar[str] = "fewstep-unet"
    net: UNetConfig

    @property
    def channels(self) -> int:
        return self.net.in_channels

    @property
    def image_size(self) -> int:
        return self.net.image_size

    @property
    def patch_sizes(self) -> list[int]:
        return [self.net.patch_size]

    @property
    def num_classes(self) -> int | None:
        """The class count the network embeds (None: unconditional)."""
        return self.net.num_classes

    def to_dict(self) -> dict[str, Any]:
        return {"net": self.net.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNetArch":
        return cls(_unet(d["net"]))

    def build(self, card: "ModelCard", state: Mapping[str, torch.Tensor], device: torch.device | str) -> NetDenoiser:
        net = UNet(self.net)
        net.load_state_dict(state)
        return NetDenoiser(net.to(device).eval(), card.schedule.build(), card.parameterization)


@dataclass(frozen=True)
class SplitInfo:
    """Where a split model changes networks (log-SNR) and how each side was trained (``sides``:
    the trainer's per-side record, kept as written)."""

    boundary_logsnr: float
    boundary_snr: float | None = None
    t_boundary: int | None = None
    sides: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"boundary_logsnr": self.boundary_logsnr}
        if self.boundary_snr is not None:
            d["boundary_snr"] = self.boundary_snr
        if self.t_boundary is not None:
            d["t_boundary"] = self.t_boundary
        return {**d, **self.sides}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SplitInfo":
        if "boundary_logsnr" not in d:
            raise ModelCardError("a split model's config needs split.boundary_logsnr")
        t_b = d.get("t_boundary")
        return cls(float(d["boundary_logsnr"]), d.get("boundary_snr"), None if t_b is None else int(t_b),
                   {k: v for k, v in d.items() if k not in ("boundary_logsnr", "boundary_snr", "t_boundary")})


@register_family
@dataclass(frozen=True)
class SplitUNetArch:
    """Two fewstep UNets split by noise level (PDM B.7); on disk: ``nets`` (high, low) and ``split``.
    Weights ``high.*`` and ``low.*`` in one safetensors file."""

    family: ClassVar[str] = "fewstep-unet-split"
    nets: Mapping[str, UNetConfig]
    split: SplitInfo

    def __post_init__(self) -> None:
        if set(self.nets) != set(SIDES):
            raise ModelCardError(f"a split model needs nets {SIDES}, got {sorted(self.nets)}")

    @property
    def channels(self) -> int:
        return self.nets["low"].in_channels

    @property
    def image_size(self) -> int:
        return self.nets["low"].image_size

    @property
    def patch_sizes(self) -> list[int]:
        return [self.nets[s].patch_size for s in SIDES]

    def to_dict(self) -> dict[str, Any]:
        return {"nets": {s: self.nets[s].to_dict() for s in SIDES}, "split": self.split.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SplitUNetArch":
        if "split" not in d:
            raise ModelCardError("a split model's config needs a 'split' entry (boundary_logsnr)")
        return cls({s: _unet(c) for s, c in d["nets"].items()}, SplitInfo.from_dict(d["split"]))

    def build(self, card: "ModelCard", state: Mapping[str, torch.Tensor], device: torch.device | str) -> SplitDenoiser:
        schedule = card.schedule.build()
        dens = {}
        for side in SIDES:
            net = UNet(self.nets[side])
            pre = side + "."
            net.load_state_dict({k[len(pre):]: v for k, v in state.items() if k.startswith(pre)})
            dens[side] = NetDenoiser(net.to(device).eval(), schedule, card.parameterization)
        return SplitDenoiser(dens["high"], dens["low"], self.split.boundary_logsnr)


def _family_of(d: Mapping[str, Any]) -> str:
    if "family" in d:
        return str(d["family"])
    return SplitUNetArch.family if "nets" in d else UNetArch.family  # format 1


# --------------------------------------------------------------------------------------------
# the card


CONDITIONING_KINDS: tuple[str, ...] = ("none", "class")


@dataclass(frozen=True)
class Conditioning:
    """What the denoiser is conditioned on: nothing (``num_classes`` None), or a class label
    (``num_classes`` classes, label index ``num_classes`` = the null label of classifier-free
    guidance; issue 17; a text model will add its embedding width here).

    On disk an unconditional card keeps today's ``{"num_classes": null}`` (its bytes and hash do not
    move); a class-conditional one says ``{"kind": "class", "num_classes": n}``."""

    num_classes: int | None = None

    def __post_init__(self) -> None:
        n = self.num_classes
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ModelCardError(f"conditioning.num_classes must be a positive integer or null, got {n!r}")

    @property
    def kind(self) -> str:
        return "class" if self.num_classes else "none"

    def to_dict(self) -> dict[str, Any]:
        if self.num_classes is None:
            return {"num_classes": None}
        return {"kind": self.kind, "num_classes": self.num_classes}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Conditioning":
        d = d or {}
        kind = d.get("kind", "class" if d.get("num_classes") is not None else "none")
        if kind not in CONDITIONING_KINDS:
            raise ModelCardError(f"unknown conditioning kind {kind!r}; this fewstep knows {CONDITIONING_KINDS}")
        n = d.get("num_classes")
        if kind == "class" and n is None:
            raise ModelCardError("a class-conditional card needs conditioning.num_classes")
        if kind == "none" and n is not None:
            raise ModelCardError(f"conditioning kind 'none' with num_classes {n!r}; say kind: class")
        return cls(None if n is None else int(n))


@dataclass(frozen=True)
class Parent:
    """The model a student was distilled from."""

    path: str
    weights_sha256: str
    sample_steps: int
    role: str
    variant: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"path": self.path, "weights_sha256": self.weights_sha256, "sample_steps": self.sample_steps,
             "role": self.role}
        return {**d, "variant": self.variant} if self.variant else d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Parent | None":
        if d is None:
            return None
        return cls(str(d["path"]), str(d["weights_sha256"]), int(d["sample_steps"]), str(d["role"]), d.get("variant"))


@dataclass(frozen=True)
class Lineage:
    """What the model was made from. ``weights_sha256`` is set when the weights are written."""

    dataset: str | None = None
    class_names: tuple[str, ...] | None = None
    data_hash: str | None = None
    params_hash: str | None = None
    run_hash: str | None = None
    train_steps: int | None = None
    parent: Parent | None = None
    weights_sha256: str | None = None
    # an imported model's origin (interop.unet2d: kind, url, sha256 of every source file, the source's
    # scheduler config); a student of it carries its teacher's source
    source: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"parent": self.parent.to_dict() if self.parent else None}
        for k in ("dataset", "data_hash", "params_hash", "run_hash", "train_steps", "weights_sha256", "source"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.class_names is not None:
            d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Lineage":
        names = d.get("class_names")
        steps = d.get("train_steps")
        return cls(d.get("dataset"), None if names is None else tuple(names), d.get("data_hash"), d.get("params_hash"),
                   d.get("run_hash"), None if steps is None else int(steps), Parent.from_dict(d.get("parent")),
                   d.get("weights_sha256"), d.get("source"))


_LINEAGE_KEYS = ("dataset", "class_names", "data_hash", "params_hash", "run_hash", "train_steps", "parent",
                 "weights_sha256", "source")
_CARD_KEYS = ("format_version", "family", "role", "variant", "study", "parameterization", "weighting", "schedule",
              "image_size", "channels", "conditioning", "sample_steps", "guidance")


@dataclass(frozen=True)
class ModelCard:
    """One model: its architecture (``arch``, of family ``arch.family``), how it predicts and samples,
    its image shape, conditioning and lineage. ``extra`` keeps on-disk keys this version does not
    know, so a round trip never drops them."""

    arch: Architecture
    role: Role
    parameterization: Parameterization
    schedule: ScheduleSpec
    image_size: int
    sample_steps: int
    weighting: Weighting | None = None
    variant: str | None = None  # a patch-study teacher (p<P>), a split model or an objective variant
    study: str | None = None  # the study that made it (patch, objective)
    conditioning: Conditioning = Conditioning()
    lineage: Lineage = Lineage()
    extra: Mapping[str, Any] = field(default_factory=dict)
    # a guided-distilled student (train.distill, Meng et al. 2023): the classifier-free guidance scale
    # w its teacher was guided at; its single conditional forward already approximates that guided
    # prediction, so it samples at guidance 0 (NFE = steps) and asking it for w > 0 is refused
    # (fewstep.math.guidance). 0.0: a conditional student distilled without guidance. None (omitted on
    # disk, so older cards hash the same): a model never distilled from a conditional parent.
    guidance: float | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ModelCardError(f"unknown model role {self.role!r}; expected one of {ROLES}")
        if self.parameterization not in KINDS:
            raise ModelCardError(f"unknown parameterization {self.parameterization!r}; expected one of {KINDS}")
        if self.weighting is not None and self.weighting not in WEIGHTINGS:
            raise ModelCardError(f"unknown weighting {self.weighting!r}; expected one of {WEIGHTINGS}")
        net_classes = getattr(self.arch, "num_classes", None)  # a family without the notion: unconditional
        if net_classes != self.conditioning.num_classes:
            raise ModelCardError(f"the card's conditioning says num_classes={self.conditioning.num_classes} but "
                                 f"its {self.family} network embeds {net_classes}")
        if self.guidance is not None:
            g = self.guidance
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
                raise ModelCardError(f"guidance (the scale a student was distilled at) must be a number >= 0, "
                                     f"got {g!r}")
            if self.conditioning.kind != "class":
                raise ModelCardError(f"guidance {g:g} on a {self.conditioning.kind}-conditioned card; only a "
                                     "class-conditional student is distilled at a guidance scale")
            object.__setattr__(self, "guidance", float(g))

    @property
    def family(self) -> str:
        return self.arch.family

    @property
    def channels(self) -> int:
        return self.arch.channels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample."""
        return (self.channels, self.image_size, self.image_size)

    @property
    def patch_sizes(self) -> list[int]:
        return self.arch.patch_sizes

    @property
    def weights_sha256(self) -> str | None:
        return self.lineage.weights_sha256

    def with_weights(self, sha256: str) -> "ModelCard":
        return dataclasses.replace(self, lineage=dataclasses.replace(self.lineage, weights_sha256=sha256))

    def updated(self, **keys: Any) -> "ModelCard":
        """The card with on-disk keys replaced (e.g. ``variant``, ``study``; unknown keys go to extra)."""
        return ModelCard.from_dict({**self.to_dict(), **keys})

    # -- serialisation: one flat JSON object (format 1 keys + family, channels, conditioning)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format_version": FORMAT_VERSION, "family": self.family, **self.arch.to_dict(),
                             "role": self.role, "parameterization": self.parameterization,
                             "schedule": self.schedule.to_dict(), "image_size": self.image_size,
                             "channels": self.channels, "conditioning": self.conditioning.to_dict(),
                             "sample_steps": self.sample_steps, **self.lineage.to_dict()}
        for k in ("weighting", "variant", "study", "guidance"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return {**self.extra, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelCard":
        version = d.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ModelCardError(f"unsupported model format_version {version!r}; this fewstep reads {READABLE_VERSIONS}")
        if "role" in d and d["role"] not in ROLES:  # e.g. the evaluator's config: no denoiser, no card
            raise ModelCardError(f"unknown model role {d['role']!r}; expected one of {ROLES}")
        arch_cls = family_class(_family_of(d))
        try:
            arch = arch_cls.from_dict(d)
            card = cls(arch=arch, role=d["role"], parameterization=d["parameterization"],
                       schedule=ScheduleSpec.from_dict(d["schedule"]), image_size=int(d["image_size"]),
                       sample_steps=int(d["sample_steps"]), weighting=d.get("weighting"), variant=d.get("variant"),
                       study=d.get("study"), conditioning=Conditioning.from_dict(d.get("conditioning")),
                       lineage=Lineage.from_dict(d), guidance=d.get("guidance"))
        except KeyError as e:
            raise ModelCardError(f"model config lacks {e.args[0]!r}") from None
        if "channels" in d and int(d["channels"]) != card.channels:
            raise ModelCardError(f"model config says {d['channels']} channels but its network takes {card.channels}")
        arch_keys = set(arch.to_dict())
        extra = {k: v for k, v in d.items() if k not in arch_keys and k not in _CARD_KEYS and k not in _LINEAGE_KEYS}
        return dataclasses.replace(card, extra=extra)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelCard":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ModelCardError(f"model config is not valid JSON: {e}") from None


def _as_card(card: ModelCard | Mapping[str, Any], arch: Architecture) -> ModelCard:
    """A card for ``arch``: a ModelCard (whose arch must be ``arch``) or a format-1 style meta dict
    (role defaults to teacher, image_size to the network's, sample_steps to the schedule's T)."""
    if isinstance(card, ModelCard):
        if card.arch != arch:
            raise ValueError(f"the card describes {card.arch!r}, not the network being saved ({arch!r})")
        return card
    defaults = {"role": "teacher", "image_size": arch.image_size, "sample_steps": card["schedule"]["T"],
                "conditioning": Conditioning(getattr(arch, "num_classes", None)).to_dict()}
    return ModelCard.from_dict({**defaults, **card, "format_version": FORMAT_VERSION, "family": arch.family,
                                **arch.to_dict()})


# --------------------------------------------------------------------------------------------
# model directories


def save(directory: str | Path, card: ModelCard, state: Mapping[str, torch.Tensor], kind: str = "model") -> ModelCard:
    """Write weights and card atomically; returns the card with the weights' sha256."""
    directory = Path(directory)
    with storage.atomic_dir(directory) as tmp:
        storage.save_tensors(tmp / WEIGHTS, dict(state), metadata={"fewstep": kind})
        card = card.with_weights(storage.sha256_file(tmp / WEIGHTS))
        storage.write_json(tmp / CONFIG, card.to_dict())
    return card


def save_model(directory: str | Path, net: UNet, card: ModelCard | Mapping[str, Any]) -> str:
    """One fewstep UNet and its card (or a format-1 style meta dict); returns the weights' sha256."""
    return save(directory, _as_card(card, UNetArch(net.cfg)), net.state_dict()).lineage.weights_sha256


def save_split(directory: str | Path, nets: Mapping[str, UNet], card: ModelCard | Mapping[str, Any]) -> str:
    """A split (two-network) model as one model dir: weights ``high.*`` and ``low.*`` in one
    safetensors file; the card names both architectures and the boundary."""
    if set(nets) != set(SIDES):
        raise ValueError(f"a split model needs nets {SIDES}, got {sorted(nets)}")
    if isinstance(card, ModelCard):
        split = card.arch.split if isinstance(card.arch, SplitUNetArch) else None
    else:
        if "split" not in card:
            raise ValueError("a split model's meta needs a 'split' entry (boundary_logsnr)")
        split = SplitInfo.from_dict(card["split"])
    arch = SplitUNetArch({s: nets[s].cfg for s in SIDES}, split)
    state = {f"{s}.{k}": v for s in SIDES for k, v in nets[s].state_dict().items()}
    return save(directory, _as_card(card, arch), state, kind="split-model").lineage.weights_sha256


def load_card(directory: str | Path) -> ModelCard:
    path = Path(directory) / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"no model config at {path}")
    try:
        return ModelCard.from_json(path.read_text())
    except ModelCardError as e:
        raise ModelCardError(f"{path}: {e}") from None


def config_role(directory: str | Path) -> str | None:
    """The role a model dir's config.json states (teacher, student: a card; evaluator: no denoiser,
    no card), or None when the dir has no config.json."""
    path = Path(directory) / CONFIG
    if not path.exists():
        return None
    raw = storage.read_json(path)
    return raw.get("role") if isinstance(raw, dict) else None


def has_card(directory: str | Path) -> bool:
    """Whether ``directory`` holds a denoiser described by a ModelCard (not the evaluator)."""
    return config_role(directory) in ROLES


def is_split(card: ModelCard) -> bool:
    return card.family == SplitUNetArch.family


def denoiser_from_card(card: ModelCard, state: Mapping[str, torch.Tensor],
                       device: str | torch.device = "cpu") -> NetDenoiser | SplitDenoiser:
    """The denoiser a card describes, with weights ``state``; it carries its ``.card``."""
    den = card.arch.build(card, state, device).eval().requires_grad_(False)
    den.card = card  # lineage travels with the object
    return den


def denoiser_from_config(cfg: ModelCard | Mapping[str, Any], state: Mapping[str, torch.Tensor],
                         device: str | torch.device = "cpu") -> NetDenoiser | SplitDenoiser:
    card = cfg if isinstance(cfg, ModelCard) else ModelCard.from_dict(cfg)
    return denoiser_from_card(card, state, device)


def _copy_net(net: torch.nn.Module) -> torch.nn.Module:
    """A trainable copy of ``net`` with dropout off (a distillation student). A network of another
    family (e.g. interop.unet2d's adapter) copies itself: ``net.trainable_copy()``."""
    if not isinstance(net, UNet):
        return net.trainable_copy().requires_grad_(True)
    copy = UNet(dataclasses.replace(net.cfg, dropout=0.0))
    copy.load_state_dict(net.state_dict())
    return copy.requires_grad_(True)


def student_start(den: NetDenoiser | SplitDenoiser) -> torch.nn.Module:
    """The network a distillation student starts as: a copy of its teacher (PD Alg. 2), dropout
    off. A split teacher's student is a split net initialised from both nets and routed at the
    teacher's boundary, so on both sides of it the student begins equal to the teacher."""
    if isinstance(den, SplitDenoiser):
        return SplitNet(_copy_net(den.high.net), _copy_net(den.low.net), den.t_boundary, den.schedule.T)
    return _copy_net(den.net)


def student_arch(net: torch.nn.Module, parent: ModelCard) -> Architecture:
    """The card's architecture for a student network started by :func:`student_start` from ``parent``:
    one UNet, a split pair at the parent's boundary, or a network of another family (it states its
    own: ``net.arch``, of the parent's family)."""
    if not isinstance(net, (UNet, SplitNet)):
        arch = net.arch
        if arch.family != parent.family:
            raise ValueError(f"a {arch.family} student needs a parent of that family, got a {parent.family} one")
        return arch
    if isinstance(net, SplitNet):
        if not isinstance(parent.arch, SplitUNetArch):
            raise ValueError(f"a split student needs a split parent, got a {parent.family} one")
        ps = parent.arch.split
        split = SplitInfo(ps.boundary_logsnr, ps.boundary_snr, net.t_boundary,
                          {s: {"patch_size": getattr(net, s).cfg.patch_size, "init": "parent"} for s in SIDES})
        return SplitUNetArch({s: getattr(net, s).cfg for s in SIDES}, split)
    return UNetArch(net.cfg)


def load_net(directory: str | Path, device: str | torch.device = "cpu") -> tuple[UNet, ModelCard]:
    card = load_card(directory)
    if not isinstance(card.arch, UNetArch):
        raise ValueError(f"{directory} is a {card.family} model, not one fewstep UNet; load it with load_denoiser")
    net = UNet(card.arch.net)
    net.load_state_dict(storage.load_tensors(Path(directory) / WEIGHTS))
    return net.to(device).eval(), card


def load_denoiser(directory: str | Path, device: str | torch.device = "cpu") -> NetDenoiser | SplitDenoiser:
    """Rebuild the denoiser (network(s) + schedule + parameterisation) from a model directory."""
    card = load_card(directory)
    return denoiser_from_card(card, storage.load_tensors(Path(directory) / WEIGHTS), device)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("params ask for device 'cuda' but no CUDA device is available")
    return torch.device(name)
