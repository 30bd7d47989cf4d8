"""Export to diffusers (issue 16, "Out"): the OLSS scheduler as a diffusers scheduler, the fewstep UNet
as a diffusers model, and the export command. Everything runs a standard diffusers loop on the
exported files and compares with fewstep's own samplers from the same x_T."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from fewstep import models, storage  # noqa: E402
from fewstep.math.ddim import PerImageNoise, sample_ddim  # noqa: E402
from fewstep.math.olss import OLSSScheduler, fit_weights, sample_olss, search_path  # noqa: E402
from fewstep.math.schedules import timesteps  # noqa: E402
from fewstep.trajectories import collect  # noqa: E402

SEEDS = [11, 12, 13]
N = 4


def stage_params() -> dict:
    """The tiny params with one torch thread: the stage sets the thread count for the whole process."""
    from tests.helpers import tiny_params

    p = tiny_params()
    p["base"]["threads"] = 1
    return p


def close(a, b):
    """Equal up to float32 rounding: weights that diffusers loads memory-mapped (unaligned) take other
    SIMD paths than freshly allocated ones (differences ~5e-7)."""
    return bool((a - b).abs().max() <= 1e-5)


def loop(unet, sched, x, n):
    """The standard diffusers sampling loop."""
    sched.set_timesteps(n)
    for t in sched.timesteps:
        out = unet(x, t).sample
        x = sched.step(out, t, x).prev_sample
    return x


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny nets: on a busy 2-core box a second torch thread only slows them down."""
    from tests.mlflow_helpers import one_thread

    with one_thread():
        yield


@pytest.fixture(scope="module")
def setup(tiny_teacher, tmp_path_factory):
    """The tiny teacher exported natively, and a 4-step OLSS scheduler fitted on 8 of its trajectories."""
    from fewstep.interop.native import export_native

    d = tmp_path_factory.mktemp("export")
    teacher = tiny_teacher / "teacher"
    den = models.load_denoiser(teacher)
    t_path = timesteps(den.schedule.T, 16)
    X, E = collect(den, range(100, 108), den.card.image_shape, t_path)
    X, E = X.flatten(1), E.flatten(1)
    ps = search_path(X, E, N, iters=12)
    sched = fit_weights(X, E, ps.path, t_path)
    sched.meta = {"model": "teacher", "model_weights_sha256": den.card.weights_sha256, "variant": "open-loop"}
    path = d / "olss-4.json"
    path.write_text(sched.to_json())
    export = export_native(teacher, d / "native")
    x_T = PerImageNoise(SEEDS).randn(*den.card.image_shape)
    return {"den": den, "teacher": teacher, "sched": sched, "sched_path": path, "export": export, "x_T": x_T,
            "dir": d}


@pytest.fixture(scope="module")
def unet(setup):
    from fewstep.interop.native import FewstepUNet2DModel

    return FewstepUNet2DModel.from_pretrained(setup["export"] / "unet", use_safetensors=True).eval()


# --------------------------------------------------------------------------------------------
# the native UNet and its DDIM export


def test_native_unet_round_trips_and_takes_diffusers_timesteps(setup, unet):
    den, x = setup["den"], setup["x_T"]
    cfg = json.loads((setup["export"] / "unet" / "config.json").read_text())
    assert cfg["_class_name"] == "FewstepUNet2DModel" and cfg["num_train_timesteps"] == den.schedule.T
    assert cfg["prediction_type"] == "v_prediction" and cfg["sample_size"] == den.card.image_size
    assert cfg["fewstep_card"]["weights_sha256"] == den.card.weights_sha256
    assert not list((setup["export"] / "unet").glob("*.bin"))
    B = x.shape[0]
    with torch.no_grad():
        for t in (torch.tensor(40), 40, 40.0, torch.full((B,), 40)):  # diffusers 40 = fewstep index 41
            assert close(unet(x, t).sample, den(x, torch.full((B,), 41))), t
        per = torch.tensor([63, 20, 0])
        assert close(unet(x, per).sample, den(x, per + 1))
        assert not close(unet(x, per).sample, den(x, per))
        assert torch.equal(unet(x, 40, return_dict=False)[0], unet(x, 40).sample)
    with pytest.raises(ValueError, match="one entry per sample"):
        unet(x, torch.tensor([1, 2]))


