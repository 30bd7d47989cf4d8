"""A fitted fewstep OLSS scheduler as a diffusers scheduler (``SchedulerMixin``, ``ConfigMixin``).

``OLSSDiffusersScheduler`` runs the n-step sampler of :func:`fewstep.math.olss.sample_olss` inside
any diffusers sampling loop that calls ``set_timesteps`` / ``step`` (DDPMPipeline, a hand-written
loop; DDIMPipeline replaces its scheduler in its constructor, so assign ``pipe.scheduler`` after)::

    x_{i+1} = wx[i] x_T + sum_{j<=i} we[i][j] e_j

with e_j the step's model output in the scheduler's ``basis``: ``"x"`` (x-hat from the output, its
``prediction_type`` and the step's alpha, sigma; fewstep's default) or ``"output"`` (the raw output:
eps, v or x). The combination is accumulated in float64 (float32 on MPS, which has no float64) and
returned in the sample's dtype, exactly as ``sample_olss`` does, so a diffusers loop with the same
network reproduces fewstep's samples from the same x_T.

``save_pretrained`` writes only ``scheduler_config.json``, so everything lives in the config as plain
numbers: ``timesteps`` in diffusers units (fewstep index - 1, descending), ``wx``, ``we``
(lower-triangular rows), ``alphas``/``sigmas`` of each step (float64), ``basis``,
``prediction_type``, ``num_train_timesteps`` and the provenance (``source_sha256`` of the fewstep
scheduler JSON, ``model_name``, ``model_version``, ``model_weights_sha256``). Float64 lists
round-trip exactly through that JSON.

Loading a saved pipeline that names this class (``["fewstep.interop.olss_scheduler",
"OLSSDiffusersScheduler"]`` in model_index.json) needs the module imported first: diffusers 0.42
resolves a non-diffusers library only from ``sys.modules``.

diffusers is imported lazily: the class is built on first access (module ``__getattr__``), so
importing this module never needs diffusers.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from fewstep.errors import UserError

if TYPE_CHECKING:
    from fewstep.math.olss import OLSSScheduler
    from fewstep.models import ModelCard

BASES = ("x", "output")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
PREDICTION_TYPE = {"eps": "epsilon", "v": "v_prediction", "x": "sample"}  # fewstep parameterisation -> diffusers


class OLSSConfigError(UserError, ValueError):
    """An OLSS diffusers-scheduler config that cannot run (malformed weights, unknown basis, ...)."""


class StaleSchedulerError(UserError, ValueError):
    """An OLSS scheduler fitted on other weights than the model it is exported with."""


# --------------------------------------------------------------------------------------------
# the config (no diffusers needed)


def validate_config(timesteps: Sequence[int], wx: Sequence[float], we: Sequence[Sequence[float]],
                    alphas: Sequence[float], sigmas: Sequence[float], basis: str, prediction_type: str,
                    num_train_timesteps: int) -> None:
    n = len(timesteps)
    if n < 1 or len(wx) != n or len(we) != n or any(len(r) != i + 1 for i, r in enumerate(we)):
        raise OLSSConfigError("malformed OLSS scheduler config: need n timesteps, n wx and a lower-triangular we "
                              f"(row i has i+1 entries); got {n} timesteps, {len(wx)} wx, rows "
                              f"{[len(r) for r in we]}")
    if len(alphas) != n or len(sigmas) != n:
        raise OLSSConfigError(f"an OLSS scheduler config needs one alpha and sigma per step: {n} steps, "
                              f"{len(alphas)} alphas, {len(sigmas)} sigmas")
    if any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        raise OLSSConfigError(f"OLSS timesteps must be strictly descending, got {list(timesteps)}")
    if not (0 <= timesteps[-1] and timesteps[0] < num_train_timesteps):
        raise OLSSConfigError(f"OLSS timesteps {list(timesteps)} are outside 0..{num_train_timesteps - 1}")
    if basis not in BASES:
        raise OLSSConfigError(f"unknown OLSS basis {basis!r}; expected one of {BASES}")
    if prediction_type not in PREDICTION_TYPES:
        raise OLSSConfigError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
    numbers = list(wx) + [w for r in we for w in r] + list(alphas) + list(sigmas)
    if not all(math.isfinite(float(v)) for v in numbers):
        raise OLSSConfigError("OLSS scheduler config has non-finite weights or noise levels")
    if basis == "x" and prediction_type == "epsilon" and any(float(a) <= 0 for a in alphas):
        raise OLSSConfigError("basis 'x' with an epsilon model needs alpha > 0 at every step")


def config_from_olss(sched: "OLSSScheduler", card: "ModelCard", *, source_sha256: str | None = None,
                     model_name: str | None = None, model_version: str | None = None) -> dict[str, Any]:
    """The OLSSDiffusersScheduler config of fewstep's artifact ``sched`` for the model ``card``.

    ``source_sha256``: the scheduler file's sha256 (default: that of ``sched.to_json()``, which is
    what fit_olss writes). Refuses a scheduler fitted on other weights than the card's."""
    sched.validate()
    meta = sched.meta or {}
    fitted_on = meta.get("model_weights_sha256")
    if fitted_on is not None and card.weights_sha256 is not None and fitted_on != card.weights_sha256:
        raise StaleSchedulerError(f"the OLSS scheduler was fitted on weights {fitted_on[:12]}, but the model has "
                                  f"{card.weights_sha256[:12]}; re-run fit_olss or export it with its own model")
    schedule = card.schedule.build()
    if any(t < 1 or t > schedule.T for t in sched.timesteps):
        raise OLSSConfigError(f"OLSS timesteps {sched.timesteps} are outside the schedule's 1..{schedule.T}")
    cfg = {
        "timesteps": [int(t) - 1 for t in sched.timesteps],  # diffusers index = fewstep index - 1
        "wx": [float(w) for w in sched.wx],
        "we": [[float(w) for w in row] for row in sched.we],
        "alphas": [float(schedule.alpha[t]) for t in sched.timesteps],
        "sigmas": [float(schedule.sigma[t]) for t in sched.timesteps],
        "basis": str(getattr(sched, "basis", "x")),
        "prediction_type": PREDICTION_TYPE[card.parameterization],
        "num_train_timesteps": int(schedule.T),
        "source_sha256": source_sha256 or hashlib.sha256(sched.to_json().encode()).hexdigest(),
        "model_name": model_name or meta.get("model"),
        "model_version": model_version,
        "model_weights_sha256": card.weights_sha256,
    }
    validate_config(cfg["timesteps"], cfg["wx"], cfg["we"], cfg["alphas"], cfg["sigmas"], cfg["basis"],
                    cfg["prediction_type"], cfg["num_train_timesteps"])
    return cfg


