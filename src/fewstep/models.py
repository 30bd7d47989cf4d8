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


def load_net(directory: str | Path, device: str | torch.device = "cpu") -> tuple[UNet, dict[str, Any]]:
    cfg = load_config(directory)
    net = UNet(UNetConfig(**cfg["net"]))
    state = storage.load_tensors(Path(directory) / WEIGHTS)
    net.load_state_dict(state)
    return net.to(device).eval(), cfg


def load_denoiser(directory: str | Path, device: str | torch.device = "cpu") -> NetDenoiser:
    """Rebuild the denoiser (network + schedule + parameterisation) from a model directory."""
    net, cfg = load_net(directory, device)
    den = NetDenoiser(net, schedule_from_dict(cfg["schedule"]), cfg["parameterization"]).eval().requires_grad_(False)
    den.config = cfg  # lineage travels with the object
    return den


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("params ask for device 'cuda' but no CUDA device is available")
    return torch.device(name)
