"""The README tells the truth by construction: its results blocks are what benchmarks/readme.py
makes from the committed metrics, and every file and image it references exists."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

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
    names = re.findall(r"<!-- generated:([a-z0-9@-]+) -->", text)
    assert {"evaluation", "pareto", "teacher", "ranking", "ranking@cpu-full", "redundancy@cpu-full",
            "ddim-study@cpu-full", "study-rows@cpu-full"} <= set(names)
    assert len(names) == len(set(names)) == text.count("<!-- /generated:")
    # the check can fail: a typed number inside a block is caught
    stale = tmp_path / "README.md"
    for p in ("metrics", "reports", "results"):
        (tmp_path / p).symlink_to(ROOT / p)
    stale.write_text(text.replace("<!-- generated:teacher -->\n", "<!-- generated:teacher -->\n865 img/s\n", 1))
    r = _check("--check", "--readme", str(stale))
    assert r.returncode == 1 and "stale" in r.stderr


def _referenced_paths(text: str) -> set[str]:
    images = set(re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text))
    links = set(re.findall(r"\]\(([^)\s#]+)\)", text)) - images
    code = set(re.findall(r"`([A-Za-z0-9_.\-/]+\.(?:png|md|jsonl|json|yaml|yml|py|csv|sh|txt|toml))`", text))
    code |= set(re.findall(r"(?<![\w./-])((?:benchmarks|stages|flows|infra|tests|src|profiles|reports|samples|study|"
                           r"metrics|plots)/[A-Za-z0-9_.\-/]+\.(?:png|md|jsonl|json|yaml|yml|py|csv|sh|txt|toml))", text))
    return {p for p in images | links | code if "://" not in p and "<" not in p and "*" not in p and "{" not in p}


def test_every_file_and_image_the_readme_references_exists():
    paths = _referenced_paths(README.read_text())
    assert "reports/pareto.png" in paths and "benchmarks/readme.py" in paths  # the scan finds references
    missing = sorted(p for p in paths if not p.startswith(MADE_BY_RUN) and p not in EXAMPLE_OUTPUTS
                     and not p.startswith("../") and not (ROOT / p).exists())
    assert not missing, f"README.md references files that do not exist: {missing}"


def _synthetic_metrics(root):
    import json

    def row(nfe, fd, lo, hi, n=2000, **kw):
        block = {"n": n, "fd": fd, "fd_lo": lo, "fd_hi": hi, "kid": 0.1, "kid_se": 0.004, "recall": 0.6,
                 "dup_rate": 0.01, "rmse": 0.05, "rmse_lo": 0.045, "rmse_hi": 0.055}
        return {**block, "n": 500, "nfe": nfe, "headline": block, **kw}

    rows = {"teacher ddim 64": row(64, 30.4, 29.5, 31.3, is_reference=True),
            "teacher olss-4": row(4, 29.8, 28.9, 30.9), "teacher olss-paper-4": row(4, 31.0, 30.0, 32.0),
            "student-8 ddim 8": row(8, 29.9, 29.0, 30.8),
            "student-4 ddim 4": row(4, 33.9, 32.8, 34.9), "teacher ddim 4": row(4, 53.6, 51.0, 56.0)}
    # student-8: inside the teacher's interval, but paired (same seeds) its FD difference excludes 0;
    # its KID difference is 1 paired s.e.: no KID claim
    rows["student-8 ddim 8"]["headline"]["paired"] = {"ref": "teacher ddim 64", "fd_diff": -0.5, "fd_diff_lo": -0.7,
                                                      "fd_diff_hi": -0.3, "kid_diff": 0.002, "kid_diff_se": 0.002}
    (root / "metrics/olss").mkdir(parents=True)
    (root / "metrics/evaluate.json").write_text(json.dumps({"n_samples": 500, "n_headline": 2000, "rows": rows,
                                                            "fd_floor": {"n": 500, "fd": 1.0, "fd_lo": 0.5,
                                                                         "fd_hi": 1.5},
                                                            "fd_blur": {"0.5": {"n": 500, "fd": 9.0, "fd_lo": 8,
                                                                                "fd_hi": 10}}}))
    (root / "metrics/olss/teacher-4.json").write_text(json.dumps({
        "model": "teacher", "steps": 4, "path": [0, 11, 31, 53], "holdout_seeds": 64,
        "rmse_vs_full_step": {"ddim": 0.19, "olss": 0.042, "olss_paper": 0.073, "olss_closed": 0.042},
        "chosen": "olss-closed", "chosen_label": "OLSS x-hat, closed loop (beyond paper)",
        "variants": {"olss-paper": {"file": "olss-paper-4.json", "label": "OLSS (paper)", "holdout_rmse": 0.073},
                     "olss-closed": {"file": "olss-closed-4.json", "label": "OLSS x-hat, closed loop (beyond paper)",
                                     "holdout_rmse": 0.042}}}))


def test_generated_rankings_claim_an_order_only_where_intervals_separate(tmp_path):
    import json

    from benchmarks import readme

    _synthetic_metrics(tmp_path)
    lines = {ln.split(" | ")[0].strip("| "): ln for ln in readme.ranking(tmp_path).splitlines() if ln.startswith("|")}
    assert "within noise of the teacher's DDIM-64" in lines["teacher olss-4"]  # 29.8 [28.9, 30.9] vs 30.4
    assert "1.12x the teacher's DDIM-64's FD (worse)" in lines["student-4 ddim 4"]  # separated: the ratio is stated
    assert "| 2000 |" in lines["student-4 ddim 4"] and "[32.8, 34.9]" in lines["student-4 ddim 4"]
    assert "sigma 0.5 px 9.00 [8.00, 10.0]" in readme.ranking(tmp_path)
    # paired where the row has it: FD and KID judged separately
    s8 = lines["student-8 ddim 8"]
    assert "0.98x the teacher's DDIM-64's FD (better, paired)" in s8 and "-0.50 [-0.70, -0.30]" in s8
    assert s8.endswith("| within noise of the teacher's DDIM-64 |")  # KID: 1 s.e., not 2
    assert "within noise of the teacher's DDIM-64 | within noise of the teacher's DDIM-64" in lines["teacher olss-4"]
    # the OLSS table lists every variant the metrics file has, the paper's included, with intervals
    table = readme.olss(tmp_path)
    paper = next(ln for ln in table.splitlines() if "`olss-paper-4`" in ln)
    assert "OLSS (paper)" in paper and "0.0730" in paper and "31.0 [30.0, 32.0]" in paper and "| 2000 |" in paper
    assert "registered `olss-N` = OLSS x-hat, closed loop" in next(ln for ln in table.splitlines() if "`olss-4`" in ln)
    assert "`olss-closed-4`" in table and "| - | - | - |" in table  # a variant without an evaluation row
    # an older metrics file (no variants table): the variants are the keys of its held-out RMSE
    m = json.loads((tmp_path / "metrics/olss/teacher-4.json").read_text())
    del m["variants"]
    (tmp_path / "metrics/olss/teacher-4.json").write_text(json.dumps(m))
    assert "`olss-paper-4` | olss_paper | 0.0730" in readme.olss(tmp_path)


def test_a_block_of_a_kept_run_reads_that_run_and_names_its_files(tmp_path):
    from benchmarks import readme

    _synthetic_metrics(tmp_path / "results" / "run-a")
    (tmp_path / "results/run-a/metrics/teacher.json").write_text(
        '{"steps": 1500, "params": 10, "images_per_s": 99.0, "device": "cpu", "final_loss": 0.5}')
    (tmp_path / "results/run-a/reports/grids").mkdir(parents=True)
    (tmp_path / "results/run-a/reports/grids/teacher-ddim-4.png").write_bytes(b"png")
    text = ("<!-- generated:ranking@run-a -->\n<!-- /generated:ranking@run-a -->\n"
            "<!-- generated:grids@run-a -->\n<!-- /generated:grids@run-a -->\n"
            "<!-- generated:teacher@run-a -->\n<!-- /generated:teacher@run-a -->\n")
    out = readme.render(text, tmp_path)
    assert "| student-4 ddim 4 | 4 | 2000 | 33.9 [32.8, 34.9]" in out  # results/run-a's numbers
    # only the grids the run made, named by their path from the README
    assert "![DDIM 4](results/run-a/reports/grids/teacher-ddim-4.png)" in out and "unipc" not in out
    assert "(`results/run-a/metrics/teacher.json`): 1,500 steps" in out
    with pytest.raises(SystemExit, match="results/nope"):
        readme.render("<!-- generated:ranking@nope -->\n<!-- /generated:ranking@nope -->\n", tmp_path)
