"""Prompt files and text classifier-free guidance behind the plain denoiser contract (issue 17).

A prompt file is one safetensors file with

    prompt_embeds           (N, L, D) float   the text encoder's output for N prompts
    negative_prompt_embeds  (N or 1, L, D)    the negative prompt(s) (the unconditional branch of
                                              guidance; 1 row: the same for every prompt)

(D = the UNet's ``cross_attention_dim``, the card's ``conditioning.embed_dim``), optionally beside
a ``<stem>.txt`` (one prompt a line) or ``<stem>.json`` (a list of strings) with the N prompt texts,
recorded as an artifact of the run. fewstep.interop.sd.encode_prompts writes such a file from plain
text with a snapshot's text encoder (once; then the file is the input).

Which prompt an image gets: the image of seed s uses prompt (s - first_seed) mod N (as a class label
does for class-conditional models, fewstep.math.guidance.cycle_labels), so the assignment does not
depend on batching or sharding.

Guidance (fewstep.math.guidance's convention): with c the prediction at the prompt's embeddings and
u the one at the negative embeddings, ``(1 + w) c - w u = u + s (c - u)``, s = 1 + w = diffusers'
``guidance_scale``; w = 0 is one conditional pass (diffusers' s = 1: no CFG), w > 0 one batched
forward of 2B in diffusers' order [negative, prompt].
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from fewstep import storage
from fewstep.errors import UserError
from fewstep.math.guidance import GuidanceError, GuidedDenoiser, check_guidance_scale, cycle_labels

PROMPT_KEY, NEGATIVE_KEY = "prompt_embeds", "negative_prompt_embeds"
TEXT_SUFFIXES = (".txt", ".json")


class PromptFileError(UserError, ValueError):
    """A prompt file that is missing, unreadable, malformed or does not fit the model."""


@dataclass(frozen=True)
class PromptSet:
    """The embeddings of one prompt file: ``embeds`` (N, L, D), ``negative`` (N or 1, L, D) float32;
    ``sha256`` of the file, its ``path`` and the prompt texts when a sidecar gives them."""

    embeds: torch.Tensor
    negative: torch.Tensor
    sha256: str
    path: str
    texts: tuple[str, ...] | None = None
    texts_path: str | None = None

    @property
    def n(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.embeds.shape[1])

    @property
    def embed_dim(self) -> int:
        return int(self.embeds.shape[2])

    def indices(self, seeds: Sequence[int], first_seed: int) -> list[int]:
        """The prompt of each seed: (seed - first_seed) mod N (the class rule, fewstep.math.guidance)."""
        return cycle_labels(seeds, first_seed, self.n)

    def select(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt, negative) embeddings (B, L, D) of prompts ``idx``."""
        i = torch.as_tensor(list(idx), dtype=torch.long)
        neg = self.negative.expand(self.n, -1, -1) if self.negative.shape[0] == 1 else self.negative
        return self.embeds[i], neg[i]

    def check_model(self, embed_dim: int | None, seq_len: int | None = None, what: str = "the model") -> None:
        """A PromptFileError unless the embeddings fit a text model of width ``embed_dim`` (and, when
        known, token count ``seq_len``)."""
        if embed_dim is None:
            raise PromptFileError(f"{self.path}: prompt embeddings given, but {what} is not text-conditional")
        if self.embed_dim != embed_dim:
            raise PromptFileError(f"{self.path}: embedding width D={self.embed_dim}, but {what} takes "
                                  f"D={embed_dim} (its UNet's cross_attention_dim); encode the prompts with its "
                                  f"own text encoder")
        if seq_len is not None and self.seq_len != seq_len:
            raise PromptFileError(f"{self.path}: {self.seq_len} tokens per prompt, but {what}'s text encoder gives "
                                  f"{seq_len}")

    def artifact(self) -> dict[str, Any]:
        """What a run records of this prompt file."""
        return {"prompt_file": self.path, "prompt_file_sha256": self.sha256, "num_prompts": self.n,
                "seq_len": self.seq_len, "embed_dim": self.embed_dim,
                "negative": "per prompt" if self.negative.shape[0] == self.n and self.n > 1 else "shared",
                "texts_file": self.texts_path, "texts": list(self.texts) if self.texts is not None else None}


