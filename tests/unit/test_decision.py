"""The champion decision (fewstep.tracking.decision.decide) is pure: no I/O, no MLflow. Its cases,
and proof that it imports without importing mlflow."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from fewstep.tracking.decision import ChampionState, decide
from tests.helpers import ROOT

CHAMP_E1 = ChampionState("1", 10.0, "e1")  # champion v1, FD 10 measured in evaluation e1


def test_importing_and_deciding_does_not_import_mlflow(tmp_path):
    code = ("import sys\n"
            "from fewstep.tracking.decision import ChampionState, decide\n"
            "from fewstep import tracking\n"
            "assert tracking.decide is decide\n"
            "print(decide('2', 8.0, 'e1', ChampionState('1', 10.0, 'e1'), 0.1, {})[0])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'torch')))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[:2] == ["promoted", "[]"]


@pytest.mark.parametrize("fd,partial,why", [(1.0, True, "partial"), (None, False, "missing"),
                                            (float("nan"), False, "not finite"), (float("inf"), False, "not finite"),
                                            ("abc", False, "not finite")])
def test_a_partial_evaluation_or_a_bad_fd_is_rejected(fd, partial, why):
    decision, reason, champ_fd = decide("2", fd, "e1", CHAMP_E1, 0.1, {}, partial=partial)
    assert (decision, champ_fd) == ("rejected", None) and why in reason
    # with no champion at all, still rejected: a bad evaluation never takes the alias
    assert decide("2", fd, "e1", None, 0.1, {}, partial=partial)[0] == "rejected"


def test_no_champion_promotes_and_the_champion_itself_is_unchanged():
    assert decide("1", 50.0, "e1", None, 0.1, {}) == ("promoted", "no champion yet", None)
    assert decide("1", 9.0, "e2", CHAMP_E1, 0.1, {})[:1] == ("unchanged",)


def test_margin_is_relative_and_strict():
    bar = 10.0 * (1 - 0.1)  # the candidate must be below FD_champ * (1 - margin)
    assert decide("2", math.nextafter(bar, 0), "e1", CHAMP_E1, 0.1, {})[::2] == ("promoted", 10.0)
    decision, reason, champ_fd = decide("2", bar, "e1", CHAMP_E1, 0.1, {})
    assert (decision, champ_fd) == ("kept", 10.0) and ">=" in reason and "recorded for this evaluation" in reason
    assert decide("2", 9.99, "e1", CHAMP_E1, 0.0, {})[0] == "promoted"
    assert decide("2", 10.0, "e1", CHAMP_E1, 0.0, {})[0] == "kept"  # a tie keeps the champion


def test_the_champion_fd_must_come_from_the_same_evaluation():
    decision, reason, champ_fd = decide("2", 1.0, "e2", CHAMP_E1, 0.1, {})  # recorded on e1, compared on e2
    assert (decision, champ_fd) == ("held", None) and "remeasured" in reason
    # its FD re-measured in e2 is used, over the recorded one
    assert decide("2", 5.0, "e2", CHAMP_E1, 0.1, {"1": 6.0})[::2] == ("promoted", 6.0)
    assert decide("2", 5.0, "e2", CHAMP_E1, 0.1, {"1": 5.2})[::2] == ("kept", 5.2)
    assert decide("2", 5.0, "e1", CHAMP_E1, 0.1, {"1": 5.2})[::2] == ("kept", 5.2)  # re-measured wins on e1 too
    assert decide("2", 5.0, "e2", CHAMP_E1, 0.1, {"1": float("nan")})[::2] == ("rejected", None)
    assert decide("2", 5.0, "e1", ChampionState("1", None, "e1"), 0.1, {})[0] == "held"  # no valid record
