"""The latent text-to-image path through the stages (issue 17), in process, without dvc: an imported
``diffusers-sd`` teacher (teacher.source kind diffusers-sd, a tiny snapshot with a text encoder built
here), plain prompts in trajectories.prompts encoded once, collect_trajectories, fit_olss and export
into a StableDiffusionPipeline dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fewstep import models, storage  # noqa: E402
from tests.helpers import tiny_params, write_params  # noqa: E402
from tests.sd_snapshot import add_tiny_text_encoder, tiny_sd_snapshot  # noqa: E402


def test_stages_import_collect_fit_and_export_a_text_to_image_teacher(tmp_path, monkeypatch, torch_one_thread):
    from stages import collect_trajectories, export, fit_olss, train_teacher

    snap = add_tiny_text_encoder(tiny_sd_snapshot(tmp_path / "snap"))
    (tmp_path / "prompts.txt").write_text("a red fox\na cat\na dog\n")
    p = tiny_params()
    p["base"].update(image_size=16, threads=1, device="cpu")
    p["teacher"]["source"] = {"kind": "diffusers-sd", "path": str(snap)}
    p["teacher"]["sample"] = {"n": 2, "steps": 4, "spacing": "trailing", "seed": 0, "guidance": 1.0}
    p["trajectories"].update(models=["teacher"], reference_steps=16, n_fit=6, shard_size=6, batch_size=6,
                             guidance=1.0, prompts=str(tmp_path / "prompts.txt"))
    p["olss"].update(models=["teacher"], steps=[4], max_elements=1000, bisection_iters=5, n_holdout=2)
    params = str(write_params(tmp_path / "params.yaml", p))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEWSTEP_TRACKING", "off")

    train_teacher.main(["--params", params, "--data", "data", "--model", "models/teacher", "--checkpoints", "ckpt",
                        "--metrics", "metrics/teacher.json", "--loss-csv", "loss.csv", "--grid", "grid.png",
                        "--no-progress"])
    card = models.load_card("models/teacher")
    assert card.family == "diffusers-sd" and card.conditioning.kind == "text" and Path("grid.png").stat().st_size
    collect_trajectories.main(["--params", params, "--no-progress"])
    meta = storage.read_json("trajectories/teacher/meta.json")
    cached = list(Path("trajectories/.prompts").glob("teacher-*.safetensors"))
    assert len(cached) == 1 and meta["conditioning"]["prompt_file_sha256"] == storage.sha256_file(cached[0])
    assert meta["conditioning"]["scale"] == 1.0 and meta["prompts"]["texts"] == ["a red fox", "a cat", "a dog"]
    fit_olss.main(["--params", params, "--model", "teacher", "--steps", "4", "--no-progress"])
    sched = storage.read_json("schedulers/teacher/olss-4.json")
    assert sched["meta"]["guidance"]["prompt_file_sha256"] == meta["conditioning"]["prompt_file_sha256"]
    export.main(["--params", params, "--scheduler", "schedulers/teacher/olss-4.json", "--model", "models/teacher",
                 "--out", "export/olss-4", "--no-progress"])
    index = json.loads(Path("export/olss-4/model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["text_encoder"][1] == "CLIPTextModel"
    assert index["scheduler"] == ["fewstep.interop.olss_scheduler", "OLSSDiffusersScheduler"]
    assert storage.read_json("export/olss-4/fewstep.json")["guidance_scale"] == 2.0
