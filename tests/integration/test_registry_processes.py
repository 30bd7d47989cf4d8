"""The registry with real processes: the register stage CLI (idempotent), a registered sampler
loaded by alias in a fresh process, and promotions racing for the champion alias (moved from
tests/unit: they start processes). Stores in temp dirs; every process runs in its test's temp dir."""

import json
import subprocess
import sys

import numpy as np
import pytest

from fewstep import models
from fewstep.images import to_uint8
from fewstep.math.ddim import PerImageNoise, generate
from fewstep.math.olss import OLSSScheduler, sample_olss
from fewstep.math.schedules import timesteps
from tests.helpers import subprocess_env, tiny_params, write_params
from tests.mlflow_helpers import LOAD_SAMPLER, configure_env, model_versions, race, use_env

tracking = pytest.importorskip("fewstep.tracking")
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_register_cli_is_idempotent(registry, tree, tmp_path, monkeypatch):
    env, regs = registry
    use_env(monkeypatch, env)
    t = configure_env(env)
    before = {n: len(t.client.search_model_versions(f"name = '{n}'")) for n in regs}
    assert set(before.values()) == {1}
    params = write_params(tmp_path / "params.yaml", tiny_params())
    out = tmp_path / "versions.json"
    r = subprocess.run([sys.executable, "-m", "stages.register", "--params", str(params), "--no-progress",
                        "--models", str(tree / "models"), "--schedulers", str(tree / "schedulers"),
                        "--repo", str(tree), "--out", str(out)],
                       cwd=tmp_path, env=subprocess_env(**env), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["versions"]
    assert {(x["name"], x["version"], x["created"]) for x in rows} == {(n, g.version, False) for n, g in regs.items()}
    assert {n: len(t.client.search_model_versions(f"name = '{n}'")) for n in regs} == before


def test_pyfunc_by_alias_in_a_fresh_process_matches_direct_sampling(registry, tree, tmp_path, monkeypatch):
    env, regs = registry
    use_env(monkeypatch, env)
    for name in ("cifar10-student-4step", "cifar10-olss-student-4-2step"):
        # no champion yet: becomes champion
        tracking.promote(name, regs[name].version, 1.0, "first", margin=0.1, tracking=configure_env(env))
    uris = {"ddim": "models:/cifar10-student-4step@champion", "olss": "models:/cifar10-olss-student-4-2step@champion"}
    r = subprocess.run([sys.executable, "-c", LOAD_SAMPLER, json.dumps(uris), str(tmp_path / "out.npz")], cwd=tmp_path,
                       env=subprocess_env(**env), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "artifacts/code/fewstep" in r.stdout  # the package came with the model (code_paths)
    got = np.load(tmp_path / "out.npz")
    student = models.load_denoiser(tree / "models" / "student-4")
    ddim = to_uint8(generate(student, range(5, 8), (3, 8, 8), timesteps(64, 4)))
    sched = OLSSScheduler.from_json((tree / "schedulers" / "student-4" / "olss-2.json").read_text())
    olss = to_uint8(sample_olss(student, PerImageNoise(range(5, 8)).randn(3, 8, 8), sched))
    for key, ref in (("ddim", ddim), ("olss", olss)):
        assert got[key].dtype == np.uint8 and got[key].shape == (3, 8, 8, 3)
        np.testing.assert_array_equal(got[key], ref)
        np.testing.assert_array_equal(got[key + "_one"], ref[1:2])  # per-seed: independent of n
    assert not np.array_equal(got["ddim"], got["olss"])


def test_racing_promotions_end_with_one_consistent_champion(store, tmp_path):
    t, name = store, "race-student-4step"
    v1, v2, v3 = model_versions(t, name, 3)
    tracking.promote(name, v1, 10.0, "e1", margin=0.01, tracking=t)
    res = race(name, [(v2, 8.0), (v3, 6.0)], tmp_path)
    rm = t.client.get_registered_model(name)
    assert str(rm.aliases["champion"]) == v3  # the best candidate wins whatever the order
    assert (rm.tags["champion.version"], rm.tags["champion.fd"]) == (v3, "6.0")
    tv2, tv3 = (t.client.get_model_version(name, v).tags for v in (v2, v3))
    assert tv3["promotion.decision"] == "promoted" and tv3["fd"] == "6.0"
    # v2 either went first (beat v1, then lost to v3) or second (compared with v3 and kept it)
    assert (tv2["promotion.decision"], tv2["promotion.champion_version"]) in {("promoted", v1), ("kept", v3)}
    assert tv3["promotion.champion_version"] == (v2 if tv2["promotion.decision"] == "promoted" else v1)
