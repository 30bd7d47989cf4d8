"""Fitting the OLSS schedulers of one model and one step count from its recorded trajectories, and
checking them on held-out seeds (Duan et al. 2023; the math is in fewstep.math.olss).

Four variants, each an :class:`OLSSScheduler` with its lineage in ``meta``:

    olss-N        the searched path; refit closed loop when ``closed_loop`` (the weights see the
                  scheduler's own errors), else the open-loop fit
    olss-open-N   the paper's teacher-forced (open-loop) fit on the searched path
    olss-p-N      OLSS-P: the open-loop fit on the uniform path
    olss-ridge-N  the open-loop fit on the searched path with ridge ``ridge_variant`` (beyond the
                  paper; 0 is plain least squares)

The held-out check: RMSE of each variant's images, and of plain DDIM with N steps, to the
full-step DDIM result from the same noise. The model runs in IEEE float32 throughout (the closed-loop
refit and the check, as the trajectories were collected; ``full_precision``, issue 18.4).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fewstep import storage
from fewstep.config import OLSSParams
from fewstep.errors import UserError
from fewstep.math import metrics as M
from fewstep.math.ddim import PerImageNoise, sample_ddim
from fewstep.math.olss import OLSSScheduler, fit_weights, refit_closed_loop, sample_olss, search_path, uniform_path
from fewstep.math.param import Denoiser, full_precision
from fewstep.math.schedules import timesteps
from fewstep.trajectories import load_steps, load_subsample

HOLDOUT_SEED = 2_000_000
VARIANTS = ("olss", "olss-open", "olss-p", "olss-ridge")  # file stems: <variant>-<N>.json


class StaleTrajectoriesError(UserError):
    """The trajectories were recorded from another version of the model."""


def variant_files(steps: int) -> list[str]:
    """The scheduler files one fit writes (the outs dvc.yaml declares), whatever the params."""
    return [f"{v}-{steps}.json" for v in VARIANTS]


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMSE of the images as they would be shown (clamped to [-1, 1])."""
    return M.rmse(a.clamp(-1, 1).cpu().numpy(), b.clamp(-1, 1).cpu().numpy())


@dataclass
class OLSSFit:
    schedulers: dict[str, OLSSScheduler]  # file stem (olss-N, olss-open-N, ...) -> scheduler
    metrics: dict[str, Any]  # what metrics/olss/<model>-<N>.json holds

    @property
    def best(self) -> OLSSScheduler:
        return next(iter(self.schedulers.values()))


def fit_variants(den: Denoiser, model: str, traj_dir: Path, n: int, op: OLSSParams, seed: int,
                 device: torch.device) -> tuple[dict[str, OLSSScheduler], dict[str, Any]]:
    """Fit the four variants (module docstring) of ``model``'s ``n``-step scheduler on the
    trajectories in ``traj_dir``; returns them by file stem (olss-N first) and the fit's facts."""
    card = den.card  # type: ignore[attr-defined]
    weights_sha = card.weights_sha256
    tmeta = storage.read_json(traj_dir / "meta.json")
    if tmeta["model_weights_sha256"] != weights_sha:
        raise StaleTrajectoriesError(f"{traj_dir} was collected from another version of {model}; "
                                     "re-run collect_trajectories")
    t_path = tmeta["timesteps"]
    N = len(t_path)
    t0 = time.perf_counter()
    X, E = load_subsample(traj_dir, op.max_elements, seed=seed)
    ps = search_path(X, E, min(n, N), iters=op.bisection_iters)
    open_loop = fit_weights(X, E, ps.path, t_path, op.ridge)
    fit_seconds = time.perf_counter() - t0
    lineage = {"model": model, "model_weights_sha256": weights_sha,
               "trajectories": str(traj_dir), "reference_steps": N, "fit_seeds": len(tmeta["seeds"]),
               "elements": int(X.shape[1]), "path_note": ps.note, "D": ps.D, "ridge": op.ridge,
               "schedule": card.schedule.to_dict(), "parameterization_basis": "x"}
    open_loop.meta = {**lineage, "variant": "open-loop"}
    uni = fit_weights(X, E, uniform_path(N, min(n, N)), t_path, op.ridge)
    uni.meta = {**lineage, "variant": "olss-p", "path_note": "uniform"}
    best = open_loop
    if op.closed_loop:
        full = list(load_steps(traj_dir, ps.path[1:] + [N, 0]))
        targets, x_T = full[:-1], full[-1]
        with full_precision(den):
            best = refit_closed_loop(den, x_T.to(device), [t.to(device) for t in targets], open_loop, op.ridge)
        best.meta = {**lineage, "variant": "closed-loop"}
    # beyond the paper: the searched path, open loop, with a small ridge (0: plain least squares)
    ridged = fit_weights(X, E, ps.path, t_path, op.ridge_variant)
    ridged.meta = {**lineage, "variant": "ridge", "ridge": op.ridge_variant}
    variants = {f"olss-{n}": best, f"olss-open-{n}": open_loop, f"olss-p-{n}": uni, f"olss-ridge-{n}": ridged}
    facts = {"reference_steps": N, "t_path": t_path, "path": ps.path, "path_note": ps.note, "D": ps.D,
             "fit_seconds": fit_seconds, "search_stats": ps.stats}
    return variants, facts


