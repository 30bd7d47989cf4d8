"""The paper's OLSS (basis = the network's own outputs) beside the beyond-paper variants (x-hat basis,
closed loop, ridge), and olss-N as the variant with the lowest held-out RMSE (issue 18, point 1)."""

import json
import math
import types

import pytest
import torch
import yaml

from fewstep.config import OLSSParams
from fewstep.math.ddim import sample_ddim
from fewstep.math.olss import OLSSScheduler, fit_weights, sample_olss, search_path
from fewstep.math.schedules import cosine_schedule, timesteps
from fewstep.olss_fit import VARIANTS, choose, fit_olss, headline, variant_files
from fewstep.testing import GMMDenoiser
from fewstep.trajectories import StaleTrajectoriesError, load_steps, load_subsample, trajectory, write_shards
from tests.helpers import ROOT

SHAPE = (3, 4, 4)
pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny tensors: a second thread only contends


def mixture(kind: str) -> GMMDenoiser:
    """The analytic 8-mode mixture of test_olss.py, its optimum returned as ``kind``."""
    sch = cosine_schedule(1024)
    g = torch.Generator().manual_seed(0)
    modes = torch.rand(8, *SHAPE, generator=g, dtype=torch.float64) * 1.6 - 0.8
    return GMMDenoiser(sch, modes, s0=0.15, kind=kind)


@pytest.fixture(scope="module")
def eps_reference():
    """64-step reference on the eps-mixture in float64: X latents, E x-hat, O eps (the outputs)."""
    den = mixture("eps")
    t_path = timesteps(den.schedule.T, 64)
    g = torch.Generator().manual_seed(0)
    torch.rand(8, *SHAPE, generator=g, dtype=torch.float64)  # the modes' draw: the same fit noise as test_olss.py
    t = trajectory(den, torch.randn(32, *SHAPE, generator=g, dtype=torch.float64), t_path)
    return den, t_path, t["x"], t["e"], t["o"]


def test_trajectory_outputs_are_the_networks_own(eps_reference):
    den, t_path, X, E, O = eps_reference
    a, s = den.schedule.at(torch.tensor([t_path[3]]), torch.float64)
    torch.testing.assert_close(O[3], (X[3] - a * E[3]) / s)  # eps, from x-hat and the latent
    assert not torch.allclose(O[3], E[3])


def test_the_bases_give_different_searches_and_the_x_hat_basis_holds_out_better(eps_reference):
    """The issue's measurement: teacher-forced on reference latents, the x-hat and eps least squares
    differ, so do the searched paths; on this mixture x-hat samples closer to the full-step result
    (measured: n=4 paths [0,14,29,42] vs [0,13,29,42], held-out RMSE 0.075 vs 0.118)."""
    den, t_path, X, E, O = eps_reference
    x_T = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    ref = sample_ddim(den, x_T, t_path, clip=False)
    px, po = search_path(X, E, 4), search_path(X, O, 4)
    assert px.path != po.path, (px.path, po.path)
    err = {}
    for basis, B, ps in (("x", E, px), ("output", O, po)):
        sched = fit_weights(X, B, ps.path, t_path, basis=basis)
        assert sched.basis == basis and sched.path == ps.path
        err[basis] = float((sample_olss(den, x_T, sched, clip=False) - ref).pow(2).mean().sqrt())
    assert err["x"] < 0.8 * err["output"], err
    # the eps basis at the zero-SNR start: eps_0 ~ x_T, weights of order 1/alpha_T (2.2e4), cancelling
    assert 1.0 / float(den.schedule.alpha[den.schedule.T]) == pytest.approx(2.2e4, rel=0.01)
    paper = fit_weights(X, O, po.path, t_path, basis="output")
    assert max(abs(w) for r in paper.we for w in r) > 1e3 > max(abs(w) for r in fit_weights(X, E, px.path, t_path).we
                                                                  for w in r)


