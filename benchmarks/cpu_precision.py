"""CPU precision of every hot loop: float32 vs bf16 autocast vs channels_last, and 1 vs N threads.

Issue 19 part 1: what ``base.cpu_bf16`` and ``base.channels_last`` (fewstep.math.precision) buy on
this CPU, measured on the pipeline's own code at the params' net and batch sizes (the CPU default
unless ``--profile``). The loops:

  teacher     one teacher training step: fewstep.train.teacher.diffusion_loss, backward, grad clip,
              AdamW, at teacher.batch_size
  distill     one distillation step of the first round (fewstep.train.distill.distill_loss): the
              teacher's two target forwards in float32 (full_precision, whatever the policy), the
              student's forward and backward under the policy, at the round's batch size
  sample      one DDIM step of evaluation sampling at evaluate.batch_size (NetDenoiser under the policy)
  trajectory  one DDIM step of OLSS trajectory collection at trajectories.batch_size (full_precision:
              float32 under every policy; its bf16 column is the control, error exactly 0)
  evaluator   one evaluator training step (fewstep.train.evaluator.classifier_loss), evaluator.batch_size
  features    evaluator features of evaluate.batch_size images (run under bf16 autocast here to measure
              it; the pipeline keeps the metric's features in float32)

Variants: fp32, bf16 (torch.autocast("cpu", bfloat16): the policy's cpu_bf16), cl (channels_last
weights and inputs), bf16+cl, all at ``--threads``, and fp32 and cl at 1 thread. Every repetition runs
each variant of a loop in turn (interleaved, the order rotated per repetition) for ``--iters``
iterations; the table shows the median seconds per iteration and the ratio fp32 / variant (> 1:
faster than float32 at ``--threads``), so ratios come from one run on the same (possibly shared)
machine. bf16 error: the loop's output under bf16 vs float32 from identical weights and inputs,
max |a - b| / max |a| and ||a - b|| / ||a|| (training loops: the network's prediction/logits; sample:
images after ``--error-steps`` DDIM steps; distill also its target, which must not move).

Weights come from ``--models`` (models/teacher, models/evaluator) when present, else a random init;
images from ``--data`` when present, else random. Run from the repository root:

    python benchmarks/cpu_precision.py --quick             # about 3 minutes on 2 cores
    python benchmarks/cpu_precision.py --json benchmarks/results/cpu_precision.json
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fewstep import models, storage
from fewstep.config import Params, load_params
from fewstep.math import precision
from fewstep.math.ddim import PerImageNoise, sample_ddim
from fewstep.math.losses import DEFAULT_WEIGHTING
from fewstep.math.param import NetDenoiser, full_precision
from fewstep.math.schedules import timesteps
from fewstep.nets.evaluator import Evaluator, EvaluatorConfig
from fewstep.nets.unet import UNet
from fewstep.train.distill import distill_loss
from fewstep.train.evaluator import classifier_loss, features
from fewstep.train.teacher import diffusion_loss, schedule_of

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "cpu_precision.json"  # not reports/ (the evaluate stage's DVC output)


@dataclass(frozen=True)
class Variant:
    name: str
    threads: int
    bf16: bool = False
    channels_last: bool = False


@dataclass
class LoopResult:
    loop: str
    batch: int
    seconds: dict[str, float] = field(default_factory=dict)  # variant -> median s/iteration
    samples: dict[str, list[float]] = field(default_factory=dict)
    ratio: dict[str, float] = field(default_factory=dict)  # fp32 / variant (> 1: faster)
    bf16_error: dict[str, float] = field(default_factory=dict)
    note: str = ""


# a loop: for a variant (its policy active while this runs), build the state and return one iteration
Loop = Callable[[Variant], Callable[[], Any]]


def variants(threads: int, with_cl_bf16: bool = True) -> list[Variant]:
    out = [Variant("fp32", threads), Variant("bf16", threads, bf16=True), Variant("cl", threads, channels_last=True)]
    if with_cl_bf16:
        out.append(Variant("bf16+cl", threads, bf16=True, channels_last=True))
    if threads != 1:
        out += [Variant("fp32 1 thread", 1), Variant("cl 1 thread", 1, channels_last=True)]
    return out


class active:
    """The variant's thread count and CPU policy for a block."""

    def __init__(self, v: Variant):
        self.v = v

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        torch.set_num_threads(self.v.threads)
        self.old = precision.configure(self.v.bf16, self.v.channels_last)

    def __exit__(self, *exc: object) -> None:
        precision.configure(self.old.bf16, self.old.channels_last)
        torch.set_num_threads(self.threads)


