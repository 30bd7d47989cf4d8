"""diffusers' schedulers as peers, driven with a fewstep denoiser and the same noise.

The adapter hands diffusers exactly our schedule (trained_betas from our alpha table, indices
1..T shifted to diffusers' 0..T-1, reference diffusers_peers.md section 4), the matching
prediction_type, and maps whatever timestep a scheduler asks for (integer or fractional) to our
continuous time through the noise level, so the network sees the sigma the solver integrates with.
Heun alone gets the table cut at VE sigma HEUN_SIGMA_MAX and Karras sigmas (see there).
Only this module imports diffusers.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch

from fewstep.math.param import NetDenoiser

PEERS = ("ddim", "pndm", "dpmpp_2m", "dpmpp_3m", "unipc", "deis", "heun")
# Heun's trapezoid in sigma weights the derivative at the far end of a step by half the step. On the
# cosine grid the first step of a zero-SNR start runs from VE sigma 2.2e4 to ~2: O(1) derivative
# differences times ~1e4 (RMSE ~0.7). Even from sigma 80, uniform-in-t steps span sigma ratios of
# ~30 at the top and Heun trails DDIM at equal NFE. So Heun gets EDM's recipe: the table cut where
# the VE sigma passes HEUN_SIGMA_MAX (EDM's sigma_max; diffusers_peers.md 4.4, 7.1, 8.5-8.6) and
# Karras sigmas (rho 7) between it and the trailing grid's smallest sigma.
HEUN_SIGMA_MAX = 80.0
_PRED = {"v": "v_prediction", "x": "sample", "eps": "epsilon"}


def ddpm_cifar10_unet(dropout: float = 0.1) -> torch.nn.Module:
    """diffusers' UNet2DModel in the google/ddpm-cifar10-32 configuration (35.7M parameters, built
    here: nothing is downloaded). The peer that training throughput and the compute budget are
    measured against."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,  # one head, as in DDPM
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_eps=1e-6,
        dropout=dropout,
    )


def _betas(alpha: np.ndarray) -> np.ndarray:
    abar = alpha[1:] ** 2  # diffusers index i <-> our index i + 1
    return 1.0 - np.concatenate([abar[:1], abar[1:] / abar[:-1]])


def truncated_T(den: NetDenoiser, sigma_max: float) -> int:
    """The largest index whose VE sigma (sigma/alpha) is <= sigma_max (at least 1)."""
    sch = den.schedule
    with np.errstate(divide="ignore"):
        ve = sch.sigma / sch.alpha
    ok = np.nonzero(ve <= sigma_max)[0]
    return max(1, int(ok.max()))


def load_diffusers():
    """Import diffusers (offline: nothing is downloaded)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers

    return diffusers


def _schedule_config(name: str, den: NetDenoiser) -> dict:
    """The peer's num_train_timesteps and betas. Our alpha table as trained_betas (diffusers index i =
    our i + 1; a truncated table is a prefix of ours: index i keeps its noise level, _time_map is
    unchanged); for an imported diffusers model (card schedule kind "diffusers") its own beta config,
    so diffusers recomputes exactly the alphas_cumprod the model was trained with (our table is that,
    widened to float64) and the peers run as a diffusers user runs them."""
    sch = den.schedule
    spec = getattr(getattr(den, "card", None), "schedule", None)
    if name != "heun" and spec is not None and spec.kind == "diffusers" and spec.T == sch.T:
        return dict(num_train_timesteps=sch.T, **spec.kwargs())
    T = truncated_T(den, HEUN_SIGMA_MAX) if name == "heun" else sch.T
    return dict(num_train_timesteps=T, trained_betas=_betas(sch.alpha)[:T])


def make_scheduler(name: str, den: NetDenoiser):
    d = load_diffusers()
    base = dict(**_schedule_config(name, den), prediction_type=_PRED[den.kind])
    if name == "ddim":
        return d.DDIMScheduler(**base, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    if name == "pndm":
        return d.PNDMScheduler(**base, skip_prk_steps=True, set_alpha_to_one=True, timestep_spacing="trailing")
    if name in ("dpmpp_2m", "dpmpp_3m"):
        return d.DPMSolverMultistepScheduler(**base, algorithm_type="dpmsolver++", solver_order=int(name[-2]),
                                             final_sigmas_type="zero", timestep_spacing="trailing")
    if name == "unipc":
        return d.UniPCMultistepScheduler(**base, solver_order=2, solver_type="bh2", timestep_spacing="trailing")
    if name == "deis":
        return d.DEISMultistepScheduler(**base, solver_order=2, timestep_spacing="trailing")
    if name == "heun":  # starts at VE sigma HEUN_SIGMA_MAX; x_T is taken as the noise there (alpha ~ 1/80)
        return d.HeunDiscreteScheduler(**base, timestep_spacing="trailing", use_karras_sigmas=True)
    raise ValueError(f"unknown peer {name!r}; expected one of {PEERS}")


def steps_for_nfe(name: str, nfe: int) -> int:
    """Heun evaluates the model twice per step but once on the last: 2 s - 1 evaluations."""
    return max(1, (nfe + 1) // 2) if name == "heun" else nfe


def _time_map(den: NetDenoiser, sched) -> Callable[[float], float]:
    """diffusers timestep (int or fractional) -> our continuous time, through log-SNR."""
    ac = sched.alphas_cumprod.double().numpy()
    sig = np.sqrt((1 - ac) / ac)  # diffusers' VE sigma table (interpolated for fractional t)
    lam_ours = den.schedule.logsnr[1:]  # descending in index
    u_ours = np.arange(1, den.schedule.T + 1) / den.schedule.T

    def f(t: float) -> float:
        s = np.interp(float(t), np.arange(len(sig)), sig)
        lam = -2.0 * np.log(s)
        return float(np.interp(-lam, -lam_ours, u_ours))  # np.interp needs ascending x

    return f


def sample_peer(name: str, den: NetDenoiser, x_T: torch.Tensor, nfe: int) -> tuple[torch.Tensor, int]:
    """Run a fresh peer scheduler from x_T within ``nfe`` model evaluations; returns (x0 in [-1, 1],
    model evaluations used)."""
    return run_peer(name, den, x_T, steps_for_nfe(name, nfe))


@torch.no_grad()
def run_peer(name: str, den: NetDenoiser, x_T: torch.Tensor, steps: int) -> tuple[torch.Tensor, int]:
    """Run a fresh peer scheduler from x_T in ``steps`` scheduler steps; returns (x0 in [-1, 1],
    model evaluations used)."""
    sched = make_scheduler(name, den)
    sched.set_timesteps(steps)
    to_u = _time_map(den, sched)
    x = x_T.float() * sched.init_noise_sigma
    calls = 0
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        u = torch.full((x.shape[0],), to_u(float(t)), device=x.device)
        out = den.continuous(x_in, u)
        calls += 1
        x = sched.step(out.float(), t, x).prev_sample
    return x.clamp(-1, 1), calls
