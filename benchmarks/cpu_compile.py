"""torch.compile on the CPU: what it buys the teacher's training step and a sampling step.

Issue 19 part 2 asks where the 15-minute default's teacher can get more steps from on a CPU without
native bf16. This measures ``torch.compile`` (TorchInductor's C++/OpenMP backend) on the pipeline's
own code at the params' net and batch sizes (the CPU default unless ``--profile``):

  teacher   one teacher training step (fewstep.train.teacher.diffusion_loss with the params'
            noise levels, backward, grad clip, AdamW) at teacher.batch_size
  sample    one network call of evaluation sampling at evaluate.batch_size, under no_grad

Variants: ``eager`` and ``compile`` (``torch.compile(net)``, default mode; ``--mode`` for others).
The first calls of the compiled net compile it: their seconds are reported as ``compile_s`` (the
one-off cost a stage would pay), with the break-even number of steps. Then ``--reps`` interleaved
repetitions of ``--iters`` iterations per variant (order rotated) give the median seconds per step
and the ratio eager / compile (> 1: compile is faster), measured in one run. Faithfulness: the
first step's loss and the sample call's output of both variants from identical weights and inputs
(max relative difference).

    python benchmarks/cpu_compile.py                     # about 5 minutes on 2 cores
    python benchmarks/cpu_compile.py --json benchmarks/results/cpu_compile.json
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_precision import Setup, _train_step, add_setup_args, load_setup, rel_errors  # noqa: E402  (benchmarks/ is no package)

from fewstep.config import load_params  # noqa: E402
from fewstep.math.losses import DEFAULT_WEIGHTING  # noqa: E402
from fewstep.train.teacher import diffusion_loss, schedule_of, time_sampling  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "cpu_compile.json"


def compiled(net: torch.nn.Module, variant: str, mode: str) -> torch.nn.Module:
    """``net`` itself for ``eager``; for ``compile``, torch.compile(net) in ``mode``."""
    if variant == "eager":
        return net
    return torch.compile(net, mode=None if mode == "default" else mode)


def teacher_step(s: Setup, variant: str, mode: str) -> Callable[[], float]:
    p, tp = s.p, s.p.teacher
    net = compiled(copy.deepcopy(s.teacher_net).train(), variant, mode)
    loss = diffusion_loss(s.data, schedule_of(p), tp.parameterization,
                          tp.weighting or DEFAULT_WEIGHTING[tp.parameterization], tp.batch_size, tp.hflip,
                          logsnr_normal=time_sampling(tp))
    return _train_step(net, loss)


def sample_call(s: Setup, variant: str, mode: str) -> Callable[[], torch.Tensor]:
    p = s.p
    n = p.evaluate.batch_size
    net = compiled(copy.deepcopy(s.teacher_net).eval(), variant, mode)
    g = torch.Generator().manual_seed(0)
    c = s.teacher_net.cfg.in_channels
    z = torch.randn(n, c, p.base.image_size, p.base.image_size, generator=g)
    t = torch.full((n,), 0.5)

    @torch.no_grad()
    def run() -> torch.Tensor:
        return net(z, t)

    return run


LOOPS: dict[str, Callable[[Setup, str, str], Callable[[], Any]]] = {"teacher": teacher_step,
                                                                            "sample": sample_call}


def measure(name: str, s: Setup, mode: str, reps: int, iters: int, warmup: int,
            log: Callable[[str], None]) -> dict[str, Any]:
    steps: dict[str, Callable[[], Any]] = {}
    first: dict[str, Any] = {}
    setup_s: dict[str, float] = {}
    for v in ("eager", "compile"):
        t0 = time.perf_counter()
        steps[v] = LOOPS[name](s, v, mode)
        first[v] = steps[v]()  # the compiled net compiles here (forward and, for training, backward)
        for _ in range(warmup):
            steps[v]()
        setup_s[v] = time.perf_counter() - t0
        log(f"  {name}: {v} first {1 + warmup} calls {setup_s[v]:.1f} s")
    a, b = (torch.as_tensor(first[v], dtype=torch.float64) for v in ("eager", "compile"))
    max_rel, _ = rel_errors(a.reshape(-1), b.reshape(-1))
    samples: dict[str, list[float]] = {"eager": [], "compile": []}
    order = ["eager", "compile"]
    for r in range(reps):
        for v in order[r % 2:] + order[: r % 2]:
            t0 = time.perf_counter()
            for _ in range(iters):
                steps[v]()
            samples[v].append((time.perf_counter() - t0) / iters)
        log(f"  {name}: rep {r + 1}/{reps}: " + ", ".join(f"{k} {x[-1] * 1e3:.0f} ms" for k, x in samples.items()))
    sec = {k: statistics.median(x) for k, x in samples.items()}
    saved = sec["eager"] - sec["compile"]
    compile_s = max(0.0, setup_s["compile"] - (1 + warmup) * sec["compile"])
    return {"loop": name, "seconds": sec, "samples": samples, "ratio": sec["eager"] / sec["compile"],
            "compile_s": compile_s, "break_even_steps": compile_s / saved if saved > 0 else None,
            "first_output_max_rel": max_rel}


def markdown(rows: list[dict[str, Any]]) -> str:
    out = ["| loop | eager ms | compile ms | eager / compile | compile s | break-even steps | max rel diff |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        be = "never" if r["break_even_steps"] is None else f"{r['break_even_steps']:.0f}"
        out.append(f"| {r['loop']} | {r['seconds']['eager'] * 1e3:.1f} | {r['seconds']['compile'] * 1e3:.1f} | "
                   f"{r['ratio']:.2f} | {r['compile_s']:.1f} | {be} | {r['first_output_max_rel']:.1e} |")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_args(ap)
    ap.add_argument("--loops", nargs="+", default=list(LOOPS), choices=list(LOOPS))
    ap.add_argument("--mode", default="default", help="torch.compile mode (default, reduce-overhead, "
                                                      "max-autotune-no-cudagraphs)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    p = load_params(a.params, a.profile)
    threads = a.threads or p.base.threads or 2
    torch.set_num_threads(threads)
    s = load_setup(p, a.models, a.data)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    log(f"cpu_compile: {s.source}; {threads} threads; torch {torch.__version__}; mode {a.mode}")
    rows = [measure(name, s, a.mode, a.reps, a.iters, a.warmup, log) for name in a.loops]
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "threads": threads, "mode": a.mode,
           "profile": a.profile or "default", "source": s.source, "rows": rows}
    print(markdown(rows))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
