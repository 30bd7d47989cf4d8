"""Training a split (two-network) model, PDM style (Luhman & Luhman 2022; distill_pdm.md B.7).

The high-noise net is trained first, on the indices whose log-SNR is below the boundary; the
low-noise net then starts from its weights wherever the shapes match (all of them when both nets
share an architecture, as in the PDM release; the trunk when only the patch size differs) and
is trained on the other side. Both are saved as one model dir (fewstep.models.save_split).

A model with ``setup: paper`` (params validated against the PDM release's setup) records it on its
card under ``split.setup``; the project's setup is the default and is not written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fewstep import models, storage
from fewstep.config import EXECUTION_KEYS, Params
from fewstep.math import precision
from fewstep.math.losses import DEFAULT_WEIGHTING
from fewstep.math.split import SIDES, boundary_index, boundary_logsnr
from fewstep.nets.unet import UNet
from fewstep.train.loop import LoopResult, train
from fewstep.train.teacher import diffusion_loss, time_sampling, load_train_data, loop_config, schedule_of, schedule_spec


def init_matching(dst: torch.nn.Module, src: torch.nn.Module) -> tuple[int, int]:
    """Copy every tensor of ``src`` into ``dst`` whose name and shape match; (copied, total)."""
    s = src.state_dict()
    d = dst.state_dict()
    hit = {k: s[k].detach().clone() for k, v in d.items() if k in s and s[k].shape == v.shape}
    dst.load_state_dict({**d, **hit})
    return len(hit), len(d)


def side_ranges(T: int, t_boundary: int) -> dict[str, tuple[int, int]]:
    """Inclusive index ranges: low-noise 1..t_b (log-SNR >= boundary), high-noise t_b+1..T."""
    if not 1 <= t_boundary < T:
        raise ValueError(f"the split boundary (index {t_boundary}) leaves a side of 1..{T} empty; "
                         "choose a boundary SNR inside the schedule's range")
    return {"high": (t_boundary + 1, T), "low": (1, t_boundary)}


def train_split(
    p: Params,
    name: str,
    data_dir: str | Path,
    model_dir: str | Path,
    ckpt_dir: str | Path,
    device: torch.device,
    progress: bool = True,
) -> tuple[dict[str, LoopResult], models.ModelCard]:
    """Train (or resume) both nets of split model ``name`` (params split.models.<name>) and write
    its model dir. Returns the loop results per side and the card written."""
    if name not in p.split.models:
        raise ValueError(f"split.models has no {name!r}; models: {sorted(p.split.models)}")
    sp = p.split.models[name]
    manifest, data = load_train_data(p, data_dir, device)
    schedule = schedule_of(p)
    lam_b = boundary_logsnr(sp.boundary_snr)
    t_b = boundary_index(schedule, lam_b)
    ranges = side_ranges(schedule.T, t_b)
    base = {"schedule": p.schedule.model_dump(), "base": p.base.model_dump(exclude=set(EXECUTION_KEYS)),
            "data": manifest["content_hash"], "boundary_snr": sp.boundary_snr}
    results: dict[str, LoopResult] = {}
    nets: dict[str, UNet] = {}
    info: dict[str, Any] = {}
    for side in SIDES:  # high first: the low-noise net may start from it
        tp = sp.side(p.teacher, side)
        torch.manual_seed(p.base.seed)
        net = UNet(tp.net.unet_config(p.base.image_size))
        init = None
        if side == "low" and sp.init_low_from_high:
            copied, total = init_matching(net, nets["high"])
            init = {"from": "high", "run_hash": info["high"]["run_hash"], "tensors_copied": copied,
                    "tensors": total}
        net = net.to(memory_format=precision.memory_format(device))  # CUDA; the CPU by base.channels_last
        weighting = tp.weighting or DEFAULT_WEIGHTING[tp.parameterization]
        rh = storage.sha256_json({**base, "side": side, "teacher": tp.model_dump(), "t_range": list(ranges[side]),
                                  "init": init})
        loss_fn = diffusion_loss(data, schedule, tp.parameterization, weighting, tp.batch_size, tp.hflip,
                                 t_range=ranges[side], logsnr_normal=time_sampling(tp))
        res = train(net, loss_fn, loop_config(tp, p.base.seed), Path(ckpt_dir) / side, rh, device,
                    progress=progress, desc=f"{name} {side}")
        results[side] = res
        nets[side] = res.net.to("cpu").float()
        info[side] = {"t_range": list(ranges[side]), "patch_size": tp.net.patch_size, "train_steps": tp.steps,
                      "weighting": weighting, "run_hash": rh, "init": init}
    kinds = {sp.side(p.teacher, s).parameterization for s in SIDES}
    if len(kinds) != 1:
        raise ValueError(f"split model {name}: both nets need one parameterization, got {sorted(kinds)}")
    if sp.setup != "project":  # a label only where it is not the default (cards of existing models unchanged)
        info["setup"] = sp.setup
    split = models.SplitInfo(boundary_logsnr=lam_b, boundary_snr=sp.boundary_snr, t_boundary=t_b, sides=info)
    card = models.ModelCard(
        arch=models.SplitUNetArch({s: nets[s].cfg for s in SIDES}, split), role="teacher",
        variant=name.removeprefix("teacher-"), parameterization=kinds.pop(), weighting=info["low"]["weighting"],
        schedule=schedule_spec(p), image_size=p.base.image_size, sample_steps=p.schedule.T,
        lineage=models.Lineage(dataset=p.base.dataset, class_names=tuple(manifest["class_names"]),
                               data_hash=manifest["content_hash"], params_hash=storage.sha256_json(sp.model_dump()),
                               run_hash=storage.sha256_json([info[s]["run_hash"] for s in SIDES]),
                               train_steps=sum(info[s]["train_steps"] for s in SIDES)),
    )
    state = {f"{s}.{k}": v for s in SIDES for k, v in nets[s].state_dict().items()}
    return results, models.save(model_dir, card, state, kind="split-model")
