"""The MLflow pyfunc sampler: a registered model version that turns ``{"n", "seed", "steps"}`` into images.

Artifacts (copied into the MLflow model, never pickled): ``weights`` (safetensors), ``config``
(the model dir's config.json: its ModelCard) and, for an OLSS version, ``scheduler`` (olss-N.json). The fewstep
package travels with the model as ``code_paths``, and this file is the model's code
(MLflow "models from code"), so loading needs neither cloudpickle nor an installed fewstep.

``predict(context, {"n": 4, "seed": 10, "steps": 2})`` returns uint8 (n, H, W, 3); image i uses
seed ``seed + i`` through its own generator (fewstep.math.ddim.PerImageNoise), so an image does
not depend on n or on the batch it is drawn in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch

from fewstep import models, samplers, storage
from fewstep.images import to_uint8
from fewstep.math.olss import OLSSScheduler
from fewstep.math.param import NetDenoiser
from fewstep.math.split import SplitDenoiser
from fewstep.models import ModelCard

SPACING = "trailing"  # the spacing every fewstep stage samples students with


@dataclass
class Sampler:
    denoiser: NetDenoiser | SplitDenoiser
    card: ModelCard
    scheduler: OLSSScheduler | None
    default_steps: int
    device: torch.device

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.card.image_shape

    def plan(self, steps: int | None) -> tuple[str, int, dict[str, Any]]:
        """(registered sampler, steps, options) for a request: the OLSS scheduler at its own step
        count, else DDIM at ``steps`` (default: default_steps) on the trailing grid."""
        if self.scheduler is not None:
            if steps is not None and int(steps) != self.scheduler.steps:
                raise ValueError(f"this OLSS scheduler samples in exactly {self.scheduler.steps} steps, not {steps}")
            return "olss", self.scheduler.steps, {"scheduler": self.scheduler}
        T = self.denoiser.schedule.T
        k = int(steps) if steps is not None else self.default_steps
        if not 1 <= k <= T:
            raise ValueError(f"steps must be in 1..{T}, got {k}")
        return "ddim", k, {"spacing": SPACING}

    def sample(self, n: int, seed: int, steps: int | None = None, batch_size: int = 256) -> np.ndarray:
        """uint8 (n, H, W, C) for seeds seed .. seed+n-1."""
        sampler, k, options = self.plan(steps)
        seeds = range(int(seed), int(seed) + int(n))
        return to_uint8(samplers.generate(sampler, self.denoiser, seeds, self.shape, steps=k, batch_size=batch_size,
                                          device=self.device, **options))


def load_sampler(
    weights: str | Path,
    config: str | Path,
    scheduler: str | Path | None = None,
    default_steps: int | None = None,
    device: str | torch.device = "cpu",
) -> Sampler:
    """Rebuild the denoiser from explicit artifact paths; the weights must match the card's hash."""
    card = ModelCard.from_json(Path(config).read_text())
    digest = storage.sha256_file(weights)
    if digest != card.weights_sha256:
        raise ValueError(f"{weights}: sha256 {digest[:12]} does not match the config's {str(card.weights_sha256)[:12]}")
    dev = torch.device(device)
    den = models.denoiser_from_card(card, storage.load_tensors(weights), dev)  # one net or a split pair
    sched = None
    if scheduler is not None:
        with storage.open_read(scheduler) as f:
            sched = OLSSScheduler.from_json(f.read().decode())
    steps = int(default_steps) if default_steps else card.sample_steps
    return Sampler(den, card, sched, steps, dev)


def parse_request(model_input: Any) -> tuple[int, int, int | None]:
    """(n, seed, steps) from a dict, a one-element list of dicts, or a one-row DataFrame."""
    req = model_input
    if hasattr(req, "to_dict") and hasattr(req, "columns"):  # pandas DataFrame (REST scoring)
        rows = req.to_dict(orient="records")
        req = rows[0] if len(rows) == 1 else rows
    if isinstance(req, list) and len(req) == 1:
        req = req[0]
    if not isinstance(req, dict):
        raise TypeError(f"expected a dict {{'n': int, 'seed': int, 'steps': int?}}, got {type(model_input).__name__}")
    unknown = set(req) - {"n", "seed", "steps"}
    if unknown:
        raise ValueError(f"unknown request keys {sorted(unknown)}; expected n, seed and optional steps")
    try:
        n, seed = int(req["n"]), int(req.get("seed", 0))
        steps = req.get("steps")
        steps = None if steps is None or steps != steps else int(steps)  # steps != steps: NaN from a DataFrame
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"bad request {req!r}: n (int >= 1), seed (int), steps (int, optional)") from e
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return n, seed, steps


class FewstepSampler(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around :class:`Sampler`; ``model_config`` may set default_steps and device."""

    # predict has no type hints so the request dict arrives unchanged (mlops.md 4a); this MLflow
    # switch (used by its ChatModel) skips the hint check and its "add type hints" warning.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        model_config = dict(context.model_config or {})  # MLflow's model_config: default_steps, device
        self.sampler = load_sampler(
            context.artifacts["weights"],
            context.artifacts["config"],
            context.artifacts.get("scheduler"),
            default_steps=model_config.get("default_steps"),
            device=model_config.get("device", "cpu"),
        )

    def predict(self, context, model_input, params=None):
        n, seed, steps = parse_request(model_input)
        return self.sampler.sample(n, seed, steps)


if __name__ != "fewstep.sampler_pyfunc":
    # Executed by MLflow as the model's code file (models from code), not imported as a module.
    mlflow.models.set_model(FewstepSampler())
