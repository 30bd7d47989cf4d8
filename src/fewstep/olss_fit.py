"""Fitting the OLSS schedulers of one model and one step count from its recorded trajectories, and
checking them on held-out seeds (Duan et al. 2023; the math is in fewstep.math.olss).

The variants (VARIANTS), each an :class:`OLSSScheduler` written as ``<prefix>-N.json`` with its
lineage, basis and method ("paper" or "beyond-paper") in ``meta``:

    olss-paper-N   the paper's method exactly: basis = the network's own outputs (eps for an eps
                   model, v for a v model), path searched and weights fitted teacher-forced on
                   that basis, float64, no ridge, no closed loop
    olss-p-N       OLSS-P, the paper's ablation: the same fit on the uniform path (no search)
    olss-open-N    beyond the paper: basis = x_hat, searched path, teacher-forced (open-loop) fit
                   (ridge ``olss.ridge``)
    olss-closed-N  beyond the paper: olss-open-N's path, weights refit closed loop on the
                   sampler's own trajectory (the weights see the scheduler's own errors)
    olss-ridge-N   beyond the paper: olss-open-N with ridge ``olss.ridge_variant`` (0 = plain
                   least squares)

and the headline ``olss-N``: a copy of the variant with the lowest RMSE on held-out seeds (the
closed loop competes only when ``olss.closed_loop``), its meta naming it (``chosen_from``) and
listing every variant's held-out RMSE. The held-out check: RMSE of each variant's images, and of
plain DDIM with N steps, to the full-step DDIM result from the same noise (seeds HOLDOUT_SEED..).
The model runs in IEEE float32 throughout (the closed-loop refit and the check, as the
trajectories were collected; ``full_precision``, issue 18.4).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from fewstep import storage
from fewstep.config import OLSSParams
from fewstep.math import metrics as M
from fewstep.math.ddim import PerImageNoise, sample_ddim
from fewstep.math.olss import (OLSSScheduler, PathSearch, fit_weights, refit_closed_loop, sample_olss, search_path,
                               uniform_path)
from fewstep.math.param import Denoiser, full_precision
from fewstep.math.schedules import timesteps
from fewstep.olss_variants import BY_PREFIX, HEADLINE, VARIANTS, Variant
from fewstep.prompts import guidance_from_meta
from fewstep.teacher_source import card_source_sha256
from fewstep.trajectories import StaleTrajectoriesError, load_steps, load_subsample

HOLDOUT_SEED = 2_000_000

__all__ = ["HEADLINE", "HOLDOUT_SEED", "OLSSFit", "StaleTrajectoriesError", "VARIANTS", "Variant", "choose",
           "fit_olss", "fit_variants", "headline", "holdout_rmse", "variant_files", "write_schedulers"]


def variant_files(steps: int) -> list[str]:
    """The scheduler files one fit writes (the outs dvc.yaml declares), whatever the params."""
    return [f"{HEADLINE}-{steps}.json"] + [f"{v.prefix}-{steps}.json" for v in VARIANTS]


def rmse(a: torch.Tensor, b: torch.Tensor, clamp: bool = True) -> float:
    """RMSE of the images as they would be shown (clamped to [-1, 1]); ``clamp=False``: of the raw
    arrays (latents of a latent model, which are not images and not bounded)."""
    if not clamp:
        return M.rmse(a.cpu().numpy(), b.cpu().numpy())
    return M.rmse(a.clamp(-1, 1).cpu().numpy(), b.clamp(-1, 1).cpu().numpy())


def is_latent(den: object) -> bool:
    """Whether ``den`` samples latents (a family with ``latent = True``, e.g. diffusers-sd)."""
    return bool(getattr(getattr(getattr(den, "card", None), "arch", None), "latent", False))


def choose(holdout: Mapping[str, float], candidates: Sequence[str] | None = None) -> str:
    """The variant prefix with the lowest held-out RMSE among ``candidates`` (default: all of
    VARIANTS in ``holdout``); a tie goes to the earlier in VARIANTS, a non-finite RMSE loses."""
    order = [v.prefix for v in VARIANTS if v.prefix in holdout and (candidates is None or v.prefix in candidates)]
    if not order:
        raise ValueError(f"no OLSS variant to choose from in {sorted(holdout)}")
    return min(order, key=lambda p: (not math.isfinite(holdout[p]), holdout[p] if math.isfinite(holdout[p]) else 0.0,
                                     order.index(p)))


@dataclass
class OLSSFit:
    schedulers: dict[str, OLSSScheduler]  # file stem (olss-N, olss-paper-N, ...) -> scheduler
    metrics: dict[str, Any]  # what metrics/olss/<model>-<N>.json holds

    @property
    def best(self) -> OLSSScheduler:
        return next(iter(self.schedulers.values()))


def _search_facts(ps: PathSearch) -> dict[str, Any]:
    return {"path": ps.path, "note": ps.note, "D": ps.D, "stats": ps.stats}


def fit_variants(den: Denoiser, model: str, traj_dir: Path, n: int, op: OLSSParams, seed: int,
                 device: torch.device, prompts=None) -> tuple[dict[str, OLSSScheduler], dict[str, Any]]:
    """Fit every variant of VARIANTS (module docstring) of ``model``'s ``n``-step scheduler on the
    trajectories in ``traj_dir``; returns them by file stem (``<prefix>-<n>``) and the fit's facts.
    The headline olss-N is chosen later, on held-out seeds (fit_olss). ``prompts``: the prompt file
    (fewstep.prompts.PromptSet) text-conditional trajectories were collected with (same sha256)."""
    card = den.card  # type: ignore[attr-defined]
    weights_sha = card.weights_sha256
    tmeta = storage.read_json(traj_dir / "meta.json")
    if tmeta["model_weights_sha256"] != weights_sha:
        raise StaleTrajectoriesError(f"{traj_dir} was collected from another version of {model}; "
                                     "re-run collect_trajectories")
    t_path = tmeta["timesteps"]
    guidance = guidance_from_meta(tmeta.get("conditioning"), prompts)
    N, k = len(t_path), min(n, len(t_path))
    t0 = time.perf_counter()
    X, E, O = load_subsample(traj_dir, op.max_elements, seed=seed, keys=("x", "e", "o"))
    arrays = {"x": E, "output": O}
    searches = {b: search_path(X, arrays[b], k, iters=op.bisection_iters) for b in ("output", "x")}
    lineage = {"model": model, "model_weights_sha256": weights_sha, "network_output": den.kind,
               "trajectories": str(traj_dir), "reference_steps": N, "fit_seeds": len(tmeta["seeds"]),
               "elements": int(X.shape[1]), "schedule": card.schedule.to_dict()}
    if guidance is not None:  # guided (or conditional) trajectories: the scheduler fits that scale only
        lineage["guidance"] = guidance.to_dict()  # text: with the prompt file's sha256
    source = card_source_sha256(card)
    if source:  # the model descends from an imported teacher: the scheduler names its source too
        lineage["source_sha256"] = source

    def fit(v: Variant, path: list[int], ridge: float, ps: PathSearch | None) -> OLSSScheduler:
        s = fit_weights(X, arrays[v.basis], path, t_path, ridge, basis=v.basis)
        s.meta = {**lineage, "variant": v.variant, "method": v.method, "label": v.label, "basis": v.basis,
                  "ridge": ridge, "path_note": ps.note if ps else "uniform", "D": ps.D if ps else None}
        return s

    out = {
        "olss-paper": fit(BY_PREFIX["olss-paper"], searches["output"].path, 0.0, searches["output"]),
        "olss-p": fit(BY_PREFIX["olss-p"], uniform_path(N, k), 0.0, None),
        "olss-open": fit(BY_PREFIX["olss-open"], searches["x"].path, op.ridge, searches["x"]),
    }
    fit_seconds = time.perf_counter() - t0
    full = list(load_steps(traj_dir, searches["x"].path[1:] + [N, 0]))
    targets, x_T = full[:-1], full[-1]
    fit_den = guidance.wrap(den, tmeta["seeds"]) if guidance is not None else den  # shards hold seeds in order
    with full_precision(den):
        closed = refit_closed_loop(fit_den, x_T.to(device), [t.to(device) for t in targets], out["olss-open"],
                                   op.ridge)
    v = BY_PREFIX["olss-closed"]
    closed.meta = {**out["olss-open"].meta, "variant": v.variant, "method": v.method, "label": v.label}
    out["olss-closed"] = closed
    out["olss-ridge"] = fit(BY_PREFIX["olss-ridge"], searches["x"].path, op.ridge_variant, searches["x"])
    facts = {"reference_steps": N, "t_path": t_path, "fit_seconds": fit_seconds,
             "search": {b: _search_facts(ps) for b, ps in searches.items()}, "guidance": guidance}
    return {f"{p}-{n}": out[p] for p in BY_PREFIX}, facts


@torch.no_grad()
def holdout_rmse(den: Denoiser, schedulers: Mapping[str, OLSSScheduler], n: int, t_path: list[int], n_holdout: int,
                 shape: tuple[int, int, int], device: torch.device,
                 guidance: Any = None) -> dict[str, float]:
    """RMSE to the full-step DDIM result on ``t_path`` from the same noise (seeds HOLDOUT_SEED...):
    DDIM with ``n`` steps (key ddim) and every variant of VARIANTS in ``schedulers`` (key
    Variant.key: olss_paper, olss_p, olss_open, olss_closed, olss_ridge). ``guidance``: a
    class-conditional model at its seeds' labels and scale (the trajectories'), or a text one at
    its seeds' prompts (TextGuidance). A latent model's RMSE is of the raw latents (no clamp)."""
    clamp = not is_latent(den)
    seeds = range(HOLDOUT_SEED, HOLDOUT_SEED + n_holdout)
    noise = PerImageNoise(seeds, device)
    x_T = noise.randn(*shape)
    if guidance is not None:
        den = guidance.wrap(den, seeds)
    with full_precision(den):
        ref = sample_ddim(den, x_T, t_path, clip=False)
        res = {"ddim": rmse(sample_ddim(den, x_T, timesteps(den.schedule.T, n), clip=False), ref, clamp)}
        for v in VARIANTS:
            sched = schedulers.get(f"{v.prefix}-{n}")
            if sched is not None:
                res[v.key] = rmse(sample_olss(den, x_T, sched, clip=False), ref, clamp)
    return res


def headline(schedulers: Mapping[str, OLSSScheduler], n: int, res: Mapping[str, float],
             candidates: Sequence[str] | None = None) -> tuple[str, OLSSScheduler]:
    """(chosen prefix, olss-N): a copy of the variant with the lowest held-out RMSE in ``res``, its
    meta recording ``chosen_from`` (the file stem) and every variant's held-out RMSE."""
    by_prefix = {v.prefix: res[v.key] for v in VARIANTS if v.key in res and f"{v.prefix}-{n}" in schedulers}
    chosen = choose(by_prefix, candidates)
    src = schedulers[f"{chosen}-{n}"]
    best = OLSSScheduler.from_json(src.to_json())
    best.meta = {**src.meta, "chosen_from": f"{chosen}-{n}", "holdout_rmse": dict(by_prefix),
                 "chosen_by": "lowest held-out RMSE to the full-step DDIM result"}
    return chosen, best


