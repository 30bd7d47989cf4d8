"""Shared CLI plumbing for the stages: params, profile, device, threads, clear errors."""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import torch

from fewstep import dist
from fewstep.config import Params, ParamsError, load_params
from fewstep.models import resolve_device


def parser(doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file")
    ap.add_argument("--profile", default=None, help="merge profiles/NAME.yaml over the params (or $FEWSTEP_PROFILE)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def setup(args: argparse.Namespace) -> tuple[Params, torch.device]:
    """Validate params before any work; pick the device and thread count. Under torchrun
    (WORLD_SIZE > 1) join the process group: this rank's device (cuda:LOCAL_RANK or the CPU)."""
    p = load_params(args.params, args.profile)
    if p.base.threads:
        torch.set_num_threads(p.base.threads)
    return p, dist.init(resolve_device(p.base.device))


@contextmanager
def clear_errors(stage: str) -> Iterator[None]:
    """Expected failures (bad params, bad data, diverged training) end with one clear line, rc 2."""
    from fewstep.data import DataError
    from fewstep.storage import StorageError
    from fewstep.train.loop import TrainingDivergedError

    t0 = time.perf_counter()
    try:
        yield
    except (ParamsError, DataError, StorageError, TrainingDivergedError, FileNotFoundError, dist.DistError) as e:
        print(f"{stage}: error: {e}" + (f" (rank {dist.rank()})" if dist.world_size() > 1 else ""), file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        dist.shutdown()
    if dist.env_world()[0] == 0:
        print(f"{stage}: done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