def _check_embeds(path: str, embeds: torch.Tensor, negative: torch.Tensor) -> None:
    for key, t in ((PROMPT_KEY, embeds), (NEGATIVE_KEY, negative)):
        if t.ndim != 3 or not t.is_floating_point() or 0 in t.shape:
            raise PromptFileError(f"{path}: {key} must be a non-empty float tensor [N, L, D], got shape "
                                  f"{list(t.shape)} dtype {t.dtype}")
        if not torch.isfinite(t).all():
            raise PromptFileError(f"{path}: {key} holds non-finite values")
    n = embeds.shape[0]
    if negative.shape[1:] != embeds.shape[1:] or negative.shape[0] not in (1, n):
        raise PromptFileError(f"{path}: {NEGATIVE_KEY} has shape {list(negative.shape)}; with {PROMPT_KEY} "
                              f"{list(embeds.shape)} it must be [{n} or 1, {embeds.shape[1]}, {embeds.shape[2]}]")


def _texts(path: Path, n: int) -> tuple[tuple[str, ...] | None, str | None]:
    for suffix in TEXT_SUFFIXES:
        side = path.with_suffix(suffix)
        if not side.is_file():
            continue
        raw = side.read_text(encoding="utf-8")
        if suffix == ".json":
            try:
                texts = json.loads(raw)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{side}: not valid JSON: {e}") from None
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise PromptFileError(f"{side}: must be a JSON list of prompt strings")
        else:
            texts = raw.splitlines()
        if len(texts) != n:
            raise PromptFileError(f"{side}: {len(texts)} prompt texts for {n} prompt embeddings")
        return tuple(texts), str(side)
    return None, None


def load_prompt_file(path: str | Path) -> PromptSet:
    """The prompt file at ``path`` (module doc), checked; a PromptFileError (one line) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist; expected a safetensors file with "
                              f"{PROMPT_KEY} [N, L, D] and {NEGATIVE_KEY} [N or 1, L, D]")
    try:
        t = storage.load_tensors(path)
    except Exception as e:  # safetensors' own error types
        raise PromptFileError(f"{path} is not a readable safetensors file: {' '.join(str(e).split())}") from None
    missing = [k for k in (PROMPT_KEY, NEGATIVE_KEY) if k not in t]
    if missing:
        raise PromptFileError(f"{path} lacks {', '.join(missing)}; has {sorted(t)}")
    embeds, negative = t[PROMPT_KEY], t[NEGATIVE_KEY]
    _check_embeds(str(path), embeds, negative)
    texts, texts_path = _texts(path, embeds.shape[0])
    return PromptSet(embeds.float().contiguous(), negative.float().contiguous(), storage.sha256_file(path),
                     str(path), texts, texts_path)


def save_prompt_file(path: str | Path, embeds: torch.Tensor, negative: torch.Tensor,
                     texts: Sequence[str] | None = None) -> PromptSet:
    """Write a prompt file (and ``<stem>.json`` with ``texts`` when given); returns it loaded."""
    path = Path(path)
    _check_embeds(str(path), embeds, negative)
    if texts is not None and len(texts) != embeds.shape[0]:
        raise PromptFileError(f"{len(texts)} prompt texts for {embeds.shape[0]} prompt embeddings")
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.save_tensors(path, {PROMPT_KEY: embeds.detach().float().cpu().contiguous(),
                                NEGATIVE_KEY: negative.detach().float().cpu().contiguous()},
                         metadata={"fewstep": "prompt-embeds"})
    if texts is not None:
        storage.write_json(path.with_suffix(".json"), list(texts))
    return load_prompt_file(path)


# --------------------------------------------------------------------------------------------
# the guided denoiser


def text_conditioning(den: object) -> Any:
    """The card's Conditioning of a text-conditional denoiser (None otherwise)."""
    cond = getattr(getattr(den, "card", None), "conditioning", None)
    return cond if cond is not None and cond.kind == "text" else None


