"""Registered model names (no MLflow needed).

``<dataset>-teacher`` (``<dataset>-teacher-<variant>`` for a patch-study teacher or a split model),
``<dataset>-student-<k>step``, ``<dataset>-olss-<model>-<n>step`` and ``<dataset>-evaluator``. A
student or OLSS name is a budget (one step count), so the OLSS variants of a model and step count
(closed-loop, open-loop, OLSS-P) are versions of one name and compete for its champion alias.
"""

from __future__ import annotations

from typing import Any, Mapping

CHAMPION = "champion"


def model_registry_name(cfg: Mapping[str, Any]) -> str:
    """The registered name of a teacher or student model config."""
    if cfg["role"] == "teacher":
        return f"{cfg['dataset']}-teacher" + (f"-{cfg['variant']}" if cfg.get("variant") else "")
    if cfg["role"] == "student":
        return f"{cfg['dataset']}-student-{int(cfg['sample_steps'])}step"
    raise ValueError(f"unknown model role {cfg['role']!r}")


def scheduler_registry_name(dataset: str, model: str, steps: int) -> str:
    return f"{dataset}-olss-{model}-{int(steps)}step"


def evaluator_registry_name(dataset: str) -> str:
    return f"{dataset}-evaluator"
