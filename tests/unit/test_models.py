"""The model card (fewstep.models.ModelCard): round trips, old-format configs, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep import models, storage
from fewstep.math.split import SplitDenoiser
from fewstep.nets.unet import UNet, UNetConfig

NET = UNetConfig(image_size=8, channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), head_dim=8,
                 dropout=0.0)
SCHEDULE = models.ScheduleSpec("cosine", 64, -20.0, 20.0)


def _net(patch_size: int = 1, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(UNetConfig(**{**NET.to_dict(), "patch_size": patch_size}))
    with torch.no_grad():  # a non-trivial output
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def _card(net: UNet, **kw) -> models.ModelCard:
    lineage = models.Lineage(dataset="toy", class_names=("a", "b"), data_hash="d" * 64, params_hash="p" * 64,
                             run_hash="r" * 64, train_steps=10)
    return models.ModelCard(arch=models.UNetArch(net.cfg), role="teacher", parameterization="v", schedule=SCHEDULE,
                            image_size=8, sample_steps=64, weighting="snr+1", lineage=lineage, **kw)


def _outputs(den) -> torch.Tensor:
    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return den(z, torch.tensor([1, 20, 40, 64]))


def test_save_then_load_gives_identical_outputs_and_an_identical_card(tmp_path):
    net = _net()
    card = _card(net, variant="p1", study="patch")
    saved = models.save(tmp_path / "m", card, net.state_dict())
    assert saved.weights_sha256 == storage.sha256_file(tmp_path / "m" / models.WEIGHTS)
    assert saved == card.with_weights(saved.weights_sha256)
    den = models.load_denoiser(tmp_path / "m")
    assert den.card == saved and models.load_card(tmp_path / "m") == saved
    assert not hasattr(den, "config") and not hasattr(saved, "get")  # no string-key view of the card
    assert torch.equal(_outputs(den), _outputs(models.UNetArch(net.cfg).build(card, net.state_dict(), "cpu")))
    assert models.ModelCard.from_json(saved.to_json()) == saved
    assert saved.family == "fewstep-unet" and saved.image_shape == (3, 8, 8)
    assert saved.conditioning.kind == "none" and saved.patch_sizes == [1]


def test_the_on_disk_keys_are_the_format_1_keys_plus_the_new_ones(tmp_path):
    net = _net()
    models.save(tmp_path / "m", _card(net), net.state_dict())
    d = storage.read_json(tmp_path / "m" / models.CONFIG)
    format_1 = {"format_version", "net", "role", "parameterization", "weighting", "schedule", "image_size", "dataset",
                "class_names", "data_hash", "params_hash", "run_hash", "train_steps", "sample_steps", "parent",
                "weights_sha256"}
    assert set(d) == format_1 | {"family", "channels", "conditioning"}
    assert d["format_version"] == models.FORMAT_VERSION and d["conditioning"] == {"num_classes": None}
    assert d["schedule"] == {"kind": "cosine", "T": 64, "logsnr_min": -20.0, "logsnr_max": 20.0}


def test_a_format_1_config_still_loads_with_the_same_outputs(tmp_path):
    net = _net()
    old = {"format_version": 1, "net": net.cfg.to_dict(), "role": "teacher", "parameterization": "v",
           "weighting": "snr+1", "schedule": {"kind": "cosine", "T": 64, "logsnr_min": -20.0, "logsnr_max": 20.0},
           "image_size": 8, "dataset": "toy", "class_names": ["a", "b"], "data_hash": "d", "params_hash": "p",
           "run_hash": "r", "train_steps": 10, "sample_steps": 64, "parent": None, "variant": "p1", "study": "patch",
           "something_new": {"kept": True}}
    (tmp_path / "m").mkdir()
    storage.save_tensors(tmp_path / "m" / models.WEIGHTS, net.state_dict())
    old["weights_sha256"] = storage.sha256_file(tmp_path / "m" / models.WEIGHTS)
    (tmp_path / "m" / models.CONFIG).write_text(json.dumps(old))
    den = models.load_denoiser(tmp_path / "m")
    assert den.card.family == "fewstep-unet" and den.card.variant == "p1" and den.card.image_shape == (3, 8, 8)
    assert den.card.extra == {"something_new": {"kept": True}}
    upgraded = den.card.to_dict()
    assert {k: v for k, v in upgraded.items() if k in old and k != "format_version"} == \
        {k: v for k, v in old.items() if k != "format_version"}  # every old key, unchanged
    ref = models.UNetArch(net.cfg).build(den.card, net.state_dict(), "cpu")
    assert torch.equal(_outputs(den), _outputs(ref))


def test_a_split_model_round_trips_through_its_family(tmp_path):
    high, low = _net(2, seed=1), _net(1, seed=2)
    info = models.SplitInfo(boundary_logsnr=-1.386, boundary_snr=0.25, t_boundary=40,
                            sides={"high": {"patch_size": 2}, "low": {"patch_size": 1, "init": {"tensors_copied": 5}}})
    arch = models.SplitUNetArch({"high": high.cfg, "low": low.cfg}, info)
    card = models.ModelCard(arch=arch, role="teacher", parameterization="v", schedule=SCHEDULE, image_size=8,
                            sample_steps=64, variant="split")
    sha = models.save_split(tmp_path / "s", {"high": high, "low": low}, card)
    den = models.load_denoiser(tmp_path / "s")
    assert isinstance(den, SplitDenoiser) and den.card == card.with_weights(sha)
    assert den.card.family == "fewstep-unet-split" and den.card.patch_sizes == [2, 1]
    assert den.card.arch.split.sides["low"]["init"]["tensors_copied"] == 5 and den.card.arch.split.t_boundary == 40
    assert den.card.to_dict()["split"]["low"]["init"]["tensors_copied"] == 5  # on disk as the trainer wrote it
    assert models.is_split(den.card) and not models.is_split(_card(_net()))


def test_a_family_is_registered_by_name_and_bad_cards_fail_clearly(tmp_path):
    net = _net()
    d = _card(net).to_dict()
    with pytest.raises(models.ModelCardError, match="unknown architecture family 'no-such-net'"):
        models.ModelCard.from_dict({**d, "family": "no-such-net"})
    with pytest.raises(models.ModelCardError, match="format_version 7"):
        models.ModelCard.from_dict({**d, "format_version": 7})
    with pytest.raises(models.ModelCardError, match="lacks 'role'"):
        models.ModelCard.from_dict({k: v for k, v in d.items() if k != "role"})
    with pytest.raises(models.ModelCardError, match="parameterization 'z'"):
        models.ModelCard.from_dict({**d, "parameterization": "z"})
    with pytest.raises(models.ModelCardError, match="4 channels"):
        models.ModelCard.from_dict({**d, "channels": 4})
    evaluator = {"format_version": 1, "role": "evaluator", "net": {"widths": [8]}, "weights_sha256": "e"}
    (tmp_path / "ev").mkdir()
    storage.write_json(tmp_path / "ev" / models.CONFIG, evaluator)
    assert models.config_role(tmp_path / "ev") == "evaluator" and not models.has_card(tmp_path / "ev")
    assert models.has_card(tmp_path / "x") is False and models.config_role(tmp_path / "x") is None  # no config
    with pytest.raises(models.ModelCardError, match="unknown model role 'evaluator'"):
        models.load_card(tmp_path / "ev")
    with pytest.raises(ValueError, match="not the network being saved"):
        models.save_model(tmp_path / "x", _net(2), _card(net))
    assert not (tmp_path / "x").exists()
