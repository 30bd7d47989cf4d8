"""A diffusers ``UNet2DModel`` as a fewstep model: the ``diffusers-unet2d`` family, import, export.

In: :func:`import_teacher` reads a diffusers ``save_pretrained`` directory (local or any fsspec URL)
holding an unconditional or class-conditional ``UNet2DModel`` (``config.json`` +
``diffusion_pytorch_model.safetensors``, at the root or under ``unet/``) and a scheduler config (``scheduler/scheduler_config.json`` or
``scheduler_config.json``), checks it, and writes a fewstep model dir: ``model.safetensors`` (the
UNet's own state dict keys) + ``config.json`` (a ModelCard of family ``diffusers-unet2d``). It never
unpickles: the UNet is built with ``from_config(load_config)`` and its weights are read with
safetensors and loaded strictly (reference diffusers_interop.md section 1).

The schedule is diffusers' own: the card's ScheduleSpec of kind ``diffusers`` keeps the beta spec,
and fewstep.math.schedules.diffusers_schedule recomputes ``alphas_cumprod`` bit for bit (float32).
Timesteps: diffusers' index k is fewstep's index k + 1 (fewstep's 0 is clean data). The network sees
continuous time tc = index / T, so the adapter calls the UNet at ``tc * T - 1`` (a fractional
timestep where a solver leaves the grid: peers, fractional times).

Class-conditional UNet2DModels (issue 17): ``num_class_embeds`` E with ``class_embed_type`` None (an
``nn.Embedding`` of E labels) or ``"timestep"`` (the label through the sinusoidal time projection and
an MLP; its config must still state the label count as ``num_class_embeds``). ``"identity"`` is
refused: its ``class_labels`` are embedding vectors, not class indices. The card says
``conditioning: {kind: class, num_classes: K}`` in fewstep's convention (classes 0..K-1, null label
K). Which diffusers index was the model's dropped-label ("null") index is not in its config: it is
the import's ``null_label`` (params ``teacher.source.null_label``), kept on the card as
``diffusers_null_label``:

- given (n in 0..E-1): K = E - 1 classes; fewstep class c is diffusers label c (c < n) or c + 1
  (c >= n), fewstep's null label K is diffusers' n, so classifier-free guidance works;
- absent: the model is conditional only: K = E, fewstep class c is diffusers label c, and guidance
  w > 0 is refused (there is no unconditional prediction to guide with).

Out: :func:`export_unet2d` writes a ``DDIMPipeline`` directory (``unet/`` safetensors,
``scheduler/`` a DDIMScheduler config reproducing the schedule, trailing spacing) plus
``fewstep.json`` (the model's step count and lineage), loadable with
``DDIMPipeline.from_pretrained(dir, use_safetensors=True)``.

diffusers is imported lazily, inside functions (an optional extra).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping

import numpy as np
import torch

from fewstep import models, storage
from fewstep.errors import UserError
from fewstep.math.guidance import GuidanceError
from fewstep.math.param import NetDenoiser
from fewstep.math.schedules import BETA_SCHEDULES, DIFFUSERS_KIND

FAMILY = "diffusers-unet2d"
UNET_KEY = "diffusers_unet"  # the card key holding the UNet2DModel config
SOURCE_KIND = "diffusers"
UNET_CLASS = "UNet2DModel"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
UNET_PICKLE = "diffusion_pytorch_model.bin"
SCHEDULER_CONFIG = "scheduler_config.json"
MODEL_INDEX = "model_index.json"
EXPORT_INFO = "fewstep.json"
# schedulers whose alphas_cumprod is the DDPM one computed from the beta spec (diffusers 0.42.1)
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
              "DEISMultistepScheduler", "UniPCMultistepScheduler", "EulerDiscreteScheduler")
PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x"}  # diffusers prediction_type -> ours
PREDICTION_TYPE = {v: k for k, v in PREDICTION.items()}
# diffusers' defaults for keys a scheduler config may omit (DDPMScheduler / DDIMScheduler)
SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                      "trained_betas": None, "prediction_type": "epsilon"}
SUPPORTED = ("an unconditional or class-conditional (num_class_embeds; class_embed_type null or 'timestep') "
             "UNet2DModel (config.json + diffusion_pytorch_model.safetensors) with a DDPM/DDIM-style scheduler config")
CLASS_EMBED_TYPES = (None, "timestep")  # "identity" takes embedding vectors, not labels
NULL_KEY = "diffusers_null_label"  # the card key: the diffusers label index of "no class" (CFG's null)


class DiffusersSourceError(UserError, ValueError):
    """A diffusers directory fewstep cannot import; the message names what is supported."""


class DiffusersExportError(UserError, ValueError):
    """A model dir that export_unet2d cannot export."""


class DiffusersMissingError(UserError, ImportError):
    """diffusers (an optional extra) is not installed."""


def _diffusers():
    """Import diffusers, offline (nothing is downloaded)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import diffusers
    except ImportError:
        raise DiffusersMissingError("the diffusers-unet2d family needs diffusers: "
                                    "pip install 'fewstep[peers]'") from None
    return diffusers