def fmt_of(v: Variant) -> torch.memory_format:
    return torch.channels_last if v.channels_last else torch.contiguous_format


def rel_errors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b| / max |a|, ||a - b|| / ||a||) in float64."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    d = (a - b).abs()
    return float(d.max() / a.abs().max().clamp_min(1e-30)), float(d.norm() / a.norm().clamp_min(1e-30))


def bf16_error(out: Callable[[], torch.Tensor], prefix: str = "") -> dict[str, float]:
    """The relative errors of ``out()`` under the bf16 policy vs float32 (both at the same threads)."""
    with precision.using(False):
        a = out()
    with precision.using(True):
        b = out()
    mx, l2 = rel_errors(a, b)
    return {f"{prefix}max_rel": mx, f"{prefix}l2_rel": l2}


def time_loop(name: str, batch: int, loop: Loop, vs: list[Variant], reps: int, iters: int, warmup: int,
              log: Callable[[str], None]) -> LoopResult:
    """Interleaved repetitions: each rep runs every variant (order rotated) for ``iters`` iterations."""
    steps: dict[str, Callable[[], Any]] = {}
    for v in vs:
        with active(v):
            steps[v.name] = loop(v)
            for _ in range(warmup):
                steps[v.name]()
    res = LoopResult(name, batch, samples={v.name: [] for v in vs})
    for r in range(reps):
        order = vs[r % len(vs):] + vs[: r % len(vs)]
        for v in order:
            with active(v):
                t0 = time.perf_counter()
                for _ in range(iters):
                    steps[v.name]()
                res.samples[v.name].append((time.perf_counter() - t0) / iters)
        log(f"  {name}: rep {r + 1}/{reps}: " + ", ".join(f"{k} {s[-1] * 1e3:.0f} ms" for k, s in res.samples.items()))
    res.seconds = {k: statistics.median(s) for k, s in res.samples.items()}
    base = res.seconds["fp32"]
    res.ratio = {k: base / s for k, s in res.seconds.items()}
    return res


# ---- the loops -----------------------------------------------------------------------------------

@dataclass
class Setup:
    p: Params
    teacher_net: torch.nn.Module
    evaluator_net: Evaluator
    data: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # (N,) long
    num_classes: int
    source: str


def load_setup(p: Params, models_dir: Path, data_dir: Path) -> Setup:
    size = p.base.image_size
    src = []
    if (data_dir / "train_images.npy").exists():
        images = storage.load_array(data_dir / "train_images.npy")
        labels = torch.from_numpy(np.asarray(storage.load_array(data_dir / "train_labels.npy"), dtype=np.int64))
        num_classes = len(storage.read_json(data_dir / "manifest.json")["class_names"])
        data = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        src.append(f"images {data_dir}")
    else:
        g = torch.Generator().manual_seed(0)
        data = torch.randint(0, 256, (1024, 3, size, size), generator=g, dtype=torch.uint8)
        num_classes = 4
        labels = torch.randint(0, num_classes, (1024,), generator=g)
        src.append("random images")
    if data.shape[-1] != size:
        raise SystemExit(f"{data_dir}: images are {data.shape[-1]}px, params say {size}")
    tdir = models_dir / "teacher"
    if models.has_card(tdir) and models.load_card(tdir).image_size == size:
        den = models.load_denoiser(tdir, "cpu")
        teacher_net = den.net
        src.append(f"teacher {tdir}")
    else:
        torch.manual_seed(0)
        teacher_net = UNet(p.teacher.net.unet_config(size))
        with torch.no_grad():  # the zero-initialised output layer would make every output 0
            for prm in teacher_net.parameters():
                prm.add_(0.02 * torch.randn_like(prm))
        src.append("random teacher")
    edir = models_dir / "evaluator"
    if (edir / "config.json").exists():
        from fewstep.train.evaluator import load_evaluator

        evaluator_net, _ = load_evaluator(edir, "cpu")
        src.append(f"evaluator {edir}")
    else:
        torch.manual_seed(0)
        evaluator_net = Evaluator(EvaluatorConfig(num_classes=num_classes, widths=tuple(p.evaluator.widths),
                                                  blocks_per_stage=p.evaluator.blocks_per_stage))
        src.append("random evaluator")
    return Setup(p, teacher_net.float().eval(), evaluator_net.float().eval(), data, labels, num_classes,
                 ", ".join(src))


