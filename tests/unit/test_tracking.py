"""MLflow tracking, registry lineage, the pyfunc sampler and champion promotion, on a real MLflow
(SQLite store in a temp dir, file artifacts; no mocks). A migrated SQLite DB is made once per module
and copied per test (migrations cost seconds, a copy milliseconds: mlops.md 4a).

The library reads no FEWSTEP_* variable: in-process calls pass the store, experiment, artifact root,
parent run and commit explicitly; the FEWSTEP_* variables in ``_store_env`` are for the stage
processes (entry points, which read them through fewstep.settings)."""

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fewstep import models, storage
from fewstep.images import save_grid, to_uint8
from fewstep.math.ddim import PerImageNoise, generate
from fewstep.math.olss import OLSSScheduler, fit_weights, sample_olss, uniform_path
from fewstep.math.schedules import timesteps
from fewstep.trajectories import load_subsample, write_shards
from tests.helpers import ROOT, tiny_params, write_params

tracking = pytest.importorskip("fewstep.tracking")

QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
         "OMP_NUM_THREADS": "1"}  # tiny nets: a second thread only contends


def _store_env(d: Path) -> dict[str, str]:
    return {**QUIET, "MLFLOW_TRACKING_URI": f"sqlite:///{d / 'mlflow.db'}",
            "FEWSTEP_ARTIFACT_ROOT": (d / "artifacts").as_uri(), "FEWSTEP_EXPERIMENT": "fewstep-test"}


def _configure(env: dict[str, str]) -> "tracking.Tracking":
    """The store, experiment and artifact root of ``env`` (what a stage would read), passed explicitly."""
    return tracking.configure(env["MLFLOW_TRACKING_URI"], env["FEWSTEP_EXPERIMENT"], env["FEWSTEP_ARTIFACT_ROOT"])


def _use(monkeypatch, env: dict[str, str]) -> None:
    for k in ("FEWSTEP_PARENT_RUN_ID", "FEWSTEP_GIT_COMMIT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


@contextmanager
def _one_thread():
    """The nets here are tiny: on a busy 2-core box a second torch thread makes sampling ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Never the repository's mlflow.db or mlartifacts/: a test that forgets its store gets an empty
    one here, and the default artifact root (<cwd>/mlartifacts) is under tmp_path."""
    _use(monkeypatch, _store_env(tmp_path / "unconfigured"))
    monkeypatch.chdir(tmp_path)
    with _one_thread():
        yield


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory) -> Path:
    from mlflow.tracking import MlflowClient

    d = tmp_path_factory.mktemp("mlflow_template")
    MlflowClient(tracking_uri=f"sqlite:///{d / 'mlflow.db'}").search_experiments()  # runs the migrations
    return d / "mlflow.db"


@pytest.fixture
def store(tmp_path, migrated_db, monkeypatch) -> "tracking.Tracking":
    shutil.copy(migrated_db, tmp_path / "mlflow.db")
    _use(monkeypatch, _store_env(tmp_path))
    return _configure(_store_env(tmp_path))


def _perturbed_student(teacher_dir: Path, out: Path, steps: int) -> None:
    net, card = models.load_net(teacher_dir)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    student = card.updated(role="student", sample_steps=steps, params_hash=storage.sha256_json({"student": steps}),
                           parent={"path": str(teacher_dir), "weights_sha256": card.weights_sha256,
                                   "sample_steps": 2 * steps, "role": "teacher"})
    models.save_model(out, net, student)


@pytest.fixture(scope="module")
def tree(tiny_teacher, tmp_path_factory) -> Path:
    """models/{teacher, student-4}, trajectories/*, schedulers/*/olss-2.json and a dvc.lock naming the
    student's stage and the student's trajectories (the student is the teacher, slightly perturbed:
    lineage and sampling are what is tested here, not distillation)."""
    d = tmp_path_factory.mktemp("tree")
    with _one_thread():
        _build_tree(tiny_teacher, d)
    return d


