"""Parameterisations (eps, x, v) and the one denoiser contract.

With z = alpha x + sigma eps and alpha^2 + sigma^2 = 1 (Salimans & Ho 2022, App. D):
    v = alpha eps - sigma x,   x = alpha z - sigma v,   eps = sigma z + alpha v.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal, Protocol, get_args, runtime_checkable

import torch

from fewstep.math.schedules import Schedule

# The parameterisation names, defined here once (fewstep.config and the model card import them).
Parameterization = Literal["eps", "x", "v"]
KINDS: tuple[str, ...] = get_args(Parameterization)


@runtime_checkable
class Denoiser(Protocol):
    """The denoiser contract every sampler takes.

    ``denoiser(z, t)`` with z a (B, C, H, W) noisy sample and t a (B,) long tensor of schedule
    indices (1..T) returns a prediction of kind ``denoiser.kind`` in float32 or better.
    """

    kind: str
    schedule: Schedule

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


def _bc(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return a.reshape(-1, *([1] * (ref.ndim - 1))).to(ref.dtype)


def to_x(pred: torch.Tensor, kind: str, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Prediction of ``kind`` -> x-prediction."""
    a, s = _bc(alpha, z), _bc(sigma, z)
    if kind == "x":
        return pred
    if kind == "v":
        return a * z - s * pred
    if kind == "eps":
        return (z - s * pred) / a  # unstable where alpha -> 0 (PD section 4)
    raise ValueError(f"unknown parameterisation {kind!r}")


