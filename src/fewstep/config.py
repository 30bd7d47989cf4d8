"""Typed, validated params (one pydantic model per params.yaml section).

``load_params`` reads params.yaml, optionally deep-merges a profile (profiles/<name>.yaml), and
validates everything before any work starts: unknown keys, wrong types and impossible values
fail with one message that names every bad field.
"""

from __future__ import annotations

from fewstep.errors import UserError

import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError, field_validator, \
    model_serializer, model_validator

from fewstep.math.losses import DEFAULT_WEIGHTING, WEIGHTINGS, Weighting, divergence
from fewstep.math.param import KINDS, Parameterization
from fewstep.math.precision import CpuBf16
from fewstep.math.schedules import ScheduleKind, Spacing
from fewstep.nets.unet import PatchSize, UNetConfig


class ParamsError(UserError, ValueError):
    """params.yaml is malformed or has invalid values."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Keys added after a section's hashes were first written: left out of dumps while at their
    # default, so the run, params and card hashes of existing configs (and dvc outputs) do not move.
    _added_keys: ClassVar[dict[str, Any]] = {}

    @model_serializer(mode="wrap")
    def _omit_added_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        d = handler(self)
        for k, default in self._added_keys.items():
            if k in d and d[k] == default:
                del d[k]
        return d


# base keys that say how a run computes, not what it computes: left out of the training run hashes
EXECUTION_KEYS: frozenset[str] = frozenset({"device", "threads", "cpu_bf16", "channels_last"})


class BaseParams(_Strict):
    dataset: str = Field("cifar10", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    image_size: int = Field(16, ge=4, le=1024)
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default")
    # How the CPU computes, not what (like device and threads: left out of the run hashes). Applied
    # by the stage runner (fewstep.math.precision.configure_from); CUDA keeps its own rules.
    cpu_bf16: CpuBf16 = Field("auto", description="bf16 autocast of the network forwards on the CPU (training, "
                              "sampling; never distillation targets or OLSS): auto = only where the CPU runs bf16 "
                              "natively (AVX-512 BF16, AMX, Arm BF16), true, false")
    channels_last: bool = Field(False, description="channels_last weights and inputs on the CPU")

    _added_keys: ClassVar[dict[str, Any]] = {"cpu_bf16": "auto", "channels_last": False}

    @field_validator("cpu_bf16", mode="before")
    @classmethod
    def _cpu_bf16(cls, v: Any) -> Any:
        if isinstance(v, bool) or v == "auto":
            return v
        if isinstance(v, str) and v.lower() in ("true", "false"):
            return v.lower() == "true"
        raise ValueError(f"must be auto, true or false, got {v!r}")


class ScheduleParams(_Strict):
    kind: ScheduleKind = "cosine"
    T: int = Field(1024, ge=2, le=100_000)
    logsnr_min: float = -20.0
    logsnr_max: float = 20.0

    @model_validator(mode="after")
    def _range(self) -> "ScheduleParams":
        if self.logsnr_min >= self.logsnr_max:
            raise ValueError(f"logsnr_min ({self.logsnr_min}) must be below logsnr_max ({self.logsnr_max})")
        return self

    def kwargs(self) -> dict[str, Any]:
        return {"logsnr_min": self.logsnr_min, "logsnr_max": self.logsnr_max} if self.kind == "cosine" else {}


def _check_combo(parameterization: str, weighting: str | None) -> None:
    reason = divergence(parameterization, weighting)
    if reason:
        raise ValueError(reason)


class PrepareParams(_Strict):
    train_source: str
    test_source: Optional[str] = None
    classes: Optional[list[str]] = None
    max_per_class: Optional[int] = Field(None, ge=1)
    test_max_per_class: Optional[int] = Field(None, ge=1)
    max_corrupt_fraction: float = Field(0.01, ge=0.0, le=1.0)


class NetParams(_Strict):
    patch_size: PatchSize = 1
    channels: int = Field(64, ge=8)
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2, 2], min_length=1)
    num_res_blocks: int = Field(2, ge=1)
    attn_resolutions: list[int] = Field(default_factory=list)
    head_dim: int = Field(32, ge=4)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    pos_emb: bool = Field(False, description="PDM's fixed 2-D position embedding after the first conv")

    _added_keys: ClassVar[dict[str, Any]] = {"pos_emb": False}

    def unet_config(self, image_size: int) -> UNetConfig:
        try:
            return UNetConfig(image_size=image_size, **self.model_dump())
        except ValueError as e:
            raise ParamsError(f"net: {e}") from e


class SampleParams(_Strict):
    n: int = Field(64, ge=1)
    steps: int = Field(64, ge=0, description="sampling steps for the grid; 0 = the model's own step count")
    spacing: Spacing = "trailing"
    seed: int = Field(0, ge=0)
    guidance: float = Field(0.0, ge=0.0, description="classifier-free guidance scale w of a class-conditional "
                            "model's grid (Ho & Salimans; diffusers' s = 1 + w); 0: plain conditional")

    _added_keys: ClassVar[dict[str, Any]] = {"guidance": 0.0}


SOURCE_KINDS: tuple[str, ...] = ("diffusers", "diffusers-sd")
SHA256_HEX = r"^[0-9a-f]{64}$"


class TeacherSource(_Strict):
    """A pretrained teacher imported instead of trained (stage train_teacher; issue 16).

    ``kind``: ``diffusers`` = a ``save_pretrained`` dir of an unconditional or class-conditional
    ``UNet2DModel`` (``null_label``: its dropped-label index) with its scheduler config
    (fewstep.interop.unet2d.import_teacher); ``diffusers-sd`` = a latent
    text-to-image pipeline dir (unet/ UNet2DConditionModel, vae/ AutoencoderKL, scheduler/, optional
    text_encoder/ + tokenizer/; fewstep.interop.sd.import_sd; its trajectories need
    ``trajectories.prompts``). ``path``: a local dir or any fsspec URL
    (s3://...); ``$FEWSTEP_DDPM_SOURCE``-style variables are expanded. ``sha256``: optional pin of the
    source's digest (the one the card records as ``source.sha256``): the import refuses a source
    that does not match, and, being a param, a new pin is what tells DVC the source changed."""

    kind: Literal["diffusers", "diffusers-sd"]
    path: str = Field(min_length=1)
    sha256: Optional[str] = Field(None, pattern=SHA256_HEX, description="expected source digest (lowercase hex)")
    null_label: Optional[int] = Field(None, ge=0, description="a class-conditional UNet2DModel's label index "
                                      "used for dropped labels in training (classifier-free guidance); null: the "
                                      "model is conditional only and guidance w > 0 is refused")

    _added_keys: ClassVar[dict[str, Any]] = {"null_label": None}

    @model_validator(mode="after")
    def _null_label_kind(self) -> "TeacherSource":
        if self.null_label is not None and self.kind != "diffusers":
            raise ValueError(f"null_label is the dropped-label index of a class-conditional UNet2DModel "
                             f"(kind diffusers), not of kind {self.kind}")
        return self

    def resolved_path(self) -> str:
        """``path`` with environment variables expanded; a ParamsError names an unset one."""
        out = os.path.expandvars(self.path)
        if "$" in out:
            raise ParamsError(f"teacher.source.path {self.path!r}: environment variable not set "
                              f"({out[out.index('$'):].split('/')[0]})")
        return out


class ConditioningParams(_Strict):
    """A class-conditional teacher (issue 17): the class count comes from the prepared data (its
    manifest's class_names); ``p_uncond`` is the label-dropout rate of classifier-free guidance
    (Ho & Salimans 2022: a label is replaced by the null label with this probability, so one net
    learns the conditional and the unconditional model)."""

    kind: Literal["class"] = "class"
    p_uncond: float = Field(0.1, ge=0.0, lt=1.0, description="probability a training label is dropped to null")


class TimeSamplingParams(_Strict):
    """How a training step draws its noise levels. ``uniform``: t uniform on the grid (the DDPM /
    progressive-distillation default; on the cosine schedule log-SNR then has mean 0 and s.d. pi).
    ``logsnr_normal``: log-SNR ~ N(mean, std^2), snapped to the nearest grid index: EDM's
    log-normal noise levels (Karras et al. 2022, sec. 5: ln sigma ~ N(-1.2, 1.2^2) with sigma_data =
    0.5, i.e. log-SNR ~ N(2.4, 2.4^2) for data in [-1, 1]), which spends the steps on the noise levels
    where the loss can still fall instead of near-pure noise or near-clean images."""

    kind: Literal["uniform", "logsnr_normal"] = "uniform"
    mean: float = Field(2.4, ge=-30.0, le=30.0, description="log-SNR mean (logsnr_normal)")
    std: float = Field(2.4, gt=0.0, le=30.0, description="log-SNR standard deviation (logsnr_normal)")


class TeacherParams(_Strict):
    # not a training hyperparameter: left out of model_dump, so the trained teacher's run and params
    # hashes (its card, checkpoints) and the study/split/objective teachers derived from this section
    # are the same with or without the key; DVC still sees it in params.yaml (stage train_teacher)
    source: Optional[TeacherSource] = Field(None, exclude=True, description="null: train the teacher; "
                                            "{kind: diffusers, path: DIR_OR_URL}: import it instead")
    parameterization: Parameterization = "v"
    weighting: Optional[Weighting] = None
    net: NetParams = NetParams()
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-4, gt=0.0, le=1.0)
    warmup: int = Field(100, ge=0)
    lr_decay: Literal["constant", "cosine"] = "constant"
    weight_decay: float = Field(0.0, ge=0.0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, gt=0.0)
    hflip: bool = True
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(50, ge=1)
    sample: SampleParams = SampleParams()
    conditioning: Optional[ConditioningParams] = Field(None, description="null: unconditional; {kind: class, "
                                                       "p_uncond: 0.1}: class-conditional with label dropout")
    t_sampling: Optional[TimeSamplingParams] = Field(None, description="null or {kind: uniform}: t uniform; "
                                                     "{kind: logsnr_normal, mean, std}: EDM-style noise levels")

    _added_keys: ClassVar[dict[str, Any]] = {"conditioning": None, "t_sampling": None}

    @field_validator("t_sampling", mode="after")
    @classmethod
    def _uniform_is_default(cls, v: Optional[TimeSamplingParams]) -> Optional[TimeSamplingParams]:
        return None if v is not None and v.kind == "uniform" else v  # one spelling, one run hash

    @model_validator(mode="after")
    def _combo(self) -> "TeacherParams":
        _check_combo(self.parameterization, self.weighting)
        return self


class DistillRoundParams(_Strict):
    """One round's effective settings: distill.defaults overridden by the round's own keys."""

    parent: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    steps: int = Field(ge=1, description="student sampling steps; the parent samples in 2x")
    train_steps: int = Field(500, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(5e-5, gt=0.0, le=1.0)
    weighting: Weighting = "snr_trunc"
    ema_decay: Optional[float] = Field(None, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, gt=0.0)
    hflip: bool = True
    checkpoint_every: int = Field(250, ge=1)
    log_every: int = Field(25, ge=1)
    sample: SampleParams = SampleParams()
    guidance: Optional[float] = Field(None, ge=0.0, allow_inf_nan=False, description="guided distillation "
                                      "(Meng et al. 2023) of a class-conditional teacher: the first round's target "
                                      "is the teacher guided at this w and the student's card records it; null: "
                                      "plain distillation (a conditional parent: w = 0, labels drawn uniformly)")

    _added_keys: ClassVar[dict[str, Any]] = {"guidance": None}


class DistillParams(_Strict):
    defaults: dict[str, Any] = Field(default_factory=dict)
    rounds: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def round(self, name: str) -> DistillRoundParams:
        if name not in self.rounds:
            raise ParamsError(f"distill.rounds has no round {name!r}; rounds: {sorted(self.rounds)}")
        try:
            return DistillRoundParams.model_validate(deep_merge(self.defaults, self.rounds[name]))
        except ValidationError as e:
            raise ParamsError(_format(e, f"distill.rounds.{name} (+ distill.defaults)")) from None

    @model_validator(mode="after")
    def _chain(self) -> "DistillParams":
        for name in self.rounds:
            r = self.round(name)
            if r.parent != "teacher":
                if r.parent not in self.rounds:
                    raise ValueError(f"round {name}: parent {r.parent!r} is neither 'teacher' nor a round")
                if self.round(r.parent).steps != 2 * r.steps:
                    raise ValueError(f"round {name}: {r.steps} steps is not half of its parent's "
                                     f"{self.round(r.parent).steps}")
        return self


class TrajectoryParams(_Strict):
    models: list[str] = Field(default_factory=lambda: ["teacher"], min_length=1)
    reference_steps: int = Field(64, ge=2, description="full-step DDIM reference (capped at a student's own steps)")
    n_fit: int = Field(128, ge=1, description="fitting trajectories (seeds)")
    seed_offset: int = Field(1_000_000, ge=0, description="fit seeds start here, away from evaluation seeds")
    shard_size: int = Field(64, ge=1)
    batch_size: int = Field(64, ge=1)
    guidance: float = Field(0.0, ge=0.0, description="classifier-free guidance scale w of a class-conditional "
                            "model's trajectories (seed s: class (s - seed_offset) mod num_classes); OLSS fitted "
                            "on them records it and refuses another scale")
    prompts: Optional[str] = Field(None, min_length=1, description="a text-conditional model's prompts (issue 17): a "
                                   "prompt file (safetensors: prompt_embeds [N, L, D], negative_prompt_embeds "
                                   "[N or 1, L, D]) or plain prompts (.txt one a line, .json a list) encoded once "
                                   "with the model's text encoder; seed s gets prompt (s - seed_offset) mod N")

    _added_keys: ClassVar[dict[str, Any]] = {"guidance": 0.0, "prompts": None}


class OLSSParams(_Strict):
    models: list[str] = Field(default_factory=lambda: ["teacher"], min_length=1)
    steps: list[int] = Field(default_factory=lambda: [4, 8], min_length=1)
    max_elements: int = Field(262_144, ge=1000, description="subsample of trajectory elements used by the fit")
    bisection_iters: int = Field(30, ge=1)
    ridge: float = Field(0.0, ge=0.0,
                         description="ridge of the x-hat fits olss-open-N and olss-closed-N (the paper variants have none)")
    ridge_variant: float = Field(1e-4, ge=0.0, description="the ridge of the olss-ridge-N variant (always fitted); 0 = plain least squares")
    closed_loop: bool = Field(True,
                              description="the closed-loop refit (olss-closed-N, always fitted) competes for olss-N")
    n_holdout: int = Field(64, ge=1, description="held-out seeds for the RMSE check in metrics")

    @model_validator(mode="after")
    def _steps(self) -> "OLSSParams":
        if any(n < 1 for n in self.steps):
            raise ValueError(f"olss.steps must all be >= 1, got {self.steps}")
        return self


class EvaluatorParams(_Strict):
    widths: list[int] = Field(default_factory=lambda: [64, 128, 256], min_length=1)
    blocks_per_stage: int = Field(2, ge=1)
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(2e-3, gt=0, le=1)
    weight_decay: float = Field(5e-4, ge=0)
    ref_subset: int = Field(5000, ge=10, description="train features kept for KID / precision-recall")


class EvaluateParams(_Strict):
    n_samples: int = Field(500, ge=10)
    batch_size: int = Field(250, ge=1)
    seed: int = Field(0, ge=0)
    reference_steps: int = Field(64, ge=1, description="the teacher's full-step DDIM: the RMSE reference")
    ddim_steps: list[int] = Field(default_factory=lambda: [2, 4, 8, 16, 64])
    eta_steps: list[int] = Field(default_factory=lambda: [8, 64], description="steps for the eta / sigma-hat rows")
    etas: list[float] = Field(default_factory=lambda: [0.2, 0.5, 1.0])
    sigma_hat: bool = True
    peers: list[str] = Field(default_factory=lambda: ["ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "deis", "heun", "pndm"])
    peer_steps: list[int] = Field(default_factory=lambda: [4, 8])
    grid_n: int = Field(64, ge=1)
    kid_subsets: int = Field(20, ge=1)
    study_steps: list[int] = Field(default_factory=lambda: [4, 16],
                                   description="DDIM rows for every models/teacher-* (patch study, split)")
    inception_weights: str | None = Field(None, description="a user's FID Inception-v3 weight file (safetensors or "
                                          "a weights-only .pth): adds standard FID/KID beside the evaluator's")
    n_headline: int = Field(0, ge=0, description="samples of the ranked rows (teacher DDIM at the reference and the "
                            "students' steps, students, OLSS); at most n_samples (e.g. 0) = no second block")
    fd_resamples: int = Field(200, ge=0, description="bootstrap resamples of each FD and RMSE interval (0 = none)")
    dup_quantile: float = Field(0.01, gt=0.0, lt=1.0, description="duplicate threshold: this quantile of real-real "
                                "nearest-neighbour distances in evaluator features")
    blur_sigmas: list[float] = Field(default_factory=lambda: [0.5, 1.0],
                                     description="FD sensitivity: Gaussian blurs (pixels) of the test split")
    guidance: list[Annotated[float, Field(ge=0.0, allow_inf_nan=False)]] = Field(
        default_factory=lambda: [0.0], min_length=1, description="classifier-free guidance scales w (>= 0; "
        "diffusers' s = 1 + w) a class-conditional model's rows are sampled at, one row per w (0: plain "
        "conditional); unconditional models ignore it")
    per_class: bool = Field(True, description="class-conditional rows: FD/KID and the evaluator's accuracy per "
                            "class, against the test split's images of that class")

    _added_keys: ClassVar[dict[str, Any]] = {"guidance": [0.0], "per_class": True}

    @model_validator(mode="after")
    def _sigmas(self) -> "EvaluateParams":
        if any(s <= 0 for s in self.blur_sigmas):
            raise ValueError(f"evaluate.blur_sigmas must be positive, got {self.blur_sigmas}")
        if len(set(self.guidance)) != len(self.guidance):
            raise ValueError(f"evaluate.guidance has duplicates: {self.guidance}")
        return self

    @property
    def headline_n(self) -> int:
        """Samples of a ranked (headline) row."""
        return max(self.n_headline, self.n_samples)


class StudyParams(_Strict):
    """Patched-diffusion study (Luhman & Luhman 2022): one teacher per patch size, models/teacher-p<P>
    (stage study_teacher@P). ``teacher`` overrides the teacher section for every study teacher;
    ``nets.p<P>`` overrides teacher.net for patch size P (widths chosen so a step costs less as P
    grows). ``patch_sizes: []`` turns the study off; the full study is [1, 2, 4, 8]."""

    patch_sizes: list[PatchSize] = Field(default_factory=list)
    teacher: dict[str, Any] = Field(default_factory=dict)
    nets: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _keys(self) -> "StudyParams":
        if len(set(self.patch_sizes)) != len(self.patch_sizes):
            raise ValueError(f"study.patch_sizes has duplicates: {self.patch_sizes}")
        bad = sorted(set(self.nets) - {"p1", "p2", "p4", "p8"})
        if bad:
            raise ValueError(f"study.nets keys must be p1, p2, p4 or p8, got {bad}")
        return self

    def teacher_for(self, teacher: TeacherParams, P: int) -> TeacherParams:
        """The teacher section of the study teacher with patch size P."""
        return _teacher_variant(teacher, self.teacher, {**self.nets.get(f"p{P}", {}), "patch_size": P},
                                f"study (patch size {P})")


def _teacher_variant(teacher: TeacherParams, overrides: dict[str, Any], net: dict[str, Any],
                     source: str) -> TeacherParams:
    raw = deep_merge(teacher.model_dump(), overrides)
    raw["net"] = {**raw["net"], **net}
    try:
        return TeacherParams.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(_format(e, source)) from None


# The PDM release's setup (Luhman & Luhman 2022, ImageNet-256 two-network model; distill_pdm.md B.3,
# B.6, B.7): what a split model labelled ``setup: paper`` must resolve to on both sides. Widths,
# training lengths and learning rates are not part of it (they are scaled to the profile).
PDM_PAPER_SETUP: dict[str, Any] = {"parameterization": "x", "weighting": "sqrt_snr", "patch_size": 4,
                                   "pos_emb": True, "boundary_snr": 0.25, "init_low_from_high": True,
                                   "t_sampling": "uniform"}
Setup = Literal["project", "paper"]


class SplitModelParams(_Strict):
    """A two-network model (PDM B.7): ``high`` answers below the boundary SNR, ``low`` above it.
    Each side is a set of overrides of the teacher section (its net under ``net``); the low-noise
    net starts from the high-noise net's weights where shapes match (PDM release).

    ``setup`` labels the model: ``project`` (the default; the project's choice, e.g. v-prediction,
    SNR+1 weighting and a P=4 / P=2 pair) or ``paper`` (the PDM release, :data:`PDM_PAPER_SETUP`),
    which params validation checks the resolved sides against, so the label cannot drift from
    what is trained."""

    setup: Setup = "project"
    boundary_snr: float = Field(0.25, gt=0.0, description="SNR = alpha^2/sigma^2 at the boundary (PDM: 0.25)")
    init_low_from_high: bool = True
    high: dict[str, Any] = Field(default_factory=dict)
    low: dict[str, Any] = Field(default_factory=dict)

    _added_keys: ClassVar[dict[str, Any]] = {"setup": "project"}

    def paper_mismatches(self, teacher: TeacherParams) -> list[str]:
        """Where this model differs from :data:`PDM_PAPER_SETUP` (``[]``: it is the paper's setup)."""
        want = PDM_PAPER_SETUP
        bad = [f"{k} {getattr(self, k)!r} (paper: {want[k]!r})" for k in ("boundary_snr", "init_low_from_high")
               if getattr(self, k) != want[k]]
        for s in ("high", "low"):
            tp = self.side(teacher, s)
            got = {"parameterization": tp.parameterization,
                   "weighting": tp.weighting or DEFAULT_WEIGHTING[tp.parameterization],
                   "patch_size": tp.net.patch_size, "pos_emb": tp.net.pos_emb,
                   "t_sampling": tp.t_sampling.kind if tp.t_sampling is not None else "uniform"}
            bad += [f"{s}.{k} {v!r} (paper: {want[k]!r})" for k, v in got.items() if v != want[k]]
        return bad

    def side(self, teacher: TeacherParams, side: str) -> TeacherParams:
        over = dict(getattr(self, side))
        return _teacher_variant(teacher, {k: v for k, v in over.items() if k != "net"}, over.get("net", {}),
                                f"split.{side}")


class SplitParams(_Strict):
    """Split models by model dir name (teacher-<name>), one stage train_split@<name> each; {} = off."""

    models: dict[str, SplitModelParams] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names(self) -> "SplitParams":
        for name in self.models:
            if not re.fullmatch(r"teacher-[A-Za-z0-9_.-]+", name) or re.fullmatch(r"teacher-p\d+", name):
                raise ValueError(f"split model {name!r}: name it teacher-<name> (not teacher-p<P>, the study's)")
        return self


OBJECTIVE_VARIANT = rf"^({'|'.join(KINDS)})-({'|'.join(re.escape(w) for w in WEIGHTINGS)})$"


class ObjectiveParams(_Strict):
    """Objective study: one small teacher per (variant, patch size), variant = <kind>-<weighting>
    (stage objective@<variant>-<P>), scored by x-prediction MSE on the test split and FD.
    ``variants: []`` turns it off; see params.yaml for the full list."""

    variants: list[str] = Field(default_factory=list)
    patch_sizes: list[PatchSize] = Field(default_factory=lambda: [1, 4])
    teacher: dict[str, Any] = Field(default_factory=dict, description="overrides of the teacher section")
    nets: dict[str, dict[str, Any]] = Field(default_factory=dict, description="p<P>: overrides of teacher.net")
    n_test: int = Field(256, ge=1, description="test images for the x-MSE per noise level")
    n_samples: int = Field(200, ge=0, description="samples for FD (0 = no FD)")
    sample_steps: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _variants(self) -> "ObjectiveParams":
        bad = [v for v in self.variants if not re.match(OBJECTIVE_VARIANT, v)]
        if bad:
            raise ValueError(f"objective.variants must be <eps|x|v>-<weighting>, got {bad}")
        for v in self.variants:
            _check_combo(*v.split("-", 1))
        return self

    def teacher_for(self, teacher: TeacherParams, variant: str, P: int) -> TeacherParams:
        kind, weighting = variant.split("-", 1)
        return _teacher_variant(teacher, {**self.teacher, "parameterization": kind, "weighting": weighting},
                                {**self.nets.get(f"p{P}", {}), "patch_size": P}, f"objective ({variant}, P={P})")


class RedundancyParams(_Strict):
    """x-prediction error of every teacher against log-SNR on the test split (the PDM argument).
    ``scope: [teachers]`` runs it (stage redundancy@teachers, every models/teacher*); ``[]`` = off (a list
    because DVC switches a stage off only through an empty ``foreach``)."""

    scope: list[Literal["teachers"]] = Field(default_factory=list, max_length=1,
                                             description="[teachers] = on (stage redundancy@teachers), [] = off")
    n_images: int = Field(256, ge=1)
    bins: int = Field(10, ge=1)
    logsnr_min: float = -10.0
    logsnr_max: float = 10.0
    seed: int = Field(0, ge=0)
    batch_size: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _range(self) -> "RedundancyParams":
        if self.logsnr_min >= self.logsnr_max:
            raise ValueError(f"redundancy.logsnr_min ({self.logsnr_min}) must be below logsnr_max")
        return self


class DDIMStudyParams(_Strict):
    """DDIM inversion / consistency / interpolation study on one model (stage ddim_study@<model>).
    ``models: [teacher]`` runs it on models/teacher; ``[]`` = off (a list because DVC switches a stage
    off only through an empty ``foreach``; at most one model: the study's outputs have fixed names)."""

    models: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]] = Field(
        default_factory=list, max_length=1,
        description="[teacher] = on (stage ddim_study@teacher, on models/teacher), [] = off; a model directory's name")
    n_images: int = Field(8, ge=1, description="test images encoded and decoded for the reconstruction error")
    recon_steps: list[int] = Field(default_factory=lambda: [10, 20, 50, 100, 1024], min_length=1)
    consistency_steps: list[int] = Field(default_factory=lambda: [10, 20, 50, 100, 1024], min_length=1,
                                         description="the largest (capped at T) is the reference")
    n_consistency: int = Field(8, ge=2, description="x_T seeds decoded at every consistency step count")
    interp_steps: int = Field(50, ge=1)
    interp_n: int = Field(8, ge=2, description="images per interpolation row")
    interp_pairs: int = Field(2, ge=1, description="rows of noise pairs, and as many of encoded test-image pairs")
    spacing: Spacing = "trailing"
    clip: bool = Field(False, description="clip x_hat while encoding/decoding images (the paper does not)")
    seed: int = Field(0, ge=0, description="x_T seeds start here; test images are picked with it")
    batch_size: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _steps(self) -> "DDIMStudyParams":
        bad = [n for n in (*self.recon_steps, *self.consistency_steps) if n < 1]
        if bad:
            raise ValueError(f"ddim_study step counts must all be >= 1, got {bad}")
        return self


class PromoteParams(_Strict):
    margin: float = Field(0.02, ge=0.0, lt=1.0, description="relative FD improvement a candidate needs")


class DistributedParams(_Strict):
    """How many processes the training and sampling stages run in (python -m fewstep.launch).
    Results do not depend on it (DDP over one global batch, sampling sharded by seed), so no
    stage lists it as a DVC param dependency."""

    world_size: int = Field(1, ge=0, description="processes over all nodes; 1 = plain, no torchrun; "
                                                 "0 = one per visible GPU (1 without CUDA); $FEWSTEP_WORLD_SIZE wins")
    nnodes: int = Field(1, ge=1, description="machines; > 1 = torchrun c10d rendezvous at $FEWSTEP_RDZV_ENDPOINT; "
                                             "$FEWSTEP_NNODES wins")

    @model_validator(mode="after")
    def _split(self) -> "DistributedParams":
        if self.world_size and self.world_size % self.nnodes:
            raise ValueError(f"world_size {self.world_size} does not split evenly over {self.nnodes} nodes")
        return self


class Params(_Strict):
    base: BaseParams = BaseParams()
    schedule: ScheduleParams = ScheduleParams()
    prepare: PrepareParams
    teacher: TeacherParams = TeacherParams()
    distill: DistillParams = DistillParams()
    trajectories: TrajectoryParams = TrajectoryParams()
    olss: OLSSParams = OLSSParams()
    evaluator: EvaluatorParams = EvaluatorParams()
    evaluate: EvaluateParams = EvaluateParams()
    promote: PromoteParams = PromoteParams()
    distributed: DistributedParams = DistributedParams()
    study: StudyParams = StudyParams()
    split: SplitParams = SplitParams()
    objective: ObjectiveParams = ObjectiveParams()
    redundancy: RedundancyParams = RedundancyParams()
    ddim_study: DDIMStudyParams = DDIMStudyParams()

    @model_validator(mode="after")
    def _study_nets(self) -> "Params":
        """Every study, split and objective net must be buildable at base.image_size."""
        size = self.base.image_size

        def check(tp: TeacherParams, where: str) -> None:
            try:
                tp.net.unet_config(size)
            except ParamsError as e:
                raise ValueError(f"{where} at image_size {size}: {e}") from None

        for P in self.study.patch_sizes:
            check(self.study.teacher_for(self.teacher, P), f"study.nets.p{P}")
        for name, sp in self.split.models.items():
            sides = {s: sp.side(self.teacher, s) for s in ("high", "low")}
            for s, tp in sides.items():
                check(tp, f"split.models.{name}.{s}")
            if sides["high"].parameterization != sides["low"].parameterization:
                raise ValueError(f"split model {name}: both nets need one parameterization")
            bad = sp.paper_mismatches(self.teacher) if sp.setup == "paper" else []
            if bad:
                raise ValueError(f"split model {name}: setup 'paper' is the PDM release's setup, but it has "
                                 + "; ".join(bad) + " (set those, or label it setup: project)")
        for v in self.objective.variants:
            for P in self.objective.patch_sizes:
                check(self.objective.teacher_for(self.teacher, v, P), f"objective ({v}, P={P})")
        return self

    @model_validator(mode="after")
    def _distill_grid(self) -> "Params":
        """A round's teacher samples 2N trailing steps of the T grid (fewstep.train.distill), so 2N <= T.
        An imported teacher brings its own T: checked when the round starts."""
        if self.teacher.source is not None:
            return self
        for name in self.distill.rounds:
            r = self.distill.round(name)
            if 2 * r.steps > self.schedule.T:
                raise ValueError(f"distill round {name}: its teacher's {2 * r.steps} steps exceed "
                                 f"schedule.T={self.schedule.T}")
        return self


def deep_merge(a: dict, b: dict) -> dict:
    """``b`` over ``a``: mappings merge key by key, anything else replaces. An empty mapping in ``b``
    replaces too, so a profile can turn a section off (``split: {models: {}}``); a null in ``b``
    over a mapping in ``a`` removes that key, so a profile can drop one named entry
    (``distill: {rounds: {student-2: null}}``)."""
    out = dict(a)
    for k, v in b.items():
        if v is None and isinstance(out.get(k), dict):
            del out[k]
            continue
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and v and isinstance(out.get(k), dict) else v
    return out


def _format(e: ValidationError, source: str) -> str:
    lines = [f"{source}: {e.error_count()} invalid param(s)"]
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see params.yaml for the valid keys)"
        got = err.get("input")
        got_s = "" if err["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {loc}: {msg}{got_s}")
    return "\n".join(lines)


def load_params(path: str | os.PathLike = "params.yaml", profile: str | None = None) -> Params:
    """Read, merge ``profiles/<profile>.yaml`` (beside ``path``; None or "default": none) and validate.
    Entry points pass the profile ($FEWSTEP_PROFILE is read by fewstep.settings, not here)."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    source = str(path)
    if profile and profile != "default":
        ppath = path.parent / "profiles" / f"{profile}.yaml"
        if not ppath.exists():
            raise ParamsError(f"unknown profile {profile!r}: {ppath} does not exist")
        raw = deep_merge(raw, yaml.safe_load(ppath.read_text()) or {})
        source = f"{path} + {ppath}"
    return validate(raw, source)


def validate(raw: dict, source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(_format(e, source)) from None
