"""The ddim_study stage and the ddim_tools CLI on the session's tiny teacher (8x8, T=64)."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep import storage
from fewstep.nets.evaluator import Evaluator, EvaluatorConfig
from tests.helpers import tiny_params, write_params


def _tiny_evaluator(d):
    """A random-weight evaluator in the stage's format (its features only need to be a fixed map)."""
    torch.manual_seed(0)
    net = Evaluator(EvaluatorConfig(num_classes=2, widths=(8, 16), blocks_per_stage=1)).eval()
    d.mkdir(parents=True)
    storage.save_tensors(d / "model.safetensors", net.state_dict())
    f = torch.randn(32, net.feature_dim, dtype=torch.float64)
    storage.save_tensors(d / "ref_stats.safetensors", {"mu": f.mean(0), "sigma": torch.cov(f.T), "subset": f})
    storage.write_json(d / "config.json", {"format_version": 1, "role": "evaluator", "net": net.cfg.to_dict()})


def _png_size(path):
    with Image.open(path) as im:
        return im.size


def _grid_px(n_rows, n_cols, size, scale):
    return ((n_cols * (size + 1) + 1) * scale, (n_rows * (size + 1) + 1) * scale)


def test_ddim_study_stage_writes_its_outputs(tmp_path, tiny_teacher, monkeypatch):
    from stages import ddim_study

    p = tiny_params()
    p["ddim_study"] = {"n_images": 6, "recon_steps": [2, 8, 1024], "consistency_steps": [2, 8, 1024],
                       "n_consistency": 3, "interp_steps": 4, "interp_n": 4, "interp_pairs": 2, "seed": 0,
                       "batch_size": 4}
    _tiny_evaluator(tmp_path / "evaluator")
    monkeypatch.setenv("FEWSTEP_TRACKING", "off")
    ddim_study.main(["--params", str(write_params(tmp_path / "params.yaml", p)), "--no-progress",
                     "--model", str(tiny_teacher / "teacher"), "--evaluator", str(tmp_path / "evaluator"),
                     "--data", str(tiny_teacher / "data"), "--metrics", str(tmp_path / "m/ddim_study.json"),
                     "--plots", str(tmp_path / "plots"), "--samples", str(tmp_path / "samples")])

    m = json.loads((tmp_path / "m/ddim_study.json").read_text())
    assert m["split"] == "train" and m["n_images"] == 6 and m["T"] == 64  # the tiny data has no test split
    rec = m["reconstruction"]
    assert sorted(rec, key=int) == ["2", "8", "64"]  # 1024 capped at T
    assert [rec[k]["nfe"] for k in ("2", "8", "64")] == [4, 16, 128]
    assert rec["2"]["mse"] > rec["8"]["mse"] > rec["64"]["mse"] > 0
    assert rec["64"]["mse_01"] == pytest.approx(rec["64"]["mse"] / 4)
    con = m["consistency"]
    assert con["reference_steps"] == 64
    rows = con["rows"]
    assert rows["64"]["rmse"] == 0 and rows["64"]["feat_dist"] == 0 and rows["64"]["psnr"] is None  # valid JSON
    assert rows["2"]["rmse"] > rows["8"]["rmse"] > 0
    assert rows["2"]["feat_dist"] > 0 and rows["2"]["feat_dist_rel"] > 0

    with open(tmp_path / "plots/ddim_reconstruction.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["steps"]) for r in table] == [2, 8, 64]
    assert np.allclose([float(r["mse"]) for r in table], [rec[k]["mse"] for k in ("2", "8", "64")], rtol=1e-5)
    with open(tmp_path / "plots/ddim_consistency_features.csv") as f:
        assert [int(r["steps"]) for r in csv.DictReader(f)] == [2, 8]  # the reference row is left out
    scale = 64 // 8
    assert _png_size(tmp_path / "samples/ddim_consistency.png") == _grid_px(3, 3, 8, scale)
    assert _png_size(tmp_path / "samples/ddim_reconstruction.png") == _grid_px(4, 6, 8, scale)
    assert _png_size(tmp_path / "samples/ddim_interpolation.png") == _grid_px(4, 4, 8, scale)


def test_ddim_tools_cli_interpolate_encode_decode(tmp_path, tiny_teacher, capsys):
    from stages.ddim_tools import main

    model = str(tiny_teacher / "teacher")
    out = tmp_path / "interp.png"
    main(["interpolate", "--model", model, "--seeds", "1", "2", "3", "4", "--steps", "4", "--n", "5",
          "--out", str(out), "--no-progress"])
    assert _png_size(out) == _grid_px(2, 5, 8, 8)

    imgs = storage.load_array(tiny_teacher / "data/train_images.npy")[:2]
    files = []
    for i, im in enumerate(imgs):
        files.append(tmp_path / f"im{i}.png")
        Image.fromarray(im).save(files[-1])
    lat = tmp_path / "lat.safetensors"
    main(["encode", "--model", model, "--images", *map(str, files), "--steps", "64", "--out", str(lat), "--no-progress"])
    z = storage.load_tensors(lat)["latents"]
    assert z.shape == (2, 3, 8, 8) and torch.isfinite(z).all()
    main(["decode", "--model", model, "--latents", str(lat), "--steps", "64", "--scale", "1",
          "--out", str(tmp_path / "dec.png"), "--no-progress"])
    with Image.open(tmp_path / "dec.png") as im:
        dec = np.asarray(im.convert("RGB")).astype(float)
    # the 1x grid holds the two reconstructions at (1, 1) and (1, 10): close to the originals
    got = np.stack([dec[1:9, 1:9], dec[1:9, 10:18]])
    assert np.sqrt(np.mean((got - imgs.astype(float)) ** 2)) < 8.0  # uint8 levels

    main(["interpolate", "--model", model, "--data", str(tiny_teacher / "data"), "--split", "train",
          "--index", "0", "1", "--steps", "4", "--n", "3", "--out", str(tmp_path / "i2.png")])
    assert _png_size(tmp_path / "i2.png") == _grid_px(1, 3, 8, 8)
    with pytest.raises(SystemExit) as e:
        main(["interpolate", "--model", model, "--seeds", "1", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("ddim_tools: error: ") and "pairs" in err[0]


@pytest.mark.parametrize("models, ok", [([], True), (["teacher"], True), (["student-4"], True),
                                        (["../outside"], False), (["teacher", "student-4"], False), ([""], False)])
def test_ddim_study_models_are_one_model_directory_name(models, ok):
    from fewstep.config import ParamsError, validate

    p = tiny_params()
    p["ddim_study"] = {"models": models}
    if ok:
        assert validate(p).ddim_study.models == models
    else:
        with pytest.raises(ParamsError, match="ddim_study.models"):
            validate(p)
