"""Typed, validated params (one pydantic model per params.yaml section).

``load_params`` reads params.yaml, optionally deep-merges a profile (profiles/<name>.yaml), and
validates everything before any work starts: unknown keys, wrong types and impossible values
fail with one message that names every bad field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fewstep.nets.unet import UNetConfig


class ParamsError(ValueError):
    """params.yaml is malformed or has invalid values."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseParams(_Strict):
    dataset: str = Field("cifar10", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    image_size: int = Field(16, ge=4, le=1024)
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default")


class ScheduleParams(_Strict):
    kind: Literal["cosine", "linear"] = "cosine"
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


class PrepareParams(_Strict):
    train_source: str
    test_source: Optional[str] = None
    classes: Optional[list[str]] = None
    max_per_class: Optional[int] = Field(None, ge=1)
    test_max_per_class: Optional[int] = Field(None, ge=1)
    max_corrupt_fraction: float = Field(0.01, ge=0.0, le=1.0)


class NetParams(_Strict):
    patch_size: Literal[1, 2, 4, 8] = 1
    channels: int = Field(64, ge=8)
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2, 2], min_length=1)
    num_res_blocks: int = Field(2, ge=1)
    attn_resolutions: list[int] = Field(default_factory=list)
    head_dim: int = Field(32, ge=4)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)

    def unet_config(self, image_size: int) -> UNetConfig:
        try:
            return UNetConfig(image_size=image_size, **self.model_dump())
        except ValueError as e:
            raise ParamsError(f"net: {e}") from e


class SampleParams(_Strict):
    n: int = Field(64, ge=1)
    steps: int = Field(64, ge=0, description="sampling steps for the grid; 0 = the model's own step count")
    spacing: Literal["trailing", "linspace", "quadratic"] = "trailing"
    seed: int = Field(0, ge=0)


class TeacherParams(_Strict):
    parameterization: Literal["eps", "x", "v"] = "v"
    weighting: Optional[Literal["snr", "snr_trunc", "snr+1", "sqrt_snr", "constant"]] = None
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

    @model_validator(mode="after")
    def _combo(self) -> "TeacherParams":
        if self.parameterization == "eps" and self.weighting == "snr_trunc":
            raise ValueError("eps-prediction with snr_trunc weighting diverges (Salimans & Ho 2022, Table 1)")
        return self


class DistillRoundParams(_Strict):
    """One round's effective settings: distill.defaults overridden by the round's own keys."""

    parent: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    steps: int = Field(ge=1, description="student sampling steps; the parent samples in 2x")
    train_steps: int = Field(500, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(5e-5, gt=0.0, le=1.0)
    weighting: Literal["snr", "snr_trunc", "snr+1", "sqrt_snr", "constant"] = "snr_trunc"
    ema_decay: Optional[float] = Field(None, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, gt=0.0)
    hflip: bool = True
    checkpoint_every: int = Field(250, ge=1)
    log_every: int = Field(25, ge=1)
    sample: SampleParams = SampleParams()


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


class OLSSParams(_Strict):
    models: list[str] = Field(default_factory=lambda: ["teacher"], min_length=1)
    steps: list[int] = Field(default_factory=lambda: [4, 8], min_length=1)
    max_elements: int = Field(262_144, ge=1000, description="subsample of trajectory elements used by the fit")
    bisection_iters: int = Field(30, ge=1)
    ridge: float = Field(0.0, ge=0.0)
    ridge_variant: float = Field(1e-4, ge=0.0, description="also fit an olss-ridge-N variant with this ridge; 0 = off")
    closed_loop: bool = True
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


class DDIMStudyParams(_Strict):
    """DDIM inversion / consistency / interpolation study on the teacher (stage ddim_study)."""

    n_images: int = Field(8, ge=1, description="test images encoded and decoded for the reconstruction error")
    recon_steps: list[int] = Field(default_factory=lambda: [10, 20, 50, 100, 1024], min_length=1)
    consistency_steps: list[int] = Field(default_factory=lambda: [10, 20, 50, 100, 1024], min_length=1,
                                         description="the largest (capped at T) is the reference")
    n_consistency: int = Field(8, ge=2, description="x_T seeds decoded at every consistency step count")
    interp_steps: int = Field(50, ge=1)
    interp_n: int = Field(8, ge=2, description="images per interpolation row")
    interp_pairs: int = Field(2, ge=1, description="rows of noise pairs, and as many of encoded test-image pairs")
    spacing: Literal["trailing", "linspace", "quadratic"] = "trailing"
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
    ddim_study: DDIMStudyParams = DDIMStudyParams()

    @model_validator(mode="after")
    def _distill_grid(self) -> "Params":
        for name in self.distill.rounds:
            r = self.distill.round(name)
            if self.schedule.T % (2 * r.steps):
                raise ValueError(f"distill round {name}: schedule.T={self.schedule.T} is not divisible by its "
                                 f"teacher's {2 * r.steps} steps")
        return self


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
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
    """Read, merge the profile (explicit or $FEWSTEP_PROFILE) and validate."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    profile = profile or os.environ.get("FEWSTEP_PROFILE") or None
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