def to_eps(pred: torch.Tensor, kind: str, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Prediction of ``kind`` -> eps-prediction."""
    a, s = _bc(alpha, z), _bc(sigma, z)
    if kind == "eps":
        return pred
    if kind == "v":
        return s * z + a * pred
    if kind == "x":
        return (z - a * pred) / s
    raise ValueError(f"unknown parameterisation {kind!r}")


def to_v(pred: torch.Tensor, kind: str, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Prediction of ``kind`` -> v-prediction."""
    if kind == "v":
        return pred
    a, s = _bc(alpha, z), _bc(sigma, z)
    x = to_x(pred, kind, z, alpha, sigma)
    eps = to_eps(pred, kind, z, alpha, sigma)
    return a * eps - s * x


def convert(pred: torch.Tensor, src: str, dst: str, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return {"x": to_x, "eps": to_eps, "v": to_v}[dst](pred, src, z, alpha, sigma)


def predict_x_eps(
    denoiser: Denoiser, z: torch.Tensor, t: torch.Tensor, clip: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate the denoiser once and return (x_hat, eps_hat) in z's dtype.

    With ``clip`` the x estimate is clamped to [-1, 1] and eps recomputed from it (PD A.3);
    where sigma = 0 the eps estimate is taken from the raw prediction instead.
    """
    _, x, eps = predict_raw_x_eps(denoiser, z, t, clip)
    return x, eps


def predict_raw_x_eps(
    denoiser: Denoiser, z: torch.Tensor, t: torch.Tensor, clip: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As predict_x_eps, also returning the raw prediction (kind ``denoiser.kind``, never clipped):
    (pred, x_hat, eps_hat), one evaluation."""
    alpha, sigma = denoiser.schedule.at(t, torch.float64)
    pred = denoiser(z, t).to(z.dtype)
    x = to_x(pred, denoiser.kind, z, alpha, sigma)
    eps = to_eps(pred, denoiser.kind, z, alpha, sigma)
    if clip:
        x = x.clamp(-1.0, 1.0)
        eps = torch.where(_bc(sigma, z) > 0, (z - _bc(alpha, z) * x) / _bc(sigma, z).clamp_min(1e-12), eps)
    return pred, x, eps


AMP_DTYPE = torch.bfloat16  # the mixed-precision compute type of a network forward


@contextlib.contextmanager
def _ieee_fp32(device: torch.device) -> Iterator[None]:
    """Plain IEEE float32 convolutions and matmuls on CUDA for the block (TF32 off), restored after:
    cuDNN allows TF32 convolutions by default, which round inputs to a 10-bit mantissa."""
    if device.type != "cuda":
        yield
        return
    cudnn, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, mm


class NetDenoiser(torch.nn.Module):
    """Wraps a network ``net(z, t_continuous)`` into the denoiser contract.

    The network sees time as t = index / T in [0, 1], so a model trained on one grid can be
    queried on any sub-sequence of it.

    Precision: with ``autocast`` (the default) the forward runs under bf16 autocast on CUDA, and on
    the CPU as well when ``cpu_autocast`` is set (off by default, so CPU outputs are plain float32;
    tests and ``benchmarks/fp32_targets.py`` use it to emulate the GPU path). Without autocast the
    forward is IEEE float32, TF32 off on CUDA, whatever autocast region the caller is in. Either way
    the output is float32. :func:`full_precision` turns autocast off for a block: the teacher's
    distillation targets, OLSS trajectories and fits run in it.
    """

    def __init__(self, net: torch.nn.Module, schedule: Schedule, kind: str, autocast: bool = True,
                 cpu_autocast: bool = False):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown parameterisation {kind!r}; expected one of {KINDS}")
        self.net, self.schedule, self.kind = net, schedule, kind
        self.autocast, self.cpu_autocast = autocast, cpu_autocast

    def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The prediction at schedule indices t; ``y``: (B,) class labels of a class-conditional net
        (None: its null label, the unconditional model; fewstep.math.guidance wraps this into the
        plain ``den(z, t)`` contract)."""
        return self.continuous(z, t.to(torch.float32) / self.schedule.T, y)

    @property
    def num_classes(self) -> int | None:
        """The class count of a class-conditional network (None: unconditional)."""
        return getattr(self.net, "num_classes", None)

    @property
    def has_null_label(self) -> bool:
        """Whether the network has an unconditional (null-label) model to guide with (classifier-free
        guidance); False for an imported conditional-only network."""
        return bool(getattr(self.net, "has_null_label", True))

    def amp(self, device: torch.device) -> bool:
        """Whether a forward on ``device`` runs under bf16 autocast."""
        return self.autocast and (device.type == "cuda" or (device.type == "cpu" and self.cpu_autocast))

    def continuous(self, z: torch.Tensor, tc: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The network at continuous time tc in [0, 1] (index / T); for solvers off the grid."""
        dev = z.device
        amp = self.amp(dev)
        region = torch.autocast(dev.type, dtype=AMP_DTYPE, enabled=amp) if dev.type in ("cuda", "cpu") \
            else contextlib.nullcontext()
        with region, (contextlib.nullcontext() if amp else _ieee_fp32(dev)):
            out = self.net(z.float(), tc) if y is None else self.net(z.float(), tc, y)
        return out.float()


def net_denoisers(den: object) -> list[NetDenoiser]:
    """Every :class:`NetDenoiser` inside ``den`` (itself, both nets of a split model, ...)."""
    return [m for m in den.modules() if isinstance(m, NetDenoiser)] if isinstance(den, torch.nn.Module) else []


def set_autocast(den: object, enabled: bool = True, cpu: bool | None = None) -> None:
    """Set ``autocast`` (and ``cpu_autocast`` when ``cpu`` is given) on every network of ``den``."""
    for m in net_denoisers(den):
        m.autocast = enabled
        if cpu is not None:
            m.cpu_autocast = cpu


@contextlib.contextmanager
def full_precision(den: object) -> Iterator[object]:
    """Every network of ``den`` runs in IEEE float32 inside the block (autocast off; TF32 off on
    CUDA), whatever its setting or the caller's autocast region; settings are restored after.

    The contract for any denoiser that runs in mixed precision: it exposes a bool ``autocast``
    (a NetDenoiser does; a SplitDenoiser holds two). Used where the teacher makes data that other
    fits learn from: distillation targets (PD Alg. 2), OLSS trajectories, the OLSS fits and checks.
    """
    mods = [m for m in den.modules() if isinstance(getattr(m, "autocast", None), bool)] \
        if isinstance(den, torch.nn.Module) else []
    old = [(m, m.autocast) for m in mods]
    for m in mods:
        m.autocast = False
    try:
        yield den
    finally:
        for m, a in old:
            m.autocast = a
