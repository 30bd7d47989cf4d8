"""Scaling of teacher training with torch.distributed: images/s per process, 1 -> N processes.

What it measures: the real training loop (fewstep.train.loop.train: DDP, AdamW, grad clip, EMA,
the step-seeded global batch of which each rank computes its rows) on the teacher of the chosen
params profile, with synthetic uint8 images of the profile's size (the data does not change the
cost). For each world size W it spawns W processes (gloo on the CPU, NCCL on CUDA with one GPU
per process), runs ``--warmup`` untimed steps, then times ``--iters`` steps on rank 0 between two
loss logs (each log all-reduces the loss: every rank has finished those steps).

  weak scaling   each process keeps ``--batch`` images: global batch W x batch
  strong scaling the global batch stays ``--batch`` (what the pipeline does: global batch is a
                 param), each process computes batch / W

efficiency = (images/s per process at W) / (images/s of the single process); the CPU efficiency
is the same ratio per CPU-second of rank 0 (DDP's own overhead, apart from cores taken by other
jobs on a shared machine, which lower the wall-clock efficiency). On the CPU every
process gets ``--threads`` threads (default 1, so W processes use W cores); on CUDA the world
sizes are 1, 2, 4, ... up to all visible GPUs.

    python benchmarks/distributed_scaling.py                       # CPU: 1 vs 2 processes
    python benchmarks/distributed_scaling.py --profile gpu --batch 128 --iters 20   # all GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from fewstep import parallel
from fewstep.config import load_params
from fewstep.math.losses import DEFAULT_WEIGHTING
from fewstep.nets.unet import UNet, count_params
from fewstep.train.loop import LoopConfig, train
from fewstep.train.teacher import diffusion_loss, schedule_of

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, job: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(job["threads"])
    p = load_params(ROOT / "params.yaml", job["profile"])
    want = torch.device("cuda" if job["cuda"] else "cpu")
    with parallel.session(want) as device, tempfile.TemporaryDirectory() as ck:
        size = p.base.image_size
        g = torch.Generator().manual_seed(0)
        data = torch.randint(0, 256, (1024, 3, size, size), dtype=torch.uint8, generator=g).to(device)
        torch.manual_seed(0)
        net = UNet(p.teacher.net.unet_config(size))
        if device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        tp = p.teacher
        loss_fn = diffusion_loss(data, schedule_of(p), tp.parameterization,
                                 tp.weighting or DEFAULT_WEIGHTING[tp.parameterization], job["global_batch"], tp.hflip)
        w, n = job["warmup"], job["iters"]
        stamps: dict[int, float] = {}

        def on_log(step: int, _loss: float) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps[step] = (time.perf_counter(), time.process_time())

        loop = LoopConfig(steps=w + n, lr=1e-4, ema_decay=tp.ema_decay, checkpoint_every=10**9, log_every=w,
                          seed=0)
        train(net, loss_fn, loop, ck, "bench", device, progress=False, log=lambda _m: None, on_log=on_log)
        if rank == 0:
            secs = stamps[w + n][0] - stamps[w][0]
            cpu = stamps[w + n][1] - stamps[w][1]
            Path(out).write_text(json.dumps({"seconds": secs, "cpu_seconds": cpu, "params": count_params(net)}))


def measure(world: int, global_batch: int, args, cuda: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        job = {"threads": args.threads, "profile": args.profile, "cuda": cuda, "global_batch": global_batch,
               "warmup": args.warmup, "iters": args.iters}
        mp.spawn(_worker, args=(world, _free_port(), job, str(out)), nprocs=world, join=True)
        r = json.loads(out.read_text())
    ips = args.iters * global_batch / r["seconds"]
    return {"world": world, "global_batch": global_batch, "per_proc_batch": global_batch / world,
            "s_per_step": r["seconds"] / args.iters, "images_per_s": ips, "per_proc": ips / world,
            "per_cpu_s": args.iters * global_batch / world / r["cpu_seconds"], "params": r["params"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=None, help="params profile (default: params.yaml, the CPU profile)")
    ap.add_argument("--batch", type=int, default=None, help="per-process (weak) / global (strong) batch; "
                                                            "default: the profile's teacher.batch_size")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=12, help="timed steps (a multiple of --warmup)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process on the CPU")
    ap.add_argument("--max-world", type=int, default=None, help="CPU: largest world size (default 2)")
    ap.add_argument("--modes", nargs="+", default=["weak", "strong"], choices=["weak", "strong"])
    ap.add_argument("--cpu", action="store_true", help="stay on the CPU even with CUDA")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    if args.iters % args.warmup:
        ap.error("--iters must be a multiple of --warmup (the timer reads the loss logs)")
    p = load_params(ROOT / "params.yaml", args.profile)
    batch = args.batch or p.teacher.batch_size
    cuda = torch.cuda.is_available() and not args.cpu
    top = torch.cuda.device_count() if cuda else (args.max_world or 2)
    worlds = sorted({1, top} | {2**k for k in range(1, 8) if 2**k < top})
    dev = torch.cuda.get_device_name(0) if cuda else f"{platform.processor() or platform.machine()}, " \
                                                     f"{os.cpu_count()} cores, {args.threads} thread(s)/process"
    print(f"teacher of profile {args.profile or 'default'} ({p.base.image_size}px), "
          f"{'nccl' if cuda else 'gloo'}, {dev}; {args.warmup} warmup + {args.iters} timed steps")
    rows = []
    for mode in args.modes:
        for w in worlds:
            gb = batch * w if mode == "weak" else batch
            if gb % w:
                continue
            r = measure(w, gb, args, cuda)
            r["mode"] = mode
            rows.append(r)
    print(f"\n{'mode':6} {'procs':>5} {'global B':>8} {'B/proc':>6} {'s/step':>8} {'img/s':>9} "
          f"{'img/s/proc':>10} {'efficiency':>10} {'img/CPU-s':>9} {'CPU eff.':>8}")
    for mode in args.modes:
        base = next(r for r in rows if r["mode"] == mode and r["world"] == 1)
        for r in (r for r in rows if r["mode"] == mode):
            r["efficiency"] = r["per_proc"] / base["per_proc"]
            r["cpu_efficiency"] = r["per_cpu_s"] / base["per_cpu_s"]
            print(f"{mode:6} {r['world']:5d} {r['global_batch']:8d} {r['per_proc_batch']:6.0f} {r['s_per_step']:8.4f} "
                  f"{r['images_per_s']:9.1f} {r['per_proc']:10.1f} {r['efficiency']:10.2f} {r['per_cpu_s']:9.1f} "
                  f"{r['cpu_efficiency']:8.2f}")
    print(f"\n(net: {rows[0]['params'] / 1e6:.2f}M params; efficiency 1.00 = perfect linear scaling. img/CPU-s: "
          "images per CPU-second of rank 0's process, which a machine shared with other jobs distorts less)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
