"""Export dispatch: a model dir (by its card's family) or an OLSS scheduler with its model, as a
diffusers-loadable directory (stages/export.py is the command line).

    fewstep-unet        fewstep.interop.native.export_native (DDIMPipeline dir, FewstepUNet2DModel)
    fewstep-unet-split  fewstep.interop.native.export_native (DDIMPipeline dir, FewstepSplitUNet2DModel)
    diffusers-unet2d    fewstep.interop.unet2d.export_unet2d (DDIMPipeline dir, UNet2DModel)
    diffusers-sd        fewstep.interop.sd.export_sd (StableDiffusionPipeline dir, latent text-to-image)

An OLSS export is the model's export with scheduler/ replaced by the OLSSDiffusersScheduler config
and model_index.json naming a DDPMPipeline (whose constructor keeps the scheduler it is given;
DDIMPipeline's would turn it into a DDIMScheduler); a ``diffusers-sd`` model's is its
StableDiffusionPipeline dir with the OLSS scheduler (that pipeline keeps it too).
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any

from fewstep.errors import UserError
from fewstep.interop.native import EXPORT_INFO, MODEL_INDEX, SCHEDULER_DIR

OLSS_MODULE, OLSS_CLASS = "fewstep.interop.olss_scheduler", "OLSSDiffusersScheduler"


class ExportError(UserError, ValueError):
    """A model or scheduler that this fewstep cannot export."""


def export_model(model_dir: str | Path, out: str | Path) -> Path:
    """Export the model in ``model_dir`` to ``out`` by its card's family; returns ``out``."""
    from fewstep import models

    model_dir = Path(model_dir)
    card = models.load_card(model_dir)
    if card.family in ("fewstep-unet", "fewstep-unet-split"):
        from fewstep.interop.native import export_native

        return export_native(model_dir, out)
    if card.family == "diffusers-unet2d":
        try:
            unet2d = importlib.import_module("fewstep.interop.unet2d")
        except ModuleNotFoundError as e:
            if e.name != "fewstep.interop.unet2d":
                raise
            raise ExportError(f"{model_dir} is a diffusers-unet2d model, but this fewstep has no "
                              "fewstep.interop.unet2d (the diffusers import/export of UNet2DModel)") from None
        return Path(unet2d.export_unet2d(model_dir, Path(out)))
    if card.family == "diffusers-sd":
        from fewstep.interop.sd import export_sd

        return export_sd(model_dir, out)
    raise ExportError(f"{model_dir}: no diffusers export for family {card.family!r}; exportable: fewstep-unet, "
                      "fewstep-unet-split, diffusers-unet2d, diffusers-sd")


def export_olss(scheduler_path: str | Path, model_dir: str | Path, out: str | Path, *,
                model_name: str | None = None, model_version: str | None = None) -> Path:
    """The model's export plus scheduler/ = the OLSS scheduler in ``scheduler_path`` (a fit_olss
    JSON fitted on this model's weights) as an OLSSDiffusersScheduler, model_index.json of a
    DDPMPipeline, provenance in fewstep.json. Returns ``out``."""
    from fewstep import models, storage
    from fewstep.interop.olss_scheduler import config_from_olss, scheduler_from_config
    from fewstep.math.olss import OLSSScheduler

    scheduler_path, model_dir, out = Path(scheduler_path), Path(model_dir), Path(out)
    try:
        sched = OLSSScheduler.from_json(scheduler_path.read_text())
    except (ValueError, TypeError, KeyError) as e:
        raise ExportError(f"{scheduler_path} is not a fewstep OLSS scheduler: {e}") from None
    card = models.load_card(model_dir)
    sha = storage.sha256_file(scheduler_path)
    cfg = config_from_olss(sched, card, source_sha256=sha, model_name=model_name or model_dir.name,
                           model_version=model_version)
    olss = scheduler_from_config(cfg)  # validated before anything is written
    info: dict[str, Any] = {"kind": "olss", "scheduler_file": str(scheduler_path), "scheduler_sha256": sha,
                            "steps": sched.steps, "fewstep_timesteps": sched.timesteps, "basis": cfg["basis"],
                            "olss_variant": (sched.meta or {}).get("variant"), "model_version": model_version,
                            "source_model_dir": str(model_dir), "model_weights_sha256": card.weights_sha256}
    if card.family == "diffusers-sd":  # the guidance scale and prompts it was fitted at travel with it
        from fewstep.interop.sd import export_sd

        guidance = (sched.meta or {}).get("guidance")
        return export_sd(model_dir, out, scheduler=olss, info={
            **info, "olss_guidance": guidance,
            "guidance_scale": None if not guidance else 1.0 + float(guidance["scale"])})
    with storage.atomic_dir(out) as tmp:
        export_model(model_dir, tmp)
        shutil.rmtree(tmp / SCHEDULER_DIR, ignore_errors=True)
        olss.save_pretrained(tmp / SCHEDULER_DIR)
        index = json.loads((tmp / MODEL_INDEX).read_text())
        index.update({"_class_name": "DDPMPipeline", "scheduler": [OLSS_MODULE, OLSS_CLASS]})
        storage.write_json(tmp / MODEL_INDEX, index)
        written: dict[str, Any] = storage.read_json(tmp / EXPORT_INFO) if (tmp / EXPORT_INFO).exists() else {}
        written.update({**info, "pipeline": "DDPMPipeline"})
        storage.write_json(tmp / EXPORT_INFO, written)
    return out
