"""The OLSS variants side by side: the paper's (basis = the network's own outputs) and the beyond-paper
ones (x-hat basis, closed loop, ridge), their searched paths and held-out RMSE to the full-step DDIM result.

    python benchmarks/olss_variants.py mixture [--kind eps|v] [--steps 4 6]
        the analytic 8-mode mixture of tests/unit/test_olss.py (cosine T=1024, 64-step reference):
        first in memory in float64 (32 fitting, 64 held-out trajectories: the issue-18 setting), then
        through fit_olss on stored (float32) trajectories, as the stage runs it
    python benchmarks/olss_variants.py model DIR [--steps 3 4 6] [--n-fit 64] [--reference-steps 64]
        fit_olss on a model dir (e.g. models/teacher): trajectories collected into a temp dir
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fewstep.config import OLSSParams, TrajectoryParams  # noqa: E402
from fewstep.math.ddim import sample_ddim  # noqa: E402
from fewstep.math.olss import fit_weights, sample_olss, search_path  # noqa: E402
from fewstep.math.schedules import cosine_schedule, timesteps  # noqa: E402
from fewstep.olss_fit import fit_olss  # noqa: E402
from fewstep.testing import GMMDenoiser  # noqa: E402
from fewstep.trajectories import collect_model, write_shards  # noqa: E402

SHAPE = (3, 4, 4)


def report(fit, n: int, seconds: float) -> None:
    m = fit.metrics
    print(f"  n={n}: paths {{x: {m['search']['x']['path']}, output: {m['search']['output']['path']}}}; held-out RMSE "
          + ", ".join(f"{k} {v:.4f}" for k, v in m["rmse_vs_full_step"].items())
          + f"; olss-{n} = {m['chosen']}-{n} ({seconds:.1f} s)")


def mixture(kind: str, steps: list[int]) -> None:
    sch = cosine_schedule(1024)
    g = torch.Generator().manual_seed(0)
    modes = torch.rand(8, *SHAPE, generator=g, dtype=torch.float64) * 1.6 - 0.8
    den = GMMDenoiser(sch, modes, s0=0.15, kind=kind)
    t_path = timesteps(sch.T, 64)
    print(f"1/alpha_T on the cosine table (T=1024, logsnr_min=-20): {1 / sch.alpha[sch.T]:.4g}")
    xs, es, os_ = [], [], []

    def cb(d: dict) -> None:
        xs.append(d["z"])
        es.append(d["x_hat"])
        os_.append(d["pred"])

    x0 = sample_ddim(den, torch.randn(32, *SHAPE, generator=g, dtype=torch.float64), t_path, clip=False, callback=cb)
    X, bases = torch.stack(xs + [x0]), {"x": torch.stack(es), "output": torch.stack(os_)}
    x_T = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    ref = sample_ddim(den, x_T, t_path, clip=False)
    print(f"mixture ({kind} outputs), in memory, float64, teacher-forced search and fit on each basis:")
    for n in steps:
        for basis, B in bases.items():
            ps = search_path(X, B, n)
            sched = fit_weights(X, B, ps.path, t_path, basis=basis)
            err = float((sample_olss(den, x_T, sched, clip=False) - ref).pow(2).mean().sqrt())
            big = max(abs(w) for r in sched.we for w in r)
            print(f"  n={n} basis {basis:6s}: path {ps.path}, held-out RMSE {err:.4f}, max |we| {big:.3g}")
    den.card = types.SimpleNamespace(weights_sha256="mixture", image_shape=SHAPE,
                                     schedule=types.SimpleNamespace(to_dict=lambda: {"kind": "cosine", "T": sch.T}))
    with tempfile.TemporaryDirectory() as d:
        write_shards(Path(d), den, range(32), SHAPE, t_path, 32, 32, torch.device("cpu"),
                     {"model_weights_sha256": "mixture"}, progress=False)
        print(f"mixture ({kind} outputs), fit_olss on stored trajectories (seeds 0..31, held-out 64):")
        for n in steps:
            t0 = time.perf_counter()
            report(fit_olss(den, "mixture", Path(d), n, OLSSParams(n_holdout=64), 0, torch.device("cpu")), n,
                   time.perf_counter() - t0)


def model(path: Path, steps: list[int], n_fit: int, reference_steps: int) -> None:
    from fewstep import models

    den = models.load_denoiser(path)
    with tempfile.TemporaryDirectory() as d:
        n_ref = collect_model(den, path.name, TrajectoryParams(n_fit=n_fit, reference_steps=reference_steps,
                                                               shard_size=32, batch_size=32),
                              Path(d), torch.device("cpu"), progress=False)
        print(f"{path} ({den.kind} outputs), {n_ref}-step reference, {n_fit} fitting seeds, 64 held-out:")
        for n in steps:
            t0 = time.perf_counter()
            report(fit_olss(den, path.name, Path(d), n, OLSSParams(n_holdout=64), 0, torch.device("cpu")), n,
                   time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    mx = sub.add_parser("mixture")
    mx.add_argument("--kind", choices=["eps", "v"], default="eps")
    mx.add_argument("--steps", type=int, nargs="+", default=[4, 6])
    md = sub.add_parser("model")
    md.add_argument("dir", type=Path)
    md.add_argument("--steps", type=int, nargs="+", default=[3, 4, 6])
    md.add_argument("--n-fit", type=int, default=64)
    md.add_argument("--reference-steps", type=int, default=64)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.what == "mixture":
        mixture(a.kind, a.steps)
    else:
        model(a.dir, a.steps, a.n_fit, a.reference_steps)


if __name__ == "__main__":
    main()
