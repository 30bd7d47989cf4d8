"""One registry of samplers behind one keyword-only signature (k-diffusion's ``sample_*`` family).

Every sampler is called as

    sampler(den, x_T, *, steps, noise=None, **options) -> x_0

with ``den`` a denoiser (fewstep.math.param's contract), ``x_T`` the initial noise (B, C, H, W),
``steps`` its step count and ``noise`` the per-image noise source (stochastic samplers draw from
it). Each entry also says how many network evaluations (NFE) it makes for a step count, what
artifact it needs (an OLSS scheduler file), whether it needs diffusers, and the label of its rows.
The evaluation rows (fewstep.evaluation.build_rows), the MLflow pyfunc sampler
(fewstep.sampler_pyfunc) and the FLOP budget (fewstep.budget) are built from this registry, and
every row name comes from :func:`row_name`.

The math stays pure (fewstep.math.ddim, fewstep.math.olss, fewstep.peers); an entry wraps it.
Adding a sampler touches two files: its module (the math) and its entry here, e.g.

    @register("euler", family="euler", label=lambda steps, _: f"euler {steps}")
    def euler(den, x_T, *, steps, noise=None, spacing="trailing"):
        return sample_euler(den, x_T, timesteps(den.schedule.T, steps, spacing))

(tests/unit/test_samplers.py registers one this way and runs it through the one signature).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch

from fewstep.errors import UserError
from fewstep.math.ddim import PerImageNoise, sample_ddim
from fewstep.math.guidance import GuidanceError, check_guidance_scale, evals_per_call, maybe_guided
from fewstep.math.olss import OLSSScheduler, sample_olss
from fewstep.math.param import Denoiser
from fewstep.math.schedules import Spacing, timesteps
from fewstep.olss_variants import HEADLINE, HEADLINE_LABEL, variant_of

OLSS_SCHEDULER = "olss-scheduler"  # artifact kind: an olss*.json written by fit_olss (OLSSScheduler)
PEER_PREFIX = "diffusers-"  # a diffusers scheduler as a peer: diffusers-<name>, name in fewstep.peers.PEERS


class SamplerFn(Protocol):
    def __call__(self, den: Denoiser, x_T: torch.Tensor, *, steps: int, noise: PerImageNoise | None = None,
                 **options: Any) -> torch.Tensor: ...


SampleFn = Callable[[torch.Tensor, PerImageNoise], torch.Tensor]  # a bound sampler: (x_T, noise) -> x_0


class UnknownSamplerError(UserError, ValueError):
    """A sampler name that is not in the registry."""


def _same(steps: int) -> int:
    return steps


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler.

    ``family(options)``: the row family (plots group rows by it). ``nfe(steps)``: network
    evaluations per image. ``steps_for_nfe(nfe)``: the step count that fits an NFE budget.
    ``label(steps, options)``: the row label after the model name (``options`` holds ``artifact``,
    the artifact's file name, for a sampler that needs one). ``artifact``: the kind of file the
    sampler needs (OLSS_SCHEDULER) or None. ``model_in_name``: False for rows named without
    their model (the diffusers peers, which run on the teacher)."""

    name: str
    fn: SamplerFn
    family: Callable[[Mapping[str, Any]], str]
    label: Callable[[int, Mapping[str, Any]], str]
    nfe: Callable[[int], int] = _same
    steps_for_nfe: Callable[[int], int] = _same
    artifact: str | None = None
    needs_diffusers: bool = False
    model_in_name: bool = True

    def __call__(self, den: Denoiser, x_T: torch.Tensor, *, steps: int, noise: PerImageNoise | None = None,
                 **options: Any) -> torch.Tensor:
        return self.fn(den, x_T, steps=steps, noise=noise, **options)

    def bind(self, den: Denoiser, *, steps: int, **options: Any) -> SampleFn:
        """(x_T, noise) -> x_0 with everything else fixed: one evaluation row."""
        return lambda x_T, noise: self.fn(den, x_T, steps=steps, noise=noise, **options)

    def available(self) -> bool:
        return not self.needs_diffusers or importlib.util.find_spec("diffusers") is not None


REGISTRY: dict[str, SamplerSpec] = {}


