"""Projected wall time of a profile, stage by stage, from its compute (fewstep.budget).

Counts every stage's network evaluations from the params (training images x 3, sampling forwards
x 1, float32 teacher-target / trajectory forwards x budget.FP32_FORWARD_COST), multiplies by each net's model FLOPs and divides by a sustained rate
calibrated on diffusers' DDPM CIFAR-10 UNet: by default the issue's H100 figure (1,760 training
images/s, bf16, eager, batch 128). A projection, not a measurement: it leaves out data loading,
checkpoints, process start and MLflow, and assumes every net runs at the peer's FLOP rate (small
nets and small batches will not), so real wall time is higher.

    python benchmarks/gpu_budget.py                          # profiles/gpu.yaml at the H100 rate
    python benchmarks/gpu_budget.py --profile gpu-full       # the research-scale GPU profile
    python benchmarks/gpu_budget.py --profile default --peer-images-per-s 0.8   # CPU default, a CPU rate
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fewstep import budget
from fewstep.config import load_params

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--profile", default="gpu", help="a profiles/<name>.yaml merged over --params; 'default' = none")
    ap.add_argument("--peer-images-per-s", type=float, default=budget.H100_PEER_TRAIN_IMAGES_PER_S,
                    help="the device's measured training images/s of the peer UNet (the calibration)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="for the peer's MFU (H100 SXM bf16 dense: 989)")
    args = ap.parse_args()
    p = load_params(args.params, args.profile)
    g_peer = budget.peer_gflops()
    rate = budget.rate_from_peer(args.peer_images_per_s, g_peer)
    work = budget.project(p)
    print(f"# profile {args.profile}, {p.base.image_size}x{p.base.image_size}; peer {g_peer:.2f} GFLOPs/forward, "
          f"{args.peer_images_per_s:g} train img/s -> {rate / 1e3:.1f} TFLOP/s sustained "
          f"(peer MFU {rate / 1e3 / args.peak_tflops:.1%} of {args.peak_tflops:g})")
    print(f"| stage | net | GFLOPs/img | train images | forward images | fp32 forward images "
          f"(x{budget.FP32_FORWARD_COST:g}) | PFLOP | projected min |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for w in work:
        print(f"| {w.stage} | {w.net} | {w.gflops:.3f} | {w.train:,} | {w.forward:,} | {w.fp32_forward:,} | "
              f"{w.gflop / 1e6:.2f} | "
              f"{w.gflop / rate / 60:.1f} |")
    stages = budget.by_stage(work)
    total = sum(stages.values())
    print()
    print("| stage | projected min | share |")
    print("|---|---:|---:|")
    for s, g in sorted(stages.items(), key=lambda kv: -kv[1]):
        print(f"| {s} | {g / rate / 60:.1f} | {g / total:.0%} |")
    print(f"| **total** | **{total / rate / 60:.1f}** | |")


if __name__ == "__main__":
    main()
