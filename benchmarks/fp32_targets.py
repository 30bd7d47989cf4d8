"""What float32 teacher targets buy: distillation targets and OLSS fits from a bf16 teacher vs a float32 one.

On CUDA the teacher's forward runs under bf16 autocast unless it is in ``full_precision`` (the
training path since issue 18.4). This measures the difference on the pipeline's own models. On the
CPU the GPU path is emulated (``NetDenoiser.cpu_autocast``: torch.autocast("cpu", bfloat16)); with
``--device cuda`` it is the real one, and the forward times show what float32 costs there.

Table 1, per distillation round (the model as teacher, 2N -> N steps, images from the training
split, every student step i = 1..N equally often, one noise draw per image): relative RMS
difference of the teacher's first x prediction and of the PD target x~ (Algorithm 2), and the
largest absolute target difference (images in [-1, 1]). Table 2: OLSS fitted teacher-forced (the
paper's basis, the network's outputs, and the x-hat basis) on trajectories collected in bf16 vs in
float32, scored in float32 on held-out seeds against the float32 full-step reference (RMSE as in
fit_olss).

    python benchmarks/fp32_targets.py --models models --data data/prepared
    python benchmarks/fp32_targets.py --device cuda --n 512
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import numpy as np
import torch

from fewstep import models, storage
from fewstep.math import metrics as M
from fewstep.math.ddim import PerImageNoise, sample_ddim
from fewstep.math.distill import distill_target
from fewstep.math.olss import fit_weights, sample_olss, search_path
from fewstep.math.param import full_precision, predict_x_eps, set_autocast
from fewstep.math.schedules import timesteps


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def forward_ms(den, z: torch.Tensor, t: torch.Tensor, fp32: bool, reps: int = 3) -> float:
    def once() -> None:
        with torch.no_grad(), (full_precision(den) if fp32 else contextlib.nullcontext()):
            den(z, t)
    once()
    if z.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        once()
    if z.device.type == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / reps


def target_row(name: str, den, x: torch.Tensor, N: int, seed: int) -> dict:
    """Round 2N -> N with ``den`` as the teacher, bf16 vs float32 teacher."""
    T = den.schedule.T
    dt = T // (2 * N)
    g = torch.Generator().manual_seed(seed)
    i = (torch.arange(x.shape[0]) % N + 1).to(x.device)  # every student step equally often
    t = 2 * dt * i
    eps = torch.randn(x.shape, generator=g).to(x.device)
    a, s = den.schedule.at(t, torch.float32)
    z = a.view(-1, 1, 1, 1) * x + s.view(-1, 1, 1, 1) * eps
    with torch.no_grad():
        x1_mixed = predict_x_eps(den, z, t)[0]
        with full_precision(den):
            x1_fp32 = predict_x_eps(den, z, t)[0]
    tgt_mixed = distill_target(den, z, t, dt, fp32=False)
    tgt_fp32 = distill_target(den, z, t, dt)
    return {"model": name, "round": f"{2 * N}->{N}", "dt": dt, "x_hat_rel": rel(x1_mixed, x1_fp32),
            "target_rel": rel(tgt_mixed, tgt_fp32), "target_max_abs": float((tgt_mixed - tgt_fp32).abs().max()),
            "ms_mixed": forward_ms(den, z, t, False), "ms_fp32": forward_ms(den, z, t, True)}


def trajectories(den, seeds: range, shape: tuple[int, ...], t_path: list[int], fp32: bool,
                 device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """X (N+1, M) latents and the two OLSS bases (N, M): "x" (x-hat) and "output" (the network's own)."""
    noise = PerImageNoise(seeds, device)
    xs, es, os_ = [], [], []

    def cb(d: dict) -> None:
        xs.append(d["z"].float().cpu().flatten(1))
        es.append(d["x_hat"].float().cpu().flatten(1))
        os_.append(d["pred"].float().cpu().flatten(1))

    with torch.no_grad(), (full_precision(den) if fp32 else contextlib.nullcontext()):
        x0 = sample_ddim(den, noise.randn(*shape), t_path, clip=False, callback=cb)
    # (steps, B * C * H * W): every element of every image is one least-squares sample
    X = torch.stack(xs + [x0.float().cpu().flatten(1)]).flatten(1)
    return X, {"x": torch.stack(es).flatten(1), "output": torch.stack(os_).flatten(1)}


def olss_rows(den, shape, ref_steps: int, n_fit: int, n_holdout: int, steps: list[int],
              device: torch.device) -> list[dict]:
    t_path = timesteps(den.schedule.T, ref_steps)
    fits = {}
    for label, fp32 in (("bf16", False), ("fp32", True)):
        fits[label] = trajectories(den, range(1_000_000, 1_000_000 + n_fit), shape, t_path, fp32, device)
    traj_rel = rel(fits["bf16"][0][-1], fits["fp32"][0][-1])
    noise = PerImageNoise(range(2_000_000, 2_000_000 + n_holdout), device)
    x_T = noise.randn(*shape)
    rows = []
    with torch.no_grad(), full_precision(den):
        ref = sample_ddim(den, x_T, t_path, clip=False)
        for basis in ("output", "x"):  # olss-paper-N's basis, olss-open-N's
            for n in steps:
                row = {"basis": basis, "steps": n, "trajectory_x0_rel": traj_rel}
                for label, (X, E) in fits.items():
                    ps = search_path(X, E[basis], n)
                    sched = fit_weights(X, E[basis], ps.path, t_path, basis=basis)
                    out = sample_olss(den, x_T, sched, clip=False)
                    row[f"rmse_{label}"] = M.rmse(out.clamp(-1, 1).cpu().numpy(), ref.clamp(-1, 1).cpu().numpy())
                    row[f"path_{label}"] = ps.path
                rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="models", help="the pipeline's models dir (teacher, student-*)")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--n", type=int, default=256, help="training images per round")
    ap.add_argument("--rounds", type=int, nargs="+", default=[32, 16, 8],
                    help="student steps N of the rounds with the teacher as teacher (students add their own round)")
    ap.add_argument("--olss-ref-steps", type=int, default=64)
    ap.add_argument("--olss-fit", type=int, default=64, help="fitting trajectories (0: no OLSS table)")
    ap.add_argument("--olss-holdout", type=int, default=32)
    ap.add_argument("--olss-steps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images = storage.load_array(Path(args.data) / "train_images.npy")[: args.n]
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float().div(127.5).sub(1).to(device)
    mdir = Path(args.models)
    names = ["teacher"] + sorted((d.name for d in mdir.glob("student-*") if models.has_card(d)),
                                 key=lambda s: -int(s.split("-")[1]))
    rows = []
    for name in names:
        den = models.load_denoiser(mdir / name, device)
        if device.type == "cpu":
            set_autocast(den, True, cpu=True)  # emulate the CUDA path (bf16 autocast) on the CPU
        card = den.card
        for N in args.rounds if name == "teacher" else [card.sample_steps // 2]:
            if N >= 1 and den.schedule.T % (2 * N) == 0:
                rows.append(target_row(name, den, x, N, args.seed))
    mode = "CPU emulation of bf16 autocast" if device.type == "cpu" else "CUDA bf16 autocast"
    print(f"# distillation targets, bf16 teacher ({mode}) vs float32 teacher; {args.n} training images per round")
    print("| teacher | round | dt | x-hat rel. diff | target x~ rel. diff | target max abs diff | "
          "forward ms bf16 | forward ms fp32 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['round']} | {r['dt']} | {r['x_hat_rel']:.2e} | {r['target_rel']:.2e} | "
              f"{r['target_max_abs']:.2e} | {r['ms_mixed']:.1f} | {r['ms_fp32']:.1f} |")
    if args.olss_fit:
        den = models.load_denoiser(mdir / "teacher", device)
        if device.type == "cpu":
            set_autocast(den, True, cpu=True)
        res = olss_rows(den, den.card.image_shape, args.olss_ref_steps, args.olss_fit, args.olss_holdout,
                        args.olss_steps, device)
        print()
        print(f"# OLSS (teacher-forced fits: basis output = olss-paper, x = olss-open) on the teacher: "
              f"trajectories of {args.olss_fit} seeds x {args.olss_ref_steps} steps collected in bf16 vs float32; "
              f"held-out RMSE ({args.olss_holdout} seeds) to the float32 full-step result")
        print("| basis | steps | x0 rel. diff of the trajectories | held-out RMSE, fit on fp32 | "
              "fit on bf16 | path fp32 | path bf16 |")
        print("|---|---:|---:|---:|---:|---|---|")
        for r in res:
            print(f"| {r['basis']} | {r['steps']} | {r['trajectory_x0_rel']:.2e} | {r['rmse_fp32']:.5f} | "
                  f"{r['rmse_bf16']:.5f} | {r['path_fp32']} | {r['path_bf16']} |")


if __name__ == "__main__":
    main()
