"""The compute a params file asks for, stage by stage, and the wall time it projects to.

Every stage's work is counted as network evaluations of one image: ``train`` images go through a
forward and a backward pass (counted as 3 forwards, the usual rule), ``forward`` images through a
forward pass only (sampling), ``fp32_forward`` images through a forward pass in IEEE float32 (a
distillation teacher's targets, OLSS trajectories and fits: fewstep.math.param.full_precision),
each counted as ``FP32_FORWARD_COST`` bf16 forwards. Each count is multiplied by the net's model
FLOPs per image (torch's FLOP counter, the same count as the evaluation table's GFLOPs) and divided
by a sustained rate in GFLOP/s.

The rate is calibrated on a measured peer, not a datasheet: ``rate_from_peer`` turns "this
device trains diffusers' DDPM CIFAR-10 UNet at N images/s" into GFLOP/s. The issue's H100 figure
(1,760 images/s, bf16 autocast, eager, batch 128) is ``H100_PEER_TRAIN_IMAGES_PER_S``. What the
projection leaves out, so it is a lower bound on wall time: data loading, checkpoints, process
start, MLflow, the evaluator's own features and the OLSS fit (seconds), and the lower utilisation
of small nets and small batches (a P=4/P=8 net at 32x32 will not reach the peer's rate).

    python benchmarks/gpu_budget.py                 # the GPU profile at the H100 calibration
    python benchmarks/gpu_budget.py --profile ""    # the CPU default (params.yaml alone)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from fewstep.config import Params, TeacherParams

H100_PEER_TRAIN_IMAGES_PER_S = 1760.0  # diffusers UNet2DModel (DDPM CIFAR-10), one H100, bf16, batch 128
TRAIN_FORWARDS = 3  # forward + backward of one image, in forward passes
# An IEEE float32 forward (TF32 off) in bf16 forwards. An estimate, not yet measured on a GPU
# (`python benchmarks/fp32_targets.py --device cuda` times both): the H100's fp32 peak is 1/15 of its
# bf16 tensor peak, but the peer sustains only ~3% of the bf16 peak, so these small nets are bound by
# memory traffic, which fp32 doubles.
FP32_FORWARD_COST = 2.0


@dataclass
class Work:
    stage: str
    net: str  # what runs: a label for the table
    gflops: float  # model GFLOPs of one forward pass of one image
    train: int = 0  # images through forward + backward
    forward: int = 0  # images through a forward pass only
    fp32_forward: int = 0  # images through a forward pass in IEEE float32 (teacher targets, trajectories)

    @property
    def gflop(self) -> float:
        return self.gflops * self.forward_images()

    def forward_images(self, fp32_forward_cost: float = FP32_FORWARD_COST) -> float:
        """The work in forward passes of one image of this net: training images x 3, float32 forwards
        x ``fp32_forward_cost`` (1 on a CPU that runs float32 anyway: :func:`cpu_seconds`)."""
        return TRAIN_FORWARDS * self.train + self.forward + fp32_forward_cost * self.fp32_forward


def model_gflops(net: torch.nn.Module, shape: tuple[int, ...], *extra: torch.Tensor) -> float:
    """Model GFLOPs of ``net(zeros(1, *shape), *extra)`` (torch's FLOP counter): one image, one call."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(torch.zeros(1, *shape), *extra)
    return fc.get_total_flops() / 1e9


@lru_cache(maxsize=64)
def _unet_gflops_cached(key: str, image_size: int) -> float:
    import json

    from fewstep.config import NetParams
    from fewstep.nets.unet import UNet

    cfg = NetParams.model_validate(json.loads(key)).unet_config(image_size)
    return model_gflops(UNet(cfg).eval(), (cfg.in_channels, image_size, image_size), torch.ones(1))


def unet_gflops(tp: TeacherParams, image_size: int) -> float:
    """Model GFLOPs of one forward pass of the teacher-section net ``tp.net`` on one image."""
    return _unet_gflops_cached(tp.net.model_dump_json(), image_size)


def evaluator_gflops(p: Params, num_classes: int = 10) -> float:
    from fewstep.nets.evaluator import Evaluator, EvaluatorConfig

    cfg = EvaluatorConfig(num_classes=num_classes, widths=tuple(p.evaluator.widths),
                          blocks_per_stage=p.evaluator.blocks_per_stage)
    return model_gflops(Evaluator(cfg).eval(), (3, p.base.image_size, p.base.image_size))


@lru_cache(maxsize=1)
def peer_gflops() -> float:
    """Model GFLOPs of one forward pass of diffusers' DDPM CIFAR-10 UNet at 32x32 (needs diffusers)."""
    from fewstep.peers import ddpm_cifar10_unet

    return model_gflops(ddpm_cifar10_unet().eval(), (3, 32, 32), torch.ones(1))


DDPM_T = 1000  # google/ddpm-cifar10-32's num_train_timesteps


@lru_cache(maxsize=8)
def _source_cost(path: str) -> tuple[float, int]:
    """(GFLOPs per call, T) of an imported teacher's source: its own UNet config and scheduler config
    when ``path`` is a local dir that has them, else the DDPM CIFAR-10 UNet's (the peer) and T=1000."""
    import json
    from pathlib import Path

    from fewstep import storage

    local = None if storage.is_remote(path) else Path(path)
    cfg = local / "config.json" if local else None
    if local is not None and (local / "vae" / "config.json").exists():  # a latent text-to-image pipeline
        from fewstep.interop.sd import sd_gflops

        g = sd_gflops(local)
    elif cfg is not None and cfg.exists():
        from fewstep.interop.standin import unet_from_config

        unet = unet_from_config(cfg).eval()
        c, size = unet.config.in_channels, unet.config.sample_size
        g = model_gflops(unet, (c, size, size), torch.ones(1))
    else:
        g = peer_gflops()
    T = DDPM_T
    for sc in ([local / "scheduler_config.json", local / "scheduler" / "scheduler_config.json"] if local else []):
        if sc.exists():
            T = int(json.loads(sc.read_text()).get("num_train_timesteps", DDPM_T))
            break
    return g, T


def teacher_cost(p: Params) -> tuple[float, int]:
    """(GFLOPs per call, T) of the teacher: the trained net at base.image_size and schedule.T, or an
    imported one's (teacher.source: :func:`_source_cost`)."""
    if p.teacher.source is None:
        return unet_gflops(p.teacher, p.base.image_size), p.schedule.T
    from fewstep.config import ParamsError

    try:
        path = p.teacher.source.resolved_path()
    except ParamsError:  # an unset $VARIABLE: the DDPM CIFAR-10 figures
        path = ""
    return _source_cost(path) if path else (peer_gflops(), DDPM_T)


def rate_from_peer(peer_train_images_per_s: float, gflops: float | None = None) -> float:
    """Sustained GFLOP/s of a device that trains the peer at ``peer_train_images_per_s``."""
    return peer_train_images_per_s * TRAIN_FORWARDS * (peer_gflops() if gflops is None else gflops)


def _grid_steps(sample: Any, own_steps: int) -> int:
    return sample.steps or own_steps


def _ddim_nfe(steps: int) -> int:
    from fewstep import samplers

    return samplers.get("ddim").nfe(steps)


def project(p: Params) -> list[Work]:
    """Every stage's work for params ``p`` (what `dvc repro` runs from scratch)."""
    size = p.base.image_size
    out: list[Work] = []
    tg, T = teacher_cost(p)
    tp = p.teacher
    if tp.source is None:
        cfg = 2 if tp.conditioning is not None and tp.sample.guidance > 0 else 1  # guided: 2 evaluations a step
        out.append(Work("train_teacher", f"teacher P={tp.net.patch_size}", tg, train=tp.steps * tp.batch_size,
                        forward=tp.sample.n * _grid_steps(tp.sample, 64) * cfg))
    else:  # imported: its sample grid only
        out.append(Work("train_teacher", f"imported {tp.source.kind} teacher", tg,
                        forward=tp.sample.n * _grid_steps(tp.sample, 64)))
    nets = {"teacher": tg}  # the net each model dir holds (students copy their parent's)
    steps_of = {"teacher": T}
    rounds = sorted(p.distill.rounds, key=lambda n: -p.distill.round(n).steps)  # pipeline order
    for name in rounds:
        r = p.distill.round(name)
        g = nets.get(r.parent, tg)
        nets[name], steps_of[name] = g, r.steps
        # guided distillation (a conditional teacher as the parent, guidance w > 0): each of the target's
        # two DDIM steps is a guided call, 2 evaluations (later rounds distil the student plainly)
        tcfg = 2 if r.parent == "teacher" and tp.source is None and tp.conditioning is not None and r.guidance else 1
        out.append(Work(f"distill@{name}", f"{2 * r.steps}->{r.steps} steps", g,
                        train=r.train_steps * r.batch_size, fp32_forward=2 * tcfg * r.train_steps * r.batch_size,
                        forward=r.sample.n * _grid_steps(r.sample, r.steps)))
    study: dict[str, tuple[float, int]] = {}  # model dir -> (GFLOPs per call, training steps)
    for P in p.study.patch_sizes:
        sp = p.study.teacher_for(p.teacher, P)
        g = unet_gflops(sp, size)
        study[f"teacher-p{P}"] = (g, sp.steps)
        out.append(Work(f"study_teacher@{P}", f"P={P}", g, train=sp.steps * sp.batch_size,
                        forward=sp.sample.n * _grid_steps(sp.sample, 64)))
    for name, sm in p.split.models.items():
        hi, lo = sm.side(p.teacher, "high"), sm.side(p.teacher, "low")
        gh, gl = unet_gflops(hi, size), unet_gflops(lo, size)
        out.append(Work(f"train_split@{name}", f"high P={hi.net.patch_size}", gh, train=hi.steps * hi.batch_size))
        out.append(Work(f"train_split@{name}", f"low P={lo.net.patch_size}", gl, train=lo.steps * lo.batch_size,
                        forward=lo.sample.n * _grid_steps(lo.sample, 64)))
        study[name] = (max(gh, gl), hi.steps + lo.steps)  # cost per call: bounded by the dearer net
    for v in p.objective.variants:
        for P in p.objective.patch_sizes:
            op = p.objective.teacher_for(p.teacher, v, P)
            out.append(Work(f"objective@{v}-{P}", f"P={P}", unet_gflops(op, size), train=op.steps * op.batch_size,
                            forward=p.objective.n_samples * p.objective.sample_steps + p.objective.n_test * 16))
    cond = tp.source is None and tp.conditioning is not None  # class-conditional: guided steps cost 2 evaluations
    traj_cfg = 2 if cond and p.trajectories.guidance > 0 else 1
    ref = p.trajectories.reference_steps
    for m in p.trajectories.models:
        n = min(ref, steps_of.get(m, T))
        out.append(Work(f"collect_trajectories@{m}", f"{n} steps", nets.get(m, tg),
                        fp32_forward=p.trajectories.n_fit * n * traj_cfg))
    op_ = p.olss
    from fewstep.olss_variants import VARIANTS

    variants = len(VARIANTS) + 1  # scheduler files (evaluation rows): every variant and the headline olss-N
    for m in op_.models:
        refn = min(ref, steps_of.get(m, T))
        for n in op_.steps:
            closed = p.trajectories.n_fit * n  # the closed-loop refit (always fitted)
            out.append(Work(f"fit_olss@{m}-{n}", f"{n} steps", nets.get(m, tg),
                            fp32_forward=(closed + op_.n_holdout * (refn + n + len(VARIANTS) * n)) * traj_cfg))
    ev = p.evaluate
    from fewstep.evaluation import Planned, teacher_plan

    ref = Planned("ddim", min(ev.reference_steps, T))  # the reference row: sampled once, reused by its row
    plan = [r for r in teacher_plan(ev, T) if r != ref]
    # ranked rows (evaluation.is_headline) at n_headline: the reference, DDIM at the students' steps, OLSS, students
    ranked = {steps_of[name] for name in rounds}
    n, n_h = ev.n_samples, ev.headline_n
    # a class-conditional model: every DDIM/peer row once per evaluate.guidance scale (2 evaluations a
    # step at w > 0, plus the reference at each scale); OLSS rows at the trajectories' scale
    n_w, w_cost = (len(ev.guidance), sum(2 if w > 0 else 1 for w in ev.guidance)) if cond else (1, 1)
    fwd_teacher = n_h * ref.nfe * w_cost + w_cost * sum(
        (n_h if r.sampler == "ddim" and not r.options and r.steps in ranked else n) * r.nfe for r in plan)
    for m in op_.models:
        if m == "teacher":
            fwd_teacher += n_h * variants * sum(op_.steps) * traj_cfg
    out.append(Work("evaluate", "teacher rows", tg, forward=fwd_teacher))
    for name in rounds:
        k = _ddim_nfe(steps_of[name]) * w_cost + (variants * sum(op_.steps) * traj_cfg if name in op_.models else 0)
        out.append(Work("evaluate", f"{name} rows", nets[name], forward=n_h * k))
    for name, (g, _) in study.items():
        k = sum(_ddim_nfe(n) for n in ev.study_steps if n <= T) * w_cost
        out.append(Work("evaluate", f"{name} rows", g, forward=ev.n_samples * k))
    n_rows = (n_w * (len(plan) + 1 + len(p.distill.rounds) + len(ev.study_steps) * len(study))
              + variants * len(op_.steps) * len(op_.models))
    eg = evaluator_gflops(p)
    out.append(Work("train_evaluator", "evaluator CNN", eg, train=p.evaluator.steps * p.evaluator.batch_size))
    n_ranked = n_w * (1 + len(rounds) + sum(r.sampler == "ddim" and not r.options and r.steps in ranked
                                            for r in plan)) + variants * len(op_.steps) * len(op_.models)
    out.append(Work("evaluate", "evaluator features", eg, forward=n * n_rows + (n_h - n) * n_ranked
                    + p.evaluator.ref_subset + (len(ev.blur_sigmas) + 1) * n))  # + the FD sensitivity check
    rp = p.redundancy
    if rp.scope:  # [] = the stage is off
        out.append(Work(f"redundancy@{rp.scope[0]}", f"{1 + len(study)} models",
                        sum([tg] + [g for g, _ in study.values()]), forward=rp.n_images * rp.bins))
    dp = p.ddim_study
    k = (2 * dp.n_images * sum(min(n, T) for n in dp.recon_steps) + dp.n_consistency * sum(min(n, T) for n in dp.consistency_steps)
         + dp.interp_pairs * (2 * dp.interp_n * dp.interp_steps + 2 * dp.interp_steps))
    for m in dp.models:  # [] = the stage is off
        out.append(Work(f"ddim_study@{m}", m, nets.get(m, tg), forward=k))
    return out


def by_stage(work: list[Work]) -> dict[str, float]:
    """GFLOP per stage (a stage with several nets summed), in pipeline order."""
    out: dict[str, float] = {}
    for w in work:
        out[w.stage] = out.get(w.stage, 0.0) + w.gflop
    return out


def cpu_seconds(work: list[Work], seconds_per_forward: dict[str, float],
                fp32_forward_cost: float = 1.0) -> dict[str, float]:
    """Projected seconds per stage on a CPU from measured seconds per forward image of each net: the FLOP
    rate of a CPU differs between small nets (on the project's AMD EPYC the evaluator CNN runs at about half
    the UNets' GFLOP/s), so each :class:`Work` is timed at its own net's measured rate.
    ``seconds_per_forward`` maps ``"evaluator"`` (the evaluator CNN: Work.net starting with "evaluator")
    and ``"unet"`` (every other net: the teacher and the students that copy it) to seconds; float32
    forwards count ``fp32_forward_cost`` forwards (1: the CPU runs float32 throughout)."""
    out: dict[str, float] = {}
    for w in work:
        rate = seconds_per_forward["evaluator" if w.net.startswith("evaluator") else "unet"]
        out[w.stage] = out.get(w.stage, 0.0) + rate * w.forward_images(fp32_forward_cost)
    return out

