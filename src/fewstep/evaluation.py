"""The evaluation table: every sampler x NFE on the same noise, scored in evaluator features.

A sampler row is a function from (x_T batch, per-image noise) to images in [-1, 1]. Every row uses
image seeds seed..seed+n-1, so rows differ only by the sampler. Scores: FD (with a 95% bootstrap
interval) and KID (with its standard error) against the training split's reference statistics,
precision/recall, the duplicate rate, RMSE/PSNR against the teacher's full-step DDIM sample from
the same x_T, NFE, model GFLOPs per image, images/s on this machine.

Sample counts: every row is scored on the first ``evaluate.n_samples`` seeds (its ``n``), so the
whole table compares at one n. The rows the README ranks (:func:`is_headline`) are sampled on
``evaluate.n_headline`` seeds and carry a second score block ``headline`` at that n; FD is compared
only within one n (fewstep.ranking). The FD sensitivity check (:func:`fd_sensitivity`) says what FD
difference the evaluator can see: held-out real images (the noise floor) and blurred ones.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np
import torch

from fewstep import models, parallel, samplers
from fewstep.math import metrics as M
from fewstep.math.ddim import PerImageNoise
from fewstep.math.guidance import ClassGuidance, GuidanceError, fitted_scale
from fewstep.math.olss import OLSSScheduler
from fewstep.math.param import NetDenoiser
from fewstep.math.split import SIDES, SplitDenoiser
from fewstep.olss_variants import variant_of
from fewstep.samplers import SampleFn

if TYPE_CHECKING:
    from fewstep.per_class import ClassReference


@dataclass
class Row:
    name: str
    family: str  # ddim | ddim-eta | olss | olss-paper | olss-p | olss-open | olss-closed | olss-ridge | student | peer
    model: str
    nfe: int
    fn: SampleFn = field(repr=False)
    gflops: float = 0.0
    nfe_by_net: dict[str, int] | None = None  # a split model: evaluations per image on each network
    gflops_by_net: dict[str, float] | None = None
    note: str = ""  # what the row is beyond its name: an OLSS row says paper / beyond paper / which variant olss-N is
    steps: int | None = None  # the sampler's step count (None: = nfe)
    guidance: float | None = None  # a class-conditional row: the guidance scale w it samples at; None: unconditional
    distilled_guidance: float | None = None  # a guided-distilled student: the w it was distilled at (sampled at 0)


def gflops_per_call(den: NetDenoiser, shape: tuple[int, int, int]) -> float:
    """Model FLOPs of one network evaluation for one image (torch's FLOP counter)."""
    from fewstep.budget import model_gflops

    wrapped = NetDenoiser(den.net.to("cpu"), den.schedule, den.kind, autocast=False)
    return model_gflops(wrapped, shape, torch.ones(1, dtype=torch.long))


def gflops_per_net(den: NetDenoiser | SplitDenoiser, shape: tuple[int, int, int]) -> dict[str, float]:
    """{"net": GFLOPs} for one network, {"high": .., "low": ..} for a split model (one call, one image)."""
    if isinstance(den, SplitDenoiser):
        return {s: gflops_per_call(getattr(den, s), shape) for s in SIDES}
    return {"net": gflops_per_call(den, shape)}


def count_split_nfe(den: SplitDenoiser, fn: SampleFn, shape: tuple[int, int, int]) -> dict[str, int]:
    """Network evaluations per image on each side of a split model for sampler ``fn``: counted by
    running it on one image (so any sampler, OLSS included, is counted as it routes)."""
    dev = next(den.parameters()).device
    den.reset_evaluations()
    noise = PerImageNoise([0], dev)
    with torch.no_grad():
        fn(noise.randn(*shape), noise)
    return den.reset_evaluations()


@dataclass(frozen=True)
class Planned:
    """One row before its model is loaded: a registered sampler at a step count with its options."""

    sampler: str
    steps: int
    options: dict = field(default_factory=dict)

    @property
    def nfe(self) -> int:
        return samplers.get(self.sampler).nfe(self.steps)


def teacher_plan(ep, T: int) -> list[Planned]:
    """The teacher's sampler rows for params section ``evaluate`` (``ep``), in table order: DDIM
    at ddim_steps (those <= T), the eta family and sigma-hat at eta_steps, the diffusers peers at
    peer_steps (as NFE budgets). The budget counts the same list (fewstep.budget)."""
    plan = [Planned("ddim", n) for n in ep.ddim_steps if n <= T]
    for n in ep.eta_steps:
        plan += [Planned("ddim", n, {"eta": eta}) for eta in ep.etas]
        if ep.sigma_hat:
            plan.append(Planned("ddpm-hat", n))
    for name in ep.peers:
        spec = samplers.get(samplers.PEER_PREFIX + name)
        plan += [Planned(spec.name, spec.steps_for_nfe(n)) for n in ep.peer_steps]
    return plan


def row_scales(card: models.ModelCard, ep) -> list[float | None]:
    """The guidance scales of a model's rows: [None] for an unconditional model (its rows as ever);
    [0.0] for a guided-distilled student (card ``guidance`` set: its one conditional forward already
    approximates the teacher guided at that w); else every w of ``evaluate.guidance``."""
    if card.conditioning.kind != "class":
        return [None]
    if getattr(card, "guidance", None) is not None:
        return [0.0]
    if any(ep.guidance) and not getattr(getattr(card, "arch", None), "has_null_label", True):
        raise GuidanceError(f"evaluate.guidance {list(ep.guidance)} asks guided rows of a conditional-only model "
                            "(imported without teacher.source.null_label: no unconditional prediction); "
                            "set evaluate.guidance: [0.0] or give the null label")
    return [float(w) for w in ep.guidance]


def class_bound(spec: samplers.SamplerSpec, den, guidance: ClassGuidance, steps: int, options: dict) -> SampleFn:
    """(x_T, noise) -> x_0 of a class-conditional model: the image of seed s is of class
    (s - guidance.first_seed) mod K (its seed from ``noise``), sampled at guidance.w."""

    def fn(x_T: torch.Tensor, noise: PerImageNoise) -> torch.Tensor:
        return spec(guidance.wrap(den, noise.seeds), x_T, steps=steps, noise=noise, **options)

    return fn


def _row(model: str, den, plan: Planned, family: str | None = None, artifact: str | None = None,
         w: float | None = None, first_seed: int = 0) -> Row:
    """One row; ``w`` not None: a class-conditional model at guidance scale w (its NFE counts guidance)."""
    spec = samplers.get(plan.sampler)
    label = {"artifact": artifact} if artifact else plan.options
    name = samplers.row_name(model, spec.name, steps=plan.steps, guidance=w, **label)
    fam = family or spec.family(label)
    if w is None:
        return Row(name, fam, model, plan.nfe, spec.bind(den, steps=plan.steps, **plan.options), steps=plan.steps)
    g = ClassGuidance(den.card.conditioning.num_classes, w, first_seed)
    return Row(name, fam, model, samplers.nfe(spec, plan.steps, guidance=w),
               class_bound(spec, den, g, plan.steps, plan.options), steps=plan.steps, guidance=w,
               distilled_guidance=getattr(den.card, "guidance", None))


def _rows(model: str, den, plan: Planned, ep, family: str | None = None, artifact: str | None = None) -> list[Row]:
    """The rows of one sampler setting on one model: one per guidance scale of :func:`row_scales`."""
    return [_row(model, den, plan, family, artifact, w, ep.seed) for w in row_scales(den.card, ep)]


def olss_scale(den, sched: OLSSScheduler, ep) -> tuple[float | None, str | None]:
    """(the guidance scale to sample OLSS scheduler ``sched`` at, None) or (None, why it is skipped).
    Unconditional model: (None, None). Class-conditional: the scale its meta records (it was fitted
    on trajectories guided at that scale and is refused at any other)."""
    if row_scales(den.card, ep) == [None]:
        return None, None
    g = sched.meta.get("guidance")
    if not g:
        return None, "fitted without a recorded guidance scale (meta.guidance) on a class-conditional model"
    if int(g.get("num_classes", -1)) != den.card.conditioning.num_classes:
        return None, (f"fitted for {g.get('num_classes')} classes, the model has "
                      f"{den.card.conditioning.num_classes}")
    return fitted_scale(sched.meta), None


def olss_note(artifact: str, sched: OLSSScheduler) -> str:
    """The note of an OLSS row: "paper" or "beyond paper" for a variant; for the headline olss-N,
    which variant it is (meta ``chosen_from``, fewstep.olss_fit) and that one's method."""
    v = variant_of(artifact)
    if v is not None:
        return v.method.replace("-", " ")
    src = sched.meta.get("chosen_from")
    method = sched.meta.get("method")
    if not src:
        return ""
    return f"= {src}" + (f", {method.replace('-', ' ')}" if method else "")


def build_rows(models_dir: Path, schedulers_dir: Path, ep, device: torch.device,
               log: Callable[[str], None] | None = None) -> tuple[list[Row], dict]:
    """Rows for the teacher (DDIM, eta family, OLSS variants), students and OLSS on them, the
    patch-study teachers and split models (models/teacher-*), peers; every row a registered
    sampler (fewstep.samplers) named by samplers.row_name. A class-conditional model has one row
    per guidance scale (:func:`row_scales`); its OLSS rows sample at the scale they were fitted at
    (:func:`olss_scale`; one without a recorded scale is skipped, said through ``log``)."""
    rows: list[Row] = []
    dens: dict[str, NetDenoiser] = {}
    teacher = models.load_denoiser(models_dir / "teacher", device)
    dens["teacher"] = teacher
    plan = teacher_plan(ep, teacher.schedule.T)
    rows += [x for r in plan if not samplers.get(r.sampler).needs_diffusers for x in _rows("teacher", teacher, r, ep)]
    for d in sorted(p for p in models_dir.iterdir() if (p / models.CONFIG).exists() and p.name.startswith("student")):
        den = models.load_denoiser(d, device)
        dens[d.name] = den
        rows += _rows(d.name, den, Planned("ddim", den.card.sample_steps), ep, family="student")
    # patch-study teachers (teacher-p<P>) and split models: DDIM at evaluate.study_steps, family = the model
    for d in sorted(p for p in models_dir.iterdir() if (p / models.CONFIG).exists() and p.name.startswith("teacher-")):
        den = models.load_denoiser(d, device)
        dens[d.name] = den
        rows += [x for n in ep.study_steps if n <= den.schedule.T
                 for x in _rows(d.name, den, Planned("ddim", n), ep, family=d.name)]
    for model_dir in sorted(schedulers_dir.glob("*")) if schedulers_dir.exists() else []:
        den = dens.get(model_dir.name) or models.load_denoiser(models_dir / model_dir.name, device)
        dens[model_dir.name] = den
        for f in sorted(model_dir.glob("olss*.json")):
            sched = OLSSScheduler.from_json(f.read_text())
            w, skip = olss_scale(den, sched, ep)
            if skip:
                if log is not None:
                    log(f"skipped {model_dir.name}/{f.name}: {skip}")
                continue
            if w is not None and w not in ep.guidance and log is not None:
                log(f"{model_dir.name}/{f.name} samples at its fitted scale w={w:g}, not in evaluate.guidance "
                    f"{list(ep.guidance)}: no DDIM row at that scale to compare it with")
            row = _row(model_dir.name, den, Planned("olss", sched.steps, {"scheduler": sched}), artifact=f.name,
                       w=w, first_seed=ep.seed)
            row.note = olss_note(f.name, sched)
            rows.append(row)
    peer_rows = [r for r in plan if samplers.get(r.sampler).needs_diffusers]
    if peer_rows and samplers.get(peer_rows[0].sampler).available():  # diffusers is an optional extra
        from fewstep import peers

        peers.load_diffusers()  # imported here, not inside the first peer row's timed sampling
        rows += [x for r in peer_rows for x in _rows("teacher", teacher, r, ep)]
    shape = teacher.card.image_shape
    flops = {k: gflops_per_net(v, shape) for k, v in dens.items()}
    for r in rows:
        if isinstance(dens[r.model], SplitDenoiser):  # cost = FLOPs per net x the NFE falling on its side
            r.nfe_by_net = count_split_nfe(dens[r.model], r.fn, shape)
            r.gflops_by_net = {s: flops[r.model][s] * r.nfe_by_net[s] for s in SIDES}
            r.gflops = sum(r.gflops_by_net.values())
        else:
            r.gflops = flops[r.model]["net"] * r.nfe
    return rows, dens


@torch.no_grad()
def run_row(row: Row, seeds: list[int], shape: tuple[int, int, int], batch_size: int,
            device: torch.device) -> tuple[torch.Tensor | None, float]:
    """All images of one row (CPU tensor) and the images/s it sampled at (all ranks together).

    Under torchrun each rank samples its block of the seeds and rank 0 gets every image (the
    other ranks get None); an image depends only on its seed, so the result is the same for any
    world size and batch size."""
    t0 = time.perf_counter()

    def local(mine: list[int]) -> torch.Tensor:
        out = []
        for lo in range(0, len(mine), batch_size):
            noise = PerImageNoise(mine[lo : lo + batch_size], device)
            x_T = noise.randn(*shape)
            out.append(row.fn(x_T, noise).clamp(-1, 1).float().cpu())
        return torch.cat(out)

    images = parallel.map_sharded(local, seeds)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images, len(seeds) / (time.perf_counter() - t0)


@dataclass
class Resampled:
    """What a paired comparison of one row needs (kept in memory, not written): its FD with the FD
    of each bootstrap resample (math.metrics.fd_resampled; None without resamples) and its full-sample
    KID with each image's influence (math.metrics.kid_influence). Rows scored at the same n and
    seed from the same x_T seeds pair image by image (:func:`paired_scores`)."""

    fd: tuple[float, np.ndarray] | None
    kid: tuple[float, np.ndarray]


def _kid_yy(stats: dict) -> float:
    """The reference-reference term of the unbiased MMD^2, once per reference (cached in ``stats``)."""
    if "kid_yy" not in stats:
        stats["kid_yy"] = M.kid_reference_term(stats["subset"])
    return stats["kid_yy"]


def feature_scores(feats: np.ndarray, stats: dict, kid_subsets: int, seed: int, resamples: int = 0,
                   keep: list[Resampled] | None = None) -> dict:
    """FD against the reference statistics and KID against the reference subset, in one feature
    space (the evaluator's, or Inception's for standard FID); with ``resamples`` > 0 also FD's 95%
    bootstrap interval (fd_lo, fd_hi; math.metrics.fd_bootstrap).

    ``kid`` is the mean over ``kid_subsets`` random subsets (as before); ``kid_se`` is its standard
    error at this n: the sampling part (each generated image's influence, math.metrics.kid_influence,
    the reference held fixed) and the subsets' Monte-Carlo part (``kid_se_subsets``) in quadrature.
    The subsets' part alone is no uncertainty of KID: with subsets of n/2 it is ~2.7x too small
    (measured on Gaussians, tests/unit/test_rank_paired.py). With ``keep`` the row's
    :class:`Resampled` is appended to it, for :func:`paired_scores`."""
    kid_mean, kid_se_sub = M.kid(feats, stats["subset"], subsets=kid_subsets, subset_size=min(1000, len(feats)),
                                 seed=seed)
    mmd_x, psi = M.kid_influence(feats, stats["subset"], yy=_kid_yy(stats))
    out = {"fd": M.frechet_distance(*M.mean_cov(feats), stats["mu"], stats["sigma"]), "kid": kid_mean,
           "kid_se": math.hypot(M.kid_se(psi), kid_se_sub), "kid_se_subsets": kid_se_sub}
    fd_r = None
    if resamples:
        fd_r = M.fd_resampled(feats, stats["mu"], stats["sigma"], resamples=resamples, seed=seed)
        lo, hi = M.basic_interval(*fd_r)
        out["fd_lo"], out["fd_hi"] = max(lo, 0.0), max(hi, 0.0)
    if keep is not None:
        keep.append(Resampled(fd_r, (mmd_x, psi)))
    return out


def paired_scores(a: Resampled, b: Resampled, name_b: str) -> dict:
    """Row a against row b on the same seeds (equal n, image i from the same x_T): FD(a) - FD(b)
    with its 95% joint-bootstrap interval (fd_diff_lo/hi; math.metrics.fd_diff_interval) and
    KID(a) - KID(b) on all images with its paired standard error (kid_diff_se;
    math.metrics.kid_diff). ``ref`` names b (fewstep.ranking reads these)."""
    out: dict = {"ref": name_b}
    if a.fd is not None and b.fd is not None:
        out["fd_diff"], out["fd_diff_lo"], out["fd_diff_hi"] = M.fd_diff_interval(a.fd, b.fd)
    out["kid_diff"], out["kid_diff_se"] = M.kid_diff(a.kid, b.kid)
    return out


def score(feats: np.ndarray, images: torch.Tensor, reference: torch.Tensor, stats: dict, kid_subsets: int,
          seed: int, *, resamples: int = 0, dup_threshold: float | None = None,
          keep: list[Resampled] | None = None) -> dict:
    """Every score of one row at n = len(feats): feature_scores, precision/recall, the duplicate
    rate (with ``dup_threshold``), RMSE/PSNR to ``reference`` (with an interval when ``resamples``);
    ``keep`` as in feature_scores."""
    ref_sub = stats["subset"]
    n_pr = min(len(feats), len(ref_sub), 2000)
    prec, rec = M.precision_recall(ref_sub[:n_pr], feats[:n_pr])
    a, b = images.numpy(), reference.numpy()
    out = {
        "n": len(feats),
        **feature_scores(feats, stats, kid_subsets, seed, resamples, keep),
        "precision": prec,
        "recall": rec,
        "rmse": M.rmse(a, b),
        "psnr": M.psnr(a, b),
    }
    if resamples:
        out["rmse_lo"], out["rmse_hi"] = M.rmse_interval(a, b, resamples=resamples, seed=seed)
    if dup_threshold is not None:
        out["dup_rate"] = M.duplicate_rate(feats, dup_threshold)
    return out


def dup_thresholds(subset: np.ndarray, ns: set[int], quantile: float) -> dict[int, float]:
    """The duplicate threshold for each sample count n: the ``quantile`` of nearest-neighbour
    distances among n real reference features (all of the subset when it has fewer than n)."""
    return {n: M.duplicate_threshold(subset[:n], quantile) for n in sorted(ns)}


def is_headline(row: Row, ref_steps: int, student_steps: set[int]) -> bool:
    """The rows the README ranks: the teacher's DDIM at the reference steps and at every student's
    steps, every student, every OLSS variant (family olss*)."""
    if row.family == "student" or row.family.startswith("olss"):
        return True
    steps = row.nfe if row.steps is None else row.steps
    return row.model == "teacher" and row.family == "ddim" and steps in {ref_steps, *student_steps}


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Images (N, C, H, W) blurred by a separable Gaussian of ``sigma`` pixels (radius 3 sigma,
    reflect padding)."""
    r = max(1, math.ceil(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = (k / k.sum()).to(images.dtype)
    C = images.shape[1]
    out = torch.nn.functional.pad(images, (r, r, r, r), mode="reflect")
    out = torch.nn.functional.conv2d(out, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return torch.nn.functional.conv2d(out, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def fd_sensitivity(feature_fn: Callable[[torch.Tensor], np.ndarray], stats: dict, test_images: torch.Tensor,
                   sigmas: list[float], n: int, kid_subsets: int, seed: int, resamples: int) -> dict:
    """What FD can see: ``fd_floor``, the scores of n held-out real images (the test split) against
    the training reference (the noise floor at that n), and ``fd_blur``, the same images blurred
    by each sigma (str(sigma) -> scores): n = min(n, test images) drawn at random with ``seed`` (a
    prepared split is ordered by class: its first n would be a different distribution)."""
    pick = torch.randperm(len(test_images), generator=torch.Generator().manual_seed(seed))[:n]
    x = test_images[pick.sort().values]
    floor = {"n": len(x), **feature_scores(feature_fn(x), stats, kid_subsets, seed, resamples)}
    blur = {f"{s:g}": {"n": len(x), **feature_scores(feature_fn(gaussian_blur(x, s)), stats, kid_subsets, seed,
                                                       resamples)} for s in sigmas}
    return {"fd_floor": floor, "fd_blur": blur}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (cost, fd), both lower-is-better."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def reference_stats(feats: np.ndarray, subset: int, seed: int) -> dict[str, np.ndarray]:
    """mu, sigma of the reference features and a random subset of them for KID (as train_evaluator)."""
    rng = np.random.default_rng(seed)
    mu, sigma = M.mean_cov(feats)
    return {"mu": mu, "sigma": sigma, "subset": feats[rng.choice(len(feats), min(len(feats), subset), replace=False)]}


def inception_space(weights: str | Path, train_images: torch.Tensor, subset: int, seed: int,
                    device: torch.device) -> tuple[Callable[[torch.Tensor], np.ndarray], dict[str, np.ndarray]]:
    """Standard FID: the user's Inception-v3 weight file, a feature function and the training
    split's reference statistics in its 2048-d pool space, for feature_scores."""
    from fewstep.nets.inception import inception_features, load_inception

    net = load_inception(weights, device)

    def feats(images: torch.Tensor) -> np.ndarray:
        return inception_features(net, images)

    return feats, reference_stats(feats(train_images), subset, seed)


def inception_reference(weights: str | Path, train_images_npy: Path, subset: int, seed: int, device: torch.device
                        ) -> tuple[Callable[[torch.Tensor], np.ndarray], dict[str, np.ndarray]]:
    """:func:`inception_space` on the prepared training split; a weight file that is not an FID
    Inception state dict is a ParamsError naming evaluate.inception_weights."""
    from fewstep import storage
    from fewstep.config import ParamsError
    from fewstep.images import from_uint8

    train = from_uint8(storage.load_array(train_images_npy))
    try:
        return inception_space(weights, train, subset, seed, device)
    except ValueError as e:  # one clear line
        raise ParamsError(f"evaluate.inception_weights: {e}") from None


def add_paired(results: dict[str, dict], kept: Mapping[str, Mapping[int, Resampled]],
               ref_name: str | Mapping[str, str]) -> None:
    """Every row's score blocks (the table's and the headline block) get ``paired``: the row against
    the reference row at the same n (:func:`paired_scores`; every row uses the same seeds).
    ``ref_name``: one reference row for all, or row -> its reference (a conditional model's rows are
    paired with the teacher's reference DDIM at their own guidance scale)."""
    for name, r in results.items():
        rn = ref_name if isinstance(ref_name, str) else ref_name.get(name)
        if rn is None or name == rn:
            continue
        ref = kept.get(rn, {})
        for block in (r, r.get("headline")):
            if block is not None and block["n"] in ref:
                block["paired"] = paired_scores(kept[name][block["n"]], ref[block["n"]], rn)


def paired_pairs(results: Mapping[str, Mapping], kept: Mapping[str, Mapping[int, Resampled]]) -> list[dict]:
    """For every two ranked rows (those with a ``headline`` block) at equal NFE: a (lower FD first),
    b, n and :func:`paired_scores` of a against b, for fewstep.ranking.separated_pairs."""
    heads = sorted((k for k, r in results.items() if "headline" in r), key=lambda k: results[k]["headline"]["fd"])
    out = []
    for i, a in enumerate(heads):
        for b in heads[i + 1:]:
            n = results[a]["headline"]["n"]
            if results[a]["nfe"] == results[b]["nfe"] and n == results[b]["headline"]["n"]:
                out.append({"a": a, "b": b, "n": n, **paired_scores(kept[a][n], kept[b][n], b)})
    return out


@dataclass
class Evaluation:
    """What :func:`run_evaluation` measured: ``rows`` (row name -> scores), the reference's step
    count, and ``meta`` for metrics/evaluate.json (n_headline, dup_threshold per n, fd_floor, fd_blur)."""

    rows: dict[str, dict]
    reference_steps: int
    meta: dict = field(default_factory=dict)


def _class_reference(evaluator, ep, feats_of: Callable[[torch.Tensor], np.ndarray], num_classes: int,
                     names: list[str] | None, class_test: tuple[torch.Tensor, np.ndarray] | None) -> ClassReference:
    """The per-class reference of the class-conditional rows: the evaluator must classify exactly the
    models' classes; with ``ep.per_class`` each class's test images give its statistics."""
    from fewstep.per_class import ClassEvaluationError, class_reference

    k_eval = evaluator.cfg.num_classes
    if k_eval != num_classes:
        raise ClassEvaluationError(f"the evaluator classifies {k_eval} classes but the class-conditional models "
                                   f"have {num_classes}: train both on the same prepared data")
    names = list(names) if names and len(names) == num_classes else [str(c) for c in range(num_classes)]
    if not ep.per_class:
        return class_reference(names)
    if ep.n_samples < 3 * num_classes:  # 3: KID's sampling s.e. (metrics.kid_influence)
        raise ClassEvaluationError(f"evaluate.per_class: {ep.n_samples} samples give fewer than 3 per class for "
                                   f"{num_classes} classes; raise evaluate.n_samples or set per_class false")
    if class_test is None:
        raise ClassEvaluationError("evaluate.per_class needs the test split's images and labels "
                                   "(data/prepared/test_images.npy, test_labels.npy); or set it false")
    images, labels = class_test
    return class_reference(names, feats_of(images), np.asarray(labels), subset=len(images), seed=ep.seed)


def run_evaluation(models_dir: Path, schedulers_dir: Path, ep, evaluator_dir: Path,
                   device: torch.device, grid_dir: Path | None = None,
                   inception: Callable[[], tuple[Callable[[torch.Tensor], np.ndarray], dict]] | None = None,
                   log: Callable[[str], None] | None = None,
                   test_images: torch.Tensor | None = None,
                   class_test: tuple[torch.Tensor, np.ndarray] | None = None,
                   class_names: list[str] | None = None) -> Evaluation | None:
    """Every row of :func:`build_rows` sampled on seeds ep.seed.. and scored (:func:`score`, plus
    standard FID with ``inception``) against the teacher's ``ep.reference_steps``-step DDIM images
    from the same noise (the image shape is the teacher card's); one sample grid per row under
    ``grid_dir``. Every row is scored on ``ep.n_samples`` seeds; the :func:`is_headline` rows are
    sampled on ``ep.headline_n`` seeds and scored again at that n (``headline``). With
    ``test_images`` (the test split, in [-1, 1]) the FD sensitivity check runs too. Returns the
    :class:`Evaluation` on rank 0; None on the other ranks of a torchrun (they sample their share,
    rank 0 scores). ``inception`` is called once the rows are built (e.g. a partial of
    :func:`inception_reference`) and gives the feature function and reference statistics.

    Class-conditional models (fewstep.per_class): a row at guidance scale w samples seed s as class
    (s - ep.seed) mod K, its RMSE reference is the teacher's reference-steps DDIM at the same w (a
    guided-distilled student's: at the w it was distilled at), and it adds the evaluator's accuracy
    and, with ``ep.per_class``, FD/KID per class against the test images of that class
    (``class_test``: the test split's images in [-1, 1] and labels; ``class_names`` name the
    classes) and a per-class grid (one row per class)."""
    from fewstep.images import save_grid
    from fewstep.per_class import class_major, class_scores
    from fewstep.reports import slug
    from fewstep.train.evaluator import features, load_evaluator

    evaluator, stats = load_evaluator(evaluator_dir, device)
    rows, dens = build_rows(models_dir, schedulers_dir, ep, device, log=log)
    inc = inception() if inception is not None else None
    teacher = dens["teacher"]
    n, n_h = ep.n_samples, ep.headline_n
    shape = teacher.card.image_shape
    n_ref = min(ep.reference_steps, teacher.schedule.T)
    student_steps = {r.steps for r in rows if r.family == "student"}
    heads = {r.name for r in rows if is_headline(r, n_ref, student_steps)} if n_h > n else set()
    seeds = list(range(ep.seed, ep.seed + (n_h if heads else n)))
    teacher_conditional = row_scales(teacher.card, ep) != [None]
    refs: dict[float | None, tuple[torch.Tensor, float]] = {}

    def reference(w: float | None) -> tuple[torch.Tensor, float]:
        """The teacher's n_ref-step DDIM images of every seed (at guidance scale w), sampled once."""
        if w not in refs:
            refs[w] = run_row(_row("teacher", teacher, Planned("ddim", n_ref), w=w, first_seed=ep.seed), seeds, shape,
                              ep.batch_size, device)
        return refs[w]

    def ref_scale(row: Row) -> float | None:
        if not teacher_conditional:
            return None
        return row.distilled_guidance if row.distilled_guidance is not None else (row.guidance or 0.0)

    reference(row_scales(teacher.card, ep)[0])  # first, as ever: its images/s are measured unshared
    ref_names = {w: samplers.row_name("teacher", "ddim", steps=n_ref, guidance=w)
                 for w in row_scales(teacher.card, ep)}  # same sampler, steps, seeds: the reference images
    if grid_dir is not None:
        grid_dir.mkdir(parents=True, exist_ok=True)
    thresholds = dup_thresholds(stats["subset"], {n, n_h} if heads else {n}, ep.dup_quantile)

    def feats_of(images: torch.Tensor) -> np.ndarray:
        return features(evaluator, images.to(device) if device.type == "cuda" else images)

    def scores(f: np.ndarray, images: torch.Tensor, ref: torch.Tensor, keep: list[Resampled] | None = None) -> dict:
        m = len(f)
        return score(f, images, ref[:m], stats, ep.kid_subsets, ep.seed, resamples=ep.fd_resamples,
                     dup_threshold=thresholds[m], keep=keep)

    cond_rows = [r for r in rows if r.guidance is not None]
    class_ref = None
    if cond_rows and parallel.is_main():
        k = dens[cond_rows[0].model].card.conditioning.num_classes
        class_ref = _class_reference(evaluator, ep, feats_of, k, class_names, class_test)
    asked = np.array([(s - ep.seed) % class_ref.num_classes for s in seeds]) if class_ref else None

    results: dict[str, dict] = {}
    kept: dict[str, dict[int, Resampled]] = {}  # row -> n -> its resampled scores, for the paired comparisons
    paired_ref: dict[str, str] = {}  # row -> the reference row it is paired with (the teacher's DDIM at its w)
    for row in rows:
        rw = ref_scale(row)
        if row.name == ref_names.get(rw) and row.model == "teacher":
            images, ips = reference(rw)
        else:
            images, ips = run_row(row, seeds[: n_h if row.name in heads else n], shape, ep.batch_size, device)
        ref_images = reference(rw)[0]
        if not parallel.is_main():
            continue
        f = feats_of(images)
        keep: list[Resampled] = []
        r = scores(f[:n], images[:n], ref_images, keep)
        if row.name in heads:
            r["headline"] = scores(f, images, ref_images, keep)
        kept[row.name] = {len(f[:n]): keep[0], **({len(f): keep[1]} if row.name in heads else {})}
        paired_ref[row.name] = samplers.row_name("teacher", "ddim", steps=n_ref, guidance=rw)  # absent row: unpaired
        r.update(family=row.family, model=row.model, nfe=row.nfe, gflops=row.gflops, images_per_s=ips)
        if row.note:
            r["note"] = row.note
        if row.name == ref_names.get(rw) and row.model == "teacher":
            r["is_reference"] = True  # not sampled twice
        if row.gflops_by_net:  # a split model: the cost per network
            r.update(nfe_by_net=row.nfe_by_net, gflops_by_net=row.gflops_by_net)
        if row.guidance is not None:  # class-conditional: only these rows carry the keys below
            r.update(guidance=row.guidance, steps=row.steps)
            if row.distilled_guidance is not None:
                r["distilled_guidance"] = row.distilled_guidance
            with torch.no_grad():
                pred = evaluator.head(torch.as_tensor(f[:n], dtype=torch.float32, device=device)).argmax(1).cpu().numpy()
            r.update(class_scores(f[:n], pred, asked[:n], class_ref, kid_subsets=ep.kid_subsets, seed=ep.seed,
                                  resamples=ep.fd_resamples))
        if inc is not None:
            r["inception"] = feature_scores(inc[0](images[:n]), inc[1], ep.kid_subsets, ep.seed)
        results[row.name] = r
        if grid_dir is not None:
            save_grid(images[: ep.grid_n], grid_dir / f"{slug(row.name)}.png", scale=max(1, 32 // shape[-1]))
            if row.guidance is not None:  # one row per class
                m = max(1, min(ep.grid_n // class_ref.num_classes, n // class_ref.num_classes))
                save_grid(images[class_major(asked[:n], class_ref.num_classes, m)],
                          grid_dir / f"{slug(row.name)}-classes.png", nrow=m, scale=max(1, 32 // shape[-1]))
        if log is not None:
            h = r.get("headline")
            log(f"{row.name:32s} NFE {row.nfe:4d} FD {r['fd']:8.3f} RMSE {r['rmse']:.4f}"
                + (f" acc {r['accuracy']:.3f}" if "accuracy" in r else "")
                + (f" | n={h['n']} FD {h['fd']:.3f} [{h.get('fd_lo', math.nan):.3f}, {h.get('fd_hi', math.nan):.3f}]"
                   if h else ""))
    if parallel.is_main():
        add_paired(results, kept, paired_ref)
    if not parallel.is_main():
        return None
    meta: dict = {"n_headline": n_h if heads else n, "dup_threshold": {str(k): v for k, v in thresholds.items()},
                  "dup_quantile": ep.dup_quantile, "fd_resamples": ep.fd_resamples,
                  "paired_pairs": paired_pairs(results, kept)}
    if class_ref is not None:  # absent for unconditional models: their evaluate.json keeps its keys
        meta.update(class_names=list(class_ref.names), guidance=list(ep.guidance), per_class=ep.per_class)
    if test_images is not None and len(test_images) >= 2:
        meta.update(fd_sensitivity(feats_of, stats, test_images, list(ep.blur_sigmas), n, ep.kid_subsets, ep.seed,
                                   ep.fd_resamples))
    return Evaluation(results, n_ref, meta)
