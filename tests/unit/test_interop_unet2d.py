"""A diffusers UNet2DModel in as a fewstep teacher, and back out as a DDIMPipeline (issue 16).

Everything is built here (tiny UNet2DModels, 16x16): nothing is downloaded."""

from __future__ import annotations

import ast
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fewstep import models, storage  # noqa: E402
from fewstep.interop import unet2d  # noqa: E402
from fewstep.math.ddim import sample_ddim  # noqa: E402
from fewstep.math.schedules import diffusers_alphas_cumprod, make_schedule, timesteps  # noqa: E402
from tests.helpers import ROOT, tiny_images  # noqa: E402

T = 1000
SIZE = 16


@pytest.fixture(autouse=True)
def _one_thread(torch_one_thread):
    yield


def _unet(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = dict(sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
               norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
               up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    return diffusers.UNet2DModel(**{**cfg, **kw}).eval()


def _save_src(d: Path, unet, scheduler, pipeline: bool = True) -> Path:
    """A diffusers save_pretrained dir: a DDPMPipeline (unet/, scheduler/, model_index.json), or a
    bare model dir with scheduler_config.json beside config.json (the google/ddpm-* layout)."""
    if pipeline:
        diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(d)
    else:
        unet.save_pretrained(d)
        scheduler.save_pretrained(d)
    return d


def _ddim_loop(unet, scheduler_config, x_T: torch.Tensor, k: int, clip: bool = False) -> torch.Tensor:
    """A plain diffusers DDIM loop (trailing, set_alpha_to_one) on the original UNet."""
    s = diffusers.DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing", clip_sample=clip,
                                            set_alpha_to_one=True, steps_offset=0)
    s.set_timesteps(k)
    z = x_T.clone()
    with torch.no_grad():
        for t in s.timesteps:
            z = s.step(unet(z, t).sample, t, z, use_clipped_model_output=clip).prev_sample
    return z


def _assert_same_samples(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """The images (clamped to [-1, 1]) within 1e-4; the raw samples (an x-hat from an eps model
    at alpha ~ 0.006 can reach |x| ~ 100) within 1e-6 relative to their scale."""
    assert (ours.clamp(-1, 1) - theirs.clamp(-1, 1)).abs().max().item() <= 1e-4
    assert (ours - theirs).abs().max().item() <= 1e-6 * max(1.0, theirs.abs().max().item()) + 1e-5


def _noise(seed: int, n: int = 2) -> torch.Tensor:
    return torch.randn((n, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A UNet2DModel trained briefly (eps, linear betas) on the toy 16x16 squares, saved as a DDPMPipeline."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("diffusers_src")
    imgs, _ = tiny_images(64, SIZE)
    data = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    unet = _unet(0).train()
    sched = diffusers.DDPMScheduler(num_train_timesteps=T)
    opt = torch.optim.Adam(unet.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(24):
        x = data[torch.randint(0, len(data), (8,), generator=g)]
        eps = torch.randn(x.shape, generator=g)
        t = torch.randint(0, T, (8,), generator=g)
        loss = torch.nn.functional.mse_loss(unet(sched.add_noise(x, eps, t), t).sample, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print("teacher losses", [round(v, 3) for v in losses])
    assert np.mean(losses[-6:]) < 0.5 * np.mean(losses[:6])  # it learned something
    unet.eval()
    src = _save_src(d / "src", unet, sched)
    card = unet2d.import_teacher(src, d / "teacher")
    return {"dir": d, "src": src, "unet": unet, "card": card, "teacher": d / "teacher"}


# --------------------------------------------------------------------------------------------
# the schedule


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "trained_betas"])
@pytest.mark.parametrize("n", [1000, 37])
def test_schedule_equals_diffusers_alphas_cumprod(beta_schedule, n):
    kw = dict(beta_start=0.00085, beta_end=0.012) if beta_schedule == "scaled_linear" else {}
    if beta_schedule == "trained_betas":
        kw = {"trained_betas": np.linspace(1e-3, 0.05, n) ** 1.5}
        ours = diffusers_alphas_cumprod(n, trained_betas=kw["trained_betas"].tolist())
        spec = models.ScheduleSpec("diffusers", n, trained_betas=kw["trained_betas"].tolist())
    else:
        ours = diffusers_alphas_cumprod(n, beta_schedule, **kw)
        spec = models.ScheduleSpec("diffusers", n, beta_schedule=beta_schedule, **kw)
    theirs = diffusers.DDPMScheduler(num_train_timesteps=n, beta_schedule=beta_schedule, **kw).alphas_cumprod
    assert ours.dtype == torch.float32 and torch.equal(ours, theirs)  # bit for bit
    sch = spec.build()
    assert sch.T == n and sch.alpha[0] == 1.0 and sch.sigma[0] == 0.0
    np.testing.assert_allclose(sch.alpha[1:] ** 2, theirs.double().numpy(), rtol=1e-14, atol=0)
    np.testing.assert_allclose(sch.alpha**2 + sch.sigma**2, 1.0, rtol=1e-14)
    assert models.ScheduleSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_the_cpu_default_schedules_are_unchanged():
    assert models.ScheduleSpec.from_dict({"kind": "cosine", "T": 64}).to_dict() == {"kind": "cosine", "T": 64}
    lin = make_schedule("linear", 1000)
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(lin.alpha[1:] ** 2, np.cumprod(1 - betas), rtol=1e-12)
    with pytest.raises(models.ModelCardError, match="beta_schedule"):
        models.ScheduleSpec("diffusers", 10, beta_schedule="sigmoid")


# --------------------------------------------------------------------------------------------
# in


@pytest.mark.parametrize("k", [4, 10])
def test_imported_teacher_ddim_equals_a_diffusers_ddim_loop(trained, k):
    den = models.load_denoiser(trained["teacher"])
    sched_cfg = diffusers.DDPMScheduler.load_config(trained["src"] / "scheduler")
    x_T = _noise(k)
    ours = sample_ddim(den, x_T, timesteps(T, k), clip=False)
    theirs = _ddim_loop(trained["unet"], sched_cfg, x_T, k)
    _assert_same_samples(ours, theirs)
    assert (ours - x_T).abs().mean() > 0.1  # the sampler moved


def test_the_card_records_family_configs_and_source_hashes(trained):
    card, src = trained["card"], trained["src"]
    assert card == models.load_card(trained["teacher"])
    raw = storage.read_json(trained["teacher"] / models.CONFIG)
    assert raw["family"] == "diffusers-unet2d" and raw["role"] == "teacher" and raw["name"] == "teacher"
    assert raw["parameterization"] == "eps" and raw["image_size"] == SIZE and raw["channels"] == 3
    assert raw["sample_steps"] == T
    assert raw["schedule"] == {"kind": "diffusers", "T": T, "beta_schedule": "linear", "beta_start": 0.0001,
                               "beta_end": 0.02}
    assert raw["diffusers_unet"] == unet2d.public_config(trained["unet"].config)
    assert not any(k.startswith("_") for k in raw["diffusers_unet"])
    source = raw["source"]
    assert source["kind"] == "diffusers" and source["url"] == str(src)
    assert source["scheduler_class"] == "DDPMScheduler" and source["scheduler_config"]["num_train_timesteps"] == T
    assert set(source["files"]) == {"unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                                    "scheduler/scheduler_config.json", "model_index.json"}
    for rel, sha in source["files"].items():
        assert sha == storage.sha256_file(src / rel)
    assert source["sha256"] == storage.sha256_json(source["files"])
    assert raw["weights_sha256"] == storage.sha256_file(trained["teacher"] / models.WEIGHTS)
    # the weights are the UNet's own state dict
    theirs = trained["unet"].state_dict()
    ours = storage.load_tensors(trained["teacher"] / models.WEIGHTS)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_card_save_load_gives_identical_outputs(trained, tmp_path):
    den = models.load_denoiser(trained["teacher"])
    unet = trained["unet"]
    z = _noise(3)
    t = torch.tensor([1, 500])
    with torch.no_grad():
        out = den(z, t)
        assert torch.equal(out, unet(z, t - 1).sample)  # index i is diffusers' i - 1, exactly
        frac = den.continuous(z, torch.tensor([0.25, 0.3337]))  # off the grid: a fractional timestep
        assert torch.equal(frac, unet(z, torch.tensor([249.0, 332.7])).sample)
    models.save(tmp_path / "again", den.card, den.net.state_dict(), kind="diffusers-unet2d")
    again = models.load_denoiser(tmp_path / "again")
    assert again.card == den.card and again.schedule.T == T
    with torch.no_grad():
        assert torch.equal(again(z, t), out)


def test_a_card_of_the_family_loads_without_importing_its_module_first(trained, monkeypatch):
    import fewstep.interop

    # as in a fresh process: the family's module not imported, its family not registered
    monkeypatch.delitem(models.FAMILIES, "diffusers-unet2d")
    monkeypatch.delitem(sys.modules, "fewstep.interop.unet2d")
    monkeypatch.delattr(fewstep.interop, "unet2d")
    card = models.load_card(trained["teacher"])  # imports fewstep.interop.unet2d by the family's name
    assert card.family == "diffusers-unet2d" and card.image_shape == (3, SIZE, SIZE)
    assert sys.modules["fewstep.interop.unet2d"] is not unet2d and "diffusers-unet2d" in models.FAMILIES
    with pytest.raises(models.ModelCardError, match="unknown architecture family 'diffusers-unet3d'"):
        models.ModelCard.from_dict({**card.to_dict(), "family": "diffusers-unet3d"})


@pytest.mark.parametrize("prediction_type,betas", [("epsilon", "squaredcos_cap_v2"), ("v_prediction", "linear"),
                                                   ("sample", "scaled_linear"), ("v_prediction", "trained_betas")])
def test_prediction_types_and_beta_schedules(tmp_path, prediction_type, betas):
    unet = _unet(1)
    with torch.no_grad():  # an untrained net with some structure in its output
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    kw = {"trained_betas": (np.linspace(1e-4, 0.02, T) ** 1.1).tolist()} if betas == "trained_betas" \
        else {"beta_schedule": betas}
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, prediction_type=prediction_type, **kw)
    src = _save_src(tmp_path / "src", unet, sched, pipeline=betas != "linear")  # both layouts
    card = unet2d.import_teacher(src, tmp_path / "teacher")
    assert card.parameterization == unet2d.PREDICTION[prediction_type]
    den = models.load_denoiser(tmp_path / "teacher")
    assert torch.equal(torch.from_numpy(den.schedule.alpha[1:] ** 2).float(), sched.alphas_cumprod)
    x_T = _noise(5)
    ours = sample_ddim(den, x_T, timesteps(T, 5), clip=False)  # 5 steps: T/k = 200 (k=4 and 10: the trained teacher)
    theirs = _ddim_loop(unet, sched.config, x_T, 5)
    _assert_same_samples(ours, theirs)


def test_the_diffusers_peers_run_on_an_imported_teacher(trained):
    peers = pytest.importorskip("fewstep.peers")
    den = models.load_denoiser(trained["teacher"])
    x_T = _noise(11)
    theirs, nfe = peers.sample_peer("ddim", den, x_T, 4)  # our table handed back to diffusers, fractional-safe times
    ours = sample_ddim(den, x_T, timesteps(T, 4), clip=False).clamp(-1, 1)
    assert nfe == 4 and (theirs - ours).abs().max().item() <= 1e-4
    x, nfe = peers.sample_peer("dpmpp_2m", den, x_T, 4)
    assert nfe == 4 and torch.isfinite(x).all()


def test_import_from_an_fsspec_url(trained, tmp_path):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    url = "memory://fewstep-test-import/src"
    fs.put(str(trained["src"]), "/fewstep-test-import/src", recursive=True)
    try:
        card = unet2d.import_teacher(url, tmp_path / "teacher", name="remote")
    finally:
        fs.rm("/fewstep-test-import", recursive=True)
    assert card.lineage.source["url"] == url and card.extra["name"] == "remote"
    assert card.lineage.source["files"] == trained["card"].lineage.source["files"]
    assert card.weights_sha256 == trained["card"].weights_sha256


# --------------------------------------------------------------------------------------------
# bad sources: one clear line each, nothing written


def _write_json(path: Path, **changes) -> None:
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _bin_only(d: Path) -> None:
    (d / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    _unet(0).save_pretrained(d / "unet", safe_serialization=False)
    (d / "unet" / "diffusion_pytorch_model.safetensors").unlink(missing_ok=True)


BAD = {
    "bin_only": (_bin_only, "only pickled .bin weights"),
    "conditional_class": (lambda d: _write_json(d / "unet" / "config.json", _class_name="UNet2DConditionModel"),
                          "text-conditional UNet (UNet2DConditionModel) is not a UNet2DModel"),
    # class-conditional configs import (tests/unit/test_interop_class.py); these weights lack the embedding
    "class_embeds": (lambda d: _write_json(d / "unet" / "config.json", num_class_embeds=10),
                     "does not match its config.json"),
    "class_embed_type": (lambda d: _write_json(d / "unet" / "config.json", class_embed_type="timestep"),
                         "fewstep needs the label count as num_class_embeds"),
    "class_embed_identity": (lambda d: _write_json(d / "unet" / "config.json", class_embed_type="identity",
                                                   num_class_embeds=4),
                             "class_embed_type 'identity' is not supported (its class_labels are embedding vectors"),
    "scheduler_class": (lambda d: _write_json(d / "scheduler" / "scheduler_config.json",
                                              _class_name="ScoreSdeVeScheduler"),
                        "scheduler class 'ScoreSdeVeScheduler' is not supported; supported: DDPMScheduler"),
    "beta_schedule": (lambda d: _write_json(d / "scheduler" / "scheduler_config.json", beta_schedule="sigmoid"),
                      "beta_schedule 'sigmoid' is not supported; supported: linear, scaled_linear, squaredcos_cap_v2"),
    "prediction_type": (lambda d: _write_json(d / "scheduler" / "scheduler_config.json", prediction_type="flow"),
                        "prediction_type 'flow' is not supported; supported: epsilon, v_prediction, sample"),
    "no_unet_config": (lambda d: (d / "unet" / "config.json").unlink(), "has no config.json"),
    "no_scheduler_config": (lambda d: (d / "scheduler" / "scheduler_config.json").unlink(), "no scheduler config"),
    "not_square": (lambda d: _write_json(d / "unet" / "config.json", sample_size=[16, 8]), "not square"),
    "zero_snr": (lambda d: _write_json(d / "scheduler" / "scheduler_config.json", rescale_betas_zero_snr=True),
                 "rescale_betas_zero_snr"),
    "weights_mismatch": (lambda d: _write_json(d / "unet" / "config.json", layers_per_block=2),
                         "does not match its config.json"),
}


@pytest.fixture(scope="module")
def good_src(tmp_path_factory) -> Path:
    return _save_src(tmp_path_factory.mktemp("good") / "src", _unet(2), diffusers.DDPMScheduler(num_train_timesteps=T))


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_source_gives_one_clear_line_and_writes_nothing(good_src, tmp_path, case):
    mutate, message = BAD[case]
    src = tmp_path / "src"
    shutil.copytree(good_src, src)
    mutate(src)
    out_parent = tmp_path / "models"
    out_parent.mkdir()
    with pytest.raises(unet2d.DiffusersSourceError) as e:
        unet2d.import_teacher(src, out_parent / "teacher")
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert list(out_parent.iterdir()) == []  # no model dir, no temp dir


def test_a_missing_source_dir_is_refused(tmp_path):
    with pytest.raises(unet2d.DiffusersSourceError, match="is not a directory; expected a diffusers save_pretrained"):
        unet2d.import_teacher(tmp_path / "nope", tmp_path / "teacher")
    assert list(tmp_path.iterdir()) == []


def test_a_bad_import_keeps_an_earlier_model_dir(good_src, tmp_path):
    card = unet2d.import_teacher(good_src, tmp_path / "teacher")
    src = tmp_path / "src"
    shutil.copytree(good_src, src)
    BAD["prediction_type"][0](src)
    with pytest.raises(unet2d.DiffusersSourceError):
        unet2d.import_teacher(src, tmp_path / "teacher")
    assert models.load_card(tmp_path / "teacher") == card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "teacher"]


# --------------------------------------------------------------------------------------------
# out


def _pipeline_samples(out: Path, seed: int, steps: int, clip: bool = False) -> torch.Tensor:
    pipe = diffusers.DDIMPipeline.from_pretrained(out, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=2, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                output_type="pt", use_clipped_model_output=clip).images


def test_export_round_trip_of_the_imported_teacher(trained, tmp_path):
    out = unet2d.export_unet2d(trained["teacher"], tmp_path / "export")
    info = storage.read_json(out / unet2d.EXPORT_INFO)
    assert info["steps"] == T and info["role"] == "teacher" and info["weights_sha256"] == trained["card"].weights_sha256
    assert info["lineage"]["source"]["sha256"] == trained["card"].lineage.source["sha256"]
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDIMScheduler" and sched["timestep_spacing"] == "trailing"
    assert sched["clip_sample"] is False and sched["set_alpha_to_one"] is True and sched["steps_offset"] == 0
    assert not list(out.rglob("*.bin"))
    den = models.load_denoiser(trained["teacher"])
    for k, clip in ((4, False), (10, False)):
        ours = sample_ddim(den, _noise(7), timesteps(T, k), clip=clip)
        theirs = _pipeline_samples(out, 7, k)
        assert (theirs - (ours / 2 + 0.5).clamp(0, 1)).abs().max().item() <= 1e-4
    # fewstep's own rows clip x-hat (clip=True): the clip export reproduces those
    out_clip = unet2d.export_unet2d(trained["teacher"], tmp_path / "export_clip", clip=True)
    ours = sample_ddim(den, _noise(8), timesteps(T, 4), clip=True)
    theirs = _pipeline_samples(out_clip, 8, 4, clip=True)
    assert (theirs - (ours / 2 + 0.5).clamp(0, 1)).abs().max().item() <= 1e-4


def test_a_student_of_an_imported_teacher_saves_loads_and_exports(trained, tmp_path):
    from fewstep.train.distill import distill_loss

    teacher = models.load_denoiser(trained["teacher"])
    parent = teacher.card
    student = models.student_start(teacher)  # a copy of the diffusers network, dropout off
    assert isinstance(student, unet2d.UNet2DAdapter) and student.unet is not teacher.net.unet
    assert student.state_dict().keys() == teacher.net.state_dict().keys()
    imgs, _ = tiny_images(32, SIZE)
    data = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    loss_fn = distill_loss(teacher, data, 2, "snr", 8, hflip=False)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    student.train()
    for _ in range(3):
        opt.zero_grad()
        loss_fn(student, g).backward()
        opt.step()
    student.eval()
    card = models.ModelCard(arch=models.student_arch(student, parent), role="student",
                            parameterization=parent.parameterization, schedule=parent.schedule,
                            image_size=parent.image_size, sample_steps=2, weighting="snr",
                            lineage=models.Lineage(source=parent.lineage.source,
                                                   parent=models.Parent(str(trained["teacher"]),
                                                                        parent.weights_sha256, 4, "teacher")))
    card = models.save(tmp_path / "student", card, student.state_dict(), kind="diffusers-unet2d")
    den = models.load_denoiser(tmp_path / "student")
    assert den.card == card and den.card.family == "diffusers-unet2d"
    z, t = _noise(9), torch.tensor([500, 1000])
    with torch.no_grad():
        assert torch.equal(den(z, t), student(z, t.float() / T))
        assert not torch.equal(den(z, t), teacher(z, t))  # it trained
    out = unet2d.export_unet2d(tmp_path / "student", tmp_path / "export")
    info = storage.read_json(out / unet2d.EXPORT_INFO)
    assert info["steps"] == 2 and info["role"] == "student"
    assert info["lineage"]["parent"]["weights_sha256"] == parent.weights_sha256
    ours = sample_ddim(den, _noise(10), timesteps(T, 2), clip=False)
    theirs = _pipeline_samples(out, 10, info["steps"])
    assert (theirs - (ours / 2 + 0.5).clamp(0, 1)).abs().max().item() <= 1e-4


def test_export_refuses_another_family(tmp_path):
    from fewstep.nets.unet import UNet, UNetConfig

    net = UNet(UNetConfig(image_size=8, channels=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                          head_dim=8))
    models.save_model(tmp_path / "native", net, {"parameterization": "v", "schedule": {"kind": "cosine", "T": 64}})
    with pytest.raises(unet2d.DiffusersExportError, match="fewstep-unet model; export_unet2d exports diffusers-unet2d"):
        unet2d.export_unet2d(tmp_path / "native", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# who imports diffusers


def test_only_peers_and_interop_import_diffusers_and_only_inside_functions():
    allowed = {"fewstep/peers.py"}
    src = ROOT / "src"
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src).as_posix()
        tree = ast.parse(path.read_text(), filename=rel)
        top_level = set(map(id, tree.body))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "diffusers" or n.startswith("diffusers.") for n in names):
                assert rel in allowed or rel.startswith("fewstep/interop/"), f"{rel}:{node.lineno} imports diffusers"
                assert id(node) not in top_level, f"{rel}:{node.lineno} imports diffusers at module level"
