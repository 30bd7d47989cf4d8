"""MLflow tracking, registry lineage, the pyfunc sampler and champion promotion, on a real MLflow
(SQLite store in a temp dir, file artifacts; no mocks); fixtures in tests/conftest.py. The tests
that start processes (the register CLI, loading by alias in a fresh process, the promotion race) are
in tests/integration/test_registry_processes.py.

The library reads no FEWSTEP_* variable: in-process calls pass the store, experiment, artifact root,
parent run and commit explicitly; the FEWSTEP_* variables in ``store_env`` are for the stage
processes (entry points, which read them through fewstep.settings)."""

import functools
import os

import numpy as np
import pytest
import torch
import yaml

from fewstep import models, storage
from fewstep.images import save_grid
from tests.helpers import ROOT, tiny_params, write_params
from tests.mlflow_helpers import configure_env, model_versions, store_env, use_env

tracking = pytest.importorskip("fewstep.tracking")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch, torch_one_thread):
    """Never the repository's mlflow.db or mlartifacts/: a test that forgets its store gets an empty
    one here, and the default artifact root (<cwd>/mlartifacts) is under tmp_path."""
    use_env(monkeypatch, store_env(tmp_path / "unconfigured"))
    monkeypatch.chdir(tmp_path)


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
    use_env(monkeypatch, env)
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
    assert (olss_s.tags["olss_chosen_from"], olss_s.tags["olss_basis"], olss_s.tags["olss_method"]) == (
        "olss-open-2", "x", "beyond-paper")  # olss-N says which variant it is
    assert (olss_s.tags["parent_model"], olss_s.tags["parent_version"]) == ("cifar10-student-4step", student.version)
    assert (olss_t.tags["parent_model"], olss_t.tags["parent_version"]) == ("cifar10-teacher", teacher.version)
    assert olss_s.tags["trajectories_path"] == "trajectories/student-4"
    assert olss_s.tags["trajectories_hash"] == "dvc-md5:bbbb.dir"  # from dvc.lock
    assert olss_t.tags["trajectories_hash"].startswith("sha256:")  # not in dvc.lock: hashed from the files
    assert olss_s.tags["scheduler_sha256"] == storage.sha256_file(tree / "schedulers" / "student-4" / "olss-2.json")
    chain = tracking.lineage(olss_s.name, olss_s.version, tracking=configure_env(env))
    assert [(n, v) for n, v, _ in chain] == [(olss_s.name, olss_s.version), (student.name, student.version),
                                             (teacher.name, teacher.version)]


def test_evaluator_is_registered_and_loads_as_a_feature_pyfunc(registry, tree, monkeypatch):
    import mlflow

    from fewstep.train.evaluator import features, load_evaluator

    env, regs = registry
    use_env(monkeypatch, env)
    ev = regs["cifar10-evaluator"]
    cfg = storage.read_json(tree / "models" / "evaluator" / models.CONFIG)  # the evaluator's own config: no card
    assert ev.created and ev.tags["role"] == "evaluator" and ev.tags["weights_sha256"] == cfg["weights_sha256"]
    assert ev.tags["data_hash"] == models.load_card(tree / "models" / "teacher").lineage.data_hash
    assert ev.tags["test_accuracy"] == "0.5" and ev.tags["git_commit"] == "c0ffee" * 6 + "c0ff"
    configure_env(env)  # points mlflow's registry URI at the store
    m = mlflow.pyfunc.load_model(f"models:/cifar10-evaluator/{ev.version}")
    imgs = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    net, stats = load_evaluator(tree / "models" / "evaluator")
    want = features(net, torch.from_numpy(imgs).permute(0, 3, 1, 2).double().div(127.5).sub(1).float())
    np.testing.assert_allclose(m.predict(imgs), want, rtol=1e-5, atol=1e-6)
    probs = m.predict({"images": imgs, "output": "probs"})
    assert probs.shape == (5, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    with pytest.raises(Exception, match="uint8 images"):
        m.predict(imgs.astype(np.float32))


def test_promotion_moves_only_on_a_complete_better_evaluation(store):
    t, name = store, "toy-student-4step"
    v1, v2, v3, v4 = model_versions(t, name, 4)
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