def fit_olss(den: Denoiser, model: str, traj_dir: Path, n: int, op: OLSSParams, seed: int,
             device: torch.device, prompts=None) -> OLSSFit:
    """The stage fit_olss@<model>-<n>: every variant, validated, the headline olss-N (the lowest
    held-out RMSE) and the metrics (paths per basis, bound D, fit time, held-out RMSE of DDIM and
    of each variant to the full-step reference, which variant olss-N is)."""
    variants, f = fit_variants(den, model, traj_dir, n, op, seed, device, prompts)
    for sched in variants.values():
        sched.validate()
    shape = den.card.image_shape  # type: ignore[attr-defined]
    res = holdout_rmse(den, variants, n, f["t_path"], op.n_holdout, shape, device, f["guidance"])
    candidates = [v.prefix for v in VARIANTS if op.closed_loop or v.prefix != "olss-closed"]
    chosen, best = headline(variants, n, res, candidates)
    res[HEADLINE] = res[BY_PREFIX[chosen].key]
    schedulers = {f"{HEADLINE}-{n}": best, **variants}
    table = {v.prefix: {"file": f"{v.prefix}-{n}.json", "label": v.label, "method": v.method, "basis": v.basis,
                        "path": variants[f"{v.prefix}-{n}"].path, "holdout_rmse": res[v.key],
                        "candidate": v.prefix in candidates} for v in VARIANTS}
    metrics = {"model": model, "steps": n, "reference_steps": f["reference_steps"], "chosen": chosen,
               "chosen_label": BY_PREFIX[chosen].label, "path": best.path, "timesteps": best.timesteps,
               "path_note": best.meta.get("path_note"), "D": best.meta.get("D"), "fit_seconds": f["fit_seconds"],
               "max_cond": max(best.cond), "rmse_vs_full_step": res, "variants": table,
               "holdout_seeds": op.n_holdout, "search": f["search"]}
    if f["guidance"] is not None:
        metrics["guidance"] = f["guidance"].to_dict()
    return OLSSFit(schedulers, metrics)


def write_schedulers(schedulers: dict[str, OLSSScheduler], out: Path) -> list[Path]:
    """Each scheduler as ``out/<stem>.json``; returns the paths."""
    paths = []
    for stem, sched in schedulers.items():
        paths.append(out / f"{stem}.json")
        storage.atomic_write_bytes(paths[-1], sched.to_json().encode())
    return paths