def test_output_basis_samples_the_linear_combination_of_raw_outputs():
    den = mixture("v")
    sched = OLSSScheduler([900, 500, 100], [1.1, 0.7, 0.2], [[-0.3], [0.2, -0.5], [0.1, 0.4, -0.6]],
                          [0.0] * 3, [1.0] * 3, [0, 1, 2], basis="output")
    x_T = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    hist, x = [], x_T
    for i, t in enumerate(sched.timesteps):
        hist.append(den(x, torch.full((5,), t)))  # the raw v output
        x = sched.wx[i] * x_T + sum(w * e for w, e in zip(sched.we[i], hist))
    torch.testing.assert_close(sample_olss(den, x_T, sched, clip=False), x, rtol=1e-12, atol=1e-12)
    as_x = OLSSScheduler(**{**sched.__dict__, "basis": "x"})
    assert (sample_olss(den, x_T, as_x, clip=False) - x).abs().max() > 1e-2  # the basis matters
    # float32 network, float64 accumulation: the result is the float64 combination, cast once
    x32 = sample_olss(den, x_T.float(), sched, clip=False)
    assert x32.dtype == torch.float32 and torch.allclose(x32.double(), x, atol=1e-5)


def test_old_scheduler_json_without_basis_loads_as_x():
    sched = OLSSScheduler([9, 5], [1.0, 0.5], [[0.1], [0.2, 0.3]], [0.0, 0.0], [1.0, 1.0], [0, 1])
    d = json.loads(sched.to_json())
    assert d["basis"] == "x"
    del d["basis"]
    old = OLSSScheduler.from_json(json.dumps(d))
    assert old.basis == "x" and old == sched
    out = OLSSScheduler.from_json(json.dumps({**d, "basis": "output"}))
    assert out.basis == "output" and OLSSScheduler.from_json(out.to_json()) == out
    with pytest.raises(ValueError, match="unknown OLSS basis 'eps'"):
        OLSSScheduler.from_json(json.dumps({**d, "basis": "eps"}))


def test_choose_takes_the_lowest_held_out_rmse():
    rmse = {"olss-paper": 0.073, "olss-p": 0.2, "olss-open": 0.057, "olss-closed": 0.09, "olss-ridge": 0.058}
    assert choose(rmse) == "olss-open"  # the closed loop is worse here: not chosen
    assert choose({**rmse, "olss-closed": 0.01}) == "olss-closed"
    assert choose({**rmse, "olss-closed": 0.01}, candidates=["olss-paper", "olss-open"]) == "olss-open"
    assert choose({**rmse, "olss-open": math.nan, "olss-ridge": math.inf}) == "olss-paper"  # non-finite loses
    assert choose({"olss-open": 0.05, "olss-paper": 0.05}) == "olss-paper"  # a tie goes to the paper
    with pytest.raises(ValueError):
        choose({"olss-closed": 0.1}, candidates=["olss-paper"])


def test_headline_is_a_copy_of_the_chosen_variant_with_its_record():
    base = OLSSScheduler([9, 5], [1.0, 0.5], [[0.1], [0.2, 0.3]], [0.0, 0.0], [1.0, 1.0], [0, 1])
    schedulers = {}
    for k, v in enumerate(VARIANTS):
        s = OLSSScheduler(**{**base.__dict__, "wx": [1.0 + k, 0.5], "basis": v.basis,
                             "meta": {"variant": v.variant, "method": v.method}})
        schedulers[f"{v.prefix}-2"] = s
    res = {"ddim": 0.3, "olss_paper": 0.07, "olss_p": 0.2, "olss_open": 0.05, "olss_closed": 0.06, "olss_ridge": 0.08}
    chosen, best = headline(schedulers, 2, res)
    assert chosen == "olss-open" and best.wx == schedulers["olss-open-2"].wx and best.basis == "x"
    assert best.meta["chosen_from"] == "olss-open-2" and best.meta["method"] == "beyond-paper"
    assert best.meta["holdout_rmse"] == {"olss-paper": 0.07, "olss-p": 0.2, "olss-open": 0.05, "olss-closed": 0.06,
                                         "olss-ridge": 0.08}
    assert schedulers["olss-open-2"].meta.get("chosen_from") is None  # the variant itself is untouched


def test_dvc_yaml_declares_exactly_the_variant_files():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["fit_olss"]
    outs = [o if isinstance(o, str) else next(iter(o)) for o in stage["outs"]]
    assert [o.replace("${item.model}", "m").replace("${item.n}", "7") for o in outs] == [
        f"schedulers/m/{f}" for f in variant_files(7)]


def _with_card(den: GMMDenoiser) -> GMMDenoiser:
    """What fit_olss reads of a model card, for an analytic denoiser."""
    den.card = types.SimpleNamespace(weights_sha256="mixture", image_shape=SHAPE,
                                     schedule=types.SimpleNamespace(to_dict=lambda: {"kind": "cosine"}))
    return den


