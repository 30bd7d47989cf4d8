"""Training the evaluator classifier and computing reference feature statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from fewstep import storage
from fewstep.images import from_uint8
from fewstep.math import precision
from fewstep.nets.evaluator import Evaluator, EvaluatorConfig
from fewstep.train.loop import LoopConfig, train

WEIGHTS, CONFIG, STATS = "model.safetensors", "config.json", "ref_stats.safetensors"


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random crop of a 2-pixel reflect-padded image."""
    B, _, H, W = x.shape
    flip = torch.rand(B, generator=gen, device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    pad = F.pad(x, (2, 2, 2, 2), mode="reflect")
    dy, dx = (int(v) for v in torch.randint(0, 5, (2,), generator=gen, device=x.device))
    return pad[:, :, dy : dy + H, dx : dx + W]


def classifier_loss(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Callable[[torch.nn.Module, torch.Generator],
                                                                                  torch.Tensor]:
    """loss_fn(model, gen) of the evaluator's training: a batch drawn with replacement from images
    ``x`` in [-1, 1] (N, 3, H, W) with labels ``y``, augmented, label-smoothed cross-entropy. On the
    CPU the forward follows the precision policy (base.cpu_bf16, base.channels_last); CUDA trains
    in float32."""
    dev = x.device
    fmt = precision.memory_format(dev, cuda=False)

    def loss_fn(model: torch.nn.Module, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(x), (batch_size,), generator=gen, device=dev)
        with precision.autocast(dev, cuda=False):
            logits = model(precision.to_format(_augment(x[idx], gen), fmt))
        return F.cross_entropy(logits.float(), y[idx], label_smoothing=0.1)

    return loss_fn


@torch.no_grad()
def features(net: Evaluator, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """(N, d) float64 features of images in [-1, 1] (N, 3, H, W)."""
    net.eval()
    dev = next(net.parameters()).device
    out = [net.features(images[i : i + batch_size].to(dev).float()).double().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


@torch.no_grad()
def accuracy(net: Evaluator, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    net.eval()
    dev = next(net.parameters()).device
    correct = sum(int((net(images[i : i + batch_size].to(dev)).argmax(1).cpu() == labels[i : i + batch_size]).sum())
                  for i in range(0, len(images), batch_size))
    return correct / max(1, len(images))


def train_evaluator(ep: Any, data_dir: Path, out_dir: Path, ckpt_dir: Path, seed: int, device: torch.device,
                    progress: bool = True) -> dict[str, Any]:
    """Train, then write out_dir/{model.safetensors, config.json, ref_stats.safetensors}."""
    manifest = storage.read_json(data_dir / "manifest.json")
    x_train = from_uint8(storage.load_array(data_dir / "train_images.npy"))
    y_train = torch.from_numpy(storage.load_array(data_dir / "train_labels.npy"))
    cfg = EvaluatorConfig(num_classes=len(manifest["class_names"]), widths=tuple(ep.widths),
                          blocks_per_stage=ep.blocks_per_stage)
    torch.manual_seed(seed)
    net = Evaluator(cfg)
    xd, yd = x_train.to(device), y_train.to(device)
    net = net.to(memory_format=precision.memory_format(device, cuda=False))
    loss_fn = classifier_loss(xd, yd, ep.batch_size)

    loop = LoopConfig(steps=ep.steps, lr=ep.lr, warmup=min(100, ep.steps // 10), lr_decay="cosine",
                      weight_decay=ep.weight_decay, grad_clip=5.0, ema_decay=None, checkpoint_every=ep.steps,
                      log_every=max(1, ep.steps // 20), seed=seed)
    run_hash = storage.sha256_json({"evaluator": ep.model_dump(), "data": manifest["content_hash"], "seed": seed})
    result = train(net, loss_fn, loop, ckpt_dir, run_hash, device, progress=progress, desc="evaluator")
    net = result.net.eval()
    pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))[:5000]
    metrics: dict[str, Any] = {"train_accuracy": accuracy(net, x_train[pick], y_train[pick])}
    if (data_dir / "test_images.npy").exists():
        x_test = from_uint8(storage.load_array(data_dir / "test_images.npy"))
        y_test = torch.from_numpy(storage.load_array(data_dir / "test_labels.npy"))
        metrics["test_accuracy"] = accuracy(net, x_test, y_test)
    feats = features(net, x_train)
    rng = np.random.default_rng(seed)
    subset = feats[rng.choice(len(feats), min(len(feats), ep.ref_subset), replace=False)]
    meta = {"format_version": 1, "role": "evaluator", "net": cfg.to_dict(), "data_hash": manifest["content_hash"],
            "class_names": manifest["class_names"], "feature_dim": net.feature_dim, **metrics}
    with storage.atomic_dir(out_dir) as tmp:
        storage.save_tensors(tmp / WEIGHTS, net.cpu().state_dict())
        storage.save_tensors(tmp / STATS, {"mu": torch.from_numpy(feats.mean(0)),
                                           "sigma": torch.from_numpy(np.cov(feats, rowvar=False)),
                                           "subset": torch.from_numpy(subset)})
        meta["weights_sha256"] = storage.sha256_file(tmp / WEIGHTS)
        storage.write_json(tmp / CONFIG, meta)
    metrics["history"] = result.history
    return metrics


def load_evaluator(directory: Path, device: torch.device | str = "cpu") -> tuple[Evaluator, dict[str, np.ndarray]]:
    d = Path(directory)
    return load_evaluator_files(d / WEIGHTS, d / CONFIG, d / STATS, device)


def load_evaluator_files(weights: str | Path, config: str | Path, stats: str | Path | None = None,
                         device: torch.device | str = "cpu") -> tuple[Evaluator, dict[str, np.ndarray]]:
    """The evaluator from explicit files (a model dir, or a registered version's artifacts); the
    weights must match the config's sha256."""
    cfg = storage.read_json(config)
    digest = storage.sha256_file(weights)
    if cfg.get("weights_sha256") not in (None, digest):
        raise ValueError(f"{weights}: sha256 {digest[:12]} does not match the config's {cfg['weights_sha256'][:12]}")
    net = Evaluator(EvaluatorConfig(**{**cfg["net"], "widths": tuple(cfg["net"]["widths"])}))
    net.load_state_dict(storage.load_tensors(weights))
    ref = {k: v.numpy() for k, v in storage.load_tensors(stats).items()} if stats else {}
    return net.to(device).eval(), ref
