"""Class-conditional models (issue 17): the UNet's class embedding, the card's conditioning, the
guided denoiser behind the plain ``den(z, t)`` contract, label dropout in teacher training, and
that unconditional nets and cards are unchanged."""

from __future__ import annotations

import hashlib

import pytest
import torch

from fewstep import models, samplers, storage
from fewstep.config import ParamsError, validate
from fewstep.errors import UserError
from fewstep.math.ddim import sample_ddim
from fewstep.math.guidance import GuidanceError, GuidedDenoiser, evals_per_call, guided
from fewstep.math.param import NetDenoiser, to_eps, to_x
from fewstep.math.schedules import make_schedule, timesteps
from fewstep.nets.unet import UNet, UNetConfig
from tests.helpers import tiny_params, write_prepared

NET = UNetConfig(image_size=8, channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), head_dim=8,
                 dropout=0.0)
SCHEDULE = models.ScheduleSpec("cosine", 64, -20.0, 20.0)
K = 3  # classes of the test nets

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny nets: a second thread only contends


def _net(num_classes: int | None = K, seed: int = 0, perturb: bool = True) -> UNet:
    torch.manual_seed(seed)
    net = UNet(UNetConfig(**{**NET.to_dict(), "num_classes": num_classes}))
    if perturb:  # zero-init output layers would make every net predict 0
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def _card(net: UNet, kind: str = "v", **kw) -> models.ModelCard:
    lineage = models.Lineage(dataset="toy", class_names=("a", "b"), data_hash="d" * 64, params_hash="p" * 64,
                             run_hash="r" * 64, train_steps=10, weights_sha256="w" * 64)
    return models.ModelCard(arch=models.UNetArch(net.cfg), role="teacher", parameterization=kind, schedule=SCHEDULE,
                            image_size=8, sample_steps=64, weighting="snr+1", lineage=lineage,
                            conditioning=models.Conditioning(net.cfg.num_classes), **kw)


def _den(kind: str = "v", seed: int = 0) -> NetDenoiser:
    net = _net(seed=seed)
    return models.denoiser_from_card(_card(net, kind), net.state_dict())


def _z(b: int = 4) -> torch.Tensor:
    return torch.randn(b, 3, 8, 8, generator=torch.Generator().manual_seed(1))


T_IDX = torch.tensor([1, 20, 40, 64])
LABELS = torch.tensor([0, 2, 1, 2])


# ---------------------------------------------------------------------------------------------- nets and cards


def test_an_unconditional_net_and_card_are_unchanged():
    net = _net(None, perturb=False)
    assert "num_classes" not in net.cfg.to_dict() and net.class_emb is None and net.num_classes is None
    assert not any(k.startswith("class_emb") for k in net.state_dict())
    card = _card(net)
    assert card.to_dict()["conditioning"] == {"num_classes": None} and "num_classes" not in card.to_dict()["net"]
    # the sha256 of this card's JSON as main (a529480, before conditioning existed) writes it
    assert hashlib.sha256(card.to_json().encode()).hexdigest() == \
        "53d307288f7ed93b2e64c45310ce6bf164165245fd93506d635798146a80ee9d"
    assert models.ModelCard.from_json(card.to_json()) == card
    with pytest.raises(ValueError, match="unconditional UNet"):
        net(_z(), torch.rand(4), LABELS)