def _build_tree(tiny_teacher: Path, d: Path) -> None:
    shutil.copytree(tiny_teacher / "teacher", d / "models" / "teacher")
    _perturbed_student(d / "models" / "teacher", d / "models" / "student-4", 4)
    for name, n_ref in (("teacher", 8), ("student-4", 4)):
        den = models.load_denoiser(d / "models" / name)
        t_path = timesteps(den.schedule.T, n_ref)
        tdir = d / "trajectories" / name
        write_shards(tdir, den, range(100, 108), den.card.image_shape, t_path, 8, 8, torch.device("cpu"),
                     {"model": name, "model_weights_sha256": den.card.weights_sha256}, progress=False)
        X, E = load_subsample(tdir, 10**6)
        sched = fit_weights(X, E, uniform_path(n_ref, 2), t_path)
        sched.meta = {"model": name, "model_weights_sha256": den.card.weights_sha256, "variant": "open-loop",
                      "trajectories": f"trajectories/{name}", "reference_steps": n_ref}
        storage.atomic_write_bytes(d / "schedulers" / name / "olss-2.json", sched.to_json().encode())
    _tiny_evaluator(d / "models" / "evaluator", models.load_card(d / "models" / "teacher").lineage.data_hash)
    lock = {"schema": "2.0", "stages": {
        "distill@student-4": {"cmd": "python -m stages.distill --round student-4",
                              "outs": [{"path": "models/student-4", "md5": "aaaa.dir"}]},
        "collect_trajectories@student-4": {"cmd": "python -m stages.collect_trajectories --model student-4",
                                           "outs": [{"path": "trajectories/student-4", "md5": "bbbb.dir"}]}}}
    (d / "dvc.lock").write_text(yaml.safe_dump(lock))


def _tiny_evaluator(out: Path, data_hash: str) -> None:
    """What stages.train_evaluator writes, with untrained weights (the registry is tested, not accuracy)."""
    from fewstep.nets.evaluator import Evaluator, EvaluatorConfig

    torch.manual_seed(0)
    cfg = EvaluatorConfig(num_classes=2, widths=(8, 16), blocks_per_stage=1)
    net = Evaluator(cfg)
    out.mkdir(parents=True)
    storage.save_tensors(out / "model.safetensors", net.state_dict())
    storage.save_tensors(out / "ref_stats.safetensors", {"mu": torch.zeros(16, dtype=torch.float64),
                                                         "sigma": torch.eye(16, dtype=torch.float64)})
    storage.write_json(out / "config.json", {
        "format_version": 1, "role": "evaluator", "net": cfg.to_dict(), "data_hash": data_hash,
        "class_names": ["red", "blue"], "feature_dim": 16, "test_accuracy": 0.5,
        "weights_sha256": storage.sha256_file(out / "model.safetensors")})


@pytest.fixture(scope="module")
def registry(tree, migrated_db, tmp_path_factory):
    """One registry with everything in ``tree`` registered (shared by the tests that only read it)."""
    d = tmp_path_factory.mktemp("registry")
    shutil.copy(migrated_db, d / "mlflow.db")
    env = {**_store_env(d), "FEWSTEP_GIT_COMMIT": "c0ffee" * 6 + "c0ff"}
    with _one_thread():
        regs = tracking.register_all(tree / "models", tree / "schedulers", repo=tree,
                                     git_commit=env["FEWSTEP_GIT_COMMIT"], tracking=_configure(env))
    return env, {r.name: r for r in regs}


def test_stage_run_records_params_metric_history_artifacts_and_lineage_tags(store, tmp_path, monkeypatch):
    entry = {"cmd": "python -m stages.train_teacher", "outs": [{"path": "models/teacher", "md5": "abc.dir"}]}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"train_teacher": entry}}))
    commit = "1234abcd" * 5
    grid = tmp_path / "grid.png"
    save_grid(np.zeros((4, 8, 8, 3), np.uint8), grid)
    with tracking.pipeline_run("pipeline", repo=tmp_path, git_commit=commit, tracking=store) as parent:
        assert "FEWSTEP_PARENT_RUN_ID" not in os.environ  # passing it to stage processes is the flow's job
        with tracking.stage_run("train_teacher", repo=tmp_path, parent_run_id=parent.run_id, git_commit=commit,
                                tracking=store,
                                params={"teacher": {"lr": 1e-3, "net": {"channel_mult": [1, 2]}}}) as run:
            run.log_metrics({"loss": [(0, 1.0), (25, 0.5), (50, 0.25)], "params": 7})
            run.log_artifact(grid, "samples")
    c = store.client
    r = c.get_run(run.run_id)
    assert r.info.status == "FINISHED" and r.info.experiment_id == store.experiment_id
    assert r.data.params == {"teacher.lr": "0.001", "teacher.net.channel_mult": "[1, 2]"}
    assert [(m.step, m.value) for m in c.get_metric_history(run.run_id, "loss")] == [(0, 1.0), (25, 0.5), (50, 0.25)]
    assert [a.path for a in c.list_artifacts(run.run_id, "samples")] == ["samples/grid.png"]
    assert (tmp_path / "artifacts").is_dir()  # the experiment's explicit artifact_location
    tags = r.data.tags
    assert tags["mlflow.parentRunId"] == parent.run_id
    assert tags["git_commit"] == commit
    assert tags["dvc_lock_sha256"] == storage.sha256_bytes(yaml.safe_dump(entry, sort_keys=True).encode())
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.stage_run("distill@student-4", repo=tmp_path, tracking=store) as failed:
            raise RuntimeError("boom")
    r2 = c.get_run(failed.run_id)
    assert r2.info.status == "FAILED" and "dvc_lock_sha256" not in r2.data.tags  # no lock entry for it
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert tracking.git_commit(tmp_path) is None  # not a repository
    if (ROOT / ".git").exists():
        assert len(tracking.git_commit(ROOT) or "") == 40


