"""Run a stage in one process or under torchrun, the world size taken from params or the env.

    python -m fewstep.launch [--nproc N] [--nnodes M] [--dry-run] -m stages.NAME [stage args...]

World size (processes over all nodes), first that is set: --nproc, $FEWSTEP_WORLD_SIZE,
``distributed.world_size`` of the stage's params (its --params / --profile, else params.yaml and
$FEWSTEP_PROFILE); 0 means one process per visible GPU (1 without CUDA). Nodes likewise: --nnodes,
$FEWSTEP_NNODES, ``distributed.nnodes``.

* world size 1, or already inside torchrun (RANK/WORLD_SIZE set): the stage runs right here,
  exactly as ``python -m stages.NAME`` (no torchrun, no process group);
* one node: ``torchrun --standalone --nproc-per-node N -m stages.NAME ...``;
* several nodes: run this same command on every node; ``torchrun --nnodes M --nproc-per-node N/M
  --rdzv-backend c10d --rdzv-endpoint $FEWSTEP_RDZV_ENDPOINT --rdzv-id $FEWSTEP_RUN_ID`` (the
  endpoint defaults to $MASTER_ADDR:$MASTER_PORT, port 29400). The checkpoint and output
  directories must be on storage every node sees (the stages' ranks read checkpoints; rank 0
  writes).
"""

from __future__ import annotations

from fewstep.errors import UserError

import argparse
import os
import runpy
import shlex
import sys
from typing import Sequence

from fewstep import settings
from fewstep.settings import Settings

DEFAULT_RDZV_PORT = 29400


class LaunchError(UserError, ValueError):
    """The launch request is inconsistent (bad world size, missing rendezvous endpoint)."""


def _split(argv: Sequence[str]) -> tuple[list[str], str, list[str]]:
    argv = list(argv)
    if "-m" not in argv:
        raise LaunchError("usage: python -m fewstep.launch [--nproc N] [--nnodes M] -m stages.NAME [args...]")
    i = argv.index("-m")
    if i + 1 >= len(argv):
        raise LaunchError("-m needs a module name (e.g. -m stages.train_teacher)")
    return argv[:i], argv[i + 1], argv[i + 2 :]


def _settings() -> Settings:
    """This process's FEWSTEP_* settings (the launcher is an entry point); a bad value is a LaunchError."""
    try:
        return settings.current()
    except settings.SettingsError as e:
        raise LaunchError(str(e)) from None


def _params_dist(stage_args: Sequence[str]) -> tuple[int, int]:
    """(world_size, nnodes) from the params the stage itself will read."""
    from fewstep.config import load_params

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default=None)
    a, _ = ap.parse_known_args(list(stage_args))
    d = load_params(a.params, a.profile or _settings().profile).distributed
    return d.world_size, d.nnodes


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def resolve(nproc: int | None, nnodes: int | None, stage_args: Sequence[str]) -> tuple[int, int]:
    """(world size, nodes): flag, then env, then params; world size 0 = one per visible GPU."""
    world, nodes = nproc, nnodes
    if world is None or nodes is None:
        env = _settings()
        world = env.world_size if world is None else world
        nodes = env.nnodes if nodes is None else nodes
    if world is None or nodes is None:
        pw, pn = _params_dist(stage_args)
        world = pw if world is None else world
        nodes = pn if nodes is None else nodes
    if nodes < 1:
        raise LaunchError(f"nnodes must be >= 1, got {nodes}")
    if world == 0:
        world = max(1, visible_gpus()) * nodes  # every node like this one
    if world < 1:
        raise LaunchError(f"world size must be >= 1 (or 0 = one per GPU), got {world}")
    if world % nodes:
        raise LaunchError(f"world size {world} does not split evenly over {nodes} nodes")
    return world, nodes


def torchrun_argv(module: str, stage_args: Sequence[str], world: int, nodes: int) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if nodes == 1:
        cmd += ["--standalone", "--nproc-per-node", str(world)]
    else:
        env = _settings()
        endpoint = env.rdzv_endpoint
        if not endpoint:
            addr = os.environ.get("MASTER_ADDR")
            if not addr:
                raise LaunchError(f"{nodes} nodes need a rendezvous endpoint: set $FEWSTEP_RDZV_ENDPOINT "
                                  "(host:port of node 0, reachable from every node) or $MASTER_ADDR")
            endpoint = f"{addr}:{os.environ.get('MASTER_PORT', DEFAULT_RDZV_PORT)}"
        cmd += ["--nnodes", str(nodes), "--nproc-per-node", str(world // nodes), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", endpoint, "--rdzv-id", env.run_id or "fewstep"]
    return cmd + ["-m", module, *stage_args]


def inside_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def main(argv: Sequence[str] | None = None) -> None:
    try:
        _main(sys.argv[1:] if argv is None else argv)
    except (LaunchError, ValueError) as e:  # ParamsError is a ValueError
        print(f"fewstep.launch: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _main(argv: Sequence[str]) -> None:
    own, module, stage_args = _split(argv)
    ap = argparse.ArgumentParser(prog="python -m fewstep.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=None, help="world size (processes over all nodes)")
    ap.add_argument("--nnodes", type=int, default=None, help="machines")
    ap.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    a = ap.parse_args(own)
    world, nodes = (1, 1) if inside_torchrun() else resolve(a.nproc, a.nnodes, stage_args)
    if world == 1:
        if a.dry_run:
            print(shlex.join([sys.executable, "-m", module, *stage_args]))
            return
        sys.argv = [module, *stage_args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    cmd = torchrun_argv(module, stage_args, world, nodes)
    print(f"fewstep.launch: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    if a.dry_run:
        print(shlex.join(cmd))
        return
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