def test_a_conditional_net_embeds_the_label_and_null_is_the_default():
    plain, cond = _net(None, perturb=False), _net(K, perturb=False)
    # built last: the other layers start as the unconditional net's (same seed)
    sd = cond.state_dict()
    assert set(sd) - set(plain.state_dict()) == {"class_emb.weight"} and sd["class_emb.weight"].shape[0] == K + 1
    assert all(torch.equal(v, sd[k]) for k, v in plain.state_dict().items())
    net, z, tc = _net(K), _z(), torch.rand(4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = net(z, tc, torch.zeros(4, dtype=torch.long)), net(z, tc, torch.ones(4, dtype=torch.long))
        null = net(z, tc, torch.full((4,), K))
        assert (a - b).abs().max() > 1e-4
        assert torch.equal(net(z, tc), null)  # no labels = the null label: the unconditional model
    assert net.cfg.to_dict()["num_classes"] == K and UNetConfig(**net.cfg.to_dict()) == net.cfg
    with pytest.raises(ValueError, match="num_classes"):
        UNetConfig(**{**NET.to_dict(), "num_classes": 0})


def test_the_card_records_the_class_conditioning_and_refuses_a_mismatch():
    net = _net(K)
    card = _card(net)
    assert card.to_dict()["conditioning"] == {"kind": "class", "num_classes": K} and card.conditioning.kind == "class"
    assert models.ModelCard.from_json(card.to_json()) == card
    with pytest.raises(models.ModelCardError, match="num_classes=None but its fewstep-unet network embeds 3"):
        models.ModelCard.from_dict({**card.to_dict(), "conditioning": {"num_classes": None}})
    with pytest.raises(models.ModelCardError, match="unknown conditioning kind"):
        models.ModelCard.from_dict({**card.to_dict(), "conditioning": {"kind": "video", "num_classes": K}})
    with pytest.raises(models.ModelCardError, match="text-conditional card needs"):  # text: embed_dim (latent branch)
        models.ModelCard.from_dict({**card.to_dict(), "conditioning": {"kind": "text", "num_classes": K}})


def test_save_then_load_gives_identical_conditional_outputs(tmp_path):
    net = _net(K)
    saved = models.save(tmp_path / "m", _card(net), net.state_dict())
    den = models.load_denoiser(tmp_path / "m")
    assert den.card == saved and den.num_classes == K
    assert storage.read_json(tmp_path / "m" / models.CONFIG)["conditioning"] == {"kind": "class", "num_classes": K}
    ref = models.denoiser_from_card(saved, net.state_dict())
    with torch.no_grad():
        assert torch.equal(den(_z(), T_IDX, LABELS), ref(_z(), T_IDX, LABELS))
        assert torch.equal(guided(den, LABELS, 2.0)(_z(), T_IDX), guided(ref, LABELS, 2.0)(_z(), T_IDX))
    # a format-1 style meta dict takes the conditioning from the net
    models.save_model(tmp_path / "m2", net, {"parameterization": "v", "schedule": SCHEDULE.to_dict()})
    assert models.load_card(tmp_path / "m2").conditioning.num_classes == K


# ---------------------------------------------------------------------------------------------- guidance


@pytest.mark.parametrize("kind", ["v", "eps", "x"])
def test_the_batched_guided_forward_equals_two_separate_evaluations(kind):
    den, z, w = _den(kind), _z(), 1.5
    g = guided(den, LABELS, w)
    with torch.no_grad():
        out = g(z, T_IDX)
        c, u = den(z, T_IDX, LABELS), den(z, T_IDX, torch.full((4,), K))
    torch.testing.assert_close(out, (1 + w) * c - w * u, rtol=1e-5, atol=1e-5)
    # the native-parameterisation combination is Ho & Salimans' eps-form one, and the x-form one
    a, s = den.schedule.at(T_IDX, torch.float64)
    torch.testing.assert_close(to_eps(out, kind, z, a, s),
                               (1 + w) * to_eps(c, kind, z, a, s) - w * to_eps(u, kind, z, a, s), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(to_x(out, kind, z, a, s),
                               (1 + w) * to_x(c, kind, z, a, s) - w * to_x(u, kind, z, a, s), rtol=1e-4, atol=1e-4)
    assert g.calls == 1 and g.network_evals == 2 * 4 and evals_per_call(g) == 2 and evals_per_call(den) == 1


def test_the_guided_forward_is_one_network_call_of_2B(monkeypatch):
    den = _den()
    seen = []
    inner = den.net.forward
    monkeypatch.setattr(den.net, "forward", lambda x, t, y=None: seen.append(x.shape[0]) or inner(x, t, y))
    with torch.no_grad():
        guided(den, LABELS, 3.0)(_z(), T_IDX)
        guided(den, LABELS, 0.0)(_z(), T_IDX)
    assert seen == [8, 4]


def test_guided_ddim_at_w0_equals_unguided_conditional_sampling():
    den = _den()
    steps, x_T = timesteps(64, 4), _z()

    class Conditional:  # the conditional denoiser at fixed labels, written out by hand
        kind, schedule = den.kind, den.schedule

        def __call__(self, z, t):
            return den(z, t, LABELS)

    with torch.no_grad():
        g0 = guided(den, LABELS, 0.0)
        ref = sample_ddim(Conditional(), x_T, steps)
        assert torch.equal(sample_ddim(g0, x_T, steps), ref)
        assert g0.network_evals == 4 * len(steps)  # one conditional pass per step
        g = guided(den, LABELS, 2.0)
        out = samplers.get("ddim")(g, x_T, steps=4)  # through the registry, unchanged
        assert g.network_evals == 2 * 4 * len(steps) and (out - ref).abs().max() > 1e-4
        one = guided(den, 1, 0.0)  # one label for every image
        assert torch.equal(sample_ddim(one, x_T, steps), sample_ddim(guided(den, torch.ones(4, dtype=torch.long)),
                                                                      x_T, steps))


def test_a_diffusers_peer_samples_guided_through_continuous():
    pytest.importorskip("diffusers")
    den = _den()
    with torch.no_grad():
        g = guided(den, LABELS, 1.0)
        out = samplers.get("diffusers-ddim")(g, _z(), steps=3)
    assert out.shape == (4, 3, 8, 8) and torch.isfinite(out).all() and g.network_evals == 2 * 4 * 3


def test_bad_conditioning_inputs_give_one_clear_error_each():
    den = _den()
    for w, match in ((-0.5, "must be finite and >= 0"), (float("nan"), "finite"), ("big", "a number")):
        with pytest.raises(GuidanceError, match=match):
            guided(den, 0, w)
    with pytest.raises(GuidanceError, match=r"class label 3 out of range: this model has 3 classes \(labels 0..2\)"):
        guided(den, [0, 3], 1.0)
    with pytest.raises(GuidanceError, match="class label -1 out of range"):
        guided(den, -1)
    with pytest.raises(GuidanceError, match="must be integers"):
        guided(den, torch.tensor([0.0, 1.0]))
    with pytest.raises(GuidanceError, match="3 class labels for a batch of 4"):
        guided(den, [0, 1, 2])(_z(), T_IDX)
    plain = _net(None)
    with pytest.raises(GuidanceError, match="need a class-conditional model; this fewstep-unet model is unconditional"):
        GuidedDenoiser(models.denoiser_from_card(_card(plain), plain.state_dict()), 0, 1.0)
    assert issubclass(GuidanceError, UserError)
    from fewstep.interop.native import NativeExportError, unet_config  # no diffusers needed for the config

    assert unet_config(_card(_net(K)))["num_classes"] == K  # the wrapper takes class labels (interop.native)
    assert issubclass(NativeExportError, UserError)
    from fewstep.train.distill import DistillSetupError, check_round

    with pytest.raises(DistillSetupError, match="guidance 1 needs a class-conditional parent"):
        check_round(_card(_net(None)), "models/teacher", 32, "snr+1", guidance=1.0)
    p = tiny_params(conditioning={"p_uncond": 1.0})
    with pytest.raises(ParamsError, match="teacher.conditioning.p_uncond"):
        validate(p)


def test_generate_samples_one_label_per_seed_independent_of_batching_and_counts_nfe():
    from fewstep.math.ddim import generate
    from fewstep.math.guidance import cycle_labels

    den = _den()
    assert cycle_labels(range(5, 12), 5, K) == [0, 1, 2, 0, 1, 2, 0] and cycle_labels([9, 7], 5, K) == [1, 2]
    labels = cycle_labels(range(5), 0, K)
    with torch.no_grad():
        a = samplers.generate("ddim", den, range(5), (3, 8, 8), steps=3, labels=labels, guidance=1.0, batch_size=2)
        b = samplers.generate("ddim", den, range(5), (3, 8, 8), steps=3, labels=labels, guidance=1.0)
        one = samplers.generate("ddim", den, [3], (3, 8, 8), steps=3, labels=[labels[3]], guidance=1.0)
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)  # batch shapes change float rounding only
        torch.testing.assert_close(a[3:4], one, rtol=0, atol=2e-5)  # batch shapes change float rounding only
        c = generate(den, range(5), (3, 8, 8), timesteps(64, 3), labels=labels, guidance=1.0, batch_size=2)
        torch.testing.assert_close(c, b, rtol=0, atol=2e-5)  # batch shapes change float rounding only
    assert samplers.nfe("ddim", 4) == 4 and samplers.nfe("ddim", 4, guidance=2.0) == 8
    assert samplers.nfe("ddim", 4, guided(den, 0, 1.0)) == 8 and samplers.nfe("ddim", 4, guided(den, 0)) == 4
    with pytest.raises(GuidanceError, match="2 class labels for 5 seeds"):
        samplers.generate("ddim", den, range(5), (3, 8, 8), steps=3, labels=[0, 1])
    with pytest.raises(GuidanceError, match="guidance scale 2 without class labels"):
        generate(den, range(2), (3, 8, 8), timesteps(64, 3), guidance=2.0)


def test_a_conditional_models_grid_has_every_class(tmp_path):
    from fewstep.config import SampleParams
    from fewstep.outputs import sample_grid

    net = _net(K)
    models.save(tmp_path / "m", _card(net), net.state_dict())
    sp = SampleParams(n=6, steps=3, seed=4, guidance=0.5)
    sample_grid(tmp_path / "m", tmp_path / "grid.png", sp, torch.device("cpu"))
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert "guidance" not in SampleParams().model_dump() and SampleParams(guidance=0.5).model_dump()["guidance"] == 0.5


# ---------------------------------------------------------------------------------------------- guided OLSS


def test_olss_fits_on_guided_trajectories_records_the_scale_and_refuses_another(tmp_path):
    import warnings

    from fewstep.config import OLSSParams, TrajectoryParams
    from fewstep.math.olss import sample_olss
    from fewstep.olss_fit import fit_olss
    from fewstep.trajectories import collect_all, collect_model

    net = _net(K)
    models.save(tmp_path / "m", _card(net), net.state_dict())
    den = models.load_denoiser(tmp_path / "m")
    tp = TrajectoryParams(n_fit=6, reference_steps=16, seed_offset=100, shard_size=4, batch_size=2, guidance=1.0)
    collect_model(den, "m", tp, tmp_path / "traj", torch.device("cpu"), progress=False)
    meta = storage.read_json(tmp_path / "traj" / "meta.json")
    assert meta["conditioning"] == {"kind": "class", "num_classes": K, "scale": 1.0, "first_seed": 100,
                                    "labels": "(seed - first_seed) mod num_classes"}
    # shard 1 holds seeds 104, 105: classes 1 and 2, guided at w = 1, whatever the batching
    shard = storage.load_tensors(tmp_path / "traj" / "shard-00001.safetensors")
    with torch.no_grad():
        ref = collect_all(guided(den, [1, 2], 1.0), [104, 105], (3, 8, 8), meta["timesteps"])
    torch.testing.assert_close(shard["x"], ref["x"], rtol=0, atol=2e-5)

    fit = fit_olss(den, "m", tmp_path / "traj", 4, OLSSParams(steps=[4], max_elements=1000, n_holdout=3,
                                                               bisection_iters=8), 0, torch.device("cpu"))
    sched = fit.schedulers["olss-4"]
    assert sched.meta["guidance"]["scale"] == 1.0 and fit.metrics["guidance"]["scale"] == 1.0
    assert all(s.meta["guidance"] == meta["conditioning"] for s in fit.schedulers.values())
    x_T = _z(3)
    with torch.no_grad():
        assert torch.isfinite(sample_olss(guided(den, [0, 1, 2], 1.0), x_T, sched)).all()
        for w in (0.0, 3.0):
            with pytest.raises(GuidanceError, match=f"fitted on trajectories at guidance scale w=1 but is used at w={w:g}"):
                samplers.get("olss")(guided(den, [0, 1, 2], w), x_T, steps=4, scheduler=sched)
        with pytest.raises(GuidanceError, match="used at w=0"):
            sample_olss(den, x_T, sched)  # the bare (null-label) model is not guided
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sample_olss(guided(den, [0, 1, 2], 3.0), x_T, sched, allow_scale_mismatch=True)
        assert any("allow_scale_mismatch" in str(c.message) for c in caught)
    plain = _net(None)
    models.save(tmp_path / "u", _card(plain), plain.state_dict())
    with pytest.raises(GuidanceError, match="guidance scale 1 asked of an unconditional model"):
        collect_model(models.load_denoiser(tmp_path / "u"), "u", tp, tmp_path / "traj-u", torch.device("cpu"),
                      progress=False)
    assert "guidance" not in TrajectoryParams().model_dump()


# ---------------------------------------------------------------------------------------------- training


def test_label_dropout_drops_about_p_uncond_and_is_seeded():
    from fewstep.train.teacher import drop_labels

    y = torch.zeros(4000, dtype=torch.long)
    a = drop_labels(y, 0.1, K, 4000, slice(None), torch.Generator().manual_seed(0))
    b = drop_labels(y, 0.1, K, 4000, slice(None), torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and set(a.tolist()) == {0, K}
    assert 0.08 < (a == K).float().mean().item() < 0.12
    # a rank's rows are its slice of the global batch's draws
    part = drop_labels(y[1000:2000], 0.1, K, 4000, slice(1000, 2000), torch.Generator().manual_seed(0))
    assert torch.equal(part, a[1000:2000])


def test_an_unconditional_teachers_params_hash_is_unchanged():
    p = validate(tiny_params())
    assert "conditioning" not in p.teacher.model_dump()
    c = validate(tiny_params(conditioning={"p_uncond": 0.2}))
    assert c.teacher.model_dump()["conditioning"] == {"kind": "class", "p_uncond": 0.2}


def test_a_tiny_conditional_teacher_trains_and_its_card_says_so(tmp_path):
    from fewstep.train.teacher import train_teacher

    write_prepared(tmp_path / "data", n=64)
    p = validate(tiny_params(steps=30, checkpoint_every=30, log_every=10, conditioning={"p_uncond": 0.1}))
    result, card = train_teacher(p, tmp_path / "data", tmp_path / "teacher", tmp_path / "ck", torch.device("cpu"),
                                 progress=False)
    assert card.conditioning == models.Conditioning(2) and card.arch.net.num_classes == 2
    den = models.load_denoiser(tmp_path / "teacher")
    assert den.card == card and den.num_classes == 2
    with torch.no_grad():
        z, t = _z(2), torch.tensor([32, 32])
        red, blue = den(z, t, torch.tensor([0, 0])), den(z, t, torch.tensor([1, 1]))
        assert (red - blue).abs().max() > 1e-4  # the label reached the prediction
        out = samplers.get("ddim")(guided(den, [0, 1], 1.0), z, steps=4)
    assert torch.isfinite(out).all()
    assert result.history[-1][1] < result.history[0][1]  # the loss fell
