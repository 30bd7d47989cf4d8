"""MLflow for fewstep: the only package that imports mlflow (besides the pyfunc classes MLflow
itself loads, sampler_pyfunc.py and evaluator_pyfunc.py).

    store         the tracking store and experiment (configure, Tracking), the SQLite store lock
    runs          stage runs: stage_run, record_stage, pipeline_run, metric keys
    names         registered names (no mlflow)
    registration  model dirs, the evaluator and OLSS schedulers as pyfunc versions with lineage
    decision      the champion rule, pure (no mlflow)
    promotion     moving the champion alias by that rule
    ../provenance git commit, dvc.lock hashes, flattened params (no mlflow)

Every function takes its configuration as arguments (no FEWSTEP_* variable is read here; the entry
points pass ``fewstep.settings`` values). Names are loaded on first use, so ``tracking.decide`` or
``fewstep.tracking.decision`` cost no mlflow import; the package still needs mlflow installed
(``import fewstep.tracking`` raises ImportError without it, which stages use to skip tracking).

Registered names: ``<dataset>-teacher``, ``<dataset>-student-<k>step``, ``<dataset>-olss-<model>-<n>step``
and ``<dataset>-evaluator``. The ``champion`` alias moves only on a complete evaluation that beats
the champion's FD, measured in the same evaluation, by a relative margin (:func:`promote`).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if importlib.util.find_spec("mlflow") is None:
    raise ImportError("fewstep.tracking needs mlflow (pip install mlflow)", name="mlflow")

_WHERE = {
    "fewstep.tracking.store": ("Tracking", "configure", "default_tracking_uri", "default_artifact_root",
                               "registry_lock", "store_lock", "DEFAULT_EXPERIMENT"),
    "fewstep.tracking.runs": ("StageRun", "stage_run", "record_stage", "pipeline_run", "metric_key", "run_tags"),
    "fewstep.tracking.names": ("model_name", "model_registry_name", "scheduler_registry_name",
                               "evaluator_registry_name", "CHAMPION"),
    "fewstep.tracking.registration": ("LineageError", "Registered", "Source", "find_version", "register_model_dir",
                                      "register_evaluator", "register_scheduler", "register_all", "lineage",
                                      "SAMPLER_ARTIFACT", "DownloadedVersion", "download_version",
                                      "parse_version_ref"),
    "fewstep.tracking.decision": ("ChampionState", "Decision", "decide"),
    "fewstep.tracking.promotion": ("Promotion", "champion", "promote"),
    "fewstep.provenance": ("git_commit", "dvc_lock_entry", "dvc_lock_hash", "dvc_producer", "flatten_params"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'fewstep.tracking' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from fewstep.provenance import dvc_lock_entry, dvc_lock_hash, dvc_producer, flatten_params, git_commit
    from fewstep.tracking.decision import ChampionState, Decision, decide
    from fewstep.tracking.names import (
        CHAMPION, evaluator_registry_name, model_name, model_registry_name, scheduler_registry_name)
    from fewstep.tracking.promotion import Promotion, champion, promote
    from fewstep.tracking.registration import (
        SAMPLER_ARTIFACT, LineageError, Registered, Source, find_version, lineage, register_all, register_evaluator,
        register_model_dir, register_scheduler)
    from fewstep.tracking.runs import StageRun, metric_key, pipeline_run, record_stage, run_tags, stage_run
    from fewstep.tracking.store import (
        DEFAULT_EXPERIMENT, Tracking, configure, default_artifact_root, default_tracking_uri, registry_lock,
        store_lock)
