"""A diffusers latent text-to-image pipeline (Stable Diffusion layout) as a fewstep model: the
``diffusers-sd`` family, import, prompt encoding, VAE decoding and the OLSS export (issue 17).

In: :func:`import_sd` reads a diffusers ``save_pretrained`` directory (local or any fsspec URL) with

    unet/        UNet2DConditionModel (config.json + diffusion_pytorch_model.safetensors)
    vae/         AutoencoderKL (config.json + diffusion_pytorch_model.safetensors)
    scheduler/   a DDPM/DDIM/PNDM-style scheduler config (linear / scaled_linear betas, or trained_betas)
    text_encoder/, tokenizer/   optional; copied byte for byte (text_encoder only as safetensors)

and writes a fewstep model dir: ``model.safetensors`` (the UNet's own state dict), ``vae.safetensors``
(the VAE's), ``config.json`` (a ModelCard of family ``diffusers-sd``: the UNet and VAE configs, the
VAE's scaling factor and weights sha256; conditioning kind ``text`` with embed_dim = the UNet's
cross_attention_dim and seq_len = the text encoder's max_position_embeddings when present; the image
shape is the LATENT shape (latent_channels, H/8, W/8), so trajectories, OLSS and samples are in latent
space), and the copied text_encoder/ and tokenizer/. Never unpickles: configs are JSON, weights are
read with safetensors and loaded strictly.

Conventions (as fewstep.interop.unet2d): the schedule is diffusers' own ``alphas_cumprod`` (card
schedule kind ``diffusers``); fewstep's index k is diffusers' timestep k - 1; the network sees tc =
k / T and the adapter calls the UNet at tc * T - 1 (snapped to the integer). Latents are the UNet's
(already multiplied by the VAE scaling factor); :func:`decode` divides by it before the VAE, as the
pipeline does. Guidance: fewstep.prompts (w >= 0, (1 + w) c - w u, diffusers guidance_scale = 1 + w).

Out: :func:`export_sd` writes a ``StableDiffusionPipeline`` dir (unet, vae, scheduler, text_encoder /
tokenizer when the model dir has them else null, safety_checker null, requires_safety_checker
false); with an OLSS scheduler (fewstep.interop.export.export_olss) scheduler/ is the
OLSSDiffusersScheduler, and ``StableDiffusionPipeline.from_pretrained(dir)`` called with
``prompt_embeds``, ``negative_prompt_embeds``, ``guidance_scale = 1 + w``, ``num_inference_steps = n``
and ``latents = x_T`` reproduces fewstep's OLSS latents.

diffusers and transformers are imported lazily, inside functions (optional extras).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch

from fewstep import models, storage
from fewstep.interop.unet2d import (MODEL_INDEX, UNET_WEIGHTS, DiffusersAdapter, DiffusersExportError,
                                    DiffusersSourceError, _diffusers, _load_model, _read_config, _schedule_spec,
                                    _Source, _staging, adapted_denoiser, diffusers_timestep, load_unet, public_config,
                                    scheduler_config)
from fewstep.math.guidance import GuidanceError
from fewstep.math.param import NetDenoiser

FAMILY = "diffusers-sd"
UNET_KEY, VAE_KEY = "diffusers_unet", "diffusers_vae"
SCALING_KEY, VAE_SHA_KEY = "vae_scaling_factor", "vae_weights_sha256"
VAE_WEIGHTS = "vae.safetensors"
TEXT_DIRS = ("text_encoder", "tokenizer")  # copied into the model dir when the snapshot has them
PIPELINE_INFO = "pipeline.json"  # the source model_index entries of the copied text_encoder / tokenizer
SOURCE_KIND = "diffusers-sd"
UNET_CLASS, VAE_CLASS = "UNet2DConditionModel", "AutoencoderKL"
SUPPORTED = ("a diffusers latent text-to-image dir: unet/ (UNet2DConditionModel, safetensors), vae/ "
             "(AutoencoderKL, safetensors), scheduler/scheduler_config.json (DDPM/DDIM/PNDM-style), optional "
             "text_encoder/ and tokenizer/")
# UNet2DConditionModel features this family does not drive (SDXL's added conditions, LCM's guidance
# embedding, class labels): refused at import
UNSUPPORTED_UNET_KEYS = ("class_embed_type", "num_class_embeds", "addition_embed_type", "time_cond_proj_dim",
                         "encoder_hid_dim", "encoder_hid_dim_type")


# --------------------------------------------------------------------------------------------
# the family


class SDAdapter(DiffusersAdapter):
    """``forward(z, tc, y)`` -> ``unet(z, tc * T - 1, encoder_hidden_states=y).sample``: a diffusers
    UNet2DConditionModel as a fewstep network; ``y`` (B, L, D) prompt embeddings are required.
    Its state dict is the UNet's own (no prefix)."""

    text_conditional = True
    arch: "DiffusersSDArch"

    def forward(self, z: torch.Tensor, tc: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None or y.ndim != 3:
            raise GuidanceError("a text-conditional model needs prompt embeddings (B, L, D); sample it through "
                                "fewstep.prompts (a prompt file)")
        return self.unet(z, diffusers_timestep(tc, self.T).to(z.device), encoder_hidden_states=y.to(z.dtype)).sample

    def trainable_copy(self) -> "DiffusersAdapter":
        return self._copy(self.arch)


def _size(cfg: Mapping[str, Any], where: str) -> int:
    size = cfg.get("sample_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise DiffusersSourceError(f"{where}: sample_size {size!r} is not a positive int (square latents)")
    return size


@models.register_family
@dataclass(frozen=True)
class DiffusersSDArch:
    """A latent text-to-image pipeline's UNet2DConditionModel and AutoencoderKL. On disk:
    ``diffusers_unet``, ``diffusers_vae`` (their public configs), ``vae_scaling_factor``,
    ``vae_weights_sha256``. Weights: the UNet's state dict (model.safetensors); the VAE's in
    vae.safetensors. channels / image_size are the latent's."""

    family: ClassVar[str] = FAMILY
    latent: ClassVar[bool] = True
    config: Mapping[str, Any]
    vae: Mapping[str, Any]
    scaling_factor: float
    vae_sha256: str

    @property
    def channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def image_size(self) -> int:
        return _size(self.config, UNET_KEY)

    @property
    def patch_sizes(self) -> list[int]:
        return [1]

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent (2 ** (VAE levels - 1), diffusers' ``vae_scale_factor``)."""
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def pixel_size(self) -> int:
        return self.image_size * self.vae_scale_factor

    @property
    def cross_attention_dim(self) -> int:
        return int(self.config["cross_attention_dim"])

    def to_dict(self) -> dict[str, Any]:
        return {UNET_KEY: public_config(self.config), VAE_KEY: public_config(self.vae),
                SCALING_KEY: float(self.scaling_factor), VAE_SHA_KEY: self.vae_sha256}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DiffusersSDArch":
        u, v = d.get(UNET_KEY), d.get(VAE_KEY)
        if not isinstance(u, Mapping) or "in_channels" not in u or "cross_attention_dim" not in u:
            raise models.ModelCardError(f"{UNET_KEY} must be a UNet2DConditionModel config")
        if not isinstance(v, Mapping) or "block_out_channels" not in v or SCALING_KEY not in d or VAE_SHA_KEY not in d:
            raise models.ModelCardError(f"a {FAMILY} card needs {VAE_KEY} (an AutoencoderKL config), {SCALING_KEY} "
                                        f"and {VAE_SHA_KEY}")
        return cls(public_config(u), public_config(v), float(d[SCALING_KEY]), str(d[VAE_SHA_KEY]))

    def make_unet(self) -> torch.nn.Module:
        return _diffusers().UNet2DConditionModel.from_config(dict(self.config))

    def make_vae(self) -> torch.nn.Module:
        return _diffusers().AutoencoderKL.from_config(dict(self.vae))

    def build(self, card: models.ModelCard, state: Mapping[str, torch.Tensor],
              device: torch.device | str) -> NetDenoiser:
        return adapted_denoiser(SDAdapter, self, card, state, device)


def load_vae(model_dir: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The AutoencoderKL of a ``diffusers-sd`` model dir (weights checked against the card's sha256)."""
    model_dir = Path(model_dir)
    card = models.load_card(model_dir)
    arch = _arch(card, model_dir)
    path = model_dir / VAE_WEIGHTS
    if storage.sha256_file(path) != arch.vae_sha256:
        raise models.ModelCardError(f"{path} does not match its card's {VAE_SHA_KEY}")
    vae = arch.make_vae()
    vae.load_state_dict(storage.load_tensors(path), strict=True)
    return vae.to(device).eval().requires_grad_(False)


def _arch(card: models.ModelCard, where: Any) -> DiffusersSDArch:
    if not isinstance(card.arch, DiffusersSDArch):
        raise DiffusersExportError(f"{where} is a {card.family} model, not a {FAMILY} (latent text-to-image) one")
    return card.arch


@torch.no_grad()
def decode(vae: torch.nn.Module, latents: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """Images in [0, 1] (B, 3, H, W) of UNet latents, as the pipeline's ``output_type="pt"``:
    vae.decode(z / scaling_factor), then (x / 2 + 0.5).clamp(0, 1)."""
    img = vae.decode(latents.to(next(vae.parameters()).dtype) / scaling_factor).sample
    return (img / 2 + 0.5).clamp(0, 1)


# --------------------------------------------------------------------------------------------
# in


def _check_unet(cfg: Mapping[str, Any], where: str) -> None:
    cls = cfg.get("_class_name", UNET_CLASS)
    if cls != UNET_CLASS:
        raise DiffusersSourceError(f"{where}: model class {cls!r} is not supported; supported: {SUPPORTED}")
    bad = [k for k in UNSUPPORTED_UNET_KEYS if cfg.get(k) is not None]
    if bad:
        raise DiffusersSourceError(f"{where}: {', '.join(f'{k}={cfg[k]!r}' for k in bad)} is not supported; "
                                   f"supported: a UNet conditioned on prompt embeddings only (SD 1.x / 2.x)")
    cad = cfg.get("cross_attention_dim", 1280)
    if isinstance(cad, bool) or not isinstance(cad, int):
        raise DiffusersSourceError(f"{where}: cross_attention_dim {cad!r} must be one int (per-block widths are not "
                                   f"supported)")
    if cfg.get("in_channels", 4) != cfg.get("out_channels", 4):
        raise DiffusersSourceError(f"{where}: out_channels {cfg.get('out_channels')} != in_channels "
                                   f"{cfg.get('in_channels')}; supported: one prediction per latent channel")
    _size(cfg, where)


def _check_vae(cfg: Mapping[str, Any], ucfg: Mapping[str, Any], where: str) -> None:
    cls = cfg.get("_class_name", VAE_CLASS)
    if cls != VAE_CLASS:
        raise DiffusersSourceError(f"{where}: VAE class {cls!r} is not supported; supported: {VAE_CLASS}")
    if cfg.get("shift_factor") is not None or cfg.get("latents_mean") is not None:
        raise DiffusersSourceError(f"{where}: shift_factor / latents_mean are not supported; supported: a VAE with "
                                   f"a scaling_factor only (SD 1.x / 2.x)")
    if cfg.get("latent_channels", 4) != ucfg.get("in_channels", 4):
        raise DiffusersSourceError(f"{where}: latent_channels {cfg.get('latent_channels', 4)} != the UNet's "
                                   f"in_channels {ucfg.get('in_channels', 4)}")


def _list(src: _Source, folder: str) -> list[str]:
    """Relative paths of the files under ``folder`` of the source."""
    if src.remote:
        root = f"{src.root}/{folder}"
        return sorted(f"{folder}/{p[len(root) + 1:]}" for p in src.fs.find(root))
    base = Path(src.root)
    return sorted(str(p.relative_to(base)) for p in (base / folder).rglob("*") if p.is_file())


def _text_parts(src: _Source) -> tuple[list[str], dict[str, Any], int | None]:
    """(files of text_encoder/ and tokenizer/ to copy, their model_index entries, the encoder's
    max_position_embeddings). A text encoder without safetensors weights is not copied (never
    unpickled); then the tokenizer is not either (plain prompts need both)."""
    index = _read_config(src, MODEL_INDEX) if src.exists(MODEL_INDEX) else {}
    if not (src.exists("text_encoder/config.json") and src.exists("text_encoder/model.safetensors")
            and src.exists("tokenizer/tokenizer_config.json")):
        return [], {}, None
    files = [f for d in TEXT_DIRS for f in _list(src, d)]
    pickled = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    files = [f for f in files if f not in pickled]
    entries = {d: index.get(d, ["transformers", "CLIPTextModel" if d == "text_encoder" else "CLIPTokenizer"])
               for d in TEXT_DIRS}
    te = _read_config(src, "text_encoder/config.json")
    seq = te.get("max_position_embeddings")
    return files, entries, seq if isinstance(seq, int) and seq > 0 else None


def import_sd(source: str | os.PathLike, out: str | Path, *, name: str = "teacher") -> models.ModelCard:
    """Import a diffusers latent text-to-image snapshot (module doc) as a fewstep teacher at ``out``;
    returns its card. Everything is checked before anything is written (DiffusersSourceError, one
    line, for a bad snapshot); ``out`` appears whole or not at all."""
    with _staging() as staging:
        src = _Source(source, staging)
        for rel in ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"):
            if not src.exists(rel):
                raise DiffusersSourceError(f"{src.url} has no {rel}; expected {SUPPORTED}")
        ucfg = _read_config(src, "unet/config.json")
        _check_unet(ucfg, f"{src.url}/unet/config.json")
        vcfg = _read_config(src, "vae/config.json")
        _check_vae(vcfg, ucfg, f"{src.url}/vae/config.json")
        scfg = _read_config(src, "scheduler/scheduler_config.json")
        spec, kind = _schedule_spec(scfg, f"{src.url}/scheduler/scheduler_config.json")
        if kind == "x":
            raise DiffusersSourceError(f"{src.url}/scheduler/scheduler_config.json: prediction_type 'sample' is not "
                                       f"supported for latent pipelines; supported: epsilon, v_prediction")
        unet, ustate = _load_model(src, "unet/", UNET_CLASS, ucfg, SUPPORTED)
        vae, vstate = _load_model(src, "vae/", VAE_CLASS, vcfg, SUPPORTED)
        text_files, text_entries, seq_len = _text_parts(src)
        used = ["unet/config.json", f"unet/{UNET_WEIGHTS}", "vae/config.json", f"vae/{UNET_WEIGHTS}",
                "scheduler/scheduler_config.json"] + ([MODEL_INDEX] if src.exists(MODEL_INDEX) else []) + text_files
        files = {rel: storage.sha256_file(src.local(rel)) for rel in used}
        ucfg_pub, vcfg_pub = public_config(unet.config), public_config(vae.config)
        size, C, D = _size(ucfg_pub, "unet"), int(ucfg_pub["in_channels"]), int(ucfg_pub["cross_attention_dim"])
        with torch.no_grad():  # the UNet runs at its sample size with (1, 1, D) embeddings
            probe = unet(torch.zeros(1, C, size, size), 0, encoder_hidden_states=torch.zeros(1, 1, D)).sample
        shape = tuple(probe.shape)
        if shape != (1, C, size, size):
            raise DiffusersSourceError(f"{src.url}: the UNet maps (1, {C}, {size}, {size}) to {shape}; "
                                       f"supported: {SUPPORTED}")
        source_info = {"kind": SOURCE_KIND, "url": src.url, "files": files, "sha256": storage.sha256_json(files),
                       "unet_class": UNET_CLASS, "vae_class": VAE_CLASS, "scheduler_class": scfg.get("_class_name"),
                       "scheduler_config": public_config(scfg), "diffusers_version": ucfg.get("_diffusers_version"),
                       "text_encoder": text_entries.get("text_encoder"), "tokenizer": text_entries.get("tokenizer")}
        with storage.atomic_dir(out) as tmp:
            storage.save_tensors(tmp / VAE_WEIGHTS, dict(vstate), metadata={"fewstep": "vae"})
            arch = DiffusersSDArch(ucfg_pub, vcfg_pub, float(vcfg_pub.get("scaling_factor", 0.18215)),
                                   storage.sha256_file(tmp / VAE_WEIGHTS))
            card = models.ModelCard(arch=arch, role="teacher", parameterization=kind, schedule=spec, image_size=size,
                                    sample_steps=spec.T, conditioning=models.Conditioning(None, D, seq_len),
                                    lineage=models.Lineage(source=source_info), extra={"name": name})
            storage.save_tensors(tmp / models.WEIGHTS, dict(ustate), metadata={"fewstep": FAMILY})
            card = card.with_weights(storage.sha256_file(tmp / models.WEIGHTS))
            for rel in text_files:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src.local(rel), tmp / rel)
            if text_files:
                storage.write_json(tmp / PIPELINE_INFO, text_entries)
            storage.write_json(tmp / models.CONFIG, card.to_dict())
        return card


# --------------------------------------------------------------------------------------------
# prompts: plain text -> a prompt file, with the model's own text encoder (transformers, lazily)


def has_text_encoder(model_dir: str | Path) -> bool:
    return (Path(model_dir) / PIPELINE_INFO).is_file()


@torch.no_grad()
def encode_prompts(model_dir: str | Path, prompts: Sequence[str], out: str | Path, negative_prompt: str = ""):
    """Encode ``prompts`` (and one shared ``negative_prompt``) with the model dir's text encoder as
    StableDiffusionPipeline.encode_prompt does (padding to the tokenizer's max length, the last hidden
    state), and write the prompt file ``out`` (+ ``<stem>.json`` with the texts); returns its PromptSet."""
    from fewstep.prompts import PromptFileError, save_prompt_file

    model_dir = Path(model_dir)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise PromptFileError("plain prompts must be a non-empty list of strings")
    if not has_text_encoder(model_dir):
        raise PromptFileError(f"{model_dir} has no text encoder (its snapshot had no text_encoder/ with safetensors "
                              f"weights and tokenizer/); give a prompt file of embeddings instead")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise PromptFileError("encoding plain prompts needs transformers: pip install 'fewstep[peers]'") from None
    entries = storage.read_json(model_dir / PIPELINE_INFO)
    tok_cls = getattr(transformers, entries["tokenizer"][1], None) or transformers.AutoTokenizer
    enc_cls = getattr(transformers, entries["text_encoder"][1], None) or transformers.CLIPTextModel
    tokenizer = tok_cls.from_pretrained(str(model_dir / "tokenizer"), local_files_only=True)
    encoder = enc_cls.from_pretrained(str(model_dir / "text_encoder"), local_files_only=True,
                                      use_safetensors=True).eval()

    def embed(texts: list[str]) -> torch.Tensor:
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return encoder(ids)[0].float()

    return save_prompt_file(out, embed(list(prompts)), embed([negative_prompt]), list(prompts))


# --------------------------------------------------------------------------------------------
# out


def export_sd(model_dir: str | Path, out: str | Path, *, scheduler: Any = None,
              info: Mapping[str, Any] | None = None) -> Path:
    """A StableDiffusionPipeline dir of a ``diffusers-sd`` model dir: unet/, vae/ (safetensors),
    scheduler/ (``scheduler``, a diffusers scheduler object; default a DDIMScheduler reproducing
    fewstep's unclipped DDIM on the trailing grid), text_encoder/ and tokenizer/ copied when the
    model dir has them (else null), no safety checker, and fewstep.json (lineage, ``info``)."""
    model_dir, out = Path(model_dir), Path(out)
    card = models.load_card(model_dir)
    arch = _arch(card, model_dir)
    d = _diffusers()
    try:
        from diffusers import StableDiffusionPipeline
    except ImportError:
        raise DiffusersExportError("exporting a StableDiffusionPipeline needs transformers: "
                                   "pip install 'fewstep[peers]'") from None
    unet = load_unet(arch, storage.load_tensors(model_dir / models.WEIGHTS))
    if scheduler is None:  # steps_offset 1 as the pipeline wants it; trailing spacing does not use it
        scheduler = d.DDIMScheduler(**{**scheduler_config(card, clip=False), "steps_offset": 1})
    pipe = StableDiffusionPipeline(vae=load_vae(model_dir), text_encoder=None, tokenizer=None, unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    export_info = {"format_version": 1, "pipeline": "StableDiffusionPipeline", "family": card.family,
                   "role": card.role, "parameterization": card.parameterization,
                   "schedule": card.schedule.to_dict(), "latent_shape": list(card.image_shape),
                   "vae_scaling_factor": arch.scaling_factor, "model_dir": str(model_dir),
                   "weights_sha256": card.weights_sha256, "lineage": card.lineage.to_dict(),
                   "guidance": "diffusers guidance_scale = 1 + fewstep w", **dict(info or {})}
    with storage.atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if has_text_encoder(model_dir):
            entries = storage.read_json(model_dir / PIPELINE_INFO)
            for sub in TEXT_DIRS:
                shutil.copytree(model_dir / sub, tmp / sub)
            index = json.loads((tmp / MODEL_INDEX).read_text())
            index.update({sub: entries[sub] for sub in TEXT_DIRS})
            storage.write_json(tmp / MODEL_INDEX, index)
        storage.write_json(tmp / "fewstep.json", export_info)
    return out


# --------------------------------------------------------------------------------------------
# a sample grid (stage train_teacher of an imported text-to-image teacher)


@torch.no_grad()
def text_grid(model_dir: str | Path, out: str | Path, sp: Any, prompts: Any,
              device: torch.device | str = "cpu") -> None:
    """DDIM samples (sp.steps trailing steps, unclipped latents) of the seeds sp.seed.. at their
    prompts ((s - sp.seed) mod N) guided at sp.guidance, decoded by the VAE, as a PNG grid."""
    from fewstep.images import save_grid
    from fewstep.math.ddim import PerImageNoise, sample_ddim
    from fewstep.math.schedules import timesteps
    from fewstep.prompts import TextGuidance

    den = models.load_denoiser(model_dir, device)
    arch = _arch(den.card, model_dir)
    g = TextGuidance.for_model(den, prompts, sp.guidance, sp.seed)
    seeds = list(range(sp.seed, sp.seed + sp.n))
    x_T = PerImageNoise(seeds, device).randn(*den.card.image_shape)
    steps = timesteps(den.schedule.T, min(sp.steps or den.schedule.T, den.schedule.T), sp.spacing)
    z = sample_ddim(g.wrap(den, seeds), x_T, steps, clip=False)
    img = decode(load_vae(model_dir, device), z, arch.scaling_factor) * 2 - 1  # [-1, 1], as fewstep's images
    save_grid(img.cpu(), out, scale=max(1, 64 // img.shape[-1]))


def sd_gflops(snapshot: str | Path) -> float:
    """GFLOPs of one UNet call on one latent (prompt length = the text encoder's max positions, else
    77), from the snapshot's unet/config.json alone: the UNet is built on the meta device (no
    weights, no memory) and its forward counted by torch's FLOP counter. The budget's cost of a
    latent teacher (fewstep.budget); a guided step costs twice this."""
    from torch.utils.flop_counter import FlopCounterMode

    d = Path(snapshot)
    cfg = public_config(json.loads((d / "unet" / "config.json").read_text()))
    te = d / "text_encoder" / "config.json"
    L = int(json.loads(te.read_text()).get("max_position_embeddings", 77)) if te.exists() else 77
    size = _size(cfg, "unet")
    with torch.device("meta"):
        unet = _diffusers().UNet2DConditionModel.from_config(cfg).eval()
        z = torch.zeros(1, int(cfg.get("in_channels", 4)), size, size)
        y = torch.zeros(1, L, int(cfg.get("cross_attention_dim", 1280)))
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            unet(z, torch.ones(1), encoder_hidden_states=y)
    return fc.get_total_flops() / 1e9
