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


def _resolved(*profiles: str) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name in profiles:
        raw = deep_merge(raw, yaml.safe_load((ROOT / "profiles" / f"{name}.yaml").read_text()) or {})
    dump = validate(raw).model_dump(mode="json")
    ev = validate(raw).evaluate
    dump["evaluate"]["n_headline"] = ev.headline_n if ev.headline_n > ev.n_samples else 0  # <= n_samples: off
    return dump


def test_cpu_full_pins_every_key_of_the_default_so_its_results_stay_reproducible():
    """profiles/cpu-full.yaml is the previous CPU default in full: nothing of params.yaml shows through
    it (a key the default gains, the teacher's included, must be pinned there at the old behaviour)."""
    full_alone = validate(yaml.safe_load((ROOT / "profiles/cpu-full.yaml").read_text()))
    assert validate(deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                               yaml.safe_load((ROOT / "profiles/cpu-full.yaml").read_text()))) == full_alone
    p = full_alone
    assert p.study.patch_sizes == [1, 4] and list(p.split.models) == ["teacher-split"]
    assert p.redundancy.scope == ["teachers"] and p.ddim_study.models == ["teacher"]
    assert len(p.evaluate.peers) == 7 and p.evaluate.eta_steps == [8, 64] and p.evaluate.headline_n == 2000
    assert p.distill.round("student-2").train_steps == 400 and p.evaluator.steps == 1200


def test_the_lean_default_runs_every_method_and_leaves_the_studies_to_cpu_full():
    p = load_params(ROOT / "params.yaml")
    rounds = {n: (p.distill.round(n).parent, p.distill.round(n).steps) for n in p.distill.rounds}
    assert sorted(s for _, s in rounds.values()) == [2, 4] and rounds["student-2"][0] == "student-4"
    assert rounds["student-4"][0] == "teacher"  # each round halves its parent's steps: 8 -> 4 -> 2
    assert p.olss.steps == [4, 8] and p.olss.models == ["teacher"] and p.olss.closed_loop and p.olss.ridge_variant
    assert p.evaluate.reference_steps == 64 and {2, 4, 8, 64} <= set(p.evaluate.ddim_steps)
    assert not (p.study.patch_sizes or p.split.models or p.objective.variants or p.redundancy.scope
                or p.ddim_study.models or p.evaluate.peers or p.evaluate.eta_steps)
    assert p.evaluate.headline_n == p.evaluate.n_samples  # no second block


# cpu-hour is left out: it was written for the lean default (its rounds 8 -> 4 -> 2 are the default's)
@pytest.mark.parametrize("profile", ["gpu", "gpu-full", "ddpm-cifar10", "cpu-cond"])
def test_the_lean_default_changes_no_other_profile(profile):
    """Each profile resolves over the lean default as it did over the previous one (cpu-full), the
    teacher section aside (the default's teacher recipe is the default's to change)."""
    before, now = _resolved("cpu-full", profile), _resolved(profile)
    before.pop("teacher"), now.pop("teacher")
    assert now == before


@pytest.mark.parametrize("profile", ["cpu-cond", "gpu", "gpu-full"])
def test_profiles_made_or_sized_with_the_previous_recipe_keep_its_teacher(profile):
    """cpu-cond's results (results/cpu-cond) and the GPU profiles' sizing were made with the previous
    recipe's noise levels (t uniform); cpu-cond also with its optimiser settings: the default's new
    recipe must not show through (teacher section included, unlike the test above)."""
    before, now = _resolved("cpu-full", profile), _resolved(profile)
    if profile == "cpu-cond":
        assert now["teacher"] == before["teacher"]
    assert "t_sampling" not in now["teacher"]  # uniform: omitted from the dump, as before the key existed
