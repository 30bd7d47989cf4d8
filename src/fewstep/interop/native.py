"""A fewstep UNet as a diffusers model, and its export as a diffusers-loadable directory.

``FewstepUNet2DModel`` (``ModelMixin``, ``ConfigMixin``) wraps fewstep.nets.unet.UNet behind the
``UNet2DModel`` calling convention: ``forward(sample, timestep, return_dict=True)`` takes diffusers
timesteps (fewstep index - 1; int or float, scalar or one per sample) and returns ``.sample``, the
network's output in the card's parameterisation (``prediction_type``: epsilon, v_prediction or
sample). The network sees continuous time (index / T) = (timestep + 1) / T, exactly what fewstep's
NetDenoiser feeds it; a fractional timestep is the same linear map. ``save_pretrained`` writes
config.json (the UNetConfig fields, ``num_train_timesteps``, ``prediction_type``, ``sample_size``
and the fewstep model card as ``fewstep_card``) and diffusion_pytorch_model.safetensors; load it
with ``from_pretrained(dir, use_safetensors=True)``.

:func:`export_native` writes ``unet/`` + ``scheduler/`` (a DDIMScheduler whose ``trained_betas``
are fewstep's schedule, ``timestep_spacing="trailing"``, ``clip_sample=False``,
``set_alpha_to_one=True``) + ``model_index.json`` of a DDIMPipeline. diffusers 0.42 loads the unet
component of such a directory only when ``fewstep.interop.native`` is already imported (it resolves
a library outside diffusers/transformers from ``sys.modules`` and never imports a module a
repository names). A split model (fewstep-unet-split: two UNets routed by noise level) is exported
as ``FewstepSplitUNet2DModel``: the routing (index t = timestep + 1 goes to the high-noise network
iff t > t_boundary, per sample) happens inside its forward, as in fewstep.math.split.SplitNet.

On CUDA fewstep runs its network under bf16 autocast; this wrapper runs in the model's own dtype,
so GPU samples match fewstep's to bf16 precision, CPU samples to float32 rounding.

diffusers is imported lazily: the classes are built on first access (module ``__getattr__``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fewstep.errors import UserError
from fewstep.interop.olss_scheduler import PREDICTION_TYPE

if TYPE_CHECKING:
    from fewstep.models import ModelCard

UNET_DIR, SCHEDULER_DIR, MODEL_INDEX = "unet", "scheduler", "model_index.json"
EXPORT_INFO = "fewstep.json"  # what was exported from what (provenance), beside model_index.json (as unet2d's)


class NativeExportError(UserError, ValueError):
    """A model that cannot be exported as a fewstep diffusers wrapper (another family, a bad call)."""



# --------------------------------------------------------------------------------------------
# configs (no diffusers needed)


def _common(card: "ModelCard") -> dict[str, Any]:
    return {"num_train_timesteps": int(card.schedule.T), "prediction_type": PREDICTION_TYPE[card.parameterization],
            "sample_size": card.image_size, "fewstep_card": card.to_dict()}


def unet_config(card: "ModelCard") -> dict[str, Any]:
    """The wrapper's config for a fewstep-unet card: the UNetConfig fields plus T and provenance."""
    from fewstep.models import UNetArch

    if not isinstance(card.arch, UNetArch):
        raise NativeExportError(f"a {card.family} model is not one fewstep UNet (family fewstep-unet)")
    if card.conditioning.kind not in ("none", "class"):
        raise NativeExportError(f"a {card.conditioning.kind}-conditional fewstep UNet cannot be exported: the "
                                "diffusers wrapper takes class labels only")
    return {**card.arch.net.to_dict(), **_common(card)}


def split_config(card: "ModelCard") -> dict[str, Any]:
    """The split wrapper's config for a fewstep-unet-split card: both UNetConfigs, the boundary index
    (the last index on the low-noise side, as SplitDenoiser computes it), T and provenance."""
    from fewstep.math.split import boundary_index
    from fewstep.models import SplitUNetArch

    if not isinstance(card.arch, SplitUNetArch):
        raise NativeExportError(f"a {card.family} model is not a split fewstep model (family fewstep-unet-split)")
    t_b = boundary_index(card.schedule.build(), card.arch.split.boundary_logsnr)
    return {"high": card.arch.nets["high"].to_dict(), "low": card.arch.nets["low"].to_dict(), "t_boundary": t_b,
            "in_channels": card.channels, **_common(card)}


