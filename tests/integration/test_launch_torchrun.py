"""A real 2-process teacher stage under torchrun (gloo) writing its outputs once, from rank 0
(moved from tests/unit: it starts processes). The processes run in the test's temp dir."""

import subprocess
import sys

from fewstep import models, storage
from tests.helpers import subprocess_env, tiny_params, write_params, write_prepared


def test_teacher_stage_under_torchrun_with_two_processes(tmp_path):
    write_prepared(tmp_path / "data")
    write_params(tmp_path / "params.yaml", tiny_params(steps=4, batch_size=6, checkpoint_every=2, log_every=2))
    env = subprocess_env(FEWSTEP_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "fewstep.launch", "-m", "stages.train_teacher", "--params",
           str(tmp_path / "params.yaml"), "--data", str(tmp_path / "data"), "--model", str(tmp_path / "model"),
           "--checkpoints", str(tmp_path / "ckpt"), "--metrics", str(tmp_path / "metrics.json"),
           "--loss-csv", str(tmp_path / "loss.csv"), "--grid", str(tmp_path / "grid.png"), "--no-progress"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "torch.distributed.run --standalone --nproc-per-node 2" in r.stderr
    assert storage.read_json(tmp_path / "metrics.json")["world_size"] == 2
    weights = storage.sha256_file(tmp_path / "model" / "model.safetensors")
    assert models.load_card(tmp_path / "model").weights_sha256 == weights
    assert (tmp_path / "loss.csv").read_text().splitlines()[0] == "step,loss"
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert storage.read_json(tmp_path / "ckpt" / "latest.json")["step"] == 4
    assert r.stderr.count("train_teacher: done in") == 1  # one rank reports
