"""Per-step training time of candidate teacher nets at 32x32 against the CPU default's net (profile cpu-hour).

Every candidate runs the project's own teacher step (fewstep.train.teacher.diffusion_loss: v-prediction,
SNR+1 weighting, class-conditional with label dropout 0.1, AdamW) on random uint8 images; the reference
is the CPU default teacher's net (P=2, 32 channels, mult [1, 2], one res block) at 16x16, batch 64.
Repetitions are interleaved round-robin, so on a shared machine every net sees the same load and the
ratios to the reference hold even where the milliseconds do not. Convert to an uncontended 2-thread
time with a measured reference: `--ref-ms` (the CPU default's step alone at 2 threads: 174 ms on the
project's AMD EPYC) times the ratio.

    python benchmarks/cpu_hour_nets.py --threads 1 --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fewstep.math.schedules import make_schedule
from fewstep.nets.unet import UNet, UNetConfig, count_params
from fewstep.train.teacher import diffusion_loss

REF = ("default@16", dict(image_size=16, patch_size=2, channels=32, channel_mult=(1, 2), num_res_blocks=1,
                          attn_resolutions=()), 64)
CANDIDATES = [
    ("c64-122-r1", dict(image_size=32, patch_size=2, channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
                        attn_resolutions=()), 64),
    ("c64-122-r2", dict(image_size=32, patch_size=2, channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
                        attn_resolutions=()), 64),
    ("c64-122-r2-a8", dict(image_size=32, patch_size=2, channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
                           attn_resolutions=(8,)), 64),
    ("c96-122-r1", dict(image_size=32, patch_size=2, channels=96, channel_mult=(1, 2, 2), num_res_blocks=1,
                        attn_resolutions=()), 64),
    ("c48-122-r2", dict(image_size=32, patch_size=2, channels=48, channel_mult=(1, 2, 2), num_res_blocks=2,
                        attn_resolutions=()), 64),
    ("c64-12-r2", dict(image_size=32, patch_size=2, channels=64, channel_mult=(1, 2), num_res_blocks=2,
                       attn_resolutions=()), 64),
    ("c96-12-r2-p4", dict(image_size=32, patch_size=4, channels=96, channel_mult=(1, 2), num_res_blocks=2,
                          attn_resolutions=()), 64),
    ("c32-12-r1", dict(image_size=32, patch_size=2, channels=32, channel_mult=(1, 2), num_res_blocks=1,
                       attn_resolutions=()), 64),
    ("c48-12-r1", dict(image_size=32, patch_size=2, channels=48, channel_mult=(1, 2), num_res_blocks=1,
                       attn_resolutions=()), 64),
    ("c32-122-r1", dict(image_size=32, patch_size=2, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                        attn_resolutions=()), 64),
    ("c48-122-r1", dict(image_size=32, patch_size=2, channels=48, channel_mult=(1, 2, 2), num_res_blocks=1,
                        attn_resolutions=()), 64),
    ("c64-12-r1-p4", dict(image_size=32, patch_size=4, channels=64, channel_mult=(1, 2), num_res_blocks=1,
                          attn_resolutions=()), 64),
    ("c64-12-r2-p4", dict(image_size=32, patch_size=4, channels=64, channel_mult=(1, 2), num_res_blocks=2,
                          attn_resolutions=()), 64),
]


def make_step(cfg: dict, batch: int, num_classes: int = 10):
    size = cfg["image_size"]
    net = UNet(UNetConfig(**cfg, head_dim=32, dropout=0.0, num_classes=num_classes)).train()
    data = torch.randint(0, 256, (1024, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (1024,))
    loss_fn = diffusion_loss(data, make_schedule("cosine", 1024), "v", "snr+1", batch, True, labels=labels,
                             num_classes=num_classes, p_uncond=0.1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        loss = loss_fn(net, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return net, step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5, help="timed rounds; each round times every net once")
    ap.add_argument("--steps", type=int, default=3, help="steps per timing")
    ap.add_argument("--ref-ms", type=float, default=174.0, help="the reference's step alone at 2 threads")
    ap.add_argument("--only", nargs="*", help="candidate names to run (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    nets = [REF] + [c for c in CANDIDATES if not args.only or c[0] in args.only]
    steps = {}
    for name, cfg, batch in nets:
        net, step = make_step(cfg, batch)
        step()  # warm-up
        steps[name] = (step, count_params(net), batch)
    times: dict[str, list[float]] = {name: [] for name, _, _ in nets}
    for _ in range(args.reps):
        for name, _, _ in nets:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[name][0]()
            times[name].append((time.perf_counter() - t0) / args.steps)
    ref = statistics.median(times[REF[0]])
    print(f"| net | params | batch | ms/step ({args.threads} thr, median) | ratio to {REF[0]} | "
          f"projected ms/step alone (2 thr, ref {args.ref_ms:g}) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, _, _ in nets:
        m = statistics.median(times[name])
        print(f"| {name} | {steps[name][1] / 1e6:.2f}M | {steps[name][2]} | {1e3 * m:.0f} | {m / ref:.2f} | "
              f"{args.ref_ms * m / ref:.0f} |", flush=True)


if __name__ == "__main__":
    main()