def wrapper_config(card: "ModelCard") -> tuple[str, dict[str, Any]]:
    """(class name, config) of the diffusers wrapper of ``card``'s network(s)."""
    if card.family == "fewstep-unet-split":
        return "FewstepSplitUNet2DModel", split_config(card)
    return "FewstepUNet2DModel", unet_config(card)


def ddim_scheduler_config(card: "ModelCard") -> dict[str, Any]:
    """A DDIMScheduler config on fewstep's own schedule (peers._betas: diffusers index i <-> fewstep
    index i + 1) that samples the trailing grid down to the clean image."""
    from fewstep.peers import _betas

    schedule = card.schedule.build()
    return {"num_train_timesteps": int(schedule.T), "trained_betas": _betas(schedule.alpha).tolist(),
            "beta_schedule": "linear", "prediction_type": PREDICTION_TYPE[card.parameterization],
            "timestep_spacing": "trailing", "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0,
            "thresholding": False, "rescale_betas_zero_snr": False}


# --------------------------------------------------------------------------------------------
# the diffusers class, built on first use


def _build() -> dict[str, type]:
    import dataclasses

    import torch
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.unets.unet_2d import UNet2DOutput

    from fewstep.math.split import SplitNet
    from fewstep.nets.unet import UNet, UNetConfig

    def continuous_time(sample: torch.Tensor, timestep: Any, T: int) -> torch.Tensor:
        """(B,) continuous time index / T for diffusers timesteps (index - 1), scalar or per sample."""
        B = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim == 0 or t.numel() == 1:
            t = t.reshape(1).expand(B)
        elif t.shape != (B,):
            raise NativeExportError(f"timestep must be a scalar or have one entry per sample ({B}), "
                                    f"got shape {tuple(t.shape)}")
        return (t.to(torch.float32) + 1.0) / T  # same float32 value NetDenoiser computes from the index

    class _FewstepWrapper(ModelMixin, ConfigMixin):
        """The forward both wrappers share: diffusers timesteps to fewstep's continuous time, class
        labels to a conditional net (``num_classes`` set), ``.sample`` out."""

        net: torch.nn.Module
        T: int
        num_classes: int | None = None

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, class_labels: Any = None,
                    return_dict: bool = True) -> UNet2DOutput | tuple[torch.Tensor]:
            tc = continuous_time(sample, timestep, self.T)
            if class_labels is None:
                out = self.net(sample, tc)
            elif self.num_classes is None:
                raise NativeExportError("this fewstep UNet is unconditional: class_labels must be None")
            else:  # labels 0..K-1, K = the null label (fewstep.math.guidance)
                y = torch.as_tensor(class_labels, device=sample.device).long().reshape(-1)
                out = self.net(sample, tc, y.expand(sample.shape[0]) if y.numel() == 1 else y)
            return UNet2DOutput(sample=out) if return_dict else (out,)

    class FewstepUNet2DModel(_FewstepWrapper):
        """fewstep's UNet with the UNet2DModel calling convention (see the module docstring). Its
        config holds every UNetConfig field (tests check the signature covers them all)."""

        @register_to_config
        def __init__(self, image_size: int = 32, in_channels: int = 3, patch_size: int = 1, channels: int = 64,
                     channel_mult: tuple[int, ...] = (1, 2, 2), num_res_blocks: int = 2,
                     attn_resolutions: tuple[int, ...] = (8,), head_dim: int = 32, dropout: float = 0.0,
                     emb_mult: int = 4, pos_emb: bool = False, num_classes: int | None = None,
                     num_train_timesteps: int = 1024, prediction_type: str = "v_prediction",
                     sample_size: int | None = None, fewstep_card: dict | None = None):
            super().__init__()
            if sample_size is not None and int(sample_size) != int(image_size):
                raise NativeExportError(f"sample_size {sample_size} differs from image_size {image_size}")
            cfg = UNetConfig(**{f.name: self.config[f.name] for f in dataclasses.fields(UNetConfig)})
            self.net = UNet(cfg)
            self.T, self.num_classes = int(num_train_timesteps), cfg.num_classes

    class FewstepSplitUNet2DModel(_FewstepWrapper):
        """A split fewstep model (two UNets routed by noise level, fewstep.math.split.SplitNet) with the
        UNet2DModel calling convention: index t = timestep + 1 goes to ``high`` iff t > t_boundary."""

        @register_to_config
        def __init__(self, high: dict | None = None, low: dict | None = None, t_boundary: int = 0,
                     in_channels: int = 3, num_train_timesteps: int = 1024, prediction_type: str = "v_prediction",
                     sample_size: int | None = None, fewstep_card: dict | None = None):
            super().__init__()
            cfgs = {}
            for side, d in (("high", high), ("low", low)):
                if not d:
                    raise NativeExportError(f"a split wrapper needs the {side} network's config")
                cfgs[side] = UNetConfig(**d)
            if cfgs["low"].in_channels != in_channels or cfgs["high"].in_channels != in_channels:
                raise NativeExportError("both networks of a split model must take in_channels channels")
            self.net = SplitNet(UNet(cfgs["high"]), UNet(cfgs["low"]), int(t_boundary), int(num_train_timesteps))
            self.T = int(num_train_timesteps)

    for cls in (FewstepUNet2DModel, FewstepSplitUNet2DModel):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return {c.__name__: c for c in (FewstepUNet2DModel, FewstepSplitUNet2DModel)}