class TextGuidedDenoiser(GuidedDenoiser):
    """A text-conditional denoiser ``den(z, t, y)`` (y: encoder hidden states (B, L, D)) at fixed
    prompt and negative embeddings and guidance scale w >= 0, as a plain ``den(z, t)``: ``(1 + w) c -
    w u``, one batched forward [negative, prompt] of 2B for w > 0 (evals_per_call 2), one conditional
    pass for w = 0. A GuidedDenoiser (so fewstep.math.guidance.guidance_scale_of, and with it the
    OLSS scale check, see its w); it has no class labels."""

    def __init__(self, den: torch.nn.Module, embeds: torch.Tensor, negative: torch.Tensor, w: float = 0.0):
        torch.nn.Module.__init__(self)
        if text_conditioning(den) is None and not getattr(den, "text_conditional", False):
            raise GuidanceError("prompt embeddings need a text-conditional model (card conditioning kind 'text')")
        self.w = check_guidance_scale(w)
        if embeds.ndim != 3 or negative.shape != embeds.shape:
            raise GuidanceError(f"prompt embeddings {list(embeds.shape)} and negative embeddings "
                                f"{list(negative.shape)} must both be (B, L, D)")
        self.embeds, self.negative = embeds, negative
        self.labels = None
        self.den, self.num_classes = den, None
        self.kind, self.schedule = den.kind, den.schedule
        if hasattr(den, "card"):
            self.card = den.card
        self.calls = 0
        self.network_evals = 0

    def extra_repr(self) -> str:
        return f"w={self.w:g}, prompts={self.embeds.shape[0]}"

    def _guided(self, fn: Callable[..., torch.Tensor], z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B = z.shape[0]
        if self.embeds.shape[0] != B:
            raise GuidanceError(f"{self.embeds.shape[0]} prompt embeddings for a batch of {B} latents")
        c_emb = self.embeds.to(z.device)
        self.calls += 1
        self.network_evals += self.evals_per_call * B
        if self.w == 0:
            return fn(z, t, c_emb)
        pred = fn(torch.cat([z, z]), torch.cat([t, t]), torch.cat([self.negative.to(z.device), c_emb]))
        u, c = pred[:B], pred[B:]
        return u + (1.0 + self.w) * (c - u)  # = (1 + w) c - w u; diffusers: u + s (c - u), s = 1 + w


@dataclass(frozen=True)
class TextGuidance:
    """How a text-conditional model samples a set of seeds: seed s at prompt (s - first_seed) mod N
    of ``prompts``, guidance scale ``w`` (the ClassGuidance of text models; trajectories' and OLSS
    schedulers' meta record ``to_dict()``)."""

    prompts: PromptSet
    w: float = 0.0
    first_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "w", check_guidance_scale(self.w))

    def labels(self, seeds: Sequence[int]) -> list[int]:
        return self.prompts.indices(seeds, self.first_seed)

    def wrap(self, den: torch.nn.Module, seeds: Sequence[int]) -> TextGuidedDenoiser:
        c, u = self.prompts.select(self.labels(seeds))
        return TextGuidedDenoiser(den, c, u, self.w)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "text", "scale": self.w, "first_seed": self.first_seed, "num_prompts": self.prompts.n,
                "prompt_file": self.prompts.path, "prompt_file_sha256": self.prompts.sha256,
                "texts_file": self.prompts.texts_path, "prompts": "(seed - first_seed) mod num_prompts",
                "guidance": "(1 + w) c - w u; diffusers guidance_scale = 1 + w"}

    @classmethod
    def for_model(cls, den: object, prompts: PromptSet | None, w: float, first_seed: int) -> "TextGuidance":
        """The guidance of a text model at ``prompts`` (checked against its card) and scale ``w``."""
        cond = text_conditioning(den)
        if prompts is None:
            raise PromptFileError("a text-conditional model needs a prompt file (trajectories.prompts)")
        prompts.check_model(cond.embed_dim if cond else None, cond.seq_len if cond else None)
        return cls(prompts, w, int(first_seed))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], prompts: PromptSet | None) -> "TextGuidance":
        """The guidance recorded in ``d`` with its prompt file ``prompts`` (same sha256)."""
        if prompts is None:
            raise PromptFileError(f"these trajectories were collected at prompt file {d.get('prompt_file')}; give it "
                                  f"(trajectories.prompts)")
        if prompts.sha256 != d.get("prompt_file_sha256"):
            raise PromptFileError(f"{prompts.path} (sha256 {prompts.sha256[:12]}) is not the prompt file the "
                                  f"trajectories were collected with (sha256 {str(d.get('prompt_file_sha256'))[:12]});"
                                  f" re-run collect_trajectories")
        return cls(prompts, float(d["scale"]), int(d["first_seed"]))