def public_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers config without its private keys (``_class_name``, ``_diffusers_version``, ...),
    as plain JSON values (tuples -> lists)."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def _square_size(config: Mapping[str, Any]) -> int:
    size = config.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise DiffusersSourceError(f"UNet sample_size {size} is not square; supported: square images "
                                       f"(sample_size an int or [n, n])")
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise DiffusersSourceError(f"UNet sample_size {size!r} is not a positive int; supported: square images "
                                   f"(sample_size an int or [n, n])")
    return size


# --------------------------------------------------------------------------------------------
# the family


def diffusers_timestep(tc: torch.Tensor, T: int) -> torch.Tensor:
    """Continuous time tc = index / T -> diffusers' timestep index - 1 (float32). A value within
    1e-3 of an integer is snapped to it, so an integer index that went through float32 ``index / T``
    reaches the UNet exactly as diffusers' own integer timestep."""
    t = tc.double() * T - 1.0
    r = torch.round(t)
    return torch.where((t - r).abs() < 1e-3, r, t).float()


class DiffusersAdapter(torch.nn.Module):
    """A diffusers UNet as a fewstep network: the shared part of the diffusers families' adapters
    (UNet2DAdapter here, sd.SDAdapter). Its state dict is the UNet's own (no prefix), so weights
    saved from it load back into the diffusers class unchanged. ``arch`` makes the UNet
    (``arch.make_unet()``)."""

    def __init__(self, unet: torch.nn.Module, T: int, arch: Any):
        super().__init__()
        self.unet, self.T, self.arch = unet, int(T), arch

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self.unet.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,  # type: ignore[override]
                        assign: bool = False):
        return self.unet.load_state_dict(state_dict, strict=strict, assign=assign)

    def _copy(self, arch: Any) -> "DiffusersAdapter":
        """A training-mode copy: ``arch``'s UNet with this one's weights, on this one's device."""
        unet = load_unet(arch, self.unet.state_dict())
        return type(self)(unet.to(next(self.unet.parameters()).device), self.T, arch).train()


