"""Latent text-to-image OLSS end to end (issue 17): a tiny diffusers snapshot built here (random
weights, 8x8 latents), random prompt embeddings; latent trajectories guided at w, OLSS fitted on
them, exported into a StableDiffusionPipeline dir; diffusers' pipeline called with prompt_embeds,
negative_prompt_embeds, guidance_scale = 1 + w, the fitted step count and the same x_T reproduces
fewstep's OLSS latents and decoded images; OLSS beats DDIM at equal steps on held-out seeds."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fewstep import models, storage  # noqa: E402
from fewstep.config import OLSSParams  # noqa: E402
from fewstep.interop import sd  # noqa: E402
from fewstep.interop.export import export_olss  # noqa: E402
from fewstep.math.ddim import PerImageNoise, sample_ddim  # noqa: E402
from fewstep.math.guidance import GuidanceError  # noqa: E402
from fewstep.math.olss import OLSSScheduler, sample_olss  # noqa: E402
from fewstep.math.schedules import timesteps  # noqa: E402
from fewstep.olss_fit import HOLDOUT_SEED, fit_olss, write_schedulers  # noqa: E402
from fewstep.prompts import PromptFileError, TextGuidance, save_prompt_file  # noqa: E402
from fewstep.trajectories import collect_model  # noqa: E402
from tests.sd_snapshot import random_prompts, tiny_sd_snapshot  # noqa: E402

W, STEPS, FIRST = 2.0, 4, 1000


@pytest.fixture(autouse=True)
def _one_thread(torch_one_thread):
    yield


def test_latent_olss_exports_into_stable_diffusion_and_beats_ddim(tmp_path):
    teacher = tmp_path / "teacher"
    sd.import_sd(tiny_sd_snapshot(tmp_path / "snap"), teacher)
    den = models.load_denoiser(teacher)
    c, u = random_prompts(3)
    ps = save_prompt_file(tmp_path / "prompts.safetensors", c, u, ["a", "b", "c"])
    tp = SimpleNamespace(guidance=W, seed_offset=FIRST, reference_steps=32, n_fit=12, shard_size=6, batch_size=6)
    assert collect_model(den, "teacher", tp, tmp_path / "traj", "cpu", progress=False, prompts=ps) == 32
    meta = storage.read_json(tmp_path / "traj/meta.json")
    assert meta["shape"] == [4, 8, 8] and meta["conditioning"]["scale"] == W
    assert meta["conditioning"]["prompt_file_sha256"] == ps.sha256 and meta["prompts"]["texts"] == ["a", "b", "c"]

    op = OLSSParams(max_elements=100_000, n_holdout=6)
    fit = fit_olss(den, "teacher", tmp_path / "traj", STEPS, op, 0, "cpu", prompts=ps)
    res = fit.metrics["rmse_vs_full_step"]
    for v in ("olss_paper", "olss_p", "olss_open", "olss_closed", "olss_ridge"):
        assert v in res  # every variant is fitted on latent trajectories
    assert res["olss"] < 0.5 * res["ddim"], res
    write_schedulers(fit.schedulers, tmp_path / "olss")
    sched = OLSSScheduler.from_json((tmp_path / "olss" / f"olss-{STEPS}.json").read_text())
    assert sched.meta["guidance"]["scale"] == W and sched.meta["guidance"]["prompt_file_sha256"] == ps.sha256

    # held-out latent trajectories, checked here independently of the fit's own metric (raw latents)
    g = TextGuidance(ps, W, FIRST)
    seeds = list(range(HOLDOUT_SEED + 100, HOLDOUT_SEED + 106))
    gd = g.wrap(den, seeds)
    x_T = PerImageNoise(seeds, "cpu").randn(*den.card.image_shape)
    ref = sample_ddim(gd, x_T, timesteps(1000, 32), clip=False)
    ours = sample_olss(gd, x_T, sched, clip=False)
    ddim = sample_ddim(gd, x_T, timesteps(1000, STEPS), clip=False)
    rmse = lambda a: (a - ref).pow(2).mean().sqrt().item()  # noqa: E731
    assert rmse(ours) < 0.5 * rmse(ddim)
    print(f"latent RMSE to the 32-step guided DDIM: fit's held-out {res}; here DDIM-{STEPS} {rmse(ddim):.4f}, "
          f"olss-{STEPS} {rmse(ours):.4f}")

    out = export_olss(tmp_path / "olss" / f"olss-{STEPS}.json", teacher, tmp_path / "export")
    info = json.loads((out / "fewstep.json").read_text())
    assert info["pipeline"] == "StableDiffusionPipeline" and info["guidance_scale"] == 1 + W
    import fewstep.interop.olss_scheduler  # noqa: F401  (diffusers loads the scheduler from its module)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, use_safetensors=True, text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    pc, pu = ps.select(g.labels(seeds))
    kw = dict(prompt_embeds=pc, negative_prompt_embeds=pu, guidance_scale=1 + W, num_inference_steps=STEPS)
    lat = pipe(**kw, latents=x_T.clone(), output_type="latent").images
    assert (lat - ours).abs().max().item() <= 1e-4 * max(1.0, ours.abs().max().item())
    img = pipe(**kw, latents=x_T.clone(), output_type="pt").images
    mine = sd.decode(sd.load_vae(teacher), ours, den.card.arch.scaling_factor)
    assert img.shape == (6, 3, 16, 16) and (img - mine).abs().max().item() <= 1e-4

    # the plain export: its DDIMScheduler (trailing) is fewstep's unclipped DDIM at the same steps
    plain = StableDiffusionPipeline.from_pretrained(sd.export_sd(teacher, tmp_path / "ddim"), use_safetensors=True,
                                                    text_encoder=None, tokenizer=None)
    plain.set_progress_bar_config(disable=True)
    lat = plain(**kw, latents=x_T.clone(), output_type="latent").images
    assert (lat - ddim).abs().max().item() <= 1e-4 * max(1.0, ddim.abs().max().item())

    # the scheduler fits one scale and one prompt file
    with pytest.raises(GuidanceError, match="w=2"):
        sample_olss(TextGuidance(ps, 0.5, FIRST).wrap(den, seeds), x_T, sched, clip=False)
    other = save_prompt_file(tmp_path / "other.safetensors", *random_prompts(3, seed=7))
    with pytest.raises(PromptFileError, match="not the prompt file"):
        fit_olss(den, "teacher", tmp_path / "traj", STEPS, op, 0, "cpu", prompts=other)


def test_plain_prompts_are_encoded_once_as_the_pipeline_does_and_text_parts_export(tmp_path):
    from tests.sd_snapshot import add_tiny_text_encoder

    snap = add_tiny_text_encoder(tiny_sd_snapshot(tmp_path / "snap"))
    card = sd.import_sd(snap, tmp_path / "teacher")
    assert card.conditioning.seq_len == 8 and sd.has_text_encoder(tmp_path / "teacher")
    assert "text_encoder/model.safetensors" in card.lineage.source["files"]
    texts = ["a red fox", "a cat"]
    ps = sd.encode_prompts(tmp_path / "teacher", texts, tmp_path / "p.safetensors")
    assert ps.embeds.shape == (2, 8, 16) and ps.negative.shape == (1, 8, 16) and ps.texts == tuple(texts)
    TextGuidance.for_model(models.load_denoiser(tmp_path / "teacher"), ps, 1.0, 0)  # fits the model's card

    out = sd.export_sd(tmp_path / "teacher", tmp_path / "export")
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"] and (out / "tokenizer").is_dir()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, use_safetensors=True)
    pc, pu = pipe.encode_prompt(texts, "cpu", 1, True, negative_prompt=[""] * 2)
    torch.testing.assert_close(ps.embeds, pc, rtol=0, atol=1e-6)
    torch.testing.assert_close(ps.negative.expand(2, -1, -1), pu, rtol=0, atol=1e-6)
    with pytest.raises(PromptFileError, match="no text encoder"):
        sd.import_sd(tiny_sd_snapshot(tmp_path / "bare"), tmp_path / "bare-teacher")
        sd.encode_prompts(tmp_path / "bare-teacher", texts, tmp_path / "q.safetensors")