_BUILT: dict[str, type] = {}
CLASSES = ("FewstepUNet2DModel", "FewstepSplitUNet2DModel")


def __getattr__(name: str) -> Any:
    """The wrapper classes are built on first access; ``ModelMixin`` / ``ConfigMixin`` are
    diffusers' (a pipeline's from_pretrained looks them up in the module it loads a component from)."""
    if name in CLASSES:
        if not _BUILT:
            _BUILT.update(_build())
        return _BUILT[name]
    if name in ("ModelMixin", "ConfigMixin"):
        import diffusers

        return getattr(diffusers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# from a model dir, and the export


def wrap(model_dir: str | Path):
    """The model dir's network(s) as a FewstepUNet2DModel, or a FewstepSplitUNet2DModel for a split
    model (eval mode, weights loaded strictly)."""
    from fewstep import models, storage

    card = models.load_card(model_dir)
    name, cfg = wrapper_config(card)
    model = __getattr__(name)(**cfg)
    model.net.load_state_dict(storage.load_tensors(Path(model_dir) / models.WEIGHTS), strict=True)
    return model.eval()


def export_info(card: "ModelCard", model_dir: Path, kind: str, **extra: Any) -> dict[str, Any]:
    """The provenance written as fewstep.json beside model_index.json."""
    import diffusers

    return {"kind": kind, "source_model_dir": str(model_dir), "model_family": card.family,
            "model_weights_sha256": card.weights_sha256, "role": card.role, "sample_steps": card.sample_steps,
            "parameterization": card.parameterization, "schedule": card.schedule.to_dict(),
            "diffusers_version": diffusers.__version__, **extra}


def export_native(model_dir: str | Path, out: str | Path) -> Path:
    """Write a DDIMPipeline directory for the fewstep-unet (or fewstep-unet-split) model in
    ``model_dir``: unet/ (FewstepUNet2DModel or FewstepSplitUNet2DModel, safetensors), scheduler/
    (DDIMScheduler on fewstep's schedule, trailing spacing, no clipping, set_alpha_to_one) and
    model_index.json, plus fewstep.json. A DDIM loop with it at the model's step count
    reproduces fewstep's DDIM samples (sampled with clip=False; per-step clipping is
    clip_sample=True with use_clipped_model_output=True) from the same x_T. Returns ``out``."""
    from diffusers import DDIMPipeline, DDIMScheduler

    from fewstep import models, storage

    model_dir, out = Path(model_dir), Path(out)
    card = models.load_card(model_dir)
    unet = wrap(model_dir)
    scheduler = DDIMScheduler(**ddim_scheduler_config(card))
    T, k = card.schedule.T, card.sample_steps
    note = ("DDIMPipeline(num_inference_steps=%d) visits the same timesteps as fewstep's trailing DDIM" % k
            if T % k == 0 else
            "T=%d is not a multiple of %d steps: DDIMScheduler's step goes to t - T//N, not to the next trailing "
            "timestep, so DDIMPipeline at %d steps does not visit fewstep's grid" % (T, k, k))
    with storage.atomic_dir(out) as tmp:
        DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
        storage.write_json(tmp / EXPORT_INFO, export_info(card, model_dir, card.family, note=note))
    return out
