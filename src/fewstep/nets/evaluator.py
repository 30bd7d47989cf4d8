"""The evaluator: a small CNN classifier whose penultimate features define the evaluation space
(Inception weights cannot be downloaded here; the pipeline trains its own on the same data)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class EvaluatorConfig:
    num_classes: int = 10
    widths: tuple[int, ...] = (64, 128, 256)
    blocks_per_stage: int = 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(h)) + self.skip(x))


class Evaluator(nn.Module):
    """ResNet-style: stem, stages of residual blocks (stride 2 between stages), global average pool."""

    def __init__(self, cfg: EvaluatorConfig):
        super().__init__()
        self.cfg = cfg
        w0 = cfg.widths[0]
        self.stem = nn.Sequential(nn.Conv2d(3, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU())
        layers, cin = [], w0
        for i, w in enumerate(cfg.widths):
            for j in range(cfg.blocks_per_stage):
                layers.append(_Block(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin, cfg.num_classes)

    @property
    def feature_dim(self) -> int:
        return self.cfg.widths[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [-1, 1]."""
        return self.body(self.stem(x)).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
