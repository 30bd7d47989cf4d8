"""Training throughput of fewstep's patched UNet against the diffusers DDPM CIFAR-10 UNet.

What it measures: images/s of one full training step -- forward, MSE loss against random
targets, backward, AdamW step (lr 1e-4) -- at a fixed batch of 32x32 RGB images, for

  * fewstep's ``UNet`` with patch size P = 1, 2, 4 (``--sizes``). The "large" config
    (channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention at 16x16) has about
    38.3M parameters at P=1, i.e. at least as many as the peer. P > 1 keeps the same widths
    but drops the coarsest levels whose grid would fall below 4x4, and keeps attention at the
    same feature-map size (16 tokens per side) where that size still exists, so the P > 1
    nets have fewer parameters (their counts are printed);
  * diffusers' ``UNet2DModel`` in the DDPM CIFAR-10 configuration (google/ddpm-cifar10-32,
    about 35.7M parameters), the peer every ratio is taken against.

Both nets use dropout 0.1 (as in DDPM on CIFAR-10), the same batch, loss and optimizer. On CUDA
the step runs under bf16 autocast with ``torch.cuda.synchronize()`` around the timed region;
on the CPU it runs in float32 without autocast. ``--warmup`` untimed steps (which also absorb
``--compile`` compilation) precede ``--iters`` timed steps; sec/step is their mean.

Run from the repository root:

    python benchmarks/train_throughput.py --batch 128
    python benchmarks/train_throughput.py --batch 128 --channels-last --compile --json out.json
    python benchmarks/train_throughput.py --batch 8 --iters 2 --warmup 1   # quick CPU check
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers is imported: never reach the Hub

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.nets.unet import UNet, UNetConfig, count_params

IMAGE_SIZE = 32
IN_CHANNELS = 3
DROPOUT = 0.1
LR = 1e-4
PEER_NAME = "diffusers UNet2DModel (DDPM CIFAR-10)"
PEER_PARAMS_EXPECTED = 35_746_307  # google/ddpm-cifar10-32

# fewstep "large" config at P=1; P > 1 derives from it (see large_config).
BASE_CHANNELS = 128
BASE_CHANNEL_MULT = (1, 2, 2, 2)
BASE_NUM_RES_BLOCKS = 2
BASE_ATTN_RESOLUTIONS = (16,)
MIN_GRID = 4

# Forward of a model on (x, u) with u uniform in [0, 1) of shape (B,); each wrapper maps u to
# the time input its net expects.
Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Result:
    model: str
    patch_size: int | None
    params: int | None
    images_per_s: float | None = None
    sec_per_step: float | None = None
    ratio_vs_peer: float | None = None
    note: str = ""


def large_config(patch_size: int) -> UNetConfig:
    """The P=1 large config, with the levels whose grid would drop below MIN_GRID removed."""
    grid = IMAGE_SIZE // patch_size
    levels = 0
    while levels < len(BASE_CHANNEL_MULT) and grid // 2**levels >= MIN_GRID:
        levels += 1
    if levels == 0:
        raise ValueError(f"patch size {patch_size} gives a {grid}x{grid} grid, below {MIN_GRID}x{MIN_GRID}")
    sizes = {grid // 2**i for i in range(levels)}
    return UNetConfig(
        image_size=IMAGE_SIZE,
        in_channels=IN_CHANNELS,
        patch_size=patch_size,
        channels=BASE_CHANNELS,
        channel_mult=BASE_CHANNEL_MULT[:levels],
        num_res_blocks=BASE_NUM_RES_BLOCKS,
        attn_resolutions=tuple(r for r in BASE_ATTN_RESOLUTIONS if r in sizes),
        dropout=DROPOUT,
    )


def matched_config(patch_size: int, min_params: int) -> UNetConfig:
    """``large_config(patch_size)`` widened (base channels in steps of 32) until it has at least
    ``min_params`` parameters: the goal compares throughput at no fewer parameters than the peer."""
    cfg = large_config(patch_size)
    while count_params(UNet(cfg)) < min_params:
        cfg = dataclasses.replace(cfg, channels=cfg.channels + 32)
    return cfg


def build_peer() -> nn.Module:
    """diffusers' UNet2DModel with the google/ddpm-cifar10-32 config (no download)."""
    from fewstep.peers import ddpm_cifar10_unet

    return ddpm_cifar10_unet(DROPOUT)


def time_steps(
    model: nn.Module,
    forward: Forward,
    batch: int,
    warmup: int,
    iters: int,
    device: torch.device,
    channels_last: bool,
) -> float:
    """Mean seconds of one training step (forward, MSE loss, backward, AdamW step)."""
    cuda = device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    target = torch.randn(x.shape, generator=gen)
    u = torch.rand(batch, generator=gen)
    x, target = (a.to(device, memory_format=memory_format) for a in (x, target))
    u = u.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            out = forward(x, u)
        loss = F.mse_loss(out.float(), target)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


