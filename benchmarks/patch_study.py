"""Cost of the patch-size study's networks on this machine: GFLOPs per call, parameters, training
ms/step and sampling images/s, for the teacher, every study.nets.p<P> net and both nets of each
split model, as params.yaml (plus --profile) builds them.

The last column projects each study stage's training time from the teacher's: measured ms/step
ratio x the stage's steps x ``--teacher-s-per-step`` (default: 253 s / 3000 steps, the CPU default
teacher's recorded time on 2 idle cores). On a shared, loaded machine absolute times are
unreliable; ratios taken in one process, interleaved, are much less so.

    python benchmarks/patch_study.py                    # CPU default, all P in 1, 2, 4, 8
    python benchmarks/patch_study.py --iters 3 --threads 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fewstep.config import load_params
from fewstep.evaluation import gflops_per_call
from fewstep.math.param import NetDenoiser
from fewstep.math.schedules import make_schedule
from fewstep.nets.unet import UNet, count_params

ROOT = Path(__file__).resolve().parents[1]


def nets(p) -> list[tuple[str, object, int]]:
    """(name, TeacherParams, steps) for the teacher, every study patch size and each split side."""
    out = [("teacher", p.teacher, p.teacher.steps)]
    for P in (1, 2, 4, 8):
        try:
            tp = p.study.teacher_for(p.teacher, P)
            tp.net.unet_config(p.base.image_size)
        except ValueError as e:
            print(f"# skip P={P}: {e}")
            continue
        out.append((f"teacher-p{P}", tp, tp.steps))
    for name, sp in p.split.models.items():
        for side in ("high", "low"):
            tp = sp.side(p.teacher, side)
            out.append((f"{name} {side}", tp, tp.steps))
    return out


def timed(fn, iters: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--profile", default=None)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--sample-batch", type=int, default=250)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--teacher-s-per-step", type=float, default=253 / 3000)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    p = load_params(args.params, args.profile)
    size = p.base.image_size
    sch = make_schedule(p.schedule.kind, p.schedule.T)
    rows = []
    for name, tp, steps in nets(p):
        torch.manual_seed(0)
        net = UNet(tp.net.unet_config(size))
        shape = (net.cfg.in_channels, net.cfg.image_size, net.cfg.image_size)  # what a model card would state
        g = gflops_per_call(NetDenoiser(net, sch, tp.parameterization), shape)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        xb, tb = torch.randn(tp.batch_size, *shape), torch.rand(tp.batch_size)

        def step():
            loss = (net(xb, tb) - xb).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        net.train()
        train_s = timed(step, args.iters)
        net.eval()
        xs, ts = torch.randn(args.sample_batch, *shape), torch.rand(args.sample_batch)
        with torch.no_grad():
            infer_s = timed(lambda: net(xs, ts), max(1, args.iters // 2))
        rows.append((name, tp.net.patch_size, tp.net.channels, count_params(net), g, tp.batch_size, train_s,
                     args.sample_batch / infer_s, steps))
    base = rows[0][6]
    print(f"# {size}x{size}, torch threads {torch.get_num_threads()}, {args.iters} timed steps each")
    print("| net | P | ch | params | GFLOPs/call | batch | train ms/step | x teacher | sample img/s | steps | "
          "projected train s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, P, ch, n, g, bs, ts, ips, steps in rows:
        print(f"| {name} | {P} | {ch} | {n / 1e6:.2f}M | {g:.4f} | {bs} | {1e3 * ts:.0f} | {ts / base:.2f} | "
              f"{ips:.0f} | {steps} | {steps * args.teacher_s_per_step * ts / base:.0f} |")


if __name__ == "__main__":
    main()
