"""python -m fewstep.launch: world size from flag/env/params, torchrun command lines, a real
2-process teacher stage under torchrun (gloo) writing its outputs once, from rank 0."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from fewstep import launch, models, storage
from tests.helpers import ROOT, tiny_params, write_params, write_prepared


def _dry(args, env=None, cwd=ROOT):
    e = {k: v for k, v in os.environ.items() if k not in ("FEWSTEP_WORLD_SIZE", "FEWSTEP_NNODES", "WORLD_SIZE",
                                                           "RANK", "TORCHELASTIC_RUN_ID")}
    e.update(env or {})
    r = subprocess.run([sys.executable, "-m", "fewstep.launch", "--dry-run", *args], cwd=cwd, env=e,
                       capture_output=True, text=True, timeout=120)
    return r


def test_world_size_comes_from_flag_then_env_then_params(tmp_path, monkeypatch):
    for k in ("FEWSTEP_WORLD_SIZE", "FEWSTEP_NNODES"):
        monkeypatch.delenv(k, raising=False)
    p = tiny_params()
    p["distributed"] = {"world_size": 4, "nnodes": 2}
    params = str(write_params(tmp_path / "params.yaml", p))
    assert launch.resolve(None, None, ["--params", params]) == (4, 2)
    monkeypatch.setenv("FEWSTEP_WORLD_SIZE", "2")
    assert launch.resolve(None, None, ["--params", params]) == (2, 2)
    assert launch.resolve(3, 1, ["--params", params]) == (3, 1)  # the flags win, params not needed
    with pytest.raises(launch.LaunchError, match="evenly"):
        launch.resolve(3, 2, [])
    monkeypatch.setenv("FEWSTEP_WORLD_SIZE", "two")
    with pytest.raises(launch.LaunchError, match="integer"):
        launch.resolve(None, 1, [])
    monkeypatch.delenv("FEWSTEP_WORLD_SIZE")
    p["distributed"] = {"world_size": 0, "nnodes": 1}  # one per visible GPU; none here = 1 process
    write_params(tmp_path / "params.yaml", p)
    assert launch.resolve(None, None, ["--params", params]) == (max(1, launch.visible_gpus()), 1)


def test_torchrun_command_lines(monkeypatch):
    monkeypatch.delenv("FEWSTEP_RDZV_ENDPOINT", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    cmd = launch.torchrun_argv("stages.train_teacher", ["--no-progress"], 4, 1)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", "-m",
                       "stages.train_teacher", "--no-progress"]
    with pytest.raises(launch.LaunchError, match="rendezvous"):
        launch.torchrun_argv("stages.evaluate", [], 16, 2)
    monkeypatch.setenv("MASTER_ADDR", "node0")
    cmd = shlex.join(launch.torchrun_argv("stages.evaluate", [], 16, 2))
    assert "--nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node0:29400" in cmd
    monkeypatch.setenv("FEWSTEP_RDZV_ENDPOINT", "10.0.0.5:1234")
    assert "--rdzv-endpoint 10.0.0.5:1234" in shlex.join(launch.torchrun_argv("stages.evaluate", [], 16, 2))


def test_cli_runs_one_process_plainly_and_reports_bad_input(tmp_path, capsys, monkeypatch):
    r = _dry(["-m", "stages.train_teacher", "--no-progress"], {"FEWSTEP_WORLD_SIZE": "1"})
    assert r.returncode == 0 and r.stdout.split()[1:] == ["-m", "stages.train_teacher", "--no-progress"]
    for k in ("FEWSTEP_WORLD_SIZE", "FEWSTEP_NNODES", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    launch.main(["--nproc", "2", "--dry-run", "-m", "stages.collect_trajectories"])
    assert "torch.distributed.run --standalone --nproc-per-node 2 -m stages.collect_trajectories" in capsys.readouterr().out
    for argv, msg in (([ "--dry-run", "-m", "stages.evaluate", "--params", str(tmp_path / "missing.yaml")],
                       "params file not found"), (["stages.evaluate"], "usage")):
        with pytest.raises(SystemExit) as e:
            launch.main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_teacher_stage_under_torchrun_with_two_processes(tmp_path):
    write_prepared(tmp_path / "data")
    write_params(tmp_path / "params.yaml", tiny_params(steps=4, batch_size=6, checkpoint_every=2, log_every=2))
    env = {**os.environ, "FEWSTEP_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fewstep.launch", "-m", "stages.train_teacher", "--params",
           str(tmp_path / "params.yaml"), "--data", str(tmp_path / "data"), "--model", str(tmp_path / "model"),
           "--checkpoints", str(tmp_path / "ckpt"), "--metrics", str(tmp_path / "metrics.json"),
           "--loss-csv", str(tmp_path / "loss.csv"), "--grid", str(tmp_path / "grid.png"), "--no-progress"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "torch.distributed.run --standalone --nproc-per-node 2" in r.stderr
    assert storage.read_json(tmp_path / "metrics.json")["world_size"] == 2
    weights = storage.sha256_file(tmp_path / "model" / "model.safetensors")
    assert models.load_card(tmp_path / "model").weights_sha256 == weights
    assert (tmp_path / "loss.csv").read_text().splitlines()[0] == "step,loss"
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert storage.read_json(tmp_path / "ckpt" / "latest.json")["step"] == 4
    assert r.stderr.count("train_teacher: done in") == 1  # one rank reports
