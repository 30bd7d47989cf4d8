"""The teacher imported instead of trained (params ``teacher.source``; issue 16): stage train_teacher
calls :func:`import_source` when the switch is set, so ``models/teacher`` stays that one stage's out
and every stage after it runs unchanged.

The import itself is ``fewstep.interop.unet2d.import_teacher`` (diffusers, imported lazily). Here:
the checks against the pipeline (the image size the data is prepared at, RGB, an optional sha256
pin of the source), the registry namespace (``base.dataset``), and the facts metrics/teacher.json and
the registry tags show. Nothing is written unless every check passes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from fewstep import models, storage
from fewstep.config import Params, TeacherSource
from fewstep.errors import UserError


class SourceMismatchError(UserError):
    """The imported teacher does not fit the params: its sha256 differs from the pin, or its images
    are not the size or channels the pipeline's data is prepared at."""


def source_sha256(source: Mapping[str, Any] | None) -> str | None:
    """The one digest of an imported model's source (the card's ``lineage.source``): its ``sha256``,
    else the sha256 of its per-file digests (canonical JSON). None for a model trained here."""
    if not source:
        return None
    if source.get("sha256"):
        return str(source["sha256"])
    files = source.get("files")
    return storage.sha256_json(files) if files else None


def card_source_sha256(card: models.ModelCard) -> str | None:
    """The source digest a model descends from (an imported teacher, or a student of one), or None."""
    return source_sha256(getattr(getattr(card, "lineage", None), "source", None))


def _check(card: models.ModelCard, src: TeacherSource, image_size: int) -> None:
    digest = card_source_sha256(card)
    if src.sha256 and digest != src.sha256:
        raise SourceMismatchError(f"teacher.source {src.path}: sha256 {str(digest)[:12]}... is not the pinned "
                                  f"teacher.source.sha256 {src.sha256[:12]}...; the source changed (update the pin "
                                  "to accept it)")
    if card.image_size != image_size:
        raise SourceMismatchError(f"teacher.source {src.path}: the model makes {card.image_size}px images but "
                                  f"base.image_size is {image_size} (the data distillation and evaluation use); "
                                  f"set base.image_size: {card.image_size}")
    if card.channels != 3:
        raise SourceMismatchError(f"teacher.source {src.path}: the model has {card.channels} channels; the "
                                  "prepared data is RGB (3)")


def import_source(p: Params, model_dir: str | Path) -> models.ModelCard:
    """Import ``p.teacher.source`` into ``model_dir`` (atomically: nothing is written on an error) as
    the pipeline's teacher, registered under ``base.dataset``. Returns the card written."""
    src = p.teacher.source
    if src is None:
        raise ValueError("params have no teacher.source")
    from fewstep.interop.unet2d import import_teacher  # diffusers: only when importing

    model_dir = Path(model_dir)
    with storage.atomic_dir(model_dir) as tmp:
        staged = tmp / "import"
        card = import_teacher(src.resolved_path(), staged, name=model_dir.name, null_label=src.null_label)
        _check(card, src, p.base.image_size)
        if card.lineage.dataset != p.base.dataset:  # the registry names it <dataset>-teacher, as a trained one
            card = card.updated(dataset=p.base.dataset)
            storage.write_json(staged / models.CONFIG, card.to_dict())
        for f in staged.iterdir():
            os.replace(f, tmp / f.name)
        staged.rmdir()
    return models.load_card(model_dir)


def import_metrics(card: models.ModelCard, p: Params, n_params: int, device: str) -> dict[str, Any]:
    """metrics/teacher.json of an imported teacher: where it came from and what it is."""
    src = p.teacher.source
    return {"imported": True, "source_kind": src.kind if src else None, "source": src.path if src else None,
            "source_sha256": card_source_sha256(card), "family": card.family, "T": card.schedule.T,
            "schedule": card.schedule.kind, "parameterization": card.parameterization, "params": n_params,
            "steps": 0, "final_loss": None, "device": device}
