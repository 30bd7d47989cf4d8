"""The CPU default is bitwise reproducible from scratch: two fresh processes train the tiny profile
(with the repository's `base` section, so its pinned thread count) under different inherited thread
settings and write identical bytes. See the README, *Reproducibility*, for where it stops."""

import subprocess
import sys

import yaml

from fewstep import storage
from tests.helpers import ROOT, subprocess_env, tiny_params, write_params, write_prepared


def _train(d, omp: str) -> None:
    write_prepared(d / "data", n=64)
    write_params(d / "params.yaml", tiny_params(steps=30, checkpoint_every=10, log_every=10))
    cmd = [sys.executable, "-m", "stages.train_teacher", "--params", str(d / "params.yaml"), "--data", str(d / "data"),
           "--model", str(d / "model"), "--checkpoints", str(d / "ckpt"), "--metrics", str(d / "metrics.json"),
           "--loss-csv", str(d / "loss.csv"), "--grid", str(d / "grid.png"), "--no-progress"]
    env = subprocess_env(OMP_NUM_THREADS=omp, MKL_NUM_THREADS=omp, FEWSTEP_TRACKING="off")
    r = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_the_cpu_default_pins_its_thread_count():
    base = yaml.safe_load((ROOT / "params.yaml").read_text())["base"]
    assert base["threads"] >= 1, "base.threads: 0 follows the machine and OMP_NUM_THREADS: not reproducible"


def test_two_trainings_from_scratch_give_identical_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, omp in ((a, "1"), (b, "2")):  # what the environment says must not matter
        d.mkdir()
        _train(d, omp)
    weights = [storage.sha256_file(d / "model" / "model.safetensors") for d in (a, b)]
    assert weights[0] == weights[1]
    assert (a / "loss.csv").read_bytes() == (b / "loss.csv").read_bytes()
    assert (a / "grid.png").read_bytes() == (b / "grid.png").read_bytes()