def test_registry_lineage_teacher_student_olss(registry, tree, monkeypatch):
    env, regs = registry
    _use(monkeypatch, env)
    teacher, student = regs["cifar10-teacher"], regs["cifar10-student-4step"]
    olss_s, olss_t = regs["cifar10-olss-student-4-2step"], regs["cifar10-olss-teacher-2step"]
    tcard, scard = models.load_card(tree / "models" / "teacher"), models.load_card(tree / "models" / "student-4")
    for r, card in ((teacher, tcard), (student, scard), (olss_s, scard), (olss_t, tcard)):
        assert r.created
        assert r.tags["data_hash"] == tcard.lineage.data_hash and r.tags["weights_sha256"] == card.weights_sha256
        assert r.tags["git_commit"] == "c0ffee" * 6 + "c0ff" and r.tags["params_hash"]
    assert teacher.tags["role"] == "teacher" and "parent_version" not in teacher.tags
    assert student.tags["role"] == "student" and student.tags["nfe"] == "4"
    assert (student.tags["parent_model"], student.tags["parent_version"]) == ("cifar10-teacher", teacher.version)
    assert student.tags["dvc_stage"] == "distill@student-4" and student.tags["dvc_out_md5"] == "aaaa.dir"
    assert olss_s.tags["role"] == "olss" and olss_s.tags["nfe"] == "2" and olss_s.tags["olss_variant"] == "open-loop"
    assert (olss_s.tags["parent_model"], olss_s.tags["parent_version"]) == ("cifar10-student-4step", student.version)
    assert (olss_t.tags["parent_model"], olss_t.tags["parent_version"]) == ("cifar10-teacher", teacher.version)
    assert olss_s.tags["trajectories_path"] == "trajectories/student-4"
    assert olss_s.tags["trajectories_hash"] == "dvc-md5:bbbb.dir"  # from dvc.lock
    assert olss_t.tags["trajectories_hash"].startswith("sha256:")  # not in dvc.lock: hashed from the files
    assert olss_s.tags["scheduler_sha256"] == storage.sha256_file(tree / "schedulers" / "student-4" / "olss-2.json")
    chain = tracking.lineage(olss_s.name, olss_s.version, tracking=_configure(env))
    assert [(n, v) for n, v, _ in chain] == [(olss_s.name, olss_s.version), (student.name, student.version),
                                             (teacher.name, teacher.version)]


