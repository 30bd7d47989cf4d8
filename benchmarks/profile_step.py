"""Where a teacher training step and a sampling step spend their time (torch.profiler).

Builds the teacher the params describe (``--profile`` merged, e.g. gpu), runs ``--warmup`` untimed
and ``--steps`` profiled training steps of the pipeline's own loss (fewstep.train.teacher
.diffusion_loss: batch draw, noising, forward under bf16 autocast on CUDA, weighted loss,
backward, AdamW), then ``--steps`` DDIM steps at the sampling batch, and prints the operators that
took the most time (self time; CUDA time on a GPU) with their share, plus the model FLOPs
utilisation of the training step when ``--peak-tflops`` is given.

    python benchmarks/profile_step.py                          # CPU default
    python benchmarks/profile_step.py --profile gpu --peak-tflops 989   # on an H100
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fewstep.budget import TRAIN_FORWARDS, unet_gflops
from fewstep.config import load_params
from fewstep.math.ddim import sample_ddim
from fewstep.math.losses import DEFAULT_WEIGHTING
from fewstep.math.param import NetDenoiser
from fewstep.math.schedules import timesteps
from fewstep.nets.unet import UNet
from fewstep.train.loop import step_seed
from fewstep.train.teacher import diffusion_loss, schedule_of

ROOT = Path(__file__).resolve().parents[1]


def table(prof, cuda: bool, top: int) -> str:
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    avgs = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in avgs) or 1.0
    lines = ["| op | calls | self ms | share |", "|---|---:|---:|---:|"]
    for e in avgs[:top]:
        t = getattr(e, key)
        lines.append(f"| {e.key} | {e.count} | {t / 1e3:.1f} | {t / total:.1%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--profile", default=None)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sample-batch", type=int, default=256)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak (H100 SXM bf16 dense: 989)")
    args = ap.parse_args()
    p = load_params(args.params, args.profile)
    dev = torch.device("cuda" if torch.cuda.is_available() and p.base.device != "cpu" else "cpu")
    cuda = dev.type == "cuda"
    size, tp = p.base.image_size, p.teacher
    torch.manual_seed(0)
    net = UNet(tp.net.unet_config(size)).to(dev)
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    sch = schedule_of(p)
    data = torch.randint(0, 256, (4096, 3, size, size), dtype=torch.uint8, device=dev)
    weighting = tp.weighting or DEFAULT_WEIGHTING[tp.parameterization]  # as train_teacher resolves it
    loss_fn = diffusion_loss(data, sch, tp.parameterization, weighting, tp.batch_size, tp.hflip)
    opt = torch.optim.AdamW(net.parameters(), lr=tp.lr)

    def train_step(k: int) -> None:
        gen = torch.Generator(device=dev).manual_seed(step_seed(0, k))
        opt.zero_grad(set_to_none=True)
        loss_fn(net, gen).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), tp.grad_clip)
        opt.step()

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    for k in range(args.warmup):
        train_step(k)
    sync()
    t0 = time.perf_counter()
    for k in range(args.steps):
        train_step(args.warmup + k)
    sync()
    sec = (time.perf_counter() - t0) / args.steps
    with torch.profiler.profile(activities=acts) as prof:
        for k in range(args.steps):
            train_step(k)
        sync()
    g = unet_gflops(tp, size)
    tflops = tp.batch_size * TRAIN_FORWARDS * g / sec / 1e3
    mfu = f", MFU {tflops / args.peak_tflops:.1%} of {args.peak_tflops:g} TFLOP/s" if args.peak_tflops else ""
    print(f"# {dev}, torch threads {torch.get_num_threads()}, teacher P={tp.net.patch_size} {size}x{size}, "
          f"batch {tp.batch_size}: {1e3 * sec:.1f} ms/step, {tp.batch_size / sec:.0f} img/s, "
          f"{g:.3f} GFLOPs/forward -> {tflops:.3f} TFLOP/s{mfu}")
    print(table(prof, cuda, args.top))

    den = NetDenoiser(net.eval(), sch, tp.parameterization)
    x = torch.randn(args.sample_batch, 3, size, size, device=dev)
    steps = timesteps(sch.T, args.steps)
    with torch.no_grad():
        sample_ddim(den, x, steps[:2])
        sync()
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=acts) as prof:
            sample_ddim(den, x, steps)
            sync()
        sec = (time.perf_counter() - t0) / args.steps
    print(f"\n# DDIM sampling, batch {args.sample_batch}: {1e3 * sec:.1f} ms/step, "
          f"{args.sample_batch / sec:.0f} image-steps/s (profiler on)")
    print(table(prof, cuda, args.top))


if __name__ == "__main__":
    main()
