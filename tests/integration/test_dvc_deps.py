"""Every DVC stage depends on the code it runs (issue 15, point 1).

The project's own dvc.yaml and params.yaml with profiles/cpu-full.yaml applied (the full CPU run:
every stage kind, foreach and matrix expanded) in a temp git repo; every declared output is stood
in for by a placeholder and `dvc commit -f` records the lock, so no stage has to run. Then one code byte of
``src/fewstep/models.py`` changes and `dvc status` must report every stage that loads a model.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from fewstep.profiles import apply_profile
from tests.helpers import ROOT
from tests.integration.conftest import run

COPY = ("dvc.yaml", "params.yaml", "stages", "src", "profiles", "pyproject.toml")


def _placeholders(repo: Path) -> dict[str, dict]:
    """Create every declared output of every stage (a file if the name has a suffix, else a dir);
    return each stage's deps, outs and whether it is always changed."""
    code = ("import json\nfrom dvc.repo import Repo\n"
            "r = Repo('.')\n"
            "print(json.dumps({s.addressing: {'deps': [str(d.def_path) for d in s.deps],\n"
            "                                 'outs': [str(o.def_path) for o in s.outs],\n"
            "                                 'always': bool(s.always_changed)} for s in r.index.stages}))\n")
    stages = json.loads(run([sys.executable, "-c", code], repo).stdout.strip().splitlines()[-1])
    for stage in stages.values():
        for out in stage["outs"]:
            p = repo / out
            if p.suffix:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text("placeholder\n")
            else:
                p.mkdir(parents=True, exist_ok=True)
                (p / "placeholder").write_text(out)
    return stages


def _status(repo: Path) -> dict:
    out = run([sys.executable, "-m", "dvc", "status", "--json"], repo).stdout
    return json.loads(out[out.index("{"):])


@pytest.fixture
def locked_repo(tmp_path) -> tuple[Path, dict[str, dict]]:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(src, repo / name)
    (repo / "metrics/objective").mkdir(parents=True, exist_ok=True)
    apply_profile(repo / "params.yaml", "cpu-full")  # the lean default leaves the study stages out
    run(["git", "init", "-q", "-b", "main"], repo)
    run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    run([sys.executable, "-m", "dvc", "config", "core.check_update", "false"], repo)
    stages = _placeholders(repo)
    for _ in range(2):  # the first commit adds .gitignore files inside deps such as models/
        run([sys.executable, "-m", "dvc", "commit", "-f", "-q"], repo)
    return repo, stages


def test_a_code_byte_in_models_py_makes_every_model_loading_stage_changed(locked_repo):
    repo, stages = locked_repo
    always = {s for s, st in stages.items() if st["always"]}
    assert set(_status(repo)) <= always, "the freshly committed lock should be up to date"
    loaders = sorted(s for s, st in stages.items() if any(d == "models" or d.startswith("models/") for d in st["deps"]))
    kinds = {s.split("@")[0] for s in loaders}
    assert {"distill", "collect_trajectories", "fit_olss", "evaluate", "register", "ddim_study",
            "redundancy"} <= kinds, kinds
    assert {"study_teacher", "train_split"} <= {s.split("@")[0] for s in stages}  # cpu-full: every stage kind

    models_py = repo / "src/fewstep/models.py"
    lines = models_py.read_text().splitlines(keepends=True)
    i = next(i for i, line in enumerate(lines) if line.startswith("import "))
    lines[i] = lines[i].replace("import ", "import  ", 1)  # a code byte (still valid Python), not a comment
    models_py.write_text("".join(lines))

    changed = _status(repo)
    missing = [s for s in loaders if s not in changed]
    assert not missing, f"stages that load a model but do not see models.py change: {missing}"
    for s in sorted(set(stages) - always):  # and every stage runs the library, so every stage sees it
        deps = {k: v for entry in changed.get(s, []) if isinstance(entry, dict)
                for k, v in entry.get("changed deps", {}).items()}
        assert any(k in ("src/fewstep", "src/fewstep/models.py") for k in deps), (s, changed.get(s))
