"""OLSS fit time: path search + weight fit on full-step trajectories, printed as a table.

Trajectories come from the analytic Gaussian-mixture denoiser (fewstep.testing.GMMDenoiser), so the
benchmark needs no trained model: N-step deterministic DDIM for B images of 3xSxS, then for each n
the bisection path search (Algorithms 1-3) and the final float64 fit on a subsample of M elements.
The search solves its least squares through cached Gram systems (ProjectionCache); --svd times the
previous solver (one SVD least squares on the data per problem) instead.

    python benchmarks/olss_fit.py --ref-steps 1000 --images 256 --size 32 --steps 4 5 8 10
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fewstep import storage
from fewstep.math.ddim import sample_ddim
from fewstep.math.olss import fit_weights, search_path
from fewstep.math.schedules import cosine_schedule, timesteps
from fewstep.testing import GMMDenoiser


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref-steps", type=int, default=1000)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 5, 8, 10])
    ap.add_argument("--max-elements", type=int, default=262_144)
    ap.add_argument("--svd", action="store_true", help="search with one SVD per least-squares problem (old path)")
    ap.add_argument("--cache", default=None, help="safetensors file: load the trajectories from it, or save them there")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    sch = cosine_schedule(1024)
    modes = torch.rand(8, 3, args.size, args.size, generator=g, dtype=torch.float64) * 1.6 - 0.8
    den = GMMDenoiser(sch, modes, s0=0.15)
    t_path = timesteps(sch.T, args.ref_steps)
    x_T = torch.randn(args.images, 3, args.size, args.size, generator=g, dtype=torch.float32)
    # keep only a fixed subsample of elements per step: the full 1000-step reference does not fit in memory
    idx = torch.randperm(x_T[0].numel() * args.images, generator=g)[: args.max_elements]
    xs, es = [], []
    t0 = time.perf_counter()

    def cb(d):
        xs.append(d["z"].flatten()[idx].float())
        es.append(d["x_hat"].flatten()[idx].float())

    key = f"{args.ref_steps}-{args.images}-{args.size}-{args.max_elements}"
    if args.cache and Path(args.cache).exists():
        loaded = storage.load_tensors(args.cache)
        if storage.read_json(Path(args.cache).with_suffix(".json")).get("key") != key:
            raise SystemExit(f"{args.cache} holds trajectories for other arguments; delete it or pass another --cache")
        X, E, how = loaded["X"], loaded["E"], f"loaded from {args.cache}"
    else:
        x0 = sample_ddim(den, x_T, t_path, clip=False, callback=cb)
        X = torch.stack(xs + [x0.flatten()[idx].float()])
        E = torch.stack(es)
        how = "analytic denoiser"
        if args.cache:
            storage.save_tensors(args.cache, {"X": X, "E": E})
            storage.write_json(Path(args.cache).with_suffix(".json"), {"key": key})
    collect_s = time.perf_counter() - t0
    print(f"trajectories: {args.images} images x {len(t_path)} steps, {X.shape[1]} elements kept, "
          f"{collect_s:.1f} s ({how})")
    print(f"search solver: {'SVD on the data per problem' if args.svd else 'cached Gram (SVD fallback)'}")
    print("| n | path length | search s | fit s | total s | max cond | solves (gram / residual on data / SVD) | path |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for n in args.steps:
        t1 = time.perf_counter()
        ps = search_path(X, E, n, fast=not args.svd)
        t2 = time.perf_counter()
        sched = fit_weights(X, E, ps.path, t_path)
        t3 = time.perf_counter()
        st = ps.stats
        solves = f"{st['gram']} / {st['residual_on_data']} / {st['svd_ill_conditioned']}" if st else "all SVD"
        print(f"| {n} | {len(ps.path)} ({ps.note}) | {t2 - t1:.1f} | {t3 - t2:.2f} | {t3 - t1:.1f} | {max(sched.cond):.2e} | {solves} | {ps.path} |")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")


if __name__ == "__main__":
    main()
