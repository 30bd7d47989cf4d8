"""Training checkpoints: model, EMA and optimizer state in one safetensors file, the rest in JSON.

Layout under a checkpoint root:
    step-00001000/state.safetensors   tensors: model.*, ema.*, opt.<param index>.<name>
    step-00001000/meta.json           step, run hash, optimizer param groups, loss history
    latest.json                       {"dir": "step-00001000"}, replaced atomically last
A crash at any point leaves ``latest.json`` pointing at a complete checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from fewstep import storage


def _opt_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    groups = [dict(g, betas=list(g["betas"])) if "betas" in g else dict(g) for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _opt_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def save(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    ema: torch.nn.Module | None,
    meta: dict[str, Any],
    keep: int = 2,
) -> Path:
    root = Path(root)
    name = f"step-{step:08d}"
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt_t, opt_meta = _opt_to_tensors(opt)
    tensors.update(opt_t)
    with storage.atomic_dir(root / name) as tmp:
        storage.save_tensors(tmp / "state.safetensors", tensors)
        storage.write_json(tmp / "meta.json", {**meta, "step": step, "optimizer": opt_meta})
    storage.write_json(root / "latest.json", {"dir": name, "step": step})
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return root / name


def latest(root: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """(checkpoint dir, meta) of the latest complete checkpoint, or None."""
    root = Path(root)
    ptr = root / "latest.json"
    if not ptr.exists():
        return None
    d = root / storage.read_json(ptr)["dir"]
    if not (d / "meta.json").exists() or not (d / "state.safetensors").exists():
        return None
    return d, storage.read_json(d / "meta.json")


def restore(
    directory: str | Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    ema: torch.nn.Module | None,
    meta: dict[str, Any],
    device: torch.device | str = "cpu",
) -> None:
    tensors = storage.load_tensors(Path(directory) / "state.safetensors", device)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    _opt_from_tensors(opt, tensors, meta["optimizer"])


def clear(root: str | Path) -> None:
    root = Path(root)
    (root / "latest.json").unlink(missing_ok=True)
    for d in root.glob("step-*"):
        shutil.rmtree(d, ignore_errors=True)