def _train_step(net: torch.nn.Module, loss_fn: Callable[..., torch.Tensor], seed: int = 0) -> Callable[[], float]:
    net.requires_grad_(True)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    k = [seed]

    def step() -> float:
        gen = torch.Generator().manual_seed(k[0])
        k[0] += 1
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    return step


def teacher_loop(s: Setup) -> Loop:
    p, tp = s.p, s.p.teacher

    def make(v: Variant) -> Callable[[], Any]:
        net = copy.deepcopy(s.teacher_net).train().to(memory_format=fmt_of(v))
        loss = diffusion_loss(s.data, schedule_of(p), tp.parameterization,
                              tp.weighting or DEFAULT_WEIGHTING[tp.parameterization], tp.batch_size, tp.hflip)
        return _train_step(net, loss)

    return make


def first_round(p: Params) -> tuple[int, Any]:
    name = next(iter(p.distill.rounds))
    r = p.distill.round(name)
    return r.steps, r


def distill_loop(s: Setup) -> Loop:
    steps, r = first_round(s.p)

    def make(v: Variant) -> Callable[[], Any]:
        teacher = NetDenoiser(copy.deepcopy(s.teacher_net).to(memory_format=fmt_of(v)), schedule_of(s.p),
                              s.p.teacher.parameterization).requires_grad_(False).eval()
        student = copy.deepcopy(s.teacher_net).train().to(memory_format=fmt_of(v))
        return _train_step(student, distill_loss(teacher, s.data, steps, r.weighting, r.batch_size, r.hflip))

    return make


def ddim_loop(s: Setup, batch: int, n_steps: int, fp32: bool) -> Loop:
    """``n_steps`` DDIM steps (timed per step by the caller) of ``batch`` images."""
    sch = schedule_of(s.p)
    path = timesteps(sch.T, 64)[:n_steps]  # the first steps of the 64-step reference path
    shape = (3, s.p.base.image_size, s.p.base.image_size)
    x_T = PerImageNoise(range(batch), "cpu").randn(*shape)

    def make(v: Variant) -> Callable[[], Any]:
        den = NetDenoiser(copy.deepcopy(s.teacher_net).to(memory_format=fmt_of(v)), sch, s.p.teacher.parameterization)

        def run() -> torch.Tensor:
            with torch.no_grad(), (full_precision(den) if fp32 else _null()):
                return sample_ddim(den, x_T, path, clip=False)

        return run

    return make


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def evaluator_loop(s: Setup) -> Loop:
    ep = s.p.evaluator
    x = s.data.float() / 127.5 - 1.0
    y = s.labels

    def make(v: Variant) -> Callable[[], Any]:
        torch.manual_seed(0)
        net = Evaluator(s.evaluator_net.cfg).train().to(memory_format=fmt_of(v))
        return _train_step(net, classifier_loss(x, y, ep.batch_size))

    return make


def features_loop(s: Setup, batch: int) -> Loop:
    x = s.data[:batch].float() / 127.5 - 1.0

    def make(v: Variant) -> Callable[[], Any]:
        net = copy.deepcopy(s.evaluator_net).to(memory_format=fmt_of(v))
        xv = precision.to_format(x, fmt_of(v))

        def run() -> np.ndarray:
            with precision.autocast("cpu"):
                return features(net, xv, batch_size=batch)

        return run

    return make


# ---- errors --------------------------------------------------------------------------------------

