"""The MLflow pyfunc evaluator: a registered ``<dataset>-evaluator`` version that turns images into
the features FD/KID are computed in (or class logits / probabilities).

Artifacts (never pickled): ``weights`` (safetensors), ``config`` (the model dir's config.json) and
``ref_stats`` (the training split's feature mean, covariance and subset). Like sampler_pyfunc.py,
this file is the model's code ("models from code") and fewstep travels as ``code_paths``.

``predict(context, images)``: uint8 (n, H, W, 3), as a sampler returns them -> float32 (n, d)
features; ``predict(context, {"images": images, "output": "features" | "logits" | "probs"})`` picks
the output.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch

from fewstep.images import from_uint8
from fewstep.train.evaluator import features, load_evaluator_files

OUTPUTS = ("features", "logits", "probs")


def evaluate_images(net: Any, images: Any, output: str = "features") -> np.ndarray:
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (n, H, W, 3), got {arr.dtype} {arr.shape}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    x = from_uint8(arr)
    if output == "features":
        return features(net, x).astype(np.float32)
    dev = next(net.parameters()).device
    with torch.no_grad():
        logits = torch.cat([net(x[i : i + 500].to(dev)).float().cpu() for i in range(0, len(x), 500)])
    return (logits.softmax(-1) if output == "probs" else logits).numpy()


class FewstepEvaluator(mlflow.pyfunc.PythonModel):
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        device = dict(context.model_config or {}).get("device", "cpu")  # MLflow's model_config
        self.net, self.ref_stats = load_evaluator_files(context.artifacts["weights"], context.artifacts["config"],
                                                        context.artifacts.get("ref_stats"), device)

    def predict(self, context, model_input, params=None):
        if isinstance(model_input, dict):
            unknown = set(model_input) - {"images", "output"}
            if unknown or "images" not in model_input:
                raise ValueError(f"expected {{'images': uint8 (n, H, W, 3), 'output': {OUTPUTS}}}, got keys "
                                 f"{sorted(model_input)}")
            return evaluate_images(self.net, model_input["images"], model_input.get("output", "features"))
        return evaluate_images(self.net, model_input)


if __name__ != "fewstep.evaluator_pyfunc":
    mlflow.models.set_model(FewstepEvaluator())