@pytest.mark.parametrize("k", [4, 8])
def test_ddim_pipeline_on_the_native_export_equals_sample_ddim(setup, k):
    from diffusers import DDIMPipeline

    import fewstep.interop.native  # noqa: F401  diffusers resolves the unet class from sys.modules

    den, x_T = setup["den"], setup["x_T"]
    pipe = DDIMPipeline.from_pretrained(setup["export"], use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]  # the same x_T as fewstep's seeds
    img = pipe(batch_size=len(SEEDS), generator=gens, num_inference_steps=k, output_type="pt").images
    ref = sample_ddim(den, x_T, timesteps(den.schedule.T, k), clip=False)
    assert (img - (ref / 2 + 0.5).clamp(0, 1)).abs().max() <= 1e-4
    # per-step clipping (fewstep's default, PD A.3) is DDIM's clip_sample with the clipped eps
    from diffusers import DDIMScheduler

    clipped = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=True, clip_sample_range=1.0)
    x = x_T.clone()
    clipped.set_timesteps(k)
    with torch.no_grad():
        for t in clipped.timesteps:
            x = clipped.step(pipe.unet(x, t).sample, t, x, use_clipped_model_output=True).prev_sample
    assert (x - sample_ddim(den, x_T, timesteps(den.schedule.T, k), clip=True)).abs().max() <= 1e-4