def errors(s: Setup, error_steps: int, error_n: int) -> dict[str, dict[str, float]]:
    """bf16 vs float32 outputs per loop (same weights and inputs; contiguous tensors)."""
    p = s.p
    sch = schedule_of(p)
    g = torch.Generator().manual_seed(1)
    B = p.teacher.batch_size
    x = s.data[:B].float() / 127.5 - 1.0
    t = torch.randint(1, sch.T + 1, (B,), generator=g)
    a, sg = sch.at(t, torch.float32)
    z = a.view(-1, 1, 1, 1) * x + sg.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=g)
    net = copy.deepcopy(s.teacher_net).eval()

    def train_forward() -> torch.Tensor:  # the forward diffusion_loss / distill_loss run
        with torch.no_grad(), precision.autocast("cpu"):
            return net(z, t.float() / sch.T).float()

    out: dict[str, dict[str, float]] = {"teacher": bf16_error(train_forward)}
    steps, r = first_round(p)
    den = NetDenoiser(net, sch, p.teacher.parameterization)
    from fewstep.train.distill import teacher_grid
    from fewstep.math.distill import distill_target_path

    grid = torch.tensor(teacher_grid(sch.T, 2 * steps))
    i = torch.randint(1, steps + 1, (B,), generator=g)
    zt = a.view(-1, 1, 1, 1) * x + sg.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=g)

    def target() -> torch.Tensor:
        with torch.no_grad():
            return distill_target_path(den, zt, grid[2 * i], grid[2 * i - 1], grid[2 * i - 2])

    out["distill"] = {**bf16_error(train_forward), **bf16_error(target, "target_")}
    shape = (3, p.base.image_size, p.base.image_size)
    x_T = PerImageNoise(range(error_n), "cpu").randn(*shape)
    path = timesteps(sch.T, error_steps)

    def sample(fp32: bool) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad(), (full_precision(den) if fp32 else _null()):
                return sample_ddim(den, x_T, path, clip=False).clamp(-1, 1)
        return run

    out["sample"] = bf16_error(sample(False))
    out["trajectory"] = bf16_error(sample(True))
    ev = copy.deepcopy(s.evaluator_net).eval()
    xe = s.data[: p.evaluator.batch_size].float() / 127.5 - 1.0

    def logits() -> torch.Tensor:
        with torch.no_grad(), precision.autocast("cpu"):
            return ev(xe).float()

    out["evaluator"] = bf16_error(logits)
    xf = s.data[: p.evaluate.batch_size].float() / 127.5 - 1.0

    def feats() -> torch.Tensor:
        with precision.autocast("cpu"):
            return torch.from_numpy(features(ev, xf, batch_size=len(xf)))

    out["features"] = bf16_error(feats)
    return out


# ---- report --------------------------------------------------------------------------------------

def markdown(results: list[LoopResult], vs: list[Variant]) -> str:
    names = [v.name for v in vs]
    head = "| loop | batch | " + " | ".join(f"{n} ms" for n in names) + " | " + \
        " | ".join(f"{n} vs fp32" for n in names[1:]) + " | bf16 max rel. err | bf16 rel. L2 err |"
    lines = [head, "|" + "---|" * 2 + "---:|" * (2 * len(names) - 1 + 2)]
    for r in results:
        ms = " | ".join(f"{r.seconds[n] * 1e3:.1f}" for n in names)
        ratios = " | ".join(f"{r.ratio[n]:.2f}x" for n in names[1:])
        err = r.bf16_error
        extra = f" (target {err['target_max_rel']:.1e})" if "target_max_rel" in err else ""
        mx = f"{err['max_rel']:.1e}{extra}" if "max_rel" in err else "-"
        l2 = f"{err['l2_rel']:.1e}" if "l2_rel" in err else "-"
        lines.append(f"| {r.loop}{' (' + r.note + ')' if r.note else ''} | {r.batch} | {ms} | {ratios} | {mx} | {l2} |")
    return "\n".join(lines)


