"""Plain helpers shared by the tests: the tiny profile, toy data, and subprocess environments.

Fixtures live in the conftest.py files; nothing here is a fixture."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import yaml

from fewstep import storage

ROOT = Path(__file__).resolve().parents[1]


def tiny_images(n: int = 64, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Structured toy images: a bright square on a dark background, two classes by colour."""
    rng = np.random.default_rng(seed)
    imgs = np.full((n, size, size, 3), 30, np.uint8)
    labels = rng.integers(0, 2, n)
    for i in range(n):
        r, c = rng.integers(0, size // 2, 2)
        color = (220, 60, 60) if labels[i] == 0 else (60, 60, 220)
        imgs[i, r : r + size // 2, c : c + size // 2] = color
    return imgs, labels.astype(np.int64)


def write_prepared(out: Path, size: int = 8, n: int = 64) -> dict:
    imgs, labels = tiny_images(n, size)
    out.mkdir(parents=True, exist_ok=True)
    storage.save_array(out / "train_images.npy", imgs)
    storage.save_array(out / "train_labels.npy", labels)
    manifest = {"class_names": ["red", "blue"], "content_hash": storage.sha256_arrays(imgs, labels),
                "resolution": size, "splits": {"train": {"count": n}}}
    storage.write_json(out / "manifest.json", manifest)
    return manifest


def tiny_params(**teacher) -> dict:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p = copy.deepcopy(p)
    p["base"]["image_size"] = 8
    p["schedule"]["T"] = 64
    t = p["teacher"]
    t["net"] = {"patch_size": 1, "channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
                "attn_resolutions": [4], "head_dim": 8, "dropout": 0.0}
    t.update(steps=60, batch_size=16, lr=2e-3, warmup=5, checkpoint_every=20, log_every=10)
    t["t_sampling"] = None  # t uniform, as the tiny tests' quality margins were measured (pass it to test another)
    t["sample"] = {"n": 4, "steps": 4, "spacing": "trailing", "seed": 0}
    t.update(teacher)
    return p


def write_params(path: Path, p: dict) -> Path:
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ with the repository root on PYTHONPATH, so `python -m stages.X` runs from any cwd.

    Run stage subprocesses with ``cwd=tmp_path`` and this env: whatever a stage writes to its
    working directory by default (``mlflow.db``, ``mlartifacts/``) then lands in the test's temp dir,
    never in the repository."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env
