"""Registered model names (no MLflow needed).

``<dataset>-teacher`` (``<dataset>-teacher-<variant>`` for a patch-study teacher or a split model),
``<dataset>-student-<k>step``, ``<dataset>-olss-<model>-<n>step`` and ``<dataset>-evaluator``. A
student or OLSS name is a budget (one step count), so the OLSS variants of a model and step count
(closed-loop, open-loop, OLSS-P) are versions of one name and compete for its champion alias.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fewstep.models import ModelCard

CHAMPION = "champion"


def model_name(dataset: str | None, role: str, sample_steps: int, variant: str | None = None) -> str:
    """The registered name of a teacher or student of ``dataset`` (also a student's parent)."""
    if role == "teacher":
        return f"{dataset}-teacher" + (f"-{variant}" if variant else "")
    if role == "student":
        return f"{dataset}-student-{int(sample_steps)}step"
    raise ValueError(f"unknown model role {role!r}")


def model_registry_name(card: "ModelCard") -> str:
    """The registered name of a teacher or student model card."""
    return model_name(card.lineage.dataset, card.role, card.sample_steps, card.variant)


def scheduler_registry_name(dataset: str, model: str, steps: int) -> str:
    return f"{dataset}-olss-{model}-{int(steps)}step"


def evaluator_registry_name(dataset: str) -> str:
    return f"{dataset}-evaluator"
