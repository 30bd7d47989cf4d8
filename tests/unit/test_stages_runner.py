"""The stage runner (stages/_common.run_stage): every user error is one line and exit code 2, every
stage is a main(argv) callable in-process, and the import graph runs one way (stages and flows ->
library; no stage imports another stage)."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from fewstep.data import DataError
from stages._common import StageContext, StageError, run_stage
from tests.helpers import ROOT, tiny_params, write_params

STAGES = sorted(p.stem for p in (ROOT / "stages").glob("*.py") if not p.stem.startswith("_"))


@pytest.fixture
def params(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_TRACKING", "off")  # the runner's errors, not MLflow, are tested here
    monkeypatch.delenv("FEWSTEP_PROFILE", raising=False)
    monkeypatch.chdir(tmp_path)
    return str(write_params(tmp_path / "params.yaml", tiny_params()))


def _add(ap):
    ap.add_argument("--model", default="teacher")
    ap.add_argument("--steps", type=int, default=4)


def _err_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("error", [StageError("split.models has no 'x'"), DataError("12 of 40 images are corrupt"),
                                   FileNotFoundError("no model config at models/teacher")])
def test_a_user_error_is_one_line_on_stderr_and_exit_2(params, capsys, error):
    def body(ctx: StageContext) -> None:
        raise error

    with pytest.raises(SystemExit) as e:
        run_stage("fit_olss@{model}-{steps}", ["--params", params, "--model", "student-8", "--steps", "2"], _add, body)
    assert e.value.code == 2
    assert _err_lines(capsys) == [f"fit_olss@student-8-2: error: {error}"]


def test_bad_params_and_bad_settings_fail_before_the_body(params, tmp_path, capsys, monkeypatch):
    ran = []
    body = lambda ctx: ran.append(ctx)  # noqa: E731
    with pytest.raises(SystemExit) as e:
        run_stage("train_teacher", ["--params", str(tmp_path / "missing.yaml")], None, body)
    assert e.value.code == 2 and _err_lines(capsys) == [
        f"train_teacher: error: params file not found: {tmp_path / 'missing.yaml'}"]
    bad = tiny_params()
    bad["teacher"]["steps"] = -1
    write_params(tmp_path / "bad.yaml", bad)
    with pytest.raises(SystemExit) as e:
        run_stage("train_teacher", ["--params", str(tmp_path / "bad.yaml")], None, body)
    (line,) = _err_lines(capsys)
    assert e.value.code == 2 and line.startswith("train_teacher: error: ") and "teacher.steps" in line
    monkeypatch.setenv("FEWSTEP_TRACKING", "sometimes")
    with pytest.raises(SystemExit) as e:
        run_stage("train_teacher", ["--params", params], None, body)
    assert e.value.code == 2 and "FEWSTEP_TRACKING='sometimes'" in _err_lines(capsys)[0]
    monkeypatch.setenv("FEWSTEP_TRACKING", "off")
    monkeypatch.setenv("FEWSTEP_PROFILE", "nope")  # the profile comes from the settings
    with pytest.raises(SystemExit) as e:
        run_stage("train_teacher", ["--params", params], None, body)
    assert e.value.code == 2 and "unknown profile 'nope'" in _err_lines(capsys)[0]
    assert ran == []


def test_the_body_gets_args_params_device_settings_and_a_record(params, capsys):
    seen = []

    def body(ctx: StageContext) -> None:
        ctx.record.log_metrics({"x": 1.5})
        seen.append(ctx)

    run_stage("fit_olss@{model}-{steps}", ["--params", params, "--no-progress"], _add, body)
    (ctx,) = seen
    assert ctx.name == "fit_olss@teacher-4" and ctx.args.steps == 4 and not ctx.progress
    assert ctx.params.base.image_size == 8 and ctx.device.type == "cpu" and ctx.settings.tracking == "off"
    assert ctx.record.metrics["x"] == 1.5 and ctx.record.params["base"]["image_size"] == 8
    assert "fit_olss@teacher-4: done in" in capsys.readouterr().err


def test_an_unexpected_error_keeps_its_traceback(params):
    def body(ctx: StageContext) -> None:
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        run_stage("evaluate", ["--params", params], None, body)


def test_every_stage_is_a_main_argv_callable():
    for name in STAGES:
        mod = importlib.import_module(f"stages.{name}")
        sig = inspect.signature(mod.main)
        assert list(sig.parameters) == ["argv"] and sig.parameters["argv"].default is None, name


def test_a_stage_runs_in_process_and_its_user_errors_exit_2(params, tmp_path, capsys):
    from stages import fit_olss, objective_report

    objective_report.main(["--params", params, "--metrics", str(tmp_path / "none"), "--out", str(tmp_path / "o.md")])
    assert (tmp_path / "o.md").read_text().startswith("# Objective study")
    assert (tmp_path / "plots" / "objective.csv").read_text().startswith("variant,patch,x_mse")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fit_olss.main(["--params", params, "--model", "teacher", "--steps", "4", "--models", str(tmp_path / "m")])
    assert e.value.code == 2
    (line,) = _err_lines(capsys)
    assert line.startswith("fit_olss@teacher-4: error: ") and "no model config" in line


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_no_stage_imports_another_stage_and_the_library_imports_no_stage_or_flow():
    for path in (ROOT / "stages").glob("*.py"):
        other = {m for m in _imports(path) if m.startswith("stages.") and m not in ("stages._common",)
                 and not m.startswith("stages._common.")}
        assert not other, f"{path.name} imports {sorted(other)}"
    lib = list((ROOT / "src" / "fewstep").rglob("*.py"))
    assert len(lib) > 20
    for path in lib:
        bad = {m for m in _imports(path) if m.split(".")[0] in ("stages", "flows", "infra")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