def load_unet(arch: Any, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """``arch.make_unet()`` with ``state`` loaded (strict: every key, no other)."""
    unet = arch.make_unet()
    unet.load_state_dict(state, strict=True)
    return unet


def adapted_denoiser(adapter: type[DiffusersAdapter], arch: Any, card: models.ModelCard,
                     state: Mapping[str, torch.Tensor], device: torch.device | str) -> NetDenoiser:
    """The card's denoiser over ``arch``'s UNet holding ``state``, wrapped in ``adapter`` (the
    ``build`` of both diffusers families)."""
    net = adapter(load_unet(arch, state), card.schedule.T, arch)
    return NetDenoiser(net.to(device).eval(), card.schedule.build(), card.parameterization)


class UNet2DAdapter(DiffusersAdapter):
    """``forward(z, tc)`` -> ``unet(z, tc * T - 1).sample``: a diffusers UNet2DModel as a fewstep
    network (NetDenoiser); a student saved from it loads back into a UNet2DModel unchanged."""

    arch: "DiffusersUNet2DArch"

    @property
    def num_classes(self) -> int | None:
        """fewstep's class count (labels 0..K-1, null K); None: unconditional."""
        return self.arch.num_classes

    @property
    def has_null_label(self) -> bool:
        """Whether classifier-free guidance is possible (the import named the null label)."""
        return self.arch.has_null_label

    def forward(self, z: torch.Tensor, tc: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``y``: (B,) fewstep labels of a class-conditional UNet (None: the null label)."""
        t = diffusers_timestep(tc, self.T).to(z.device)
        if self.num_classes is None:
            if y is not None:
                raise ValueError("class labels given to an unconditional UNet2DModel")
            return self.unet(z, t).sample
        if y is None:
            y = torch.full((z.shape[0],), self.num_classes, dtype=torch.long, device=z.device)
        return self.unet(z, t, class_labels=self.arch.diffusers_labels(y)).sample

    def trainable_copy(self) -> "DiffusersAdapter":
        """A copy with dropout off (a distillation student, models.student_start)."""
        return self._copy(DiffusersUNet2DArch({**self.arch.config, "dropout": 0.0}, self.arch.null_label))


@models.register_family
@dataclass(frozen=True)
class DiffusersUNet2DArch:
    """A diffusers UNet2DModel; on disk: ``diffusers_unet`` (its config, public keys). Weights: the
    UNet's state dict."""

    family: ClassVar[str] = FAMILY
    config: Mapping[str, Any]
    null_label: int | None = None  # a class-conditional UNet's diffusers index of "no class" (module doc)

    def __post_init__(self) -> None:
        n, E = self.null_label, self.num_class_embeds
        if n is None:
            return
        if E is None:
            raise models.ModelCardError(f"{NULL_KEY} {n!r} given for an unconditional UNet2DModel")
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < E:
            raise models.ModelCardError(f"{NULL_KEY} must be a label index 0..{E - 1} of this UNet2DModel "
                                        f"(num_class_embeds={E}), got {n!r}")

    @property
    def num_class_embeds(self) -> int | None:
        """The UNet's diffusers label count E (None: unconditional)."""
        E = self.config.get("num_class_embeds")
        return None if E is None else int(E)

    @property
    def num_classes(self) -> int | None:
        """fewstep's class count K: E - 1 with a null label, E without (conditional only)."""
        E = self.num_class_embeds
        if E is None:
            return None
        return E - 1 if self.null_label is not None else E

    @property
    def has_null_label(self) -> bool:
        return self.null_label is not None

    def diffusers_labels(self, y: torch.Tensor) -> torch.Tensor:
        """fewstep labels (0..K-1, null K) -> the UNet's class_labels (module doc)."""
        K, n = self.num_classes, self.null_label
        y = y.long()
        if n is None:
            if bool((y == K).any()):
                raise GuidanceError("the null label (unconditional prediction) asked of a conditional-only "
                                    "UNet2DModel: it was imported without teacher.source.null_label")
            return y
        return torch.where(y == K, torch.full_like(y, n), y + (y >= n).long())

    @property
    def channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def image_size(self) -> int:
        return _square_size(self.config)

    @property
    def patch_sizes(self) -> list[int]:
        return [1]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {UNET_KEY: public_config(self.config)}
        return {**d, NULL_KEY: self.null_label} if self.null_label is not None else d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DiffusersUNet2DArch":
        cfg = d[UNET_KEY]
        if not isinstance(cfg, Mapping) or "in_channels" not in cfg or "sample_size" not in cfg:
            raise models.ModelCardError(f"{UNET_KEY} must be a UNet2DModel config with in_channels and sample_size")
        return cls(public_config(cfg), d.get(NULL_KEY))

    def make_unet(self) -> torch.nn.Module:
        """The UNet2DModel this config describes (random weights)."""
        return _diffusers().UNet2DModel.from_config(dict(self.config))

    def build(self, card: models.ModelCard, state: Mapping[str, torch.Tensor],
              device: torch.device | str) -> NetDenoiser:
        return adapted_denoiser(UNet2DAdapter, self, card, state, device)


# --------------------------------------------------------------------------------------------
# in: a diffusers directory -> a fewstep model dir


class _Source:
    """A diffusers directory, local or fsspec URL; remote files are fetched into a local staging dir."""

    def __init__(self, url: str | os.PathLike, staging: Path):
        self.url = str(url).rstrip("/")
        self.remote = storage.is_remote(self.url)
        self.staging = staging
        if self.remote:
            try:
                self.fs, self.root = storage.filesystem(self.url)
                ok = self.fs.isdir(self.root)
            except Exception as e:  # backend-specific errors
                raise DiffusersSourceError(f"cannot read {self.url}: {type(e).__name__}: {e}") from None
        else:
            self.root = str(storage.local_path(self.url))
            ok = Path(self.root).is_dir()
        if not ok:
            raise DiffusersSourceError(f"{self.url} is not a directory; expected a diffusers save_pretrained dir of "
                                       f"{SUPPORTED}")

    def exists(self, rel: str) -> bool:
        if self.remote:
            return bool(self.fs.exists(f"{self.root}/{rel}"))
        return (Path(self.root) / rel).is_file()

    def local(self, rel: str) -> Path:
        """A local path of the file (fetched once when remote)."""
        if not self.remote:
            return Path(self.root) / rel
        dest = self.staging / rel
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            with storage.open_read(f"{self.url}/{rel}") as f, open(dest, "wb") as out:
                shutil.copyfileobj(f, out, 1 << 20)
        return dest


@contextlib.contextmanager
def _staging() -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="fewstep-import-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_config(src: _Source, rel: str) -> dict[str, Any]:
    try:
        cfg = json.loads(src.local(rel).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DiffusersSourceError(f"{src.url}/{rel} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise DiffusersSourceError(f"{src.url}/{rel} is not a JSON object")
    return cfg


def _layout(src: _Source) -> tuple[str, str]:
    """(UNet folder prefix, scheduler config path) inside the source: a pipeline dir (unet/,
    scheduler/) or a bare model dir with scheduler_config.json beside config.json."""
    unet = "unet/" if src.exists("unet/config.json") else ""
    if not src.exists(unet + "config.json"):
        raise DiffusersSourceError(f"{src.url} has no config.json (nor unet/config.json); expected {SUPPORTED}")
    for rel in ("scheduler/" + SCHEDULER_CONFIG, unet + SCHEDULER_CONFIG, SCHEDULER_CONFIG):
        if src.exists(rel):
            return unet, rel
    raise DiffusersSourceError(f"{src.url} has no scheduler config (scheduler/{SCHEDULER_CONFIG} or "
                               f"{SCHEDULER_CONFIG}); expected {SUPPORTED}")


def _check_class_embedding(cfg: Mapping[str, Any], where: str, null_label: int | None) -> None:
    """A class-conditional UNet2DModel's label embedding fewstep can drive with class indices, and
    the null label inside it (module doc)."""
    kind, E = cfg.get("class_embed_type"), cfg.get("num_class_embeds")
    if kind not in CLASS_EMBED_TYPES:
        why = "its class_labels are embedding vectors, not class indices" if kind == "identity" else "unknown"
        raise DiffusersSourceError(f"{where}: class_embed_type {kind!r} is not supported ({why}); supported: "
                                   "null with num_class_embeds, or 'timestep' with num_class_embeds stating the "
                                   "label count")
    if E is None:
        if kind is None:
            if null_label is not None:
                raise DiffusersSourceError(f"{where}: teacher.source.null_label {null_label} given, but this "
                                           "UNet2DModel is unconditional (no num_class_embeds); remove it")
            return
        raise DiffusersSourceError(f"{where}: class_embed_type 'timestep' embeds any integer label; fewstep needs "
                                   "the label count as num_class_embeds in the config")
    if isinstance(E, bool) or not isinstance(E, int) or E < 1 + (null_label is not None):
        raise DiffusersSourceError(f"{where}: num_class_embeds {E!r} must be a positive label count"
                                   + (" with room for the null label and a class" if null_label is not None else ""))
    if null_label is not None and (isinstance(null_label, bool) or not isinstance(null_label, int)
                                   or not 0 <= null_label < E):
        raise DiffusersSourceError(f"{where}: teacher.source.null_label {null_label!r} is out of range: this "
                                   f"UNet2DModel embeds labels 0..{E - 1} (num_class_embeds={E}); give the index "
                                   "it was trained with for dropped labels, or none (conditional only, no guidance)")


def _check_unet_config(cfg: Mapping[str, Any], where: str, null_label: int | None = None) -> None:
    cls = cfg.get("_class_name", UNET_CLASS)
    if cls == "UNet2DConditionModel":
        raise DiffusersSourceError(f"{where}: a text-conditional UNet ({cls}) is not a UNet2DModel; "
                                   f"supported here: {SUPPORTED}")
    if cls != UNET_CLASS:
        raise DiffusersSourceError(f"{where}: model class {cls!r} is not supported; supported: {SUPPORTED}")
    if cfg.get("time_embedding_type", "positional") != "positional":
        raise DiffusersSourceError(f"{where}: time_embedding_type {cfg['time_embedding_type']!r} is not supported; "
                                   f"supported: 'positional' (DDPM-style timesteps)")
    if cfg.get("in_channels", 3) != cfg.get("out_channels", 3):
        raise DiffusersSourceError(f"{where}: out_channels {cfg.get('out_channels')} != in_channels "
                                   f"{cfg.get('in_channels')} (learned variance?); "
                                   f"supported: one prediction per channel")
    _square_size(cfg)
    _check_class_embedding(cfg, where, null_label)


def _schedule_spec(cfg: Mapping[str, Any], where: str) -> tuple[models.ScheduleSpec, str]:
    """(the schedule, our parameterisation) from a scheduler config."""
    cls = cfg.get("_class_name")
    if cls not in SCHEDULERS:
        raise DiffusersSourceError(f"{where}: scheduler class {cls!r} is not supported; "
                                   f"supported: {', '.join(SCHEDULERS)}")
    c = {**SCHEDULER_DEFAULTS, **cfg}
    pt = c["prediction_type"]
    if pt not in PREDICTION:
        raise DiffusersSourceError(f"{where}: prediction_type {pt!r} is not supported; "
                                   f"supported: {', '.join(PREDICTION)}")
    if c.get("rescale_betas_zero_snr"):
        raise DiffusersSourceError(f"{where}: rescale_betas_zero_snr=true is not supported; supported: "
                                   f"beta_schedule {', '.join(BETA_SCHEDULES)} or trained_betas, without rescaling")
    if str(c.get("variance_type") or "fixed_small").startswith("learned"):
        raise DiffusersSourceError(f"{where}: variance_type {c['variance_type']!r} (a learned variance) is not "
                                   f"supported; supported: fixed variances")
    T = c["num_train_timesteps"]
    if not isinstance(T, int) or T < 2:
        raise DiffusersSourceError(f"{where}: num_train_timesteps {T!r} must be an int >= 2")
    tb = c["trained_betas"]
    if tb is not None:
        if not isinstance(tb, list) or len(tb) != T or not all(isinstance(b, (int, float)) and 0 < b < 1 for b in tb):
            raise DiffusersSourceError(f"{where}: trained_betas must be {T} numbers in (0, 1)")
        return models.ScheduleSpec(DIFFUSERS_KIND, T, trained_betas=tuple(float(b) for b in tb)), PREDICTION[pt]
    if c["beta_schedule"] not in BETA_SCHEDULES:
        raise DiffusersSourceError(f"{where}: beta_schedule {c['beta_schedule']!r} is not supported; supported: "
                                   f"{', '.join(BETA_SCHEDULES)} or trained_betas")
    spec = models.ScheduleSpec(DIFFUSERS_KIND, T, beta_schedule=c["beta_schedule"], beta_start=float(c["beta_start"]),
                               beta_end=float(c["beta_end"]))
    try:
        spec.build()
    except ValueError as e:
        raise DiffusersSourceError(f"{where}: {e}") from None
    return spec, PREDICTION[pt]


def _load_model(src: _Source, prefix: str, cls_name: str, cfg: Mapping[str, Any],
                supported: str = SUPPORTED) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """(the diffusers ``cls_name`` built from ``cfg`` with ``prefix + UNET_WEIGHTS`` loaded strictly,
    its state dict): the source loader of both diffusers families (``prefix``: the model's folder
    with its trailing slash, or ""). Only safetensors: a folder with pickled .bin weights alone is
    refused, never unpickled. Every failure is a DiffusersSourceError naming ``supported``."""
    rel = prefix + UNET_WEIGHTS
    if not src.exists(rel):
        if src.exists(prefix + UNET_PICKLE):
            raise DiffusersSourceError(f"{src.url}/{prefix}{UNET_PICKLE}: only pickled .bin weights, which fewstep "
                                       f"never unpickles; supported: {UNET_WEIGHTS} (convert it where you trust the "
                                       f"file: {cls_name}.from_pretrained(dir"
                                       + (f", subfolder={prefix.rstrip('/')!r}).save_pretrained(dir + "
                                          f"{'/' + prefix.rstrip('/')!r}" if prefix else ").save_pretrained(dir")
                                       + ", safe_serialization=True))")
        raise DiffusersSourceError(f"{src.url} has no {rel}; expected {supported}")
    try:
        model = getattr(_diffusers(), cls_name).from_config(public_config(cfg))
    except Exception as e:  # diffusers raises ValueError / TypeError for inconsistent configs
        raise DiffusersSourceError(f"{src.url}/{prefix}config.json: not a buildable {cls_name} config: "
                                   f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    try:
        state = storage.load_tensors(src.local(rel))
    except Exception as e:  # safetensors' own error types
        raise DiffusersSourceError(f"{src.url}/{rel} is not a readable safetensors file: "
                                   f"{' '.join(str(e).split())}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        detail = detail if len(detail) <= 240 else detail[:240] + "..."
        raise DiffusersSourceError(f"{src.url}/{rel} does not match its config.json: {detail}") from None
    return model.eval(), state


def import_teacher(source: str | os.PathLike, out: str | Path, *, name: str = "teacher",
                   null_label: int | None = None) -> models.ModelCard:
    """Import a diffusers UNet2DModel + scheduler config (local dir or fsspec URL) as a fewstep
    teacher at ``out``; returns its card (with the weights' sha256). Everything is checked before
    anything is written; ``out`` appears whole or not at all (a bad source raises
    DiffusersSourceError, one line naming what is supported). ``null_label``: a class-conditional
    UNet's diffusers label index for dropped labels (module doc; None: conditional only)."""
    with _staging() as staging:
        src = _Source(source, staging)
        unet_dir, sched_rel = _layout(src)
        ucfg = _read_config(src, unet_dir + "config.json")
        _check_unet_config(ucfg, f"{src.url}/{unet_dir}config.json", null_label)
        scfg = _read_config(src, sched_rel)
        spec, kind = _schedule_spec(scfg, f"{src.url}/{sched_rel}")
        unet, _ = _load_model(src, unet_dir, "UNet2DModel", ucfg)
        used = [unet_dir + "config.json", unet_dir + UNET_WEIGHTS, sched_rel]
        if src.exists(MODEL_INDEX):
            used.append(MODEL_INDEX)
        files = {rel: storage.sha256_file(src.local(rel)) for rel in used}
        arch = DiffusersUNet2DArch(public_config(unet.config), null_label)
        size = arch.image_size
        cond = {} if arch.num_classes is None else {"class_labels": torch.zeros(1, dtype=torch.long)}
        with torch.no_grad():  # the config builds a network that runs at its sample size
            out_shape = tuple(unet(torch.zeros(1, arch.channels, size, size), 0, **cond).sample.shape)
        if out_shape != (1, arch.channels, size, size):
            raise DiffusersSourceError(f"{src.url}: the UNet maps (1, {arch.channels}, {size}, {size}) to {out_shape}; "
                                       f"supported: {SUPPORTED}")
        source_info = {"kind": SOURCE_KIND, "url": src.url, "files": files, "sha256": storage.sha256_json(files),
                       "unet_class": ucfg.get("_class_name", UNET_CLASS), "scheduler_class": scfg.get("_class_name"),
                       "scheduler_config": public_config(scfg), "diffusers_version": ucfg.get("_diffusers_version")}
        if arch.num_classes is not None:
            source_info["null_label"] = null_label
        card = models.ModelCard(arch=arch, role="teacher", parameterization=kind, schedule=spec, image_size=size,
                                sample_steps=spec.T, lineage=models.Lineage(source=source_info),
                                conditioning=models.Conditioning(arch.num_classes), extra={"name": name})
        return models.save(out, card, unet.state_dict(), kind=FAMILY)


# --------------------------------------------------------------------------------------------
# out: a fewstep model dir of this family -> a diffusers DDIMPipeline dir


def _betas_from_table(alpha: np.ndarray) -> list[float]:
    abar = alpha[1:] ** 2  # diffusers index i <-> our index i + 1
    return (1.0 - np.concatenate([abar[:1], abar[1:] / abar[:-1]])).tolist()


def scheduler_config(card: models.ModelCard, *, clip: bool = False) -> dict[str, Any]:
    """DDIMScheduler kwargs reproducing the card's schedule and parameterisation with trailing
    spacing (fewstep's grid). A ``diffusers`` schedule is given by its own beta spec (exact); another
    kind by trained_betas from our float64 table (float32 in diffusers: equal to ~1e-7). ``clip``:
    clip x-hat to [-1, 1] (fewstep's clip=True needs ``use_clipped_model_output=True`` at step)."""
    spec = card.schedule
    cfg: dict[str, Any] = {"num_train_timesteps": spec.T, "prediction_type": PREDICTION_TYPE[card.parameterization],
                           "timestep_spacing": "trailing", "clip_sample": clip, "clip_sample_range": 1.0,
                           "set_alpha_to_one": True, "steps_offset": 0, "thresholding": False,
                           "rescale_betas_zero_snr": False}
    if spec.kind != DIFFUSERS_KIND:
        return {**cfg, "trained_betas": _betas_from_table(spec.build().alpha)}
    if spec.trained_betas is not None:
        return {**cfg, "trained_betas": list(spec.trained_betas)}
    return {**cfg, "beta_schedule": spec.beta_schedule, "beta_start": spec.beta_start, "beta_end": spec.beta_end}


def class_info(card: models.ModelCard) -> dict[str, Any]:
    """fewstep.json's keys for a class-conditional export: how fewstep's labels map to the UNet's
    ``class_labels`` and the guidance scale a distilled student already carries (sample it with
    guidance_scale 1); {} for an unconditional model."""
    if card.conditioning.kind != "class":
        return {}
    arch: DiffusersUNet2DArch = card.arch  # type: ignore[assignment]
    K, n = arch.num_classes, arch.null_label
    info: dict[str, Any] = {"conditioning": {
        "kind": "class", "num_classes": K, "null_class_label": n,
        "class_labels": [int(v) for v in arch.diffusers_labels(torch.arange(K))],  # fewstep class c -> class_labels
        "guidance": "class_labels of the null class_label; guidance_scale s = 1 + w" if n is not None
        else "none: conditional only (imported without a null label)"}}
    if card.guidance is not None:
        info["guidance"] = card.guidance  # distilled at w: its conditional output already is guided
    return info


def export_unet2d(model_dir: str | Path, out: str | Path, *, clip: bool = False) -> Path:
    """Write a diffusers DDIMPipeline dir for a ``diffusers-unet2d`` model dir (an imported teacher or
    one of its students): ``unet/`` (safetensors), ``scheduler/`` (DDIMScheduler, see
    :func:`scheduler_config`), ``model_index.json`` and ``fewstep.json`` (steps = the model's
    sample_steps, lineage). ``DDIMPipeline(...)(num_inference_steps=steps)`` then reproduces
    fewstep's DDIM samples from the same noise (``clip=False``: fewstep's ``clip=False``). A
    class-conditional UNet is exported as it is (its class embedding and config unchanged);
    ``DDIMPipeline`` passes no class_labels, so sample it with your own loop: fewstep.json's
    ``conditioning`` maps fewstep's classes to ``class_labels`` (:func:`class_info`)."""
    model_dir, out = Path(model_dir), Path(out)
    card = models.load_card(model_dir)
    if card.family != FAMILY:
        raise DiffusersExportError(f"{model_dir} is a {card.family} model; export_unet2d exports {FAMILY} models "
                                   f"(imported diffusers teachers and their students)")
    if card.conditioning.kind not in ("none", "class"):
        raise DiffusersExportError(f"{model_dir} is conditional ({card.conditioning.kind}); export_unet2d exports "
                                   f"unconditional and class-conditional models")
    d = _diffusers()
    unet = load_unet(card.arch, storage.load_tensors(model_dir / models.WEIGHTS))
    pipe = d.DDIMPipeline(unet=unet.eval(), scheduler=d.DDIMScheduler(**scheduler_config(card, clip=clip)))
    info = {"format_version": 1, "pipeline": "DDIMPipeline", "steps": card.sample_steps, "eta": 0.0,
            "clip": clip, "use_clipped_model_output": clip, "family": card.family, "role": card.role,
            "parameterization": card.parameterization, "schedule": card.schedule.to_dict(), "model_dir": str(model_dir),
            "weights_sha256": card.weights_sha256, "lineage": card.lineage.to_dict(),
            **({"variant": card.variant} if card.variant else {}), **class_info(card)}
    with storage.atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        storage.write_json(tmp / EXPORT_INFO, info)
    return out
