"""Sampler x NFE table: FD, KID, RMSE, PSNR, NFE, images/s for the trained models and schedulers.

Rows come from fewstep.evaluation.build_rows (the teacher with DDIM, OLSS variants, distilled
students, diffusers peers) and are scored by run_row / score, exactly as the evaluate stage does:
FD/KID in the evaluator's feature space against the training split, RMSE/PSNR against the
teacher's full-step DDIM sample from the same noise. images/s is measured per row at --batch-size
(1000 on CUDA, after one warm-up batch per row; on CPU a small default configuration).

    python benchmarks/samplers.py --models models --schedulers schedulers            # GPU profile
    python benchmarks/samplers.py --models /work/main/models --schedulers /work/main/schedulers \\
        --n 100 --nfe 4 8                                                             # CPU, small
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch

from fewstep import samplers
from fewstep.config import load_params
from fewstep.evaluation import Row, build_rows, run_row, score
from fewstep.models import resolve_device
from fewstep.train.evaluator import features, load_evaluator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="evaluate section: seeds, peers, reference steps")
    ap.add_argument("--profile", default=None, help="merge profiles/NAME.yaml over the params")
    ap.add_argument("--models", default="models")
    ap.add_argument("--schedulers", default="schedulers")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n", type=int, default=None, help="images per row (default: evaluate.n_samples on CUDA, 100 on CPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 1000 on CUDA, 100 on CPU")
    ap.add_argument("--nfe", type=int, nargs="+", default=None,
                    help="NFE for teacher DDIM and peers (default: evaluate.ddim_steps / peer_steps on CUDA, 4 8 on CPU)")
    ap.add_argument("--only", default=None, help="regex: keep rows whose name matches")
    args = ap.parse_args()

    p = load_params(args.params, args.profile)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    n = args.n or (p.evaluate.n_samples if cuda else 100)
    bs = args.batch_size or (1000 if cuda else 100)
    ep = p.evaluate
    if args.nfe or not cuda:  # the CPU default: no eta family, DDIM and peers at a few NFE only
        nfe = args.nfe or [4, 8]
        ep = ep.model_copy(update={"ddim_steps": nfe, "peer_steps": nfe, "eta_steps": [], "sigma_hat": False})
    evaluator, stats = load_evaluator(Path(args.models) / "evaluator", device)
    rows, dens = build_rows(Path(args.models), Path(args.schedulers), ep, device)
    if args.only:
        rows = [r for r in rows if re.search(args.only, r.name)]
    teacher = dens["teacher"]
    shape = teacher.card.image_shape
    seeds = list(range(ep.seed, ep.seed + n))
    n_ref = min(ep.reference_steps, teacher.schedule.T)
    ddim = samplers.get("ddim")
    ref_row = Row("reference", ddim.family({}), "teacher", ddim.nfe(n_ref), ddim.bind(teacher, steps=n_ref))
    t0 = time.perf_counter()
    reference, _ = run_row(ref_row, seeds, shape, bs, device)
    print(f"reference: teacher DDIM {n_ref} steps, {n} images, {time.perf_counter() - t0:.1f} s")

    print("\n| sampler | NFE | FD | KID (x1e3) | RMSE | PSNR | GFLOPs/img | images/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in sorted(rows, key=lambda r: (r.nfe, r.name)):
        # warm-up (imports, kernels, cuDNN autotuning, allocator) so images/s times the sampling only
        run_row(row, seeds[: min(bs, n) if cuda else 2], shape, bs, device)
        images, ips = run_row(row, seeds, shape, bs, device)
        feats = features(evaluator, images.to(device) if cuda else images)
        r = score(feats, images, reference, stats, ep.kid_subsets, ep.seed)
        print(f"| {row.name} | {row.nfe} | {r['fd']:.3f} | {1e3 * r['kid']:.2f} ± {1e3 * r['kid_se']:.2f} | "
              f"{r['rmse']:.4f} | {r['psnr']:.2f} | {row.gflops:.3f} | {ips:.0f} |", flush=True)
    dev = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{n} images per row (FD is comparable only at equal n), batch {bs}, {dev}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
