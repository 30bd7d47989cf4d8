"""Per-class scores of a class-conditional model's samples (issue 17).

A class-conditional row samples seed s as class y(s) = (s - evaluate.seed) mod K
(fewstep.math.guidance.cycle_labels). Beside the overall FD/KID of every row it gets:

- the evaluator's classification accuracy: the fraction of samples whose argmax class is the
  asked class, overall and per class, each with its binomial standard error sqrt(p (1 - p) / n);
- per class c (``evaluate.per_class``): FD (with its bootstrap interval) and KID of the samples
  of class c against the test split's images of class c, in the same evaluator features
  (fewstep.evaluation.feature_scores, the overall scores' function).

Test images are held out from the evaluator's training and from the overall reference (the
training split), so a class's FD here has its own floor: the test images of a class against
themselves score 0 only in the limit; compare per-class FDs with each other at equal n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fewstep.errors import UserError
from fewstep.evaluation import feature_scores, reference_stats


class ClassEvaluationError(UserError, ValueError):
    """A class-conditional model that the evaluator or the test split cannot score per class: a
    label out of range, a class count that differs from the evaluator's, or too few test images."""


@dataclass(frozen=True)
class ClassReference:
    """What a class-conditional row is scored against: the class names (index = label) and, when
    per-class scores are on, each class's reference statistics from the test split (mu, sigma and
    the feature subset KID uses: all of that class's test features)."""

    names: tuple[str, ...]
    stats: tuple[dict[str, np.ndarray], ...] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.names)


def check_labels_in_range(labels: np.ndarray | torch.Tensor | Sequence[int], num_classes: int,
                          what: str) -> np.ndarray:
    """``labels`` as an int64 array, or a ClassEvaluationError naming ``what`` and the first label
    outside 0..num_classes-1."""
    y = np.asarray(labels)
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ClassEvaluationError(f"{what}: class labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64).reshape(-1)
    bad = y[(y < 0) | (y >= num_classes)]
    if bad.size:
        raise ClassEvaluationError(f"{what}: class label {int(bad[0])} out of range 0..{num_classes - 1} "
                                   f"({num_classes} classes)")
    return y


def class_reference(names: Sequence[str], feats: np.ndarray | None = None, labels: np.ndarray | None = None, *,
                    subset: int = 5000, seed: int = 0) -> ClassReference:
    """The per-class references from test features ``feats`` (N, d) with their ``labels`` (N,);
    names only (accuracy without per-class FD/KID) when ``feats`` is None. Every class needs at
    least 2 test images (a covariance)."""
    names = tuple(str(n) for n in names)
    if feats is None:
        return ClassReference(names)
    if labels is None or len(labels) != len(feats):
        raise ClassEvaluationError(f"per-class references need one test label per test image, got "
                                   f"{None if labels is None else len(labels)} labels for {len(feats)} images")
    y = check_labels_in_range(labels, len(names), "the test split's labels")
    stats = []
    for c, name in enumerate(names):
        f = feats[y == c]
        if len(f) < 2:
            raise ClassEvaluationError(f"class {c} ({name}) has {len(f)} test image(s); per-class FD/KID needs at "
                                       "least 2 (set evaluate.per_class: false, or prepare more test images)")
        stats.append(reference_stats(f, subset, seed))
    return ClassReference(names, tuple(stats))


def binomial_se(p: float, n: int) -> float:
    """Standard error of a proportion p measured on n trials: sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1.0 - p) / n) if n > 0 else math.nan


def classification_accuracy(predicted: np.ndarray, asked: np.ndarray, num_classes: int) -> dict:
    """The fraction of samples classified as the asked class, overall and per class (index -> block),
    each with n and its standard error."""
    predicted, asked = np.asarray(predicted).reshape(-1), np.asarray(asked).reshape(-1)
    if predicted.shape != asked.shape:
        raise ClassEvaluationError(f"{len(predicted)} predictions for {len(asked)} asked labels")
    hit = predicted == asked

    def block(mask: np.ndarray) -> dict:
        n = int(mask.sum())
        p = float(hit[mask].mean()) if n else math.nan
        return {"n": n, "accuracy": p, "accuracy_se": binomial_se(p, n)}

    return {**block(np.ones_like(hit)), "per_class": [block(asked == c) for c in range(num_classes)]}


def class_scores(feats: np.ndarray, predicted: np.ndarray, asked: np.ndarray, ref: ClassReference, *,
                 kid_subsets: int, seed: int, resamples: int = 0) -> dict:
    """The keys a class-conditional row adds: ``accuracy`` and ``accuracy_se`` (overall), and with
    per-class references ``per_class``: class name -> {n, fd (fd_lo, fd_hi), kid, kid_se, accuracy,
    accuracy_se} of that class's samples against its test images."""
    asked = check_labels_in_range(asked, ref.num_classes, "the asked labels")
    acc = classification_accuracy(predicted, asked, ref.num_classes)
    out: dict = {"accuracy": acc["accuracy"], "accuracy_se": acc["accuracy_se"]}
    if ref.stats is None:
        return out
    per = {}
    for c, name in enumerate(ref.names):
        f = feats[asked == c]
        a = acc["per_class"][c]
        if len(f) < 3:  # KID's sampling s.e. (metrics.kid_influence) needs 3
            raise ClassEvaluationError(f"class {c} ({name}) has {len(f)} sample(s) in this row; per-class FD/KID "
                                       f"needs at least 3 (evaluate.n_samples >= 3 x {ref.num_classes} classes)")
        per[name] = {"n": len(f), **feature_scores(f, ref.stats[c], kid_subsets, seed, resamples),
                     "accuracy": a["accuracy"], "accuracy_se": a["accuracy_se"]}
    out["per_class"] = per
    return out


def class_major(asked: np.ndarray, num_classes: int, per_class: int) -> list[int]:
    """Indices of the first ``per_class`` samples of each class, class 0's first: a grid with
    ``per_class`` columns then shows one class per row."""
    asked = np.asarray(asked)
    return [int(i) for c in range(num_classes) for i in np.flatnonzero(asked == c)[:per_class]]