def register(name: str, *, family: str | Callable[[Mapping[str, Any]], str],
             label: Callable[[int, Mapping[str, Any]], str], nfe: Callable[[int], int] = _same,
             steps_for_nfe: Callable[[int], int] = _same, artifact: str | None = None, needs_diffusers: bool = False,
             model_in_name: bool = True) -> Callable[[SamplerFn], SamplerFn]:
    """Decorator: register ``fn`` under ``name`` (see SamplerSpec for the fields)."""

    def deco(fn: SamplerFn) -> SamplerFn:
        if name in REGISTRY:
            raise ValueError(f"sampler {name!r} is already registered")
        fam = family if callable(family) else (lambda _o, f=family: f)
        REGISTRY[name] = SamplerSpec(name, fn, fam, label, nfe, steps_for_nfe, artifact, needs_diffusers,
                                     model_in_name)
        return fn

    return deco


def get(name: str) -> SamplerSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownSamplerError(f"unknown sampler {name!r}; registered: {', '.join(sorted(REGISTRY))}") from None


def nfe(sampler: str | SamplerSpec, steps: int, den: object = None, *, guidance: float = 0.0) -> int:
    """Network evaluations per image of ``sampler`` at ``steps``: its registry ``nfe(steps)`` times
    the evaluations of one denoiser call (2 for classifier-free guidance at scale > 0, whether given
    as a guided ``den`` or as ``guidance`` for a conditional one; fewstep.math.guidance)."""
    spec = get(sampler) if isinstance(sampler, str) else sampler
    per_call = max(evals_per_call(den), 2 if check_guidance_scale(guidance) > 0 else 1)
    return spec.nfe(steps) * per_call


def row_name(model: str, sampler: str, *, steps: int, guidance: float | None = None, **options: Any) -> str:
    """The evaluation row name of ``sampler`` at ``steps`` on model dir ``model`` (the one place
    row names are made: evaluation rows, promotion's lookup). A class-conditional row sampled with
    classifier-free guidance at w > 0 ends in `` w=<w>`` (``teacher ddim 8 w=1``); at w = 0 (plain
    conditional) or unconditional (None) it has no suffix."""
    spec = get(sampler)
    label = spec.label(steps, options)
    name = f"{model} {label}" if spec.model_in_name else label
    return name + (f" w={check_guidance_scale(guidance):g}" if guidance else "")


def row_for_version(version: Mapping[str, Any]) -> str | None:
    """The evaluation row of a registered version (the tags `register` writes: role, model, nfe,
    scheduler_file), or None for a version without a row (the evaluator)."""
    role, nfe, model = version.get("role"), version.get("nfe"), version.get("model")
    if role == "teacher":  # the teacher, a patch-study teacher (teacher-p<P>) or a split model
        return row_name(model or "teacher", "ddim", steps=int(nfe))
    if role == "student":
        if not model:  # <dataset>-student-<k>step -> student-<k>
            model = version["name"].split("-", 1)[1].removesuffix("step")
        return row_name(model, "ddim", steps=int(nfe))
    if role == "olss" and version.get("scheduler_file"):  # each variant is its own row
        return row_name(version["model"], "olss", steps=int(nfe or 0), artifact=version["scheduler_file"])
    return None


@torch.no_grad()
def generate(sampler: str | SamplerSpec, den: Denoiser, seeds: Sequence[int], shape: tuple[int, int, int], *,
             steps: int, batch_size: int = 256, device: torch.device | str = "cpu",
             labels: Sequence[int] | None = None, guidance: float = 0.0, **options: Any) -> torch.Tensor:
    """Images for ``seeds`` (CPU): x_T and any sampler noise drawn per seed (PerImageNoise), so the
    result does not depend on ``batch_size``. ``labels``: one class per seed of a class-conditional
    ``den``, sampled at guidance scale ``guidance`` (its NFE: :func:`nfe`)."""
    spec = get(sampler) if isinstance(sampler, str) else sampler
    seeds = list(seeds)
    if labels is not None and len(labels) != len(seeds):
        raise GuidanceError(f"{len(labels)} class labels for {len(seeds)} seeds")
    out = []
    for lo in range(0, len(seeds), batch_size):
        noise = PerImageNoise(seeds[lo : lo + batch_size], device)
        d = maybe_guided(den, None if labels is None else list(labels)[lo : lo + batch_size], guidance)
        out.append(spec(d, noise.randn(*shape), steps=steps, noise=noise, **options).cpu())
    return torch.cat(out) if out else torch.empty(0, *shape)


