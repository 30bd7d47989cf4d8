"""stages.profile: a profile applied to params.yaml, and its smoke version (every size shrunk, every
stage kept) that dry-runs a GPU profile on a CPU."""

from __future__ import annotations

import shutil

import pytest
import yaml

from fewstep import budget
from fewstep.config import deep_merge, load_params, validate
from fewstep.profiles import smoke
from tests.helpers import ROOT


def _structure(p):
    return {
        "rounds": {n: (p.distill.round(n).parent, p.distill.round(n).steps) for n in p.distill.rounds},
        "study": p.study.patch_sizes,
        "split": sorted(p.split.models),
        "objective": (p.objective.variants, p.objective.patch_sizes),
        "olss": (p.olss.models, p.olss.steps),
        "trajectories": p.trajectories.models,
        "peers": p.evaluate.peers,
        "nets": p.teacher.net.model_dump(),
        "image_size": p.base.image_size,
    }


@pytest.mark.parametrize("profile", ["gpu", "gpu-full", "ddpm-cifar10"])
def test_smoke_keeps_every_stage_and_shrinks_every_size(profile):
    raw = deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                     yaml.safe_load((ROOT / "profiles" / f"{profile}.yaml").read_text()))
    full, small = validate(raw), validate(smoke(raw))
    assert _structure(small) == _structure(full)
    assert small.teacher.steps <= 4 and small.evaluate.n_samples == 10
    assert all(small.distill.round(n).train_steps <= 2 for n in small.distill.rounds)
    assert max(small.evaluate.ddim_steps + small.evaluate.eta_steps) <= small.evaluate.reference_steps == 64
    work_full = sum(w.gflop for w in budget.project(full))
    work_small = sum(w.gflop for w in budget.project(small))
    assert work_small < 1e-3 * work_full  # minutes on a CPU instead of GPU-hours


def test_profile_cli_writes_validated_params(tmp_path, capsys):
    from stages import profile

    (tmp_path / "profiles").mkdir()
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(ROOT / "profiles" / "gpu.yaml", tmp_path / "profiles" / "gpu.yaml")

    def run(*a):  # in-process: the CLI's exit code and its stderr
        capsys.readouterr()
        try:
            profile.main([*a, "--params", str(tmp_path / "params.yaml")])
            code = 0
        except SystemExit as e:
            code = e.code
        return code, capsys.readouterr().err

    code, err = run("gpu", "--smoke")
    assert code == 0, err
    p = load_params(tmp_path / "params.yaml")
    assert p.base.image_size == 32 and p.teacher.steps == 4 and "student-1" in p.distill.rounds
    assert "smoke sizes" in (tmp_path / "params.yaml").read_text().splitlines()[0]
    code, err = run("nope")
    assert code == 2 and "does not exist" in err
    (tmp_path / "profiles" / "bad.yaml").write_text("teacher: {steps: -1}\n")
    code, err = run("bad")
    assert code == 2 and "teacher.steps" in err
