"""Stage fit_olss@MODEL-N: an OLSS scheduler with N steps for one model.

Writes schedulers/MODEL/olss-N.json (searched path; closed-loop refit when olss.closed_loop),
olss-open-N.json (the paper's teacher-forced fit), olss-p-N.json (OLSS-P, uniform path),
olss-ridge-N.json (open loop with olss.ridge_variant, when > 0), and
metrics/olss/MODEL-N.json: RMSE to the full-step DDIM result on held-out seeds for DDIM, every
OLSS variant, with the path, the bound D and the fit time.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fewstep import models, storage
from fewstep.math import metrics
from fewstep.math.ddim import PerImageNoise, sample_ddim
from fewstep.math.olss import OLSSScheduler, fit_weights, refit_closed_loop, sample_olss, search_path, uniform_path
from fewstep.math.schedules import timesteps
from fewstep.trajectories import load_steps, load_subsample
from stages import _common

HOLDOUT_SEED = 2_000_000


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMSE of the images as they would be shown (clamped to [-1, 1])."""
    return metrics.rmse(a.clamp(-1, 1).cpu().numpy(), b.clamp(-1, 1).cpu().numpy())


def main() -> None:
    ap = _common.parser(__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--models", default="models")
    ap.add_argument("--trajectories", default="trajectories")
    ap.add_argument("--out", default="schedulers")
    ap.add_argument("--metrics", default="metrics/olss")
    args = ap.parse_args()
    name, n = args.model, args.steps
    with _common.clear_errors(f"fit_olss@{name}-{n}") as rec:
        p, device = _common.setup(args)
        op = p.olss
        tdir = Path(args.trajectories) / name
        tmeta = storage.read_json(tdir / "meta.json")
        den = models.load_denoiser(Path(args.models) / name, device)
        if tmeta["model_weights_sha256"] != den.config["weights_sha256"]:
            raise FileNotFoundError(f"{tdir} was collected from another version of {name}; re-run collect_trajectories")
        t_path = tmeta["timesteps"]
        N = len(t_path)
        t0 = time.perf_counter()
        X, E = load_subsample(tdir, op.max_elements, seed=p.base.seed)
        ps = search_path(X, E, min(n, N), iters=op.bisection_iters)
        open_loop = fit_weights(X, E, ps.path, t_path, op.ridge)
        fit_seconds = time.perf_counter() - t0
        lineage = {"model": name, "model_weights_sha256": den.config["weights_sha256"],
                   "trajectories": str(tdir), "reference_steps": N, "fit_seeds": len(tmeta["seeds"]),
                   "elements": int(X.shape[1]), "path_note": ps.note, "D": ps.D, "ridge": op.ridge,
                   "schedule": den.config["schedule"], "parameterization_basis": "x"}
        open_loop.meta = {**lineage, "variant": "open-loop"}
        uni = fit_weights(X, E, uniform_path(N, min(n, N)), t_path, op.ridge)
        uni.meta = {**lineage, "variant": "olss-p", "path_note": "uniform"}
        best = open_loop
        if op.closed_loop:
            full = list(load_steps(tdir, ps.path[1:] + [N, 0]))
            targets, x_T = full[:-1], full[-1]
            best = refit_closed_loop(den, x_T.to(device), [t.to(device) for t in targets], open_loop, op.ridge)
            best.meta = {**lineage, "variant": "closed-loop"}
        out = Path(args.out) / name
        variants = {f"olss-{n}": best, f"olss-open-{n}": open_loop, f"olss-p-{n}": uni}
        if op.ridge_variant > 0:  # beyond the paper: the searched path, open loop, with a small ridge
            ridged = fit_weights(X, E, ps.path, t_path, op.ridge_variant)
            ridged.meta = {**lineage, "variant": "ridge", "ridge": op.ridge_variant}
            variants[f"olss-ridge-{n}"] = ridged
        for fname, sched in variants.items():
            sched.validate()
            storage.atomic_write_bytes(out / f"{fname}.json", sched.to_json().encode())

        # held-out check: RMSE to the full-step reference from the same noise
        size = p.base.image_size
        noise = PerImageNoise(range(HOLDOUT_SEED, HOLDOUT_SEED + op.n_holdout), device)
        x_T = noise.randn(3, size, size)
        with torch.no_grad():
            ref = sample_ddim(den, x_T, t_path, clip=False)
            res = {"ddim": rmse(sample_ddim(den, x_T, timesteps(den.schedule.T, n), clip=False), ref)}
            for label, sched in (("olss", best), ("olss_open", open_loop), ("olss_p", uni),
                                 ("olss_ridge", variants.get(f"olss-ridge-{n}"))):
                if sched is not None:
                    res[label] = rmse(sample_olss(den, x_T, sched, clip=False), ref)
        metrics = {"model": name, "steps": n, "reference_steps": N, "path": ps.path, "timesteps": best.timesteps,
                   "path_note": ps.note, "D": ps.D, "fit_seconds": fit_seconds, "max_cond": max(open_loop.cond),
                   "rmse_vs_full_step": res, "holdout_seeds": op.n_holdout, "search_stats": ps.stats}
        storage.write_json(Path(args.metrics) / f"{name}-{n}.json", metrics)
        rec.log_metrics(metrics)
        rec.log_history("fit_error", list(enumerate(best.fit_mse)))
        rec.log_artifact(out / f"olss-{n}.json")
        print(f"fit_olss@{name}-{n}: path {ps.path} ({ps.note}); held-out RMSE "
              + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))


if __name__ == "__main__":
    main()