def add_setup_args(ap: argparse.ArgumentParser) -> None:
    """The arguments of :func:`load_setup` and the thread count (shared with benchmarks/cpu_compile.py)."""
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--profile", default=None, help="merge profiles/NAME.yaml (default: the CPU default)")
    ap.add_argument("--models", type=Path, default=ROOT / "models", help="teacher and evaluator weights, if present")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "prepared", help="prepared images, if present")
    ap.add_argument("--threads", type=int, default=None, help="threads of the main variants (default base.threads, "
                    "or 2 when that is 0)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_args(ap)
    ap.add_argument("--loops", nargs="+", default=["teacher", "distill", "sample", "trajectory", "evaluator", "features"])
    ap.add_argument("--reps", type=int, default=7, help="interleaved repetitions (median over them)")
    ap.add_argument("--iters", type=int, default=3, help="iterations per variant per repetition")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--error-steps", type=int, default=8, help="DDIM steps of the sampling error check")
    ap.add_argument("--error-n", type=int, default=64, help="images of the sampling error check")
    ap.add_argument("--no-bf16-cl", action="store_true", help="skip the bf16+channels_last variant")
    ap.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                    help="only these variants (fp32 is always run: the ratios' base), e.g. --variants cl")
    ap.add_argument("--quick", action="store_true", help="3 repetitions of 1 iteration, a 4-step error check of "
                    "32 images, no bf16+channels_last (minutes on 2 cores)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help="write the results here")
    a = ap.parse_args(argv)
    if a.quick:
        a.reps, a.iters, a.warmup, a.error_steps, a.error_n, a.no_bf16_cl = 3, 1, 1, 4, 32, True
    if min(a.reps, a.iters, a.error_steps, a.error_n) < 1 or a.warmup < 0:
        ap.error("--reps, --iters, --error-steps and --error-n must be >= 1, --warmup >= 0")
    bad = sorted(set(a.loops) - {"teacher", "distill", "sample", "trajectory", "evaluator", "features"})
    if bad:
        ap.error(f"unknown loops {bad}")
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    p = load_params(a.params, a.profile)
    threads = a.threads or p.base.threads or 2
    info = precision.detect()
    vs = variants(threads, with_cl_bf16=not a.no_bf16_cl)
    if a.variants:
        vs = [v for v in vs if v.name == "fp32" or v.name in a.variants]
    s = load_setup(p, a.models, a.data)
    print(f"# CPU precision, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}")
    print(f"# CPU: {info.describe()}; base.cpu_bf16={p.base.cpu_bf16!r} resolves to "
          f"{precision.resolve_cpu_bf16(p.base.cpu_bf16)} here")
    print(f"# profile {a.profile or 'default'}, {p.base.image_size}px, {s.source}; {a.reps} interleaved reps x "
          f"{a.iters} iters, warmup {a.warmup}; variants: {', '.join(v.name for v in vs)}", flush=True)
    log = lambda m: print(m, flush=True)  # noqa: E731
    loops: dict[str, tuple[int, Loop, str]] = {
        "teacher": (p.teacher.batch_size, teacher_loop(s), ""),
        "distill": (first_round(p)[1].batch_size, distill_loop(s), ""),
        "sample": (p.evaluate.batch_size, ddim_loop(s, p.evaluate.batch_size, 1, fp32=False), "1 DDIM step"),
        "trajectory": (p.trajectories.batch_size, ddim_loop(s, p.trajectories.batch_size, 1, fp32=True),
                       "1 DDIM step, full_precision"),
        "evaluator": (p.evaluator.batch_size, evaluator_loop(s), ""),
        "features": (p.evaluate.batch_size, features_loop(s, p.evaluate.batch_size), ""),
    }
    results = []
    t0 = time.perf_counter()
    for name in a.loops:
        batch, loop, note = loops[name]
        r = time_loop(name, batch, loop, vs, a.reps, a.iters, a.warmup, log)
        r.note = note
        results.append(r)
    torch.set_num_threads(threads)
    errs = errors(s, a.error_steps, a.error_n) if any(v.bf16 for v in vs) else {}
    for r in results:
        r.bf16_error = errs.get(r.loop, {})

    table = markdown(results, vs)
    print()
    print(table)
    print()
    print(f"bf16 errors: bf16 autocast vs float32 on the same weights and inputs (sample/trajectory: images after "
          f"{a.error_steps} DDIM steps, {a.error_n} images); ratios: fp32 ms / variant ms, fp32 at {threads} thread(s) "
          f"(> 1 = faster), medians of interleaved repetitions. {time.perf_counter() - t0:.0f} s.")
    payload = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
        "machine": platform.machine(), "cpu": asdict(info), "cpu_bf16_setting": p.base.cpu_bf16,
        "cpu_bf16_resolved": precision.resolve_cpu_bf16(p.base.cpu_bf16), "profile": a.profile or "default",
        "threads": threads, "reps": a.reps, "iters": a.iters, "quick": a.quick, "source": s.source,
        "error_steps": a.error_steps, "error_n": a.error_n, "variants": [asdict(v) for v in vs],
        "results": [asdict(r) for r in results], "table": table,
    }
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {a.json}")
    return payload


if __name__ == "__main__":
    main()