def guidance_from_meta(d: Mapping[str, Any] | None, prompts: PromptSet | None = None) -> Any:
    """The guidance a trajectories' meta ``conditioning`` records: None, a ClassGuidance or a
    TextGuidance (which needs its prompt file)."""
    from fewstep.math.guidance import ClassGuidance

    if not d:
        return None
    if d.get("kind") == "text":
        return TextGuidance.from_dict(d, prompts)
    return ClassGuidance.from_dict(d)


def resolve_prompts(spec: str | Path, model_dir: str | Path, cache_dir: str | Path) -> PromptSet:
    """The prompt set params name (``trajectories.prompts``): a prompt file (.safetensors) as is, or
    plain prompts (.txt one a line, .json a list of strings) encoded once with the text encoder of
    the model in ``model_dir`` (fewstep.interop.sd.encode_prompts, negative prompt "") into
    ``cache_dir/<model>-<key>.safetensors``, key = sha256 of the texts and of the model's weights, so a
    later stage (fit_olss) reads the same file and the same sha256."""
    spec, model_dir = Path(spec), Path(model_dir)
    if spec.suffix == ".safetensors":
        return load_prompt_file(spec)
    if spec.suffix not in TEXT_SUFFIXES:
        raise PromptFileError(f"trajectories.prompts {spec}: expected a .safetensors prompt file or plain prompts "
                              f"(.txt one a line, .json a list of strings)")
    if not spec.is_file():
        raise PromptFileError(f"trajectories.prompts {spec} does not exist")
    if spec.suffix == ".json":
        texts = json.loads(spec.read_text(encoding="utf-8"))
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise PromptFileError(f"{spec}: must be a JSON list of prompt strings")
    else:
        texts = [t for t in spec.read_text(encoding="utf-8").splitlines() if t.strip()]
    from fewstep import models

    card = models.load_card(model_dir)
    key = storage.sha256_json({"texts": texts, "weights": card.weights_sha256,
                               "source": (card.lineage.source or {}).get("sha256")})[:16]
    cached = Path(cache_dir) / f"{model_dir.name}-{key}.safetensors"
    if cached.is_file():
        return load_prompt_file(cached)
    from fewstep.interop.sd import encode_prompts  # transformers: only when encoding

    return encode_prompts(model_dir, texts, cached)


def stage_prompts(spec: str | None, den: object, model_dir: Path, traj_root: Path) -> PromptSet | None:
    """The prompts a stage gives a model: None for a model that is not text-conditional (where
    ``spec`` is ignored), else :func:`resolve_prompts` (cache ``traj_root/.prompts``); a text model
    without ``spec`` is one clear error."""
    if text_conditioning(den) is None:
        return None
    if spec is None:
        raise PromptFileError(f"{model_dir} is text-conditional: set trajectories.prompts (a prompt file or plain "
                              f"prompts)")
    return resolve_prompts(spec, model_dir, traj_root / ".prompts")