def bench(
    name: str,
    patch_size: int | None,
    build: Callable[[], nn.Module],
    make_forward: Callable[[nn.Module], Forward],
    args: argparse.Namespace,
    device: torch.device,
) -> Result:
    try:
        model = build()
    except ImportError as e:
        print(f"  {name}: not installed ({e})", flush=True)
        return Result(name, patch_size, None, note="not installed")
    params = count_params(model)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    run: nn.Module = torch.compile(model) if args.compile else model
    try:
        sec = time_steps(run, make_forward(run), args.batch, args.warmup, args.iters, device, args.channels_last)
    except torch.cuda.OutOfMemoryError:
        print(f"  {name}: out of memory at batch {args.batch}", flush=True)
        return Result(name, patch_size, params, note="OOM")
    finally:
        del run, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"  {name}: {params / 1e6:.2f}M params, {sec:.3f} s/step, {args.batch / sec:.1f} images/s", flush=True)
    return Result(name, patch_size, params, images_per_s=args.batch / sec, sec_per_step=sec)


def fewstep_forward(net: nn.Module) -> Forward:
    return lambda x, u: net(x, u)  # t: float in [0, 1]


def peer_forward(net: nn.Module) -> Forward:
    return lambda x, u: net(x, (u * 1000).long().clamp_(0, 999)).sample  # integer timesteps


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()}"


def markdown_table(results: list[Result]) -> str:
    def num(v: float | None, fmt: str) -> str:
        return format(v, fmt) if v is not None else "-"

    rows = [
        "| model | P | params (M) | images/s | vs peer | sec/step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ips = r.note if r.images_per_s is None and r.note else num(r.images_per_s, ".1f")
        ratio = f"{r.ratio_vs_peer:.2f}x" if r.ratio_vs_peer is not None else "-"
        rows.append(
            f"| {r.model} | {r.patch_size if r.patch_size is not None else '-'} "
            f"| {num(r.params / 1e6 if r.params is not None else None, '.2f')} "
            f"| {ips} | {ratio} | {num(r.sec_per_step, '.3f')} |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (absorb --compile)")
    p.add_argument("--iters", type=int, default=5, help="timed steps")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--sizes", default="1,2,4", help="comma-separated fewstep patch sizes")
    p.add_argument("--no-peer", action="store_true", help="skip the diffusers peer")
    p.add_argument("--no-matched", action="store_true",
                   help="skip the P > 1 nets widened to at least the peer's parameter count")
    p.add_argument("--channels-last", action="store_true", help="channels_last models and inputs")
    p.add_argument("--compile", action="store_true", help="torch.compile the models")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results here")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.batch < 1 or args.iters < 1 or args.warmup < 0:
        p.error("--batch and --iters must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        precision = "bf16 autocast"
    else:
        precision = f"float32, {torch.get_num_threads()} torch threads"
        print(f"torch threads: {torch.get_num_threads()}")
    print(
        f"training step, batch {args.batch}, {IMAGE_SIZE}x{IMAGE_SIZE}x{IN_CHANNELS}, {precision}"
        f"{', channels_last' if args.channels_last else ''}{', compiled' if args.compile else ''}, "
        f"warmup {args.warmup}, iters {args.iters}"
    )

    results: list[Result] = []
    peer: Result | None = None
    if not args.no_peer:
        peer = bench(PEER_NAME, None, build_peer, peer_forward, args, device)
        if peer.params is not None and peer.params != PEER_PARAMS_EXPECTED:
            print(f"  warning: peer has {peer.params:,} params, expected {PEER_PARAMS_EXPECTED:,}")
        results.append(peer)
    for P in args.sizes:
        cfg = large_config(P)
        print(
            f"  fewstep P={P}: grid {cfg.grid}, channel_mult={cfg.channel_mult}, "
            f"attn_resolutions={cfg.attn_resolutions} (+ mid-block attention)",
            flush=True,
        )
        results.append(bench("fewstep UNet", P, lambda cfg=cfg: UNet(cfg), fewstep_forward, args, device))
        if P > 1 and not args.no_matched:
            wide = matched_config(P, peer.params if peer is not None and peer.params else PEER_PARAMS_EXPECTED)
            print(f"  fewstep P={P} widened to {wide.channels} base channels (>= the peer's parameters)", flush=True)
            results.append(bench(f"fewstep UNet, {wide.channels} ch (params >= peer)", P, lambda c=wide: UNet(c),
                                 fewstep_forward, args, device))

    peer_ips = peer.images_per_s if peer is not None else None
    for r in results:
        if peer_ips and r.images_per_s is not None:
            r.ratio_vs_peer = r.images_per_s / peer_ips

    date = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    footer = (
        f"device: {device_name(device)} | torch {torch.__version__} | batch {args.batch} | "
        f"{precision}{' | channels_last' if args.channels_last else ''}{' | compiled' if args.compile else ''} | {date}"
    )
    print()
    print(markdown_table(results))
    print()
    print(footer)

    if args.json is not None:
        payload = {
            "device": device_name(device),
            "torch": torch.__version__,
            "batch": args.batch,
            "warmup": args.warmup,
            "iters": args.iters,
            "precision": precision,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "date": date,
            "configs": {str(P): large_config(P).to_dict() for P in args.sizes},
            "results": [asdict(r) for r in results],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
