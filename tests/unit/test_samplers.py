"""The sampler registry (fewstep.samplers): one keyword-only signature, NFE as counted, one row-name
function; the pyfunc sampler and the FLOP budget built from it."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from fewstep import models, samplers
from fewstep.math.ddim import PerImageNoise, sample_ddim
from fewstep.math.olss import fit_weights, sample_olss, uniform_path
from fewstep.math.param import NetDenoiser
from fewstep.math.schedules import cosine_schedule, timesteps
from fewstep.testing import GaussianNet
from fewstep.trajectories import collect

SHAPE = (3, 4, 4)


class Counting(GaussianNet):
    """The analytic Gaussian optimum as a network, counting its evaluations."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = 0

    def forward(self, z, tc):
        self.calls += 1
        return super().forward(z, tc)


@pytest.fixture(scope="module")
def den():
    g = torch.Generator().manual_seed(0)
    mu = torch.rand(SHAPE, generator=g, dtype=torch.float64) - 0.5
    std = 0.1 + 0.3 * torch.rand(SHAPE, generator=g, dtype=torch.float64)
    return NetDenoiser(Counting(mu, std, kind="v"), cosine_schedule(64), "v", autocast=False)


@pytest.fixture(scope="module")
def scheduler(den):
    t_path = timesteps(64, 16)
    X, E = collect(den, range(100, 108), SHAPE, t_path)
    return fit_weights(X.flatten(1), E.flatten(1), uniform_path(16, 4), t_path)


def _options(spec, scheduler) -> dict:
    return {"scheduler": scheduler} if spec.artifact == samplers.OLSS_SCHEDULER else {}


def test_every_sampler_has_the_one_keyword_only_signature():
    for name, spec in samplers.REGISTRY.items():
        params = inspect.signature(spec.fn).parameters
        assert list(params)[:2] == ["den", "x_T"], name
        assert params["steps"].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params["noise"].kind is inspect.Parameter.KEYWORD_ONLY and params["noise"].default is None, name
    assert {"ddim", "ddpm-hat", "olss"} <= set(samplers.REGISTRY)


@pytest.mark.parametrize("name", sorted(samplers.REGISTRY))
def test_every_registered_sampler_runs_and_counts_its_nfe(name, den, scheduler):
    spec = samplers.get(name)
    if not spec.available():
        pytest.skip("diffusers is not installed")
    steps = scheduler.steps if spec.artifact else spec.steps_for_nfe(4)
    noise = PerImageNoise(range(3))
    x_T = noise.randn(*SHAPE)
    den.net.calls = 0
    x = spec(den, x_T, steps=steps, noise=noise, **_options(spec, scheduler))
    assert x.shape == x_T.shape and torch.isfinite(x).all()
    # one batched call per network evaluation; diffusers' PNDM (PLMS, skip_prk_steps) evaluates once
    # more than its step count, and the table has always labelled it by its step count: a known
    # discrepancy, kept so the evaluation's rows stay as they are (reported to the coordinator)
    assert den.net.calls == spec.nfe(steps) + (name == "diffusers-pndm"), name
    assert spec.nfe(steps) <= 4


def test_the_registry_wraps_the_math_unchanged(den, scheduler):
    noise = PerImageNoise(range(4))
    x_T = noise.randn(*SHAPE)
    steps = timesteps(64, 8)
    assert torch.equal(samplers.get("ddim")(den, x_T, steps=8), sample_ddim(den, x_T, steps))
    assert torch.equal(samplers.get("ddim")(den, x_T, steps=8, eta=0.5, noise=PerImageNoise(range(4))),
                       sample_ddim(den, x_T, steps, eta=0.5, noise=PerImageNoise(range(4))))
    assert torch.equal(samplers.get("ddpm-hat")(den, x_T, steps=8, noise=PerImageNoise(range(4))),
                       sample_ddim(den, x_T, steps, variance="hat", noise=PerImageNoise(range(4))))
    assert torch.equal(samplers.get("olss")(den, x_T, steps=4, scheduler=scheduler), sample_olss(den, x_T, scheduler))
    with pytest.raises(ValueError, match="exactly 4 steps"):
        samplers.get("olss")(den, x_T, steps=8, scheduler=scheduler)
    with pytest.raises(samplers.UnknownSamplerError, match="unknown sampler 'nope'; registered: ddim"):
        samplers.get("nope")