def _to_basis(model_output, sample, basis: str, prediction_type: str, alpha: float, sigma: float):
    """e_j of one step in the sample's dtype, computed as fewstep.math.param.to_x does (coefficients
    looked up in float64, cast to the sample's dtype)."""
    import torch

    pred = model_output.to(sample.dtype)
    if basis == "output" or prediction_type == "sample":
        return pred
    a = torch.tensor(alpha, dtype=torch.float64, device=sample.device).to(sample.dtype)
    s = torch.tensor(sigma, dtype=torch.float64, device=sample.device).to(sample.dtype)
    if prediction_type == "v_prediction":
        return a * sample - s * pred
    return (sample - s * pred) / a  # epsilon


# --------------------------------------------------------------------------------------------
# the diffusers class, built on first use


def _build() -> type:
    import torch
    from diffusers import ConfigMixin, SchedulerMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerOutput

    class OLSSDiffusersScheduler(SchedulerMixin, ConfigMixin):
        """fewstep's OLSS sampler (Duan et al. 2023) as a diffusers scheduler; see the module docstring."""

        order = 1
        _compatibles: list[str] = []

        @register_to_config
        def __init__(self, timesteps: list[int], wx: list[float], we: list[list[float]], alphas: list[float],
                     sigmas: list[float], basis: str = "x", prediction_type: str = "epsilon",
                     num_train_timesteps: int = 1000, source_sha256: str | None = None,
                     model_name: str | None = None, model_version: str | None = None,
                     model_weights_sha256: str | None = None):
            validate_config(timesteps, wx, we, alphas, sigmas, basis, prediction_type, num_train_timesteps)
            self._fitted = [int(t) for t in timesteps]
            self.init_noise_sigma = 1.0
            self.num_inference_steps = len(self._fitted)
            self.timesteps = torch.tensor(self._fitted, dtype=torch.int64)
            self._reset()

        @property
        def steps(self) -> int:
            return len(self._fitted)

        def _reset(self) -> None:
            self._x_T: torch.Tensor | None = None
            self._history: list[torch.Tensor] = []

        def __len__(self) -> int:
            return self.config.num_train_timesteps

        def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                          **_: Any) -> None:
            """The fitted timesteps (their count is fixed by the fit); starts a new run."""
            if num_inference_steps is not None and int(num_inference_steps) != self.steps:
                raise OLSSConfigError(f"this OLSS scheduler was fitted for exactly {self.steps} steps; "
                                      f"num_inference_steps={num_inference_steps} (pass {self.steps} or None)")
            self.timesteps = torch.tensor(self._fitted, dtype=torch.int64, device=device)
            self._reset()

        def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
            return sample

        def _index(self, timestep: Any) -> int:
            t = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
            if float(t) != int(t) or int(t) not in self._fitted:
                raise OLSSConfigError(f"timestep {t} is not one of this OLSS scheduler's timesteps {self._fitted}")
            return self._fitted.index(int(t))

        def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True,
                 **_: Any) -> SchedulerOutput | tuple[torch.Tensor]:
            """x_{i+1} = wx[i] x_T + sum_j we[i][j] e_j (float64, cast to the sample's dtype). Step 0
            starts a run (stores x_T); the others must follow in order."""
            i = self._index(timestep)
            acc = torch.float32 if sample.device.type == "mps" else torch.float64
            if i == 0:
                self._reset()
                self._x_T = sample.to(acc)
            elif i != len(self._history) or self._x_T is None:
                done = len(self._history)
                self._reset()
                raise OLSSConfigError(f"OLSS steps must run in order: got step {i} (timestep {self._fitted[i]}) "
                                      f"after {done} step(s); call set_timesteps and start from the first")
            cfg = self.config
            e = _to_basis(model_output, sample, cfg.basis, cfg.prediction_type, cfg.alphas[i], cfg.sigmas[i])
            self._history.append(e.to(acc))
            nxt = cfg.wx[i] * self._x_T
            for j, w in enumerate(cfg.we[i]):
                nxt = nxt + w * self._history[j]
            prev = nxt.to(sample.dtype)
            if i == self.steps - 1:
                self._reset()
            if not return_dict:
                return (prev,)
            return SchedulerOutput(prev_sample=prev)

        @classmethod
        def from_olss(cls, sched: "OLSSScheduler", card: "ModelCard", *, source_sha256: str | None = None,
                      model_name: str | None = None, model_version: str | None = None) -> "OLSSDiffusersScheduler":
            """From fewstep's artifact and the card of the model it was fitted on (see config_from_olss)."""
            return cls(**config_from_olss(sched, card, source_sha256=source_sha256, model_name=model_name,
                                          model_version=model_version))

    OLSSDiffusersScheduler.__module__ = __name__
    OLSSDiffusersScheduler.__qualname__ = "OLSSDiffusersScheduler"
    return OLSSDiffusersScheduler


_BUILT: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    """``OLSSDiffusersScheduler`` is built on first access; ``SchedulerMixin`` / ``ConfigMixin`` are
    diffusers' (a pipeline's from_pretrained looks them up in the module it loads a component from)."""
    if name == "OLSSDiffusersScheduler":
        if name not in _BUILT:
            _BUILT[name] = _build()
        return _BUILT[name]
    if name in ("SchedulerMixin", "ConfigMixin"):
        import diffusers

        return getattr(diffusers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def scheduler_from_config(config: Mapping[str, Any]):
    """An OLSSDiffusersScheduler from a config dict (e.g. config_from_olss's)."""
    return __getattr__("OLSSDiffusersScheduler")(**dict(config))