def test_a_split_model_exports_with_its_routing(tmp_path, setup):
    """Two different networks behind one boundary: the exported split wrapper routes each timestep as
    fewstep's SplitDenoiser does, so a DDIM loop reproduces fewstep's DDIM on the split model."""
    from diffusers import DDIMPipeline

    from fewstep.interop.export import export_model

    net, card = models.load_net(setup["teacher"])
    low = models.load_net(setup["teacher"])[0]
    with torch.no_grad():
        for p in low.parameters():
            p.mul_(0.9)
    models.save_split(tmp_path / "split", {"high": net, "low": low},
                      {"schedule": card.schedule.to_dict(), "parameterization": card.parameterization,
                       "split": {"boundary_logsnr": 0.0}, "sample_steps": 4})
    out = export_model(tmp_path / "split", tmp_path / "out")
    assert json.loads((out / "model_index.json").read_text())["unet"] == ["fewstep.interop.native",
                                                                         "FewstepSplitUNet2DModel"]
    pipe = DDIMPipeline.from_pretrained(out, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    den, x_T = models.load_denoiser(tmp_path / "split"), setup["x_T"]
    assert 0 < den.t_boundary < den.schedule.T and pipe.unet.config.t_boundary == den.t_boundary
    t = torch.tensor([den.t_boundary - 1, den.t_boundary])  # diffusers timesteps either side of the boundary
    with torch.no_grad():
        assert close(pipe.unet(x_T[:2], t).sample, den(x_T[:2], t + 1))
        tb, idx = den.t_boundary, lambda i: torch.full((len(SEEDS),), i)
        assert close(pipe.unet(x_T, tb).sample, den.high(x_T, idx(tb + 1)))  # index tb+1: high noise
        assert close(pipe.unet(x_T, tb - 1).sample, den.low(x_T, idx(tb)))  # index tb: low noise
        assert not close(den.high(x_T, idx(tb)), den.low(x_T, idx(tb)))  # the two networks differ
    img = pipe(batch_size=len(SEEDS), generator=[torch.Generator().manual_seed(s) for s in SEEDS],
               num_inference_steps=8, output_type="pt").images
    ref = sample_ddim(den, x_T, timesteps(den.schedule.T, 8), clip=False)
    assert (img - (ref / 2 + 0.5).clamp(0, 1)).abs().max() <= 1e-4


def test_the_wrapper_config_covers_every_unet_field_and_round_trips_pos_emb_and_classes(tmp_path):
    """Every UNetConfig field is a parameter of FewstepUNet2DModel (none dropped on the way through
    config.json); a pos_emb net (the PDM setup) exported by export_native and a class-conditional
    net saved and reloaded give identical outputs to the fewstep nets they came from."""
    import dataclasses
    import inspect

    from fewstep.interop.native import FewstepUNet2DModel, export_native
    from fewstep.nets.unet import UNet, UNetConfig

    params = inspect.signature(FewstepUNet2DModel.__init__).parameters
    assert {f.name for f in dataclasses.fields(UNetConfig)} <= set(params)
    small = dict(image_size=8, patch_size=2, channels=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                 head_dim=8, dropout=0.0)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([5, 30, 63])

    torch.manual_seed(1)
    pos = UNet(UNetConfig(**small, pos_emb=True)).eval()
    meta = {"role": "teacher", "parameterization": "v", "schedule": {"kind": "cosine", "T": 64}, "image_size": 8,
            "dataset": "toy", "sample_steps": 4, "parent": None}
    models.save_model(tmp_path / "pos", pos, meta)
    out = export_native(tmp_path / "pos", tmp_path / "pos-export")
    assert json.loads((out / "unet" / "config.json").read_text())["pos_emb"] is True
    back = FewstepUNet2DModel.from_pretrained(out / "unet", use_safetensors=True).eval()
    assert back.net.cfg.pos_emb
    with torch.no_grad():
        assert torch.equal(back(x, t - 1).sample, pos(x, t / 64))

    torch.manual_seed(2)
    cond = FewstepUNet2DModel(**small, num_classes=3, num_train_timesteps=64).eval()
    for prm in cond.parameters():  # the class embedding starts at zero: make the labels matter
        torch.nn.init.normal_(prm, std=0.05)
    cond.save_pretrained(tmp_path / "cond", safe_serialization=True)
    again = FewstepUNet2DModel.from_pretrained(tmp_path / "cond", use_safetensors=True).eval()
    assert again.net.cfg.num_classes == 3
    y = torch.tensor([0, 2, 3])  # 3 = the null label
    with torch.no_grad():
        want = cond.net(x, t / 64, y)
        assert torch.equal(again(x, t - 1, class_labels=y).sample, want)
        assert not torch.equal(again(x, t - 1, class_labels=torch.tensor([1, 1, 1])).sample, want)
        assert torch.equal(again(x, t - 1).sample, cond.net(x, t / 64))  # no labels: the null label
    unconditional = FewstepUNet2DModel(**small, num_train_timesteps=64)
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(x, t, class_labels=y)


# --------------------------------------------------------------------------------------------
# the OLSS scheduler


def test_olss_scheduler_round_trips_and_reproduces_sample_olss(setup, unet, tmp_path):
    from fewstep.interop.olss_scheduler import OLSSDiffusersScheduler

    den, sched, x_T = setup["den"], setup["sched"], setup["x_T"]
    olss = OLSSDiffusersScheduler.from_olss(sched, den.card)
    assert olss.config.timesteps == [t - 1 for t in sched.timesteps] and olss.config.basis == "x"
    olss.save_pretrained(tmp_path / "s")
    back = OLSSDiffusersScheduler.from_pretrained(tmp_path / "s")
    keys = ("timesteps", "wx", "we", "alphas", "sigmas", "basis", "prediction_type", "num_train_timesteps",
            "source_sha256", "model_name", "model_weights_sha256")
    for k in keys:
        assert back.config[k] == olss.config[k], k  # float64 lists survive the JSON exactly
    assert back.config.wx == sched.wx and back.config.we == sched.we
    assert back.config.source_sha256 == storage.sha256_file(setup["sched_path"])
    assert back.timesteps.dtype == torch.int64 and back.timesteps.tolist() == olss.config.timesteps

    ref = sample_olss(den, x_T, sched, clip=False)
    with torch.no_grad():
        first = loop(unet, back, x_T.clone(), N)
        second = loop(unet, back, x_T.clone(), None)  # history reset: a second run is the same run
    assert (first - ref).abs().max() <= 1e-4
    assert torch.equal(first, second)
    assert first.dtype == x_T.dtype


def test_olss_scheduler_in_a_ddpm_pipeline_and_the_export_command(setup, tmp_path, monkeypatch):
    from diffusers import DDPMPipeline

    import fewstep.interop.native  # noqa: F401
    import fewstep.interop.olss_scheduler  # noqa: F401
    from stages import export
    from tests.helpers import write_params

    monkeypatch.setenv("FEWSTEP_TRACKING", "off")
    params = str(write_params(tmp_path / "params.yaml", stage_params()))
    export.main(["--params", params, "--scheduler", str(setup["sched_path"]), "--model", str(setup["teacher"]),
                 "--out", str(tmp_path / "olss")])
    index = json.loads((tmp_path / "olss" / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["scheduler"] == ["fewstep.interop.olss_scheduler", "OLSSDiffusersScheduler"]
    info = json.loads((tmp_path / "olss" / "fewstep.json").read_text())
    assert info["kind"] == "olss" and info["scheduler_sha256"] == storage.sha256_file(setup["sched_path"])

    pipe = DDPMPipeline.from_pretrained(tmp_path / "olss", use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    ref = sample_olss(setup["den"], setup["x_T"], setup["sched"], clip=True)
    runs = [pipe(batch_size=len(SEEDS), generator=[torch.Generator().manual_seed(s) for s in SEEDS],
                 num_inference_steps=N, output_type="pt").images for _ in range(2)]
    assert (runs[0] - (ref / 2 + 0.5)).abs().max() <= 1e-4
    assert torch.equal(runs[0], runs[1])
    with pytest.raises(ValueError, match=f"fitted for exactly {N} steps"):
        pipe(num_inference_steps=N + 1)

    export.main(["--params", params, "--model", str(setup["teacher"]), "--out", str(tmp_path / "teacher")])
    assert json.loads((tmp_path / "teacher" / "model_index.json").read_text())["_class_name"] == "DDIMPipeline"


def test_olss_scheduler_errors(setup):
    from fewstep.errors import UserError
    from fewstep.interop.olss_scheduler import OLSSDiffusersScheduler, StaleSchedulerError

    olss = OLSSDiffusersScheduler.from_olss(setup["sched"], setup["den"].card)
    with pytest.raises(UserError, match=r"fitted for exactly 4 steps; num_inference_steps=50"):
        olss.set_timesteps(50)
    x = setup["x_T"]
    olss.set_timesteps(4)
    t0, t1, t2 = olss.timesteps[:3]
    olss.step(x, t0, x)
    with pytest.raises(UserError, match="must run in order"):
        olss.step(x, t2, x)
    with pytest.raises(UserError, match="not one of this OLSS scheduler's timesteps"):
        olss.step(x, 5, x)
    with pytest.raises(UserError, match="lower-triangular"):
        OLSSDiffusersScheduler(**{**olss.config, "we": [[1.0]] * 4})
    with pytest.raises(UserError, match="unknown OLSS basis"):
        OLSSDiffusersScheduler(**{**olss.config, "basis": "eps"})
    stale = OLSSScheduler.from_json(setup["sched"].to_json())
    stale.meta = {**stale.meta, "model_weights_sha256": "0" * 64}
    with pytest.raises(StaleSchedulerError, match="fitted on weights 000000000000"):
        OLSSDiffusersScheduler.from_olss(stale, setup["den"].card)


def _ddim_as_olss(alphas, sigmas, kind, basis):
    """DDIM (eta 0) on the given steps, written as OLSS weights: z_{i+1} = r_i z_i + q_i e_i with e_i
    the x-hat (basis x) or the raw output (basis output), unrolled into x_T and e_0..e_i."""
    a, s = list(alphas) + [1.0], list(sigmas) + [0.0]
    wx, we, c, d = [], [], 1.0, []
    for i in range(len(alphas)):
        at, st, an, sn = a[i], s[i], a[i + 1], s[i + 1]
        if basis == "x":
            r, q = sn / st, an - sn / st * at
        elif kind == "v":  # x = a z - s v, eps = s z + a v
            r, q = an * at + sn * st, sn * at - an * st
        else:  # eps
            r, q = an / at, sn - an * st / at
        c, d = r * c, [r * w for w in d] + [q]
        wx.append(c)
        we.append(list(d))
    return wx, we


@pytest.mark.parametrize("basis", ["x", "output"])
def test_olss_with_ddim_coefficients_reproduces_ddim_scheduler(setup, unet, basis):
    """Reference check 5: OLSS weights set to DDIM's own coefficients give DDIMScheduler's samples
    (this also covers the 'output' basis: the raw v of the network)."""
    from diffusers import DDIMScheduler

    from fewstep.interop.olss_scheduler import OLSSDiffusersScheduler

    den, x_T = setup["den"], setup["x_T"]
    ddim = DDIMScheduler.from_pretrained(setup["export"] / "scheduler")
    ddim.set_timesteps(N)
    ts = ddim.timesteps.tolist()
    alphas = [float(den.schedule.alpha[t + 1]) for t in ts]
    sigmas = [float(den.schedule.sigma[t + 1]) for t in ts]
    wx, we = _ddim_as_olss(alphas, sigmas, den.kind, basis)
    olss = OLSSDiffusersScheduler(timesteps=ts, wx=wx, we=we, alphas=alphas, sigmas=sigmas, basis=basis,
                                  prediction_type="v_prediction", num_train_timesteps=den.schedule.T)
    with torch.no_grad():
        a, b = loop(unet, olss, x_T.clone(), N), loop(unet, ddim, x_T.clone(), N)
    assert (a - b).abs().max() <= 1e-4


def test_output_basis_matches_sample_olss_when_fewstep_has_it(setup, unet):
    """An artifact with basis 'output' (fewstep's e_j = the raw output) reproduces sample_olss."""
    from fewstep.interop.olss_scheduler import OLSSDiffusersScheduler

    if "basis" not in OLSSScheduler.__dataclass_fields__:
        pytest.skip("math.olss.OLSSScheduler has no basis field yet (branch olsspaper)")
    den, x_T = setup["den"], setup["x_T"]
    sched = OLSSScheduler.from_json(setup["sched"].to_json())
    sched.basis = "output"
    olss = OLSSDiffusersScheduler.from_olss(sched, den.card)
    assert olss.config.basis == "output"
    with torch.no_grad():
        assert (loop(unet, olss, x_T.clone(), N) - sample_olss(den, x_T, sched, clip=False)).abs().max() <= 1e-4


def test_a_registered_version_exports_by_name_and_version(registry, tree, tmp_path, monkeypatch):
    """--version downloads a registered OLSS version (model + scheduler) and exports both."""
    from diffusers import DDPMPipeline

    import fewstep.interop.native  # noqa: F401
    import fewstep.interop.olss_scheduler  # noqa: F401
    from fewstep import tracking
    from stages import export
    from tests.helpers import write_params
    from tests.mlflow_helpers import use_env

    env, regs = registry
    use_env(monkeypatch, env)
    monkeypatch.setenv("FEWSTEP_TRACKING", "off")
    assert tracking.parse_version_ref("models:/a-b@champion") == ("a-b", None, "champion")
    assert tracking.parse_version_ref("a-b/3") == ("a-b", "3", None)
    with pytest.raises(tracking.LineageError, match="bad model version"):
        tracking.parse_version_ref("a-b")
    r = regs["cifar10-olss-teacher-2step"]
    params = str(write_params(tmp_path / "params.yaml", stage_params()))
    export.main(["--params", params, "--version", f"models:/{r.name}/{r.version}", "--out", str(tmp_path / "o")])
    info = json.loads((tmp_path / "o" / "fewstep.json").read_text())
    sfile = tree / "schedulers" / "teacher" / "olss-2.json"
    assert info["kind"] == "olss" and info["scheduler_sha256"] == storage.sha256_file(sfile)
    assert info["model_version"] == r.version
    pipe = DDPMPipeline.from_pretrained(tmp_path / "o", use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.model_name == r.name and pipe.scheduler.config.model_version == r.version
    den = models.load_denoiser(tree / "models" / "teacher")
    ref = sample_olss(den, PerImageNoise(SEEDS).randn(*den.card.image_shape),
                      OLSSScheduler.from_json(sfile.read_text()))
    img = pipe(batch_size=len(SEEDS), generator=[torch.Generator().manual_seed(s) for s in SEEDS],
               num_inference_steps=2, output_type="pt").images
    assert (img - (ref / 2 + 0.5)).abs().max() <= 1e-4
    with pytest.raises(SystemExit) as e:
        export.main(["--params", params, "--version", "cifar10-teacher/99", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and not (tmp_path / "x").exists()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_olss_export_of_an_imported_diffusers_teacher(tmp_path, prediction_type):
    """An OLSS scheduler of a diffusers-unet2d teacher (cosine betas, T = 1000) exports beside its
    UNet2DModel (export_unet2d) and a DDPMPipeline reproduces sample_olss."""
    unet2d = pytest.importorskip("fewstep.interop.unet2d")  # branch import
    import diffusers

    import fewstep.interop.olss_scheduler  # noqa: F401
    from fewstep.interop.export import export_olss

    torch.manual_seed(0)
    u = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                              layers_per_block=1, norm_num_groups=8,
                              down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                              up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    with torch.no_grad():
        for p in u.parameters():
            p.add_(0.02 * torch.randn_like(p))  # zero-initialised output layers would make every output 0
    diffusers.DDPMPipeline(unet=u, scheduler=diffusers.DDPMScheduler(
        num_train_timesteps=1000, prediction_type=prediction_type, beta_schedule="squaredcos_cap_v2")
    ).save_pretrained(tmp_path / "src")
    card = unet2d.import_teacher(str(tmp_path / "src"), tmp_path / "teacher")
    den = models.load_denoiser(tmp_path / "teacher")
    t_path = timesteps(den.schedule.T, 20)
    X, E = collect(den, range(100, 104), card.image_shape, t_path)
    sched = fit_weights(X.flatten(1), E.flatten(1), search_path(X.flatten(1), E.flatten(1), N, iters=10).path,
                        t_path)
    sched.meta = {"model": "teacher", "model_weights_sha256": card.weights_sha256}
    (tmp_path / "olss-4.json").write_text(sched.to_json())
    out = export_olss(tmp_path / "olss-4.json", tmp_path / "teacher", tmp_path / "out")
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["_class_name"] == "DDPMPipeline"
    pipe = diffusers.DDPMPipeline.from_pretrained(out, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    seeds = SEEDS[:2]
    img = pipe(batch_size=2, generator=[torch.Generator().manual_seed(s) for s in seeds], num_inference_steps=N,
               output_type="pt").images
    ref = sample_olss(den, PerImageNoise(seeds).randn(*card.image_shape), sched)
    assert (img - (ref / 2 + 0.5)).abs().max() <= 1e-4
