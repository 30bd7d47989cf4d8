"""CPU precision and memory format: does this CPU run bf16 natively, and the process's CPU policy.

bf16 on the CPU pays only where the hardware computes it: AVX-512 BF16 (``avx512_bf16``: Intel
Cooper Lake and Sapphire Rapids and later, AMD Zen 4 and later), AMX (``amx_bf16``: Sapphire Rapids
and later) or Arm's BF16 extension (``bf16`` in an aarch64 ``Features`` line: Neoverse V1/N2,
Graviton 3). Elsewhere (AVX2 only) oneDNN emulates it and a forward is an order of magnitude slower
than float32 (benchmarks/cpu_precision.py). :func:`native_bf16` decides from a ``/proc/cpuinfo``
flag set (a pure function: testable on any machine) and torch's CPU capability; a capability of
``DEFAULT`` or ``NO AVX`` (torch told to use no vector ISA, ``ATEN_CPU_CAPABILITY=default``) counts
as not native. Off Linux (no /proc/cpuinfo) nothing is detected: ``auto`` is off.

The policy (params ``base.cpu_bf16`` and ``base.channels_last``, applied by the stage runner with
:func:`configure`) is process-wide, like torch's thread count. What it reaches on the CPU: the
training forwards of the teacher, of a distillation student and of the evaluator (:func:`autocast`,
:func:`memory_format`), and every ``NetDenoiser`` forward that is not in ``full_precision``
(sampling). Distillation targets, OLSS trajectories and fits stay IEEE float32 (``full_precision``),
and so do master weights, optimizer state, the float64 schedule and the solvers' arithmetic: only
the network forward runs in bf16, its output is cast back to float32. CUDA keeps its own rules
(bf16 autocast for the denoiser, channels_last for the teacher), whatever the policy says.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Iterable, Literal, Union

import torch

# /proc/cpuinfo flags of hardware bf16 arithmetic (x86 "flags", aarch64 "Features")
X86_BF16_FLAGS: frozenset[str] = frozenset({"avx512_bf16", "amx_bf16"})
ARM_BF16_FLAGS: frozenset[str] = frozenset({"bf16"})
NO_VECTOR_CAPABILITIES: frozenset[str] = frozenset({"DEFAULT", "NO AVX"})

CpuBf16 = Union[Literal["auto"], bool]  # params base.cpu_bf16


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """Every CPU feature flag named in a ``/proc/cpuinfo`` text (x86 ``flags``, aarch64 ``Features``)."""
    out: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            out.update(value.split())
    return frozenset(out)


def native_bf16(flags: str | Iterable[str], capability: str = "") -> bool:
    """Whether a CPU with these feature ``flags`` (a ``/proc/cpuinfo`` text, or the flag names) runs
    bf16 arithmetic in hardware, with torch's CPU ``capability`` ("" = not known)."""
    names = parse_cpu_flags(flags) if isinstance(flags, str) and ":" in flags else \
        frozenset(flags.split() if isinstance(flags, str) else flags)
    if capability.upper() in NO_VECTOR_CAPABILITIES:
        return False
    return bool(names & (X86_BF16_FLAGS | ARM_BF16_FLAGS))


@dataclass(frozen=True)
class CpuInfo:
    """What :func:`detect` found: torch's capability, the bf16 flags present, the verdict."""

    capability: str
    bf16_flags: tuple[str, ...]
    native_bf16: bool
    model: str = ""

    def describe(self) -> str:
        flags = ", ".join(self.bf16_flags) or "none"
        return (f"{self.model or platform.machine()}; torch CPU capability {self.capability}; bf16 flags: {flags}; "
                f"bf16 {'native' if self.native_bf16 else 'emulated (not native)'}")


def cpu_capability() -> str:
    """torch's CPU kernel capability (``AVX2``, ``AVX512``, ``SVE256``, ``DEFAULT``, ...)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return ""


@functools.lru_cache(maxsize=1)
def detect(cpuinfo_path: str = "/proc/cpuinfo") -> CpuInfo:
    """This machine's :class:`CpuInfo` (read once per process)."""
    try:
        text = Path(cpuinfo_path).read_text(errors="replace")
    except OSError:
        text = ""
    flags = parse_cpu_flags(text)
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.lower().startswith("model name") and ":" in line), "")
    cap = cpu_capability()
    return CpuInfo(cap, tuple(sorted(flags & (X86_BF16_FLAGS | ARM_BF16_FLAGS))), native_bf16(flags, cap), model)


def resolve_cpu_bf16(setting: CpuBf16, native: bool | None = None) -> bool:
    """``base.cpu_bf16`` -> on or off: ``auto`` is on only where bf16 is native (``native``; None =
    :func:`detect` this machine), ``true``/``false`` force it."""
    if setting == "auto":
        return detect().native_bf16 if native is None else native
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"cpu_bf16 must be auto, true or false, got {setting!r}")


@dataclass(frozen=True)
class CpuPolicy:
    """The process's CPU compute policy: bf16 autocast for network forwards, channels_last tensors."""

    bf16: bool = False
    channels_last: bool = False


_POLICY = CpuPolicy()


def policy() -> CpuPolicy:
    """The current CPU policy (off and contiguous until :func:`configure` says otherwise)."""
    return _POLICY


def configure(bf16: bool = False, channels_last: bool = False) -> CpuPolicy:
    """Set the process's CPU policy; returns the previous one (for :func:`using`)."""
    global _POLICY
    old, _POLICY = _POLICY, CpuPolicy(bool(bf16), bool(channels_last))
    return old


def configure_from(base: object) -> CpuPolicy:
    """Apply params ``base`` (``cpu_bf16``, ``channels_last``); returns the policy now in force."""
    configure(resolve_cpu_bf16(getattr(base, "cpu_bf16", False)), bool(getattr(base, "channels_last", False)))
    return _POLICY


@contextlib.contextmanager
def using(bf16: bool = False, channels_last: bool = False):
    """The CPU policy set for a block, restored after (benchmarks, tests)."""
    old = configure(bf16, channels_last)
    try:
        yield _POLICY
    finally:
        configure(old.bf16, old.channels_last)


def cpu_bf16(device: torch.device | str) -> bool:
    """Whether network forwards on ``device`` run under bf16 autocast by the CPU policy."""
    return torch.device(device).type == "cpu" and _POLICY.bf16


def autocast(device: torch.device | str, cuda: bool = True) -> ContextManager:
    """The autocast region of a training forward on ``device``: bf16 on CUDA (when ``cuda``, as the
    training loops always did), bf16 on the CPU by the policy, else no region at all."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    if cpu_bf16(dev):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device: torch.device | str, cuda: bool = True) -> torch.memory_format:
    """The memory format of a network's weights and inputs on ``device``: channels_last on CUDA
    (when ``cuda``) and on the CPU by the policy, else contiguous."""
    dev = torch.device(device)
    on = (dev.type == "cuda" and cuda) or (dev.type == "cpu" and _POLICY.channels_last)
    return torch.channels_last if on else torch.contiguous_format


def to_format(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """``x`` in ``fmt`` where it applies (4-D tensors); anything else unchanged."""
    return x.contiguous(memory_format=fmt) if x.ndim == 4 and fmt is not torch.contiguous_format else x
