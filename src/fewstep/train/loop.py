"""The training loop shared by the teacher and the distillation rounds.

Randomness is indexed by step: step k draws its batch, timesteps, noise and dropout from
generators seeded by (seed, k). So a run killed after a checkpoint and resumed draws exactly
what an uninterrupted run would have drawn, and resumes to the same weights.

No host sync per step: the loss is accumulated on the device and checked (finite?) at every log
and before every checkpoint, so a NaN can never reach a saved checkpoint.

Distributed (torchrun, fewstep.parallel): one code path, a world of 1 being the plain case. Every rank
draws the same global batch from the same step generator and computes only its own rows
(``loss_fn(net, gen, part)``); DDP averages the gradients, so W ranks with global batch B take
the same step as one process with batch B (to float tolerance; dropout masks are drawn per rank).
Parameters, EMA and optimizer state stay identical on all ranks; only rank 0 writes checkpoints,
and they hold the unwrapped net, so a run resumes with the same or a different world size.
"""

from __future__ import annotations

from fewstep.errors import UserError

import copy
import inspect
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from fewstep.progress import progress as progress_bar

from fewstep import parallel
from fewstep.train import checkpoint


class TrainingDivergedError(UserError, FloatingPointError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclass
class LoopConfig:
    steps: int
    lr: float
    warmup: int = 0
    lr_decay: str = "constant"  # constant | cosine | linear (to 0 at the last step)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float | None = None  # None: no EMA
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 50
    seed: int = 0


@dataclass
class LoopResult:
    net: torch.nn.Module  # the EMA net when EMA is on, else the trained net
    history: list[list[float]] = field(default_factory=list)  # [step, mean loss over the window]
    steps_run: int = 0  # steps run in this process (0 when the run was already complete)
    seconds: float = 0.0
    resumed_from: int = 0


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed for (seed, step, stream) (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) & (2**63 - 1)


def code_files() -> list[Path]:
    """The code a training run executes: every .py of the fewstep package, the entry module
    (``python -m stages.NAME``) and any other loaded ``stages.*`` module (the shared runner). The
    same set DVC lists as the stages' code deps (``src/fewstep``, ``stages/_common.py``, the stage)."""
    import sys

    pkg = Path(__file__).resolve().parents[1]
    files = set(pkg.rglob("*.py"))
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    mods = [m for name, m in list(sys.modules.items()) if name == "stages" or name.startswith("stages.")]
    for f in [main, *(getattr(m, "__file__", None) for m in mods)]:
        if f and f.endswith(".py") and Path(f).is_file():
            files.add(Path(f).resolve())
    return sorted(files)


def code_fingerprint() -> str:
    """sha256 of :func:`code_files` (named relative to the package, or to the working dir).

    Part of what a checkpoint must match to be resumed: DVC re-runs a training stage when this code
    changes, and a resumed (possibly finished) checkpoint of the old code would hand back the old
    weights under the new commit."""
    import hashlib

    pkg = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in code_files():
        if f.is_relative_to(pkg):
            name = "fewstep/" + f.relative_to(pkg).as_posix()
        elif f.is_relative_to(Path.cwd().resolve()):
            name = f.relative_to(Path.cwd().resolve()).as_posix()
        else:
            name = f.name
        h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def lr_at(cfg: LoopConfig, step: int) -> float:
    """Learning rate for update ``step`` (0-based): linear warmup, then constant/cosine/linear decay."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_decay == "constant":
        return cfg.lr
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.lr_decay == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * frac))
    if cfg.lr_decay == "linear":
        return cfg.lr * (1 - frac)
    raise ValueError(f"unknown lr_decay {cfg.lr_decay!r}")


def _takes_part(loss_fn: Callable[..., torch.Tensor]) -> bool:
    try:
        return len(inspect.signature(loss_fn).parameters) >= 3
    except (TypeError, ValueError):
        return False


def backward(model: torch.nn.Module, loss_fn: Callable[..., torch.Tensor], gen: torch.Generator,
             part: parallel.BatchPart) -> torch.Tensor:
    """Forward and backward of this rank's rows of the step's global batch; returns the loss
    ``loss_fn`` gave (the rank's share of the global mean, or the whole mean for a 2-argument
    ``loss_fn``). DDP averages gradients over ranks, so a share (sum over its rows / B) is scaled
    by the world size: the average is then the gradient of the global-batch mean."""
    if _takes_part(loss_fn):
        loss = loss_fn(model, gen, part)
        (loss * part.world if part.world > 1 else loss).backward()
    else:
        loss = loss_fn(model, gen)
        loss.backward()
    return loss


def train(
    net: torch.nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    cfg: LoopConfig,
    ckpt_root: str | Path,
    run_hash: str,
    device: torch.device,
    progress: bool = True,
    desc: str = "train",
    log: Callable[[str], None] = print,
    on_log: Callable[[int, float], None] | None = None,
) -> LoopResult:
    """Train ``net`` in place for ``cfg.steps`` updates of ``loss_fn`` (a scalar).

    ``loss_fn(model, gen, part)`` computes the rows ``part.rows(B)`` of the global batch B that
    ``gen`` draws and returns their summed loss divided by B (its share of the global mean);
    ``loss_fn(model, gen)`` returns the mean over the whole batch (every rank then computes the
    whole batch: correct, not faster). Resumes from the latest checkpoint under ``ckpt_root`` when
    its run hash matches; a checkpoint of a different run (params or data changed) is discarded
    with a message. In a world > 1 every rank must see ``ckpt_root`` (shared storage).
    """
    main = parallel.is_main()
    if not main:
        progress, log, on_log = False, (lambda _msg: None), None
    net.to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False) if cfg.ema_decay is not None else None
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    history: list[list[float]] = []
    start = 0
    run_hash = f"{run_hash}+code:{code_fingerprint()[:16]}"  # same params and data, same code
    found = checkpoint.latest(ckpt_root)
    stale = False
    if found is not None:
        ck_dir, meta = found
        if meta.get("run_hash") == run_hash:
            checkpoint.restore(ck_dir, net, opt, ema, meta, device)
            start, history = int(meta["step"]), meta.get("history", [])
            log(f"{desc}: resuming from {ck_dir} (step {start}/{cfg.steps}, world size {parallel.world_size()})")
        else:
            log(f"{desc}: checkpoint in {ckpt_root} belongs to another run (params, data or training code changed); starting fresh")
            stale = True
    if parallel.broadcast_int(start) != start:
        raise parallel.DistError(f"{desc}: rank {parallel.rank()} resumes from step {start} but rank 0 does not; "
                             f"{ckpt_root} must be the same shared directory on every rank")
    parallel.barrier()  # every rank has read the checkpoint before rank 0 may clear it
    if stale and main:
        checkpoint.clear(ckpt_root)
    result = LoopResult(net=ema if ema is not None else net, history=history, resumed_from=start)
    if start >= cfg.steps:
        return result

    def save(step: int) -> None:
        if main:  # the unwrapped net: resumable with any world size
            checkpoint.save(ckpt_root, step, net, opt, ema, {"run_hash": run_hash, "history": history},
                            keep=cfg.keep_checkpoints)

    model = parallel.wrap_ddp(net, device)
    part = parallel.batch_part()
    sharded = _takes_part(loss_fn)

    window = torch.zeros((), device=device)
    window_n, t0 = 0, time.perf_counter()
    bar = progress_bar(total=cfg.steps, initial=start, desc=desc, enabled=progress, dynamic_ncols=True)
    for step in range(start, cfg.steps):
        gen = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step))
        torch.manual_seed(step_seed(cfg.seed, step, stream=1 + part.rank))  # dropout, per rank
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss = backward(model, loss_fn, gen, part)
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        if ema is not None:
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1.0 - decay)
                for be, bn in zip(ema.buffers(), net.buffers()):
                    be.copy_(bn)
        window += loss.detach()
        window_n += 1
        done = step + 1
        if done % cfg.log_every == 0 or done % cfg.checkpoint_every == 0 or done == cfg.steps:
            total = parallel.all_reduce_sum(window)  # shares add up to the global mean
            mean = total.item() / window_n / (1 if sharded else part.world)
            if not math.isfinite(mean):
                bar.close()
                last = checkpoint.latest(ckpt_root)
                where = f"the last good checkpoint is {last[0]} (step {last[1]['step']})" if last else "no checkpoint was written"
                raise TrainingDivergedError(
                    f"{desc}: loss became {mean} between steps {done - window_n + 1} and {done}; "
                    f"{where}. Lower the learning rate or check the data."
                )
            history.append([done, mean])
            if on_log is not None:
                on_log(done, mean)
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
            window.zero_()
            window_n = 0
        bar.update(1)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save(done)
    bar.close()
    parallel.barrier()  # the last checkpoint is on disk before any rank goes on
    result.steps_run = cfg.steps - start
    result.seconds = time.perf_counter() - t0
    return result
