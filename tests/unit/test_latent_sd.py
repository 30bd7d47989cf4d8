"""The diffusers-sd family (issue 17, latent text-to-image): import of a tiny snapshot built here,
the text conditioning in the card, prompt files and the text-guided denoiser, and one clear error
per bad input. The collect / fit / export round trip is tests/integration/test_latent_sd_olss.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fewstep import models, storage  # noqa: E402
from fewstep.interop import sd  # noqa: E402
from fewstep.interop.unet2d import DiffusersSourceError  # noqa: E402
from fewstep.math.guidance import GuidanceError, guidance_scale_of  # noqa: E402
from fewstep.prompts import (PromptFileError, TextGuidance, TextGuidedDenoiser, load_prompt_file,  # noqa: E402
                             save_prompt_file)
from tests.sd_snapshot import CHANNELS, EMBED_DIM, LATENT, random_prompts, tiny_sd_snapshot  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(torch_one_thread):
    yield


@pytest.fixture(scope="module")
def snap(tmp_path_factory) -> Path:
    return tiny_sd_snapshot(tmp_path_factory.mktemp("sd") / "snap")


@pytest.fixture(scope="module")
def teacher(snap, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    sd.import_sd(snap, out)
    return out


def test_import_makes_a_latent_text_card_with_diffusers_alphas(snap, teacher):
    card = models.load_card(teacher)
    assert card.family == "diffusers-sd" and card.conditioning.kind == "text"
    assert card.conditioning.embed_dim == EMBED_DIM and card.conditioning.num_classes is None
    assert card.image_shape == (CHANNELS, LATENT, LATENT) and card.arch.pixel_size == 2 * LATENT
    assert card.arch.scaling_factor == pytest.approx(0.18215) and card.parameterization == "eps"
    src = card.lineage.source
    assert src["kind"] == "diffusers-sd" and src["sha256"] == storage.sha256_json(src["files"])
    assert src["files"]["unet/diffusion_pytorch_model.safetensors"] == storage.sha256_file(
        snap / "unet/diffusion_pytorch_model.safetensors")
    ref = diffusers.DDIMScheduler.from_pretrained(snap / "scheduler").alphas_cumprod
    abar = torch.from_numpy(card.schedule.build().alpha[1:] ** 2).float()
    assert torch.equal(abar, ref)  # fewstep index k = diffusers timestep k - 1, bit for bit
    assert models.ModelCard.from_json(card.to_json()) == card


def test_the_adapter_is_the_unet_at_diffusers_timesteps(snap, teacher):
    den = models.load_denoiser(teacher)
    unet = diffusers.UNet2DConditionModel.from_pretrained(snap / "unet", use_safetensors=True).eval()
    z, y = torch.randn(2, CHANNELS, LATENT, LATENT), torch.randn(2, 5, EMBED_DIM)
    with torch.no_grad():
        for k in (1, 500, 1000):
            ours = den(z, torch.full((2,), k), y)
            ref = unet(z, torch.tensor(k - 1), encoder_hidden_states=y).sample
            assert torch.equal(ours, ref)
    with pytest.raises(GuidanceError, match="prompt embeddings"):
        den(z, torch.full((2,), 10))  # a text model without embeddings: one clear error


def test_v_prediction_imports_as_v(snap, tmp_path):
    d = _broken(snap, tmp_path, "v")
    _edit(d / "scheduler/scheduler_config.json", prediction_type="v_prediction")
    assert sd.import_sd(d, tmp_path / "t").parameterization == "v"


def test_text_guided_denoiser_is_cfg_in_one_batched_forward(teacher):
    den = models.load_denoiser(teacher)
    c, u = random_prompts(3, n_negative=3)
    z, t = torch.randn(3, CHANNELS, LATENT, LATENT), torch.full((3,), 700)
    w = 2.5
    g = TextGuidedDenoiser(den, c, u, w)
    with torch.no_grad():
        got = g(z, t)
        cond, unc = den(z, t, c), den(z, t, u)
    torch.testing.assert_close(got, (1 + w) * cond - w * unc, rtol=1e-5, atol=1e-5)
    assert g.evals_per_call == 2 and g.network_evals == 6 and guidance_scale_of(g) == w
    g0 = TextGuidedDenoiser(den, c, u, 0.0)
    with torch.no_grad():
        assert torch.equal(g0(z, t), cond)
    assert g0.evals_per_call == 1 and g0.network_evals == 3


def test_prompt_of_seed_is_cyclic_and_recorded(tmp_path, teacher):
    c, u = random_prompts(3)
    ps = save_prompt_file(tmp_path / "p.safetensors", c, u, ["a cat", "a dog", "a fox"])
    assert ps.texts == ("a cat", "a dog", "a fox") and ps.sha256 == storage.sha256_file(tmp_path / "p.safetensors")
    g = TextGuidance(ps, 1.0, first_seed=10)
    assert g.labels([10, 11, 12, 13, 14]) == [0, 1, 2, 0, 1]
    e, n = ps.select([2, 0])
    assert torch.equal(e, c[[2, 0]]) and torch.equal(n, u.expand(2, -1, -1))
    d = g.to_dict()
    assert d["kind"] == "text" and d["scale"] == 1.0 and d["prompt_file_sha256"] == ps.sha256
    assert TextGuidance.from_dict(d, ps) == g


def _write(path: Path, **tensors) -> Path:
    storage.save_tensors(path, tensors)
    return path


def test_bad_prompt_files_and_scales_give_one_clear_error_each(tmp_path, teacher):
    den = models.load_denoiser(teacher)
    c, u = random_prompts(2)
    wide = load_prompt_file(_write(tmp_path / "wide.safetensors", prompt_embeds=torch.randn(2, 5, 32),
                                   negative_prompt_embeds=torch.randn(1, 5, 32)))
    with pytest.raises(PromptFileError, match=r"D=32.*D=16"):
        TextGuidance.for_model(den, wide, 1.0, 0)
    with pytest.raises(PromptFileError, match="must be \\[2 or 1, 5, 16\\]"):
        load_prompt_file(_write(tmp_path / "shape.safetensors", prompt_embeds=c,
                                negative_prompt_embeds=torch.randn(1, 4, EMBED_DIM)))
    with pytest.raises(PromptFileError, match="lacks negative_prompt_embeds"):
        load_prompt_file(_write(tmp_path / "half.safetensors", prompt_embeds=c))
    with pytest.raises(PromptFileError, match=r"\[N, L, D\]"):
        load_prompt_file(_write(tmp_path / "flat.safetensors", prompt_embeds=c[0], negative_prompt_embeds=u[0]))
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompt_file(tmp_path / "nope.safetensors")
    ok = save_prompt_file(tmp_path / "ok.safetensors", c, u)
    (tmp_path / "ok.txt").write_text("only one line\n")
    with pytest.raises(PromptFileError, match="1 prompt texts for 2"):
        load_prompt_file(tmp_path / "ok.safetensors")
    with pytest.raises(GuidanceError, match=">= 0"):
        TextGuidance.for_model(den, ok, -0.5, 0)
    with pytest.raises(GuidanceError, match=">= 0"):
        TextGuidedDenoiser(den, c, u.expand(2, -1, -1), -1.0)
    with pytest.raises(PromptFileError, match="needs a prompt file"):
        TextGuidance.for_model(den, None, 1.0, 0)


def test_conditioning_text_round_trips_and_old_cards_keep_their_bytes():
    text = models.Conditioning(None, 768, 77)
    assert text.kind == "text" and models.Conditioning.from_dict(text.to_dict()) == text
    assert models.Conditioning().to_dict() == {"num_classes": None}
    assert models.Conditioning(10).to_dict() == {"kind": "class", "num_classes": 10}
    with pytest.raises(models.ModelCardError):
        models.Conditioning(10, 768)
    with pytest.raises(models.ModelCardError, match="embed_dim"):
        models.Conditioning.from_dict({"kind": "text"})


def _broken(snap: Path, tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    shutil.copytree(snap, d)
    return d


def _edit(path: Path, **keys) -> None:
    cfg = json.loads(path.read_text())
    cfg.update(keys)
    path.write_text(json.dumps(cfg))


def test_bad_snapshots_give_one_line_errors(snap, tmp_path):
    d = _broken(snap, tmp_path, "novae")
    shutil.rmtree(d / "vae")
    with pytest.raises(DiffusersSourceError, match="no vae/config.json"):
        sd.import_sd(d, tmp_path / "o1")
    d = _broken(snap, tmp_path, "pickle")
    w = d / "unet/diffusion_pytorch_model.safetensors"
    w.rename(w.with_suffix(".bin"))
    with pytest.raises(DiffusersSourceError, match="never unpickles"):
        sd.import_sd(d, tmp_path / "o2")
    d = _broken(snap, tmp_path, "sdxl")
    _edit(d / "unet/config.json", addition_embed_type="text_time")
    with pytest.raises(DiffusersSourceError, match="addition_embed_type"):
        sd.import_sd(d, tmp_path / "o3")
    d = _broken(snap, tmp_path, "sched")
    _edit(d / "scheduler/scheduler_config.json", beta_schedule="exotic")
    with pytest.raises(DiffusersSourceError, match="beta_schedule 'exotic'"):
        sd.import_sd(d, tmp_path / "o4")
    d = _broken(snap, tmp_path, "lat")
    _edit(d / "vae/config.json", latent_channels=8)
    with pytest.raises(DiffusersSourceError, match="latent_channels 8"):
        sd.import_sd(d, tmp_path / "o5")
    for k in range(1, 6):
        assert not (tmp_path / f"o{k}").exists()


SD15_UNET = {"_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
             "cross_attention_dim": 768, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
             "attention_head_dim": 8, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}


def test_the_sd_latent_profile_loads_and_its_stated_size_holds(tmp_path):
    """profiles/sd-latent.yaml: a diffusers-sd source and prompts; its comment's sizing (803 GFLOPs a
    UNet call, ~23 PFLOP for trajectories + both fits) recomputed from the profile's own numbers."""
    from fewstep.config import load_params
    from tests.helpers import ROOT

    p = load_params(ROOT / "params.yaml", "sd-latent")
    assert p.teacher.source.kind == "diffusers-sd" and (ROOT / p.trajectories.prompts).is_file()
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet/config.json").write_text(json.dumps(SD15_UNET))
    g = sd.sd_gflops(tmp_path)  # the UNet built on the meta device: no weights, no memory
    assert 780 < g < 830
    tp, op = p.trajectories, p.olss
    calls = tp.n_fit * tp.reference_steps * 2  # guided: 2 UNet images a step
    for n in op.steps:
        calls += op.n_holdout * (tp.reference_steps + n + 5 * n) * 2 + tp.n_fit * n * 2
    assert 21 < calls * g / 1e6 < 25  # PFLOP, as the profile states (~23)
