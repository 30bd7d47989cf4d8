"""The README tells the truth by construction: its results blocks are what benchmarks/readme.py
makes from the committed metrics, and every file and image it references exists."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.helpers import ROOT

README = ROOT / "README.md"
# paths the README names that are not in the repository by design: made by `dvc repro` (or inside
# its output dirs, e.g. data/prepared/manifest.json), by the user, or example outputs of a command
MADE_BY_RUN = ("data/", "models/", "checkpoints/", "trajectories/", "schedulers/", "registry/", "mlflow.db",
               ".services/", "mlartifacts/", "dvc_plots/")
EXAMPLE_OUTPUTS = {"manifest.json", "samples/interp.png", "interp_test.png", "latents.safetensors", "rec.png",
                   "a.png", "b.png"}


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "readme.py"), *args], capture_output=True,
                          text=True, timeout=120)


def test_generated_blocks_equal_what_the_metrics_give(tmp_path):
    r = _check("--check")
    assert r.returncode == 0, r.stderr
    text = README.read_text()
    names = re.findall(r"<!-- generated:([a-z0-9-]+) -->", text)
    assert {"evaluation", "pareto", "teacher", "redundancy", "ddim-study"} <= set(names)
    assert len(names) == len(set(names)) == text.count("<!-- /generated:")
    # the check can fail: a typed number inside a block is caught
    stale = tmp_path / "README.md"
    for p in ("metrics", "reports"):
        (tmp_path / p).symlink_to(ROOT / p)
    stale.write_text(text.replace("<!-- generated:teacher -->\n", "<!-- generated:teacher -->\n865 img/s\n", 1))
    r = _check("--check", "--readme", str(stale))
    assert r.returncode == 1 and "stale" in r.stderr


def _referenced_paths(text: str) -> set[str]:
    images = set(re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text))
    links = set(re.findall(r"\]\(([^)\s#]+)\)", text)) - images
    code = set(re.findall(r"`([A-Za-z0-9_.\-/]+\.(?:png|md|json|yaml|yml|py|csv|sh|txt|toml))`", text))
    code |= set(re.findall(r"(?<![\w./-])((?:benchmarks|stages|flows|infra|tests|src|profiles|reports|samples|study|"
                           r"metrics|plots)/[A-Za-z0-9_.\-/]+\.(?:png|md|json|yaml|yml|py|csv|sh|txt|toml))", text))
    return {p for p in images | links | code if "://" not in p and "<" not in p and "*" not in p and "{" not in p}


def test_every_file_and_image_the_readme_references_exists():
    paths = _referenced_paths(README.read_text())
    assert "reports/pareto.png" in paths and "benchmarks/readme.py" in paths  # the scan finds references
    missing = sorted(p for p in paths if not p.startswith(MADE_BY_RUN) and p not in EXAMPLE_OUTPUTS
                     and not p.startswith("../") and not (ROOT / p).exists())
    assert not missing, f"README.md references files that do not exist: {missing}"