# --------------------------------------------------------------------------------------------
# the entries


@register("ddim", family=lambda o: "ddim-eta" if o.get("eta") is not None else "ddim",
          label=lambda steps, o: f"ddim {steps}" + (f" eta={o['eta']:g}" if o.get("eta") is not None else ""))
def ddim(den: Denoiser, x_T: torch.Tensor, *, steps: int, noise: PerImageNoise | None = None,
         eta: float | None = None, spacing: Spacing = "trailing", clip: bool = True) -> torch.Tensor:
    """DDIM (Song et al. 2021) on ``steps`` indices of the schedule; ``eta`` None or 0: deterministic
    (a row with an explicit eta is labelled with it)."""
    return sample_ddim(den, x_T, timesteps(den.schedule.T, steps, spacing), eta=eta or 0.0, noise=noise, clip=clip)


@register("ddpm-hat", family="ddim-eta", label=lambda steps, o: f"ddpm {steps} sigma-hat")
def ddpm_hat(den: Denoiser, x_T: torch.Tensor, *, steps: int, noise: PerImageNoise | None = None,
             spacing: Spacing = "trailing", clip: bool = True) -> torch.Tensor:
    """DDPM's larger variance sigma-hat around the eta = 1 mean (DDIM Table 1, last row)."""
    return sample_ddim(den, x_T, timesteps(den.schedule.T, steps, spacing), variance="hat", noise=noise, clip=clip)


def olss_family(artifact: str) -> str:
    """The row family of an OLSS scheduler file: its variant's prefix (olss-paper, olss-p,
    olss-open, olss-closed, olss-ridge: fewstep.olss_variants), or olss for the headline olss-N."""
    v = variant_of(artifact)
    return v.prefix if v is not None else HEADLINE


def olss_label(artifact: str) -> str:
    """What an OLSS row is, for reports: the variant's label (paper or beyond paper), or the
    headline's (olss-N is a copy of the best held-out variant; its meta says which)."""
    v = variant_of(artifact)
    return v.label if v is not None else HEADLINE_LABEL


def _olss_label(steps: int, o: Mapping[str, Any]) -> str:
    if not o.get("artifact"):
        raise ValueError("an OLSS row is named by its scheduler file: pass artifact=<olss*.json name>")
    return Path(o["artifact"]).stem


@register("olss", family=lambda o: olss_family(o["artifact"]) if o.get("artifact") else "olss", label=_olss_label,
          artifact=OLSS_SCHEDULER)
def olss(den: Denoiser, x_T: torch.Tensor, *, steps: int, noise: PerImageNoise | None = None,
         scheduler: OLSSScheduler, clip: bool = True, allow_scale_mismatch: bool = False) -> torch.Tensor:
    """OLSS (Duan et al. 2023) with a fitted scheduler (any variant: its basis is in the file);
    ``steps`` must be the scheduler's; one fitted at a guidance scale is refused at another unless
    ``allow_scale_mismatch``."""
    if steps != scheduler.steps:
        raise ValueError(f"this OLSS scheduler samples in exactly {scheduler.steps} steps, not {steps}")
    return sample_olss(den, x_T, scheduler, clip=clip, allow_scale_mismatch=allow_scale_mismatch)


def _register_peer(name: str) -> None:
    from fewstep import peers

    nfe = (lambda s: 2 * s - 1) if name == "heun" else _same  # Heun: two evaluations a step, one on the last

    def peer(den: Denoiser, x_T: torch.Tensor, *, steps: int, noise: PerImageNoise | None = None) -> torch.Tensor:
        return peers.run_peer(name, den, x_T, steps)[0]

    peer.__doc__ = f"diffusers' {name} scheduler driven with the fewstep denoiser (fewstep.peers)."
    register(PEER_PREFIX + name, family="peer", label=lambda steps, _o: f"diffusers {name} {nfe(steps)}", nfe=nfe,
             steps_for_nfe=lambda n: peers.steps_for_nfe(name, n), needs_diffusers=True, model_in_name=False)(peer)


def _register_peers() -> None:
    from fewstep.peers import PEERS

    for name in PEERS:
        _register_peer(name)


_register_peers()
