"""A small layer over torch.distributed: the only module that imports it.

A process started by ``torchrun`` (or any launcher that sets the standard environment: RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) joins a process group in ``init``: NCCL on
CUDA, gloo on the CPU. A world size of 1 needs no process group and no launcher: every function
here then degrades to the plain single-process case (rank 0, barrier a no-op, gather = identity).

Sharding is by contiguous blocks (``shard``): the first ``n % world`` ranks hold one item more,
so concatenating the blocks in rank order restores the original order, and rank 0 always holds
the largest block (``gather_cat`` relies on that to tell empty ranks the shape).
"""

from __future__ import annotations

from fewstep.errors import UserError

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as td

T = TypeVar("T")

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
           torch.bool)


class DistError(UserError, RuntimeError):
    """The distributed environment is inconsistent (bad env vars, ranks disagreeing)."""


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistError(f"${name} must be an integer, got {raw!r}") from None


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as the launcher set them; (0, 1, 0) without a launcher."""
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DistError(f"inconsistent torch.distributed environment: RANK={rank} WORLD_SIZE={world} "
                        f"LOCAL_RANK={local}")
    return rank, world, local


def is_initialized() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if is_initialized() else 0


def world_size() -> int:
    return td.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return env_world()[2] if is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device | str = "cpu", timeout_s: float = 1800.0) -> torch.device:
    """Join the process group described by the environment; returns this rank's device.

    ``device`` is the device kind the params ask for (cpu or cuda). On CUDA each rank takes
    cuda:LOCAL_RANK and the backend is NCCL; on the CPU the backend is gloo. With WORLD_SIZE 1
    (or unset) nothing is initialised and the device is returned as given."""
    device = torch.device(device)
    r, world, local = env_world()
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise DistError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                            "use --nproc-per-node <= the GPU count")
        device = torch.device("cuda", local if world > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    if world == 1 or is_initialized():
        return device
    if not td.is_available():
        raise DistError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise DistError(f"WORLD_SIZE={world} but ${name} is not set; start the processes with torchrun "
                            "(or python -m fewstep.launch)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kw = {"device_id": device} if backend == "nccl" else {}
    td.init_process_group(backend, init_method="env://", rank=r, world_size=world,
                          timeout=timedelta(seconds=timeout_s), **kw)
    return device


def shutdown() -> None:
    if is_initialized():
        td.destroy_process_group()


@contextlib.contextmanager
def session(device: torch.device | str = "cpu") -> Iterator[torch.device]:
    """``init`` on entry, ``shutdown`` on exit (also on an error)."""
    dev = init(device)
    try:
        yield dev
    finally:
        shutdown()


def _comm_device() -> torch.device:
    """Where collective tensors must live: the rank's GPU for NCCL, the CPU for gloo."""
    if is_initialized() and td.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if world_size() > 1:
        if td.get_backend() == "nccl":
            td.barrier(device_ids=[torch.cuda.current_device()])
        else:
            td.barrier()


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``t`` from rank ``src`` on every rank (in place where possible; returns the result)."""
    if world_size() == 1:
        return t
    buf = t.to(_comm_device()).contiguous()
    td.broadcast(buf, src)
    if buf is not t:
        t.copy_(buf.to(t.device))
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over all ranks (a new tensor on ``t``'s device)."""
    if world_size() == 1:
        return t.clone()
    buf = t.detach().to(_comm_device()).clone()
    td.all_reduce(buf, td.ReduceOp.SUM)
    return buf.to(t.device)


def broadcast_int(value: int, src: int = 0) -> int:
    return int(broadcast(torch.tensor([int(value)], dtype=torch.int64), src).item())


# ---------------------------------------------------------------------------------------------
# Sharding


def shard_bounds(n: int, rank_: int, world: int) -> tuple[int, int]:
    """[lo, hi) of rank ``rank_``'s contiguous block of ``n`` items."""
    if world < 1 or not 0 <= rank_ < world:
        raise ValueError(f"rank {rank_} is not in a world of size {world}")
    if n < 0:
        raise ValueError(f"cannot shard {n} items")
    base, extra = divmod(n, world)
    lo = rank_ * base + min(rank_, extra)
    return lo, lo + base + (1 if rank_ < extra else 0)


