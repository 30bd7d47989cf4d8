"""Helpers for the MLflow tests (unit and integration): temp stores, a registered model tree, a
pyfunc loader script and a promotion race between real processes. Plain functions; the fixtures that
use them live in tests/conftest.py. The library reads no FEWSTEP_* variable: in-process calls pass
the store explicitly (``configure_env``); the FEWSTEP_* variables of ``store_env`` are for the
entry-point processes (stages, these scripts), which read them through fewstep.settings."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from fewstep import models, storage
from fewstep.math.olss import fit_weights, uniform_path
from fewstep.math.schedules import timesteps
from fewstep.trajectories import load_subsample, write_shards

QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
         "OMP_NUM_THREADS": "1"}  # tiny nets: a second thread only contends


def store_env(d: Path) -> dict[str, str]:
    return {**QUIET, "MLFLOW_TRACKING_URI": f"sqlite:///{d / 'mlflow.db'}",
            "FEWSTEP_ARTIFACT_ROOT": (d / "artifacts").as_uri(), "FEWSTEP_EXPERIMENT": "fewstep-test"}


def configure_env(env: dict[str, str]):
    """The store, experiment and artifact root of ``env`` (what a stage would read), passed explicitly."""
    from fewstep import tracking

    return tracking.configure(env["MLFLOW_TRACKING_URI"], env["FEWSTEP_EXPERIMENT"], env["FEWSTEP_ARTIFACT_ROOT"])


def use_env(monkeypatch, env: dict[str, str]) -> None:
    for k in ("FEWSTEP_PARENT_RUN_ID", "FEWSTEP_GIT_COMMIT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


@contextmanager
def one_thread():
    """The nets here are tiny: on a busy 2-core box a second torch thread makes sampling ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def perturbed_student(teacher_dir: Path, out: Path, steps: int) -> None:
    net, card = models.load_net(teacher_dir)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    student = card.updated(role="student", sample_steps=steps, params_hash=storage.sha256_json({"student": steps}),
                           parent={"path": str(teacher_dir), "weights_sha256": card.weights_sha256,
                                   "sample_steps": 2 * steps, "role": "teacher"})
    models.save_model(out, net, student)


def build_tree(tiny_teacher: Path, d: Path) -> None:
    shutil.copytree(tiny_teacher / "teacher", d / "models" / "teacher")
    perturbed_student(d / "models" / "teacher", d / "models" / "student-4", 4)
    for name, n_ref in (("teacher", 8), ("student-4", 4)):
        den = models.load_denoiser(d / "models" / name)
        t_path = timesteps(den.schedule.T, n_ref)
        tdir = d / "trajectories" / name
        write_shards(tdir, den, range(100, 108), den.card.image_shape, t_path, 8, 8, torch.device("cpu"),
                     {"model": name, "model_weights_sha256": den.card.weights_sha256}, progress=False)
        X, E = load_subsample(tdir, 10**6)
        sched = fit_weights(X, E, uniform_path(n_ref, 2), t_path)
        sched.meta = {"model": name, "model_weights_sha256": den.card.weights_sha256, "variant": "open-loop",
                      "method": "beyond-paper", "chosen_from": "olss-open-2",  # a headline olss-N, as fit_olss writes
                      "trajectories": f"trajectories/{name}", "reference_steps": n_ref}
        storage.atomic_write_bytes(d / "schedulers" / name / "olss-2.json", sched.to_json().encode())
    tiny_evaluator(d / "models" / "evaluator", models.load_card(d / "models" / "teacher").lineage.data_hash)
    lock = {"schema": "2.0", "stages": {
        "distill@student-4": {"cmd": "python -m stages.distill --round student-4",
                              "outs": [{"path": "models/student-4", "md5": "aaaa.dir"}]},
        "collect_trajectories@student-4": {"cmd": "python -m stages.collect_trajectories --model student-4",
                                           "outs": [{"path": "trajectories/student-4", "md5": "bbbb.dir"}]}}}
    (d / "dvc.lock").write_text(yaml.safe_dump(lock))


def tiny_evaluator(out: Path, data_hash: str) -> None:
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


LOAD_SAMPLER = """
import json, sys, mlflow, numpy as np
out = {}
for key, uri in json.loads(sys.argv[1]).items():
    m = mlflow.pyfunc.load_model(uri)
    out[key] = m.predict({"n": 3, "seed": 5})
    out[key + "_one"] = m.predict({"n": 1, "seed": 6})
np.savez(sys.argv[2], **out)
print(sys.modules["fewstep"].__file__)
"""


def model_versions(t, name: str, n: int) -> list[str]:
    t.client.create_registered_model(name)
    out = []
    for _ in range(n):
        lm = t.client.create_logged_model(t.experiment_id, name="toy")
        out.append(str(t.client.create_model_version(name, f"models:/{lm.model_id}", model_id=lm.model_id).version))
    return out


RACE = """
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
    procs = [subprocess.Popen([sys.executable, "-c", RACE, name, v, str(fd), str(go)], cwd=tmp_path,
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