def test_register_cli_is_idempotent(registry, tree, tmp_path, monkeypatch):
    env, regs = registry
    _use(monkeypatch, env)
    t = _configure(env)
    before = {n: len(t.client.search_model_versions(f"name = '{n}'")) for n in regs}
    assert set(before.values()) == {1}
    params = write_params(tmp_path / "params.yaml", tiny_params())
    out = tmp_path / "versions.json"
    r = subprocess.run([sys.executable, "-m", "stages.register", "--params", str(params), "--no-progress",
                        "--models", str(tree / "models"), "--schedulers", str(tree / "schedulers"),
                        "--repo", str(tree), "--out", str(out)],
                       cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["versions"]
    assert {(x["name"], x["version"], x["created"]) for x in rows} == {(n, g.version, False) for n, g in regs.items()}
    assert {n: len(t.client.search_model_versions(f"name = '{n}'")) for n in regs} == before


_LOAD = """
import json, sys, mlflow, numpy as np
out = {}
for key, uri in json.loads(sys.argv[1]).items():
    m = mlflow.pyfunc.load_model(uri)
    out[key] = m.predict({"n": 3, "seed": 5})
    out[key + "_one"] = m.predict({"n": 1, "seed": 6})
np.savez(sys.argv[2], **out)
print(sys.modules["fewstep"].__file__)
"""


def test_evaluator_is_registered_and_loads_as_a_feature_pyfunc(registry, tree, monkeypatch):
    import mlflow

    from fewstep.train.evaluator import features, load_evaluator

    env, regs = registry
    _use(monkeypatch, env)
    ev = regs["cifar10-evaluator"]
    cfg = storage.read_json(tree / "models" / "evaluator" / models.CONFIG)  # the evaluator's own config: no card
    assert ev.created and ev.tags["role"] == "evaluator" and ev.tags["weights_sha256"] == cfg["weights_sha256"]
    assert ev.tags["data_hash"] == models.load_card(tree / "models" / "teacher").lineage.data_hash
    assert ev.tags["test_accuracy"] == "0.5" and ev.tags["git_commit"] == "c0ffee" * 6 + "c0ff"
    _configure(env)  # points mlflow's registry URI at the store
    m = mlflow.pyfunc.load_model(f"models:/cifar10-evaluator/{ev.version}")
    imgs = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    net, stats = load_evaluator(tree / "models" / "evaluator")
    want = features(net, torch.from_numpy(imgs).permute(0, 3, 1, 2).double().div(127.5).sub(1).float())
    np.testing.assert_allclose(m.predict(imgs), want, rtol=1e-5, atol=1e-6)
    probs = m.predict({"images": imgs, "output": "probs"})
    assert probs.shape == (5, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    with pytest.raises(Exception, match="uint8 images"):
        m.predict(imgs.astype(np.float32))


def test_pyfunc_by_alias_in_a_fresh_process_matches_direct_sampling(registry, tree, tmp_path, monkeypatch):
    env, regs = registry
    _use(monkeypatch, env)
    for name in ("cifar10-student-4step", "cifar10-olss-student-4-2step"):
        # no champion yet: becomes champion
        tracking.promote(name, regs[name].version, 1.0, "first", margin=0.1, tracking=_configure(env))
    uris = {"ddim": "models:/cifar10-student-4step@champion", "olss": "models:/cifar10-olss-student-4-2step@champion"}
    r = subprocess.run([sys.executable, "-c", _LOAD, json.dumps(uris), str(tmp_path / "out.npz")], cwd=tmp_path,
                       env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
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


def _versions(t, name: str, n: int) -> list[str]:
    t.client.create_registered_model(name)
    out = []
    for _ in range(n):
        lm = t.client.create_logged_model(t.experiment_id, name="toy")
        out.append(str(t.client.create_model_version(name, f"models:/{lm.model_id}", model_id=lm.model_id).version))
    return out


def test_promotion_moves_only_on_a_complete_better_evaluation(store):
    t, name = store, "toy-student-4step"
    v1, v2, v3, v4 = _versions(t, name, 4)
    promote = functools.partial(tracking.promote, tracking=t)
    alias = lambda: str(t.client.get_registered_model(name).aliases.get("champion"))  # noqa: E731
    tags = lambda v: t.client.get_model_version(name, v).tags  # noqa: E731

    assert promote(name, v1, 10.0, "e1", margin=0.05).decision == "promoted" and alias() == v1
    p = promote(name, v2, 9.7, "e1", margin=0.05)  # better, but not by 5 %
    assert (p.decision, p.champion_fd, alias()) == ("kept", 10.0, v1)
    assert tags(v2)["promotion.decision"] == "kept" and tags(v2)["promotion.champion_version"] == v1
    for fd, partial in ((1.0, True), (float("nan"), False), (None, False), (float("inf"), False)):
        p = promote(name, v3, fd, "e1", margin=0.05, partial=partial)
        assert p.decision == "rejected" and alias() == v1
    assert "fd" not in tags(v3)  # a failed evaluation leaves no FD on record
    p = promote(name, v3, 5.0, "e2", margin=0.05)  # champion was measured on e1, not e2
    assert p.decision == "held" and "remeasured" in p.reason and alias() == v1
    p = promote(name, v3, 5.0, "e2", margin=0.05, remeasured={v1: float("nan")})
    assert p.decision == "rejected" and alias() == v1  # the champion's re-measurement failed
    p = promote(name, v3, 5.0, "e2", margin=0.05, remeasured={v1: 11.0})
    assert (p.decision, p.champion_fd, p.previous_champion, alias()) == ("promoted", 11.0, v1, v3)
    t3 = tags(v3)
    assert (t3["fd"], t3["evaluation_id"], t3["promotion.candidate_fd"], t3["promotion.champion_fd"]) == \
        ("5.0", "e2", "5.0", "11.0")
    assert (tags(v1)["fd"], tags(v1)["evaluation_id"]) == ("11.0", "e2")  # its latest valid measurement
    assert promote(name, v4, 6.0, "e2", margin=0.0).decision == "kept" and alias() == v3
    assert promote(name, v3, 5.0, "e2", margin=0.0).decision == "unchanged"
    rm = t.client.get_registered_model(name).tags
    assert (rm["champion.version"], rm["champion.fd"], rm["champion.evaluation_id"]) == (v3, "5.0", "e2")
    assert str(tracking.champion(name, tracking=t).version) == v3


_RACE = """
import json, os, sys, time
from pathlib import Path
from fewstep import settings, tracking
name, version, fd, flag = sys.argv[1], sys.argv[2], float(sys.argv[3]), Path(sys.argv[4])
env = settings.current()  # this script is an entry point, as a stage is
t = tracking.configure(experiment=env.experiment, artifact_root=env.artifact_root)
Path(str(flag) + "." + version).touch()
while not flag.exists():
    time.sleep(0.01)
p = tracking.promote(name, version, fd, "e1", margin=0.01, tracking=t)
print(json.dumps({"decision": p.decision, "champion": p.champion_version}))
"""


def race(name: str, candidates: list[tuple[str, float]], tmp_path: Path) -> list[dict]:
    """Start one real process per (version, fd) promotion, release them together once all are
    imported and configured, and return each process's last JSON line."""
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, name, v, str(fd), str(go)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for v, fd in candidates]
    deadline = time.monotonic() + 120
    while not all(Path(f"{go}.{v}").exists() for v, _ in candidates) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        time.sleep(0.02)
    go.touch()
    res = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        res.append(json.loads(out.strip().splitlines()[-1]))
    return res


def test_racing_promotions_end_with_one_consistent_champion(store, tmp_path):
    t, name = store, "race-student-4step"
    v1, v2, v3 = _versions(t, name, 3)
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



def test_the_library_reads_no_fewstep_variable(store, tmp_path, monkeypatch):
    """FEWSTEP_* values in the environment change nothing in-process: the arguments decide (the
    entry points read the environment through fewstep.settings and pass the values)."""
    import re

    from fewstep.config import load_params

    for k, v in {"FEWSTEP_EXPERIMENT": "elsewhere", "FEWSTEP_ARTIFACT_ROOT": (tmp_path / "elsewhere").as_uri(),
                 "FEWSTEP_PARENT_RUN_ID": "0" * 32, "FEWSTEP_GIT_COMMIT": "bad" * 10,
                 "FEWSTEP_PROFILE": "no-such-profile"}.items():
        monkeypatch.setenv(k, v)
    t = tracking.configure(store.uri)
    assert (t.experiment, t.artifact_location) == ("fewstep", (tmp_path / "mlartifacts").as_uri())  # cwd: tmp_path
    run_id = tracking.record_stage("train_teacher", tracking_uri=store.uri, experiment="explicit",
                                   git_commit="c" * 40, repo=tmp_path)
    r = store.client.get_run(run_id)
    assert r.info.experiment_id == tracking.configure(store.uri, "explicit").experiment_id
    assert r.data.tags["git_commit"] == "c" * 40 and "mlflow.parentRunId" not in r.data.tags
    assert load_params(write_params(tmp_path / "params.yaml", tiny_params())).base  # no profile merged
    reads = re.compile(r"""(environ\.get|environ\[|getenv)\(?\s*["']FEWSTEP_""")
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "src" / "fewstep").rglob("*.py")
                 if p.name not in ("settings.py", "launch.py") and reads.search(p.read_text())]
    assert offenders == []  # settings.py reads them; launch.py is an entry point that uses it