@torch.no_grad()
def holdout_rmse(den: Denoiser, schedulers: dict[str, OLSSScheduler], n: int, t_path: list[int], n_holdout: int,
                 shape: tuple[int, int, int], device: torch.device) -> dict[str, float]:
    """RMSE to the full-step DDIM result on ``t_path`` from the same noise (seeds HOLDOUT_SEED...):
    DDIM with ``n`` steps and every variant (keys ddim, olss, olss_open, olss_p, olss_ridge)."""
    noise = PerImageNoise(range(HOLDOUT_SEED, HOLDOUT_SEED + n_holdout), device)
    x_T = noise.randn(*shape)
    with full_precision(den):
        ref = sample_ddim(den, x_T, t_path, clip=False)
        res = {"ddim": rmse(sample_ddim(den, x_T, timesteps(den.schedule.T, n), clip=False), ref)}
        for variant in VARIANTS:
            sched = schedulers.get(f"{variant}-{n}")
            if sched is not None:
                res[variant.replace("-", "_")] = rmse(sample_olss(den, x_T, sched, clip=False), ref)
    return res


def fit_olss(den: Denoiser, model: str, traj_dir: Path, n: int, op: OLSSParams, seed: int,
             device: torch.device) -> OLSSFit:
    """The stage fit_olss@<model>-<n>: every variant, validated, and the metrics (path, bound D, fit
    time, held-out RMSE of DDIM and each variant to the full-step reference)."""
    schedulers, f = fit_variants(den, model, traj_dir, n, op, seed, device)
    for sched in schedulers.values():
        sched.validate()
    shape = den.card.image_shape  # type: ignore[attr-defined]
    res = holdout_rmse(den, schedulers, n, f["t_path"], op.n_holdout, shape, device)
    best, open_loop = schedulers[f"olss-{n}"], schedulers[f"olss-open-{n}"]
    metrics = {"model": model, "steps": n, "reference_steps": f["reference_steps"], "path": f["path"],
               "timesteps": best.timesteps, "path_note": f["path_note"], "D": f["D"],
               "fit_seconds": f["fit_seconds"], "max_cond": max(open_loop.cond), "rmse_vs_full_step": res,
               "holdout_seeds": op.n_holdout, "search_stats": f["search_stats"]}
    return OLSSFit(schedulers, metrics)


def write_schedulers(schedulers: dict[str, OLSSScheduler], out: Path) -> list[Path]:
    """Each scheduler as ``out/<stem>.json``; returns the paths."""
    paths = []
    for stem, sched in schedulers.items():
        paths.append(out / f"{stem}.json")
        storage.atomic_write_bytes(paths[-1], sched.to_json().encode())
    return paths
