"""The PDM release's setup as a selectable split-model configuration (issue 18.5): the 2-D position
embedding after the first convolution (UNetConfig.pos_emb), the ``setup: paper`` label checked by
params validation, and a paper split model trained, saved and loaded."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fewstep import models, storage
from fewstep.config import NetParams, ParamsError, SplitModelParams, load_params, validate
from fewstep.math.schedules import make_schedule
from fewstep.nets.unet import UNet, UNetConfig, position_embedding_2d
from fewstep.train.teacher import diffusion_loss
from tests.helpers import ROOT, tiny_params, write_prepared

SCH = make_schedule("cosine", 64)
PAPER_SIDE = {"parameterization": "x", "weighting": "sqrt_snr", "steps": 2, "warmup": 1, "checkpoint_every": 2,
              "net": {"patch_size": 4, "pos_emb": True}}


def _cfg(pos_emb: bool, P: int = 2) -> UNetConfig:
    return UNetConfig(image_size=8, patch_size=P, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                      attn_resolutions=(), head_dim=8, dropout=0.0, pos_emb=pos_emb)


def _net(pos_emb: bool, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(_cfg(pos_emb))
    for prm in net.parameters():  # zero-init output layers would make every net predict 0
        torch.nn.init.normal_(prm, std=0.1)
    return net.eval()


def _outputs(net_or_den, continuous: bool = True) -> torch.Tensor:
    z = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if continuous:
            return net_or_den(z, torch.tensor([0.1, 0.5, 0.9]))
        return net_or_den(z, torch.tensor([6, 32, 58]))


def test_the_position_embedding_is_the_releases_formula():
    C, G = 8, 4
    pe = position_embedding_2d(C, G)
    assert pe.shape == (1, C, G, G) and pe.dtype == torch.float32
    half, omega = C // 2, 64 / G
    for k in range(half):
        f = 10000 ** (-k / (half - 1))
        for i in range(G):
            for j in range(G):
                assert pe[0, k, i, j].item() == pytest.approx(math.sin(omega * f * j), abs=1e-6)  # columns
                assert pe[0, half + k, i, j].item() == pytest.approx(math.sin(omega * f * i), abs=1e-6)  # rows
    assert pe[0, :, 0, 0].abs().max() == 0  # sine only: position (0, 0) is zero


def test_a_pos_emb_net_has_the_same_weights_and_uses_the_embedding():
    a, b = _net(True), _net(False)
    assert a.state_dict().keys() == b.state_dict().keys()  # fixed, not a weight: the same safetensors keys
    b.load_state_dict(a.state_dict())
    assert not torch.allclose(_outputs(a), _outputs(b))
    with pytest.raises(ValueError, match="even channel"):
        UNetConfig(image_size=8, channels=9, pos_emb=True)


def test_a_pos_emb_net_trains_one_step_on_the_papers_objective():
    net = _net(True).train()
    data = torch.randint(0, 255, (8, 3, 8, 8), dtype=torch.uint8)
    loss_fn = diffusion_loss(data, SCH, "x", "sqrt_snr", 8, False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss = loss_fn(net, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters())
    opt.step()
    assert net.conv_in.weight.grad.abs().sum() > 0
    assert any(not torch.equal(v, before[k]) for k, v in net.state_dict().items())


def _card(net: UNet) -> models.ModelCard:
    lineage = models.Lineage(dataset="toy", class_names=("a", "b"), data_hash="d" * 64, params_hash="p" * 64,
                             run_hash="r" * 64, train_steps=1)
    return models.ModelCard(arch=models.UNetArch(net.cfg), role="teacher", parameterization="x",
                            schedule=models.ScheduleSpec("cosine", 64, -20.0, 20.0), image_size=8, sample_steps=64,
                            weighting="sqrt_snr", lineage=lineage)


def test_save_then_load_gives_identical_outputs_and_an_old_card_loads_without_the_key(tmp_path):
    net = _net(True)
    models.save(tmp_path / "pe", _card(net), net.state_dict())
    assert storage.read_json(tmp_path / "pe" / models.CONFIG)["net"]["pos_emb"] is True
    den = models.load_denoiser(tmp_path / "pe")
    assert den.net.cfg.pos_emb and torch.equal(_outputs(den, False), _outputs(models.UNetArch(net.cfg).build(
        _card(net), net.state_dict(), "cpu"), False))
    # a net without the embedding writes no key: its card is what it was before the option existed
    old = _net(False)
    models.save(tmp_path / "old", _card(old), old.state_dict())
    d = storage.read_json(tmp_path / "old" / models.CONFIG)
    assert "pos_emb" not in d["net"]
    # a card written before the option existed (no key) loads as a net without it, same outputs
    assert not models.load_card(tmp_path / "old").arch.net.pos_emb
    torch.testing.assert_close(_outputs(models.load_denoiser(tmp_path / "old").net), _outputs(old), rtol=0, atol=0)
    # the same weights under a card that says pos_emb give other outputs: the key is what decides
    d["net"]["pos_emb"] = True
    (tmp_path / "old" / models.CONFIG).write_text(json.dumps(d))
    assert not torch.allclose(_outputs(models.load_denoiser(tmp_path / "old").net), _outputs(old))


def test_new_keys_at_their_default_leave_every_params_dump_unchanged():
    # run, params and card hashes are sha256 of these dumps: the default configs must dump as before
    assert "pos_emb" not in NetParams().model_dump() and NetParams(pos_emb=True).model_dump()["pos_emb"] is True
    assert "setup" not in SplitModelParams().model_dump()
    assert SplitModelParams(setup="paper").model_dump()["setup"] == "paper"
    p = load_params(ROOT / "params.yaml")
    assert "pos_emb" not in p.teacher.model_dump()["net"]
    assert all(sp.setup == "project" for sp in p.split.models.values())


def _paper_params(**over) -> dict:
    raw = tiny_params(t_sampling=None)  # the PDM release samples t uniformly
    raw["split"]["models"] = {"teacher-split-paper": {"setup": "paper", "boundary_snr": 0.25,
                                                      "high": dict(PAPER_SIDE), "low": dict(PAPER_SIDE), **over}}
    return raw


def test_the_paper_setup_validates_and_a_mislabelled_one_is_refused():
    p = validate(_paper_params())
    sp = p.split.models["teacher-split-paper"]
    assert sp.paper_mismatches(p.teacher) == []
    for side in ("high", "low"):
        tp = sp.side(p.teacher, side)
        assert (tp.parameterization, tp.weighting, tp.net.patch_size, tp.net.pos_emb) == ("x", "sqrt_snr", 4, True)
    bad = _paper_params(low={**PAPER_SIDE, "net": {"patch_size": 2, "pos_emb": True}})
    with pytest.raises(ParamsError, match=r"setup 'paper'.*low\.patch_size 2 \(paper: 4\)"):
        validate(bad)
    with pytest.raises(ParamsError, match=r"boundary_snr 0\.5"):
        validate(_paper_params(boundary_snr=0.5))
    edm = _paper_params()
    edm["teacher"]["t_sampling"] = {"kind": "logsnr_normal", "mean": 2.4, "std": 2.4}
    with pytest.raises(ParamsError, match=r"high\.t_sampling 'logsnr_normal' \(paper: 'uniform'\)"):
        validate(edm)
    bad["split"]["models"]["teacher-split-paper"]["setup"] = "project"  # the same model labelled honestly
    validate(bad)


@pytest.mark.parametrize("profile", ["gpu", "gpu-full"])
def test_the_gpu_profiles_run_the_projects_and_the_papers_split(profile):
    p = load_params(ROOT / "params.yaml", profile)
    assert {"teacher-split", "teacher-split-paper"} <= set(p.split.models)
    paper = p.split.models["teacher-split-paper"]
    assert paper.setup == "paper" and paper.paper_mismatches(p.teacher) == []
    assert p.split.models["teacher-split"].setup == "project"


def test_a_paper_split_model_trains_and_loads_with_p4_on_both_sides(tmp_path):
    from fewstep.math.split import SplitDenoiser
    from fewstep.train.split import train_split

    write_prepared(tmp_path / "data", n=16)
    p = validate(_paper_params())
    _, card = train_split(p, "teacher-split-paper", tmp_path / "data", tmp_path / "m", tmp_path / "ck",
                          torch.device("cpu"), progress=False)
    assert card.arch.split.sides["setup"] == "paper" and card.parameterization == "x"
    assert card.weighting == "sqrt_snr" and card.patch_sizes == [4, 4]
    assert all(card.arch.nets[s].pos_emb for s in ("high", "low"))
    den = models.load_denoiser(tmp_path / "m")
    assert isinstance(den, SplitDenoiser) and den.high.net.pos is not None and den.low.net.pos is not None
    assert models.load_card(tmp_path / "m") == card
    out = _outputs(den, False)
    assert torch.isfinite(out).all()
