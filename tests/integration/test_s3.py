"""S3 on a real moto server: a DVC remote (push, fresh clone, pull), the data loader reading
s3:// sources, and an S3 endpoint that is down (a clear, bounded failure that writes nothing;
the Prefect task retries, then fails with the stage's message)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import boto3
import numpy as np
from PIL import Image

from fewstep.data import load_images
from infra.local import services
from tests.helpers import ROOT, tiny_images
from tests.integration.conftest import image_tar, micro, repo_env, run
from tests.integration.servers import http_json, stop_and_check


def _s3(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint)


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_dvc_remote_push_then_clone_and_pull_is_byte_identical(make_tiny_repo, moto_server, tmp_path):
    repo = make_tiny_repo(tweak=micro)
    dvc = [sys.executable, "-m", "dvc"]
    run([*dvc, "repro", "train_teacher"], repo)  # prepare_data + train_teacher: arrays and safetensors
    services.create_bucket(moto_server.base, "dvc-remote")
    run([*dvc, "remote", "add", "-d", "s3", "s3://dvc-remote/store"], repo)
    run([*dvc, "remote", "modify", "s3", "endpointurl", moto_server.base], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "outputs and an S3 remote"], repo)
    t0 = time.monotonic()
    run([*dvc, "push"], repo)
    push_s = time.monotonic() - t0
    keys = [o["Key"] for o in _s3(moto_server.base).list_objects_v2(Bucket="dvc-remote")["Contents"]]
    assert keys and all(k.startswith("store/files/md5/") for k in keys)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / "models/teacher").exists()
    t0 = time.monotonic()
    run([*dvc, "pull", "--with-deps", "train_teacher"], clone)  # keys from AWS_* env; endpoint: .dvc/config
    pull_s = time.monotonic() - t0
    for out in ("data/prepared", "models/teacher"):
        assert _digests(clone / out) == _digests(repo / out) != {}, out
    assert (clone / "models/teacher/model.safetensors").is_file()
    print(f"dvc push {push_s:.1f} s, clone + pull {pull_s:.1f} s, {len(keys)} objects")


def test_loader_reads_s3_tarball_and_folder(moto_server, tmp_path, monkeypatch):
    s3 = _s3(moto_server.base)
    services.create_bucket(moto_server.base, "fewstep-data")
    tar = image_tar(tmp_path / "train.tar.gz", 24)
    s3.upload_file(str(tar), "fewstep-data", "cifar/train.tar.gz")
    imgs, labels = tiny_images(6, 8, seed=3)
    for i, (im, lab) in enumerate(zip(imgs, labels)):  # an ImageFolder under a prefix
        f = tmp_path / f"{i}.png"
        Image.fromarray(im).save(f)
        s3.upload_file(str(f), "fewstep-data", f"folder/{['red', 'blue'][lab]}/{i:03d}.png")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.base)

    remote = load_images("s3://fewstep-data/cifar/train.tar.gz", 8, progress=False)
    local = load_images(str(tar), 8, progress=False)
    assert remote.class_names == local.class_names == ["blue", "red"]
    np.testing.assert_array_equal(remote.images, local.images)
    np.testing.assert_array_equal(remote.labels, local.labels)

    folder = load_images("s3://fewstep-data/folder", 8, progress=False)
    assert len(folder) == 6 and folder.images.dtype == np.uint8
    order = np.argsort([f"{['red', 'blue'][lab]}/{i:03d}" for i, lab in enumerate(labels)], kind="stable")
    np.testing.assert_array_equal(folder.images, imgs[order])


def _s3_repo(make_tiny_repo, bucket: str) -> Path:
    def tweak(p):
        micro(p)
        p["prepare"].update(train_source=f"s3://{bucket}/train.tar.gz", test_source=f"s3://{bucket}/test.tar.gz")

    return make_tiny_repo(tweak=tweak)


def test_s3_down_fails_fast_clearly_and_writes_nothing(make_tiny_repo, service_env, state_dir, prefect_server,
                                                       tmp_path):
    # a moto of its own, loaded with the data, checked, then stopped: the endpoint is down
    moto = services.ready(lambda: services.start_moto(state_dir / "moto-fault", service_env))
    services.create_bucket(moto.base, "fewstep-fault")
    for split, seed in (("train", 0), ("test", 1)):
        _s3(moto.base).upload_file(str(image_tar(tmp_path / f"{split}.tar.gz", 16, seed)), "fewstep-fault",
                                   f"{split}.tar.gz")
    repo = _s3_repo(make_tiny_repo, "fewstep-fault")
    env = dict(repo_env(), AWS_ENDPOINT_URL=moto.base)
    stage = [sys.executable, "-m", "stages.prepare_data", "--no-progress"]
    up = subprocess.run(stage + ["--out", str(tmp_path / "while-up")], cwd=repo, env=env, capture_output=True,
                        text=True, timeout=120)
    assert up.returncode == 0, up.stderr[-2000:]
    stop_and_check(moto)
    url = "s3://fewstep-fault/train.tar.gz"

    # (1) the stage alone: rc 2, one line naming the URL, bounded, nothing written
    t0 = time.monotonic()
    r = subprocess.run(stage, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert f"prepare_data: error: cannot open {url}" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert took < 60, f"a dead endpoint took {took:.0f} s to fail"
    assert not (repo / "data/prepared").exists() and not list((repo / "data").glob("*"))

    # (2) the flow on the real Prefect server: the task retries once, then the run fails with the
    # stage's message; still nothing written
    _, client = prefect_server
    fenv = dict(env, **client)
    t0 = time.monotonic()
    flow = [sys.executable, str(ROOT / "flows/pipeline.py"), "--repo", str(repo), "--stages", "prepare_data",
            "--retries", "1", "--retry-delay-s", "0", "--after"]  # --after with nothing: no register step
    f = subprocess.run(flow, cwd=tmp_path, env=fenv, capture_output=True, text=True, timeout=300)
    flow_s = time.monotonic() - t0
    out = f.stdout + f.stderr
    assert f.returncode != 0, out[-3000:]
    assert "dvc repro prepare_data failed with exit code" in out and f"cannot open {url}" in out, out[-3000:]
    assert not (repo / "data/prepared").exists()
    api = client["PREFECT_API_URL"]
    failed = http_json(f"{api}/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["FAILED"]}}},
                                                   "flows": {"name": {"any_": ["fewstep-pipeline"]}}})
    (fr,) = [r for r in failed if r["parameters"].get("repo") == str(repo)]
    (tr,) = [t for t in http_json(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [fr["id"]]}}})
             if t["name"].startswith("repro prepare_data")]
    assert (tr["state_type"], tr["run_count"]) == ("FAILED", 2)
    print(f"dead S3: stage failed in {took:.1f} s; flow with 1 retry failed in {flow_s:.1f} s")
