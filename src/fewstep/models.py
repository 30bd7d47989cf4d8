"""Self-describing model directories: ``model.safetensors`` + ``config.json``.

The config carries everything needed to rebuild the denoiser (architecture, parameterisation,
schedule) and the lineage of what it was made from (data hash, params hash, parent hash).
Loading never unpickles: weights are safetensors, the config is JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fewstep import storage
from fewstep.math.param import NetDenoiser
from fewstep.math.schedules import Schedule, make_schedule
from fewstep.math.split import SIDES, SplitDenoiser
from fewstep.nets.unet import UNet, UNetConfig

FORMAT_VERSION = 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def schedule_from_dict(d: dict[str, Any]) -> Schedule:
    kw = {k: d[k] for k in ("logsnr_min", "logsnr_max") if k in d and d.get("kind") == "cosine"}
    return make_schedule(d["kind"], int(d["T"]), **kw)


def save_model(directory: str | Path, net: UNet, meta: dict[str, Any]) -> str:
    """Write weights and config atomically; returns the sha256 of the weights file."""
    directory = Path(directory)
    cfg = {"format_version": FORMAT_VERSION, "net": net.cfg.to_dict(), **meta}
    with storage.atomic_dir(directory) as tmp:
        storage.save_tensors(tmp / WEIGHTS, net.state_dict(), metadata={"fewstep": "model"})
        cfg["weights_sha256"] = storage.sha256_file(tmp / WEIGHTS)
        storage.write_json(tmp / CONFIG, cfg)
    return cfg["weights_sha256"]


def load_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"no model config at {path}")
    cfg = storage.read_json(path)
    if cfg.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {cfg.get('format_version')!r}")
    return cfg


def save_split(directory: str | Path, nets: dict[str, UNet], meta: dict[str, Any]) -> str:
    """A split (two-network) model as one model dir: weights ``high.*`` and ``low.*`` in one
    safetensors file; config ``nets`` names both architectures, ``split`` the boundary."""
    if set(nets) != set(SIDES):
        raise ValueError(f"a split model needs nets {SIDES}, got {sorted(nets)}")
    if "split" not in meta:
        raise ValueError("a split model's meta needs a 'split' entry (boundary_logsnr)")
    directory = Path(directory)
    cfg = {"format_version": FORMAT_VERSION, "nets": {s: nets[s].cfg.to_dict() for s in SIDES}, **meta}
    state = {f"{s}.{k}": v for s in SIDES for k, v in nets[s].state_dict().items()}
    with storage.atomic_dir(directory) as tmp:
        storage.save_tensors(tmp / WEIGHTS, state, metadata={"fewstep": "split-model"})
        cfg["weights_sha256"] = storage.sha256_file(tmp / WEIGHTS)
        storage.write_json(tmp / CONFIG, cfg)
    return cfg["weights_sha256"]


def is_split(cfg: dict[str, Any]) -> bool:
    return "nets" in cfg


def denoiser_from_config(cfg: dict[str, Any], state: dict[str, torch.Tensor],
                         device: str | torch.device = "cpu") -> NetDenoiser | SplitDenoiser:
    """The denoiser a config describes (one network, or a split pair), with weights ``state``."""
    schedule = schedule_from_dict(cfg["schedule"])
    if is_split(cfg):
        dens = {}
        for side in SIDES:
            net = UNet(UNetConfig(**cfg["nets"][side]))
            pre = side + "."
            net.load_state_dict({k[len(pre):]: v for k, v in state.items() if k.startswith(pre)})
            dens[side] = NetDenoiser(net.to(device).eval(), schedule, cfg["parameterization"])
        den = SplitDenoiser(dens["high"], dens["low"], float(cfg["split"]["boundary_logsnr"]))
    else:
        net = UNet(UNetConfig(**cfg["net"]))
        net.load_state_dict(state)
        den = NetDenoiser(net.to(device).eval(), schedule, cfg["parameterization"])
    den = den.eval().requires_grad_(False)
    den.config = cfg  # lineage travels with the object
    return den


def single_net(den: NetDenoiser | SplitDenoiser) -> UNet:
    """The one network to start a student from: the net itself, or a split model's low-noise net
    (the finer of the two, trained where detail is decided)."""
    return den.low.net if isinstance(den, SplitDenoiser) else den.net


def load_net(directory: str | Path, device: str | torch.device = "cpu") -> tuple[UNet, dict[str, Any]]:
    cfg = load_config(directory)
    if is_split(cfg):
        raise ValueError(f"{directory} is a split (two-network) model; load it with load_denoiser")
    net = UNet(UNetConfig(**cfg["net"]))
    state = storage.load_tensors(Path(directory) / WEIGHTS)
    net.load_state_dict(state)
    return net.to(device).eval(), cfg


def load_denoiser(directory: str | Path, device: str | torch.device = "cpu") -> NetDenoiser | SplitDenoiser:
    """Rebuild the denoiser (network(s) + schedule + parameterisation) from a model directory."""
    cfg = load_config(directory)
    return denoiser_from_config(cfg, storage.load_tensors(Path(directory) / WEIGHTS), device)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("params ask for device 'cuda' but no CUDA device is available")
    return torch.device(name)