@pytest.mark.parametrize("closed_loop", [True, False])
def test_fit_olss_on_the_mixture_records_every_variant_and_heads_with_the_best(tmp_path, closed_loop):
    """The whole fit on the eps-mixture (stored trajectories, float32 as the stage stores them): both
    searched paths are recorded, every variant is held out, olss-N is the lowest eligible one."""
    den = _with_card(mixture("eps"))
    t_path = timesteps(den.schedule.T, 64)
    write_shards(tmp_path, den, range(32), SHAPE, t_path, shard_size=16, batch_size=16, device=torch.device("cpu"),
                 meta={"model_weights_sha256": "mixture"}, progress=False)
    fit = fit_olss(den, "mixture", tmp_path, 6, OLSSParams(n_holdout=64, closed_loop=closed_loop), 0,
                   torch.device("cpu"))
    m, sch = fit.metrics, fit.schedulers
    assert set(sch) == {f.removesuffix(".json") for f in variant_files(6)}
    # measured: x basis [0, 7, 16, 24, 32, 39], eps basis [0, 7, 17, 25, 32, 39]
    assert m["search"]["x"]["path"] != m["search"]["output"]["path"]
    assert sch["olss-paper-6"].path == m["search"]["output"]["path"] and sch["olss-paper-6"].basis == "output"
    assert sch["olss-open-6"].path == m["search"]["x"]["path"] and sch["olss-open-6"].basis == "x"
    assert sch["olss-paper-6"].meta["method"] == "paper" and sch["olss-closed-6"].meta["method"] == "beyond-paper"
    held = {p: v["holdout_rmse"] for p, v in m["variants"].items()}
    assert set(held) == {v.prefix for v in VARIANTS} and all(math.isfinite(r) for r in held.values())
    eligible = {p: r for p, r in held.items() if closed_loop or p != "olss-closed"}
    assert m["chosen"] == min(eligible, key=eligible.get)
    assert m["rmse_vs_full_step"]["olss"] == held[m["chosen"]] == min(eligible.values())
    best = sch["olss-6"]
    assert best.meta["chosen_from"] == f"{m['chosen']}-6" and best.meta["holdout_rmse"] == held
    assert (best.wx, best.we, best.basis) == (sch[f"{m['chosen']}-6"].wx, sch[f"{m['chosen']}-6"].we,
                                              sch[f"{m['chosen']}-6"].basis)
    assert fit.best is best


def test_trajectories_without_network_outputs_are_stale(tmp_path):
    den = mixture("v")
    write_shards(tmp_path, den, range(4), SHAPE, timesteps(den.schedule.T, 8), shard_size=4, batch_size=4,
                 device=torch.device("cpu"), meta={}, progress=False)
    X, E, O = load_subsample(tmp_path, 10**6, keys=("x", "e", "o"))
    assert X.shape == (9, 4 * 48) and O.shape == E.shape == (8, 4 * 48)
    assert torch.equal(next(load_steps(tmp_path, [2], key="o")).flatten(), O[2])  # all elements: same order
    from fewstep import storage

    f = tmp_path / "shard-00000.safetensors"
    t = storage.load_tensors(f)
    storage.save_tensors(f, {k: v for k, v in t.items() if k != "o"})  # a shard written before "o"
    X2, E2 = load_subsample(tmp_path, 10**6)  # the x-hat fit still loads
    assert torch.equal(X2, X) and torch.equal(E2, E)
    with pytest.raises(StaleTrajectoriesError, match="re-run collect_trajectories"):
        load_subsample(tmp_path, 10**6, keys=("x", "e", "o"))
    with pytest.raises(StaleTrajectoriesError):
        next(load_steps(tmp_path, [0], key="o"))


def test_evaluation_rows_say_paper_or_beyond_paper_and_what_olss_n_is():
    from fewstep.evaluation import olss_note

    sched = OLSSScheduler([9, 5], [1.0, 0.5], [[0.1], [0.2, 0.3]], [0.0, 0.0], [1.0, 1.0], [0, 1])
    assert olss_note("olss-paper-4.json", sched) == "paper" and olss_note("olss-p-4.json", sched) == "paper"
    assert olss_note("olss-closed-4.json", sched) == "beyond paper"
    sched.meta = {"chosen_from": "olss-closed-4", "method": "beyond-paper"}
    assert olss_note("olss-4.json", sched) == "= olss-closed-4, beyond paper"
