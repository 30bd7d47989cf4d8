"""fewstep.tracking against real services: an MLflow tracking server proxying artifacts to moto S3
(registration, promotion without the SQLite file lock, loading by alias in a fresh process), and an
embedded SQLite store whose experiment writes artifacts straight to s3:// (FEWSTEP_ARTIFACT_ROOT).
The models are untrained tiny UNets: what is tested is the plumbing, not sample quality."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch

from fewstep import models, storage
from fewstep.images import to_uint8
from fewstep.math.ddim import generate
from fewstep.math.schedules import timesteps
from fewstep.nets.unet import UNet, UNetConfig
from infra.local import services
from tests.mlflow_helpers import LOAD_SAMPLER, build_tree, one_thread, race

tracking = pytest.importorskip("fewstep.tracking")


def _random_teacher(out: Path) -> None:
    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=8, channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                          head_dim=8, dropout=0.0))
    meta = {"role": "teacher", "parameterization": "v", "weighting": "snr+1", "image_size": 8, "dataset": "cifar10",
            "schedule": {"kind": "cosine", "T": 64, "logsnr_min": -20.0, "logsnr_max": 20.0},
            "class_names": ["red", "blue"], "data_hash": "d" * 64, "params_hash": "p" * 64, "run_hash": "r" * 64,
            "train_steps": 0, "sample_steps": 64, "parent": None}
    models.save_model(out / "teacher", net, meta)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    src, d = tmp_path_factory.mktemp("teacher"), tmp_path_factory.mktemp("tree")
    with one_thread():
        _random_teacher(src)
        build_tree(src, d)
    return d


def _s3_keys(endpoint: str, bucket: str, prefix: str) -> list[str]:
    s3 = boto3.client("s3", endpoint_url=endpoint)
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]


def test_registry_on_a_tracking_server_with_s3_artifacts(mlflow_server, moto_server, tree, tmp_path, monkeypatch):
    env = {"MLFLOW_TRACKING_URI": mlflow_server.base, "FEWSTEP_EXPERIMENT": "server-test", "OMP_NUM_THREADS": "1",
           "FEWSTEP_GIT_COMMIT": "f" * 40}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("FEWSTEP_ARTIFACT_ROOT", raising=False)  # (the env is for the subprocesses below)
    t = tracking.configure(mlflow_server.base, "server-test")
    assert t.artifact_location.startswith("mlflow-artifacts:")  # the server's proxied store
    kw = dict(repo=tree, git_commit="f" * 40, tracking=t)
    with one_thread():
        regs = {r.name: r for r in tracking.register_all(tree / "models", tree / "schedulers", **kw)}
        again = tracking.register_all(tree / "models", tree / "schedulers", **kw)
    assert len(regs) == 5 and not any(r.created for r in again)
    assert regs["cifar10-olss-student-4-2step"].tags["parent_version"] == regs["cifar10-student-4step"].version
    assert any(k.endswith("model.safetensors") for k in _s3_keys(moto_server.base, "fewstep-mlflow", "mlflow/"))

    name = "cifar10-student-4step"
    v1 = regs[name].version
    assert regs[name].tags["git_commit"] == "f" * 40
    assert tracking.promote(name, v1, 10.0, "e1", margin=0.01, tracking=t).promoted
    r = subprocess.run([sys.executable, "-c", LOAD_SAMPLER, json.dumps({"ddim": f"models:/{name}@champion"}),
                        str(tmp_path / "out.npz")], cwd=tmp_path, env=dict(os.environ), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with one_thread():
        student = models.load_denoiser(tree / "models" / "student-4")
        ref = to_uint8(generate(student, range(5, 8), (3, 8, 8), timesteps(64, 4)))
    np.testing.assert_array_equal(np.load(tmp_path / "out.npz")["ddim"], ref)

    # two promotions racing through the server: no file lock, only the optimistic re-checks
    lm = [t.client.create_logged_model(t.experiment_id, name="toy") for _ in range(2)]
    v2, v3 = (str(t.client.create_model_version(name, f"models:/{m.model_id}", model_id=m.model_id).version)
              for m in lm)
    race(name, [(v2, 8.0), (v3, 6.0)], tmp_path)
    rm = t.client.get_registered_model(name)
    assert str(rm.aliases["champion"]) == v3
    assert (rm.tags["champion.version"], rm.tags["champion.fd"]) == (v3, "6.0")


def test_embedded_store_with_artifacts_straight_to_s3(moto_server, service_env, tree, tmp_path, monkeypatch):
    services.create_bucket(moto_server.base, "fewstep-direct", service_env)
    for k, v in {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "FEWSTEP_EXPERIMENT": "direct",
                 "FEWSTEP_ARTIFACT_ROOT": "s3://fewstep-direct/mlflow", "AWS_ENDPOINT_URL": moto_server.base}.items():
        monkeypatch.setenv(k, v)
    t = tracking.configure(f"sqlite:///{tmp_path / 'mlflow.db'}", "direct", "s3://fewstep-direct/mlflow")
    assert t.artifact_location == "s3://fewstep-direct/mlflow"
    with one_thread():
        reg = tracking.register_model_dir(tree / "models" / "teacher", default_steps=4, repo=tree, tracking=t)
        with tracking.stage_run("train_teacher", repo=tree, tracking=t) as run:
            run.log_metrics({"loss": [(0, 1.0), (1, 0.5)]})
            run.log_artifact(tree / "models" / "teacher" / "config.json", "model")
        keys = _s3_keys(moto_server.base, "fewstep-direct", "mlflow/")
        assert any(k.endswith(f"{run.run_id}/artifacts/model/config.json") for k in keys)
        assert any(k.endswith("artifacts/model.safetensors") for k in keys)
        import mlflow

        m = mlflow.pyfunc.load_model(f"models:/{reg.name}/{reg.version}")  # downloads from S3
        teacher = models.load_denoiser(tree / "models" / "teacher")
        ref = to_uint8(generate(teacher, range(0, 2), (3, 8, 8), timesteps(64, 4)))
        np.testing.assert_array_equal(m.predict({"n": 2, "seed": 0}), ref)  # default_steps=4
    assert storage.sha256_file(tree / "models" / "teacher" / models.WEIGHTS) == reg.tags["weights_sha256"]