def test_row_names_come_from_one_function():
    assert samplers.row_name("teacher", "ddim", steps=8) == "teacher ddim 8"
    assert samplers.row_name("teacher", "ddim", steps=8, eta=1.0) == "teacher ddim 8 eta=1"
    assert samplers.row_name("teacher", "ddpm-hat", steps=64) == "teacher ddpm 64 sigma-hat"
    assert samplers.row_name("student-4", "olss", steps=4, artifact="olss-open-4.json") == "student-4 olss-open-4"
    assert samplers.get("olss").family({"artifact": "olss-ridge-8.json"}) == "olss-ridge"
    # every OLSS variant is its own family, the paper's apart from the beyond-paper ones; olss-N is the headline
    fams = {f: samplers.olss_family(f) for f in ("olss-paper-4.json", "olss-p-4.json", "olss-open-4.json",
                                                   "olss-closed-4.json", "olss-4.json")}
    assert fams == {"olss-paper-4.json": "olss-paper", "olss-p-4.json": "olss-p", "olss-open-4.json": "olss-open",
                    "olss-closed-4.json": "olss-closed", "olss-4.json": "olss"}
    assert "(paper)" in samplers.olss_label("olss-paper-4.json") and "beyond paper" in samplers.olss_label(
        "olss-closed-4.json") and "paper" not in samplers.olss_label("olss-4.json")
    assert samplers.row_name("teacher", "olss", steps=4, artifact="olss-paper-4.json") == "teacher olss-paper-4"
    assert samplers.row_name("teacher", "diffusers-heun", steps=samplers.get("diffusers-heun").steps_for_nfe(8)) \
        == "diffusers heun 7"
    assert samplers.row_name("teacher", "diffusers-dpmpp_2m", steps=4) == "diffusers dpmpp_2m 4"
    # promotion's lookup of a registered version's row
    assert samplers.row_for_version({"role": "teacher", "model": "teacher-p4", "nfe": "16"}) == "teacher-p4 ddim 16"
    assert samplers.row_for_version({"role": "student", "name": "cifar10-student-4step", "nfe": 4}) == \
        "student-4 ddim 4"
    assert samplers.row_for_version({"role": "olss", "model": "teacher", "nfe": 8,
                                     "scheduler_file": "schedulers/teacher/olss-p-8.json"}) == "teacher olss-p-8"
    assert samplers.row_for_version({"role": "evaluator", "nfe": None}) is None


def test_adding_a_sampler_is_one_function_and_one_registry_entry(den):
    """What a new sampler's module and its entry look like; the evaluation, the pyfunc and the
    budget then reach it by name through samplers.get."""

    def sample_midpoint_x(den, x_T, steps):  # "the sampler's module": math on tensors
        return sample_ddim(den, x_T, steps[::2]) if len(steps) > 1 else sample_ddim(den, x_T, steps)

    @samplers.register("every-other", family="ddim", nfe=lambda s: (s + 1) // 2,
                       label=lambda steps, _o: f"every-other {steps}")
    def every_other(den, x_T, *, steps, noise=None, spacing="trailing"):  # "its registry entry"
        return sample_midpoint_x(den, x_T, timesteps(den.schedule.T, steps, spacing))

    try:
        spec = samplers.get("every-other")
        den.net.calls = 0
        imgs = samplers.generate(spec, den, range(5), SHAPE, steps=8, batch_size=2)
        assert imgs.shape == (5, *SHAPE) and den.net.calls == 3 * spec.nfe(8)  # three batches of 4 NFE
        assert samplers.row_name("teacher", "every-other", steps=8) == "teacher every-other 8"
        with pytest.raises(ValueError, match="already registered"):
            samplers.register("every-other", family="x", label=lambda s, o: "")(every_other)
    finally:
        samplers.REGISTRY.pop("every-other", None)


def test_generate_does_not_depend_on_the_batch_size(den):
    a = samplers.generate("ddim", den, range(5), SHAPE, steps=4, batch_size=2, eta=0.5)
    b = samplers.generate("ddim", den, range(5), SHAPE, steps=4, batch_size=5, eta=0.5)
    assert torch.equal(a, b) and samplers.generate("ddim", den, [], SHAPE, steps=4).shape == (0, *SHAPE)


def test_the_pyfunc_sampler_plans_through_the_registry(tmp_path, scheduler):
    from fewstep.images import to_uint8
    from fewstep.math.ddim import generate
    from fewstep.nets.unet import UNet, UNetConfig
    from fewstep.sampler_pyfunc import load_sampler

    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=4, channels=16, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                          head_dim=8, dropout=0.0))
    meta = {"role": "student", "parameterization": "v", "schedule": {"kind": "cosine", "T": 64}, "image_size": 4,
            "dataset": "toy", "sample_steps": 4, "parent": None}
    models.save_model(tmp_path / "m", net, meta)
    (tmp_path / "olss-4.json").write_text(scheduler.to_json())
    s = load_sampler(tmp_path / "m" / models.WEIGHTS, tmp_path / "m" / models.CONFIG)
    assert s.shape == s.card.image_shape == (3, 4, 4) and s.plan(None)[:2] == ("ddim", 4)
    want = to_uint8(generate(s.denoiser, range(7, 10), (3, 4, 4), timesteps(64, 4)))
    np.testing.assert_array_equal(s.sample(3, seed=7), want)  # as before the registry
    with pytest.raises(ValueError, match="steps must be in 1..64"):
        s.sample(1, seed=0, steps=65)
    o = load_sampler(tmp_path / "m" / models.WEIGHTS, tmp_path / "m" / models.CONFIG, tmp_path / "olss-4.json")
    x_T = PerImageNoise(range(2)).randn(3, 4, 4)
    np.testing.assert_array_equal(o.sample(2, seed=0), to_uint8(sample_olss(o.denoiser, x_T, o.scheduler)))
    with pytest.raises(ValueError, match="exactly 4 steps"):
        o.sample(1, seed=0, steps=8)