def shard_counts(n: int, world: int) -> list[int]:
    return [hi - lo for lo, hi in (shard_bounds(n, r, world) for r in range(world))]


def shard(indices: Sequence[T], rank_: int | None = None, world: int | None = None) -> list[T]:
    """This rank's contiguous block of ``indices`` (all of them in a world of 1)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    lo, hi = shard_bounds(len(indices), r, w)
    return list(indices[lo:hi])


@dataclass(frozen=True)
class BatchPart:
    """Which rows of a global batch this rank computes: rank ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1

    def rows(self, batch_size: int) -> slice:
        lo, hi = shard_bounds(batch_size, self.rank, self.world)
        return slice(lo, hi)


def batch_part() -> BatchPart:
    return BatchPart(rank(), world_size())


def gather_cat(local: torch.Tensor, counts: Sequence[int], dim: int = 0) -> torch.Tensor | None:
    """Concatenate every rank's ``local`` along ``dim`` on rank 0 (None on the other ranks).

    ``counts[r]`` is rank r's size along ``dim`` (known to all ranks, as from ``shard_counts``);
    blocks are padded to the largest for the collective and trimmed after. Rank 0 must hold the
    largest block (``shard`` guarantees it): the others take shape and dtype from it, so a rank
    with nothing to contribute may pass any tensor with ``counts[r] == 0``."""
    world = world_size()
    if len(counts) != world:
        raise ValueError(f"counts has {len(counts)} entries for a world of {world}")
    if world == 1:
        return local
    r = rank()
    if counts[r] > 0 and local.shape[dim] != counts[r]:
        raise DistError(f"rank {r}: local block has {local.shape[dim]} rows along dim {dim}, counts say {counts[r]}")
    m = max(counts)
    if counts[0] != m:
        raise ValueError(f"rank 0 must hold the largest block, counts={list(counts)}")
    # Rank 0 tells the others the padded block's shape and dtype (an empty rank cannot know them).
    meta = torch.zeros(18, dtype=torch.int64)
    if r == 0:
        if local.dtype not in _DTYPES:
            raise ValueError(f"gather_cat does not handle dtype {local.dtype}")
        meta[0], meta[1] = local.ndim, _DTYPES.index(local.dtype)
        meta[2 : 2 + local.ndim] = torch.tensor(local.shape)
    broadcast(meta)
    ndim, dtype = int(meta[0]), _DTYPES[int(meta[1])]
    shape = [int(s) for s in meta[2 : 2 + ndim]]
    dim = dim % ndim
    dev = _comm_device()
    buf = torch.zeros(shape, dtype=dtype, device=dev)
    if counts[r] > 0:
        buf.narrow(dim, 0, counts[r]).copy_(local.to(dev))
    out = [torch.empty_like(buf) for _ in range(world)] if r == 0 else None
    td.gather(buf, out, dst=0)
    if r != 0:
        return None
    return torch.cat([o.narrow(dim, 0, c) for o, c in zip(out, counts)], dim).to(local.device)


def map_sharded(fn: Callable[[list[T]], torch.Tensor], items: Sequence[T], dim: int = 0) -> torch.Tensor | None:
    """``fn(items)`` computed as ``fn`` over each rank's block, concatenated on rank 0.

    Equal to the single-process result when ``fn`` treats items independently (an image that
    depends only on its own seed). Other ranks get None; a world of 1 calls ``fn(items)``."""
    if world_size() == 1:
        return fn(list(items))
    counts = shard_counts(len(items), world_size())
    mine = shard(items)
    local = fn(mine) if mine else torch.empty(0)
    return gather_cat(local, counts, dim)


# ---------------------------------------------------------------------------------------------
# Training


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``module`` in a world > 1 (it broadcasts rank 0's
    parameters and buffers, then averages gradients); ``module`` itself in a world of 1."""
    if world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)
