"""Per-class evaluation of class-conditional models (issue 17): per-class FD/KID and the evaluator's
accuracy on synthetic features, the row names and params it adds, the report section, and the
class-conditional CPU profile (fewstep.per_class, fewstep.evaluation)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fewstep import samplers
from fewstep.config import ParamsError, deep_merge, load_params, validate
from fewstep.per_class import (ClassEvaluationError, class_major, class_reference, class_scores,
                               classification_accuracy)
from tests.helpers import ROOT, tiny_params

D = 6  # feature dimension of the synthetic classes


def _two_classes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n features per class: class 0 ~ N(0, I), class 1 ~ N(3 e_0, I); labels 0, 1, 0, 1, ..."""
    rng = np.random.default_rng(seed)
    labels = np.arange(2 * n) % 2
    feats = rng.normal(size=(2 * n, D))
    feats[labels == 1, 0] += 3.0
    return feats, labels


def test_a_class_scored_against_its_own_test_images_beats_scoring_it_against_another_class():
    test, test_y = _two_classes(200, seed=0)
    ref = class_reference(["cat", "dog"], test, test_y, seed=0)
    samples, asked = _two_classes(100, seed=1)
    pred = asked.copy()
    right = class_scores(samples, pred, asked, ref, kid_subsets=4, seed=0, resamples=50)
    wrong = class_scores(samples, pred, 1 - asked, ref, kid_subsets=4, seed=0, resamples=50)  # each class swapped
    assert set(right["per_class"]) == {"cat", "dog"}
    for c in ("cat", "dog"):
        r, w = right["per_class"][c], wrong["per_class"][c]
        assert r["n"] == 100 and r["fd_lo"] <= r["fd_hi"]
        assert r["fd"] < 0.5 < 5.0 < w["fd"]  # means 3 apart: FD >= 9 against the other class
        assert r["fd_hi"] < w["fd_lo"] and r["kid"] + 2 * r["kid_se"] < w["kid"] - 2 * w["kid_se"]
    assert right["accuracy"] == 1.0 and wrong["accuracy"] == 0.0


def test_accuracy_of_a_fake_classifier_is_the_share_of_hits_with_its_binomial_standard_error():
    asked = np.arange(40) % 4
    pred = asked.copy()
    pred[asked == 3] = 0  # class 3 never recognised
    pred[:4] = (pred[:4] + 1) % 4  # one miss in each of classes 0..3 (class 3 already all missed)
    acc = classification_accuracy(pred, asked, 4)
    assert acc["n"] == 40 and acc["accuracy"] == pytest.approx(27 / 40)
    assert acc["accuracy_se"] == pytest.approx(math.sqrt(27 / 40 * 13 / 40 / 40))
    per = acc["per_class"]
    assert [b["accuracy"] for b in per] == pytest.approx([0.9, 0.9, 0.9, 0.0])
    assert per[3]["accuracy_se"] == 0.0 and all(b["n"] == 10 for b in per)
    # without per-class references only the overall accuracy is added
    feats = np.random.default_rng(0).normal(size=(40, D))
    only = class_scores(feats, pred, asked, class_reference(list("abcd")), kid_subsets=2, seed=0)
    assert set(only) == {"accuracy", "accuracy_se"} and only["accuracy"] == pytest.approx(27 / 40)


def test_a_per_class_grid_puts_one_class_per_row():
    asked = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
    assert class_major(asked, 3, 2) == [0, 3, 1, 4, 2, 5]


def test_a_label_out_of_range_and_a_negative_guidance_scale_are_one_clear_error_each():
    feats, labels = _two_classes(10, seed=0)
    with pytest.raises(ClassEvaluationError, match="class label 2 out of range 0..1"):
        class_reference(["a", "b"], feats, np.where(labels == 1, 2, 0))
    with pytest.raises(ClassEvaluationError, match="class label -1 out of range"):
        class_scores(feats, labels, labels - 1, class_reference(["a", "b"]), kid_subsets=2, seed=0)
    with pytest.raises(ClassEvaluationError, match="class 1 .b. has 1 test image"):
        class_reference(["a", "b"], feats[:3], np.array([0, 1, 0]))
    for bad, where in (([0.0, -1.0], "evaluate.guidance.1"), ([float("nan")], "evaluate.guidance.0"),
                       ([], "evaluate.guidance"), ([1.0, 1.0], "duplicates")):
        p = tiny_params()
        p["evaluate"]["guidance"] = bad
        with pytest.raises(ParamsError, match=where) as e:
            validate(p)
        assert str(e.value).count("\n") == 1  # one invalid param, said once


def test_guided_rows_are_named_by_the_one_row_name_function():
    assert samplers.row_name("teacher", "ddim", steps=8, guidance=1.0) == "teacher ddim 8 w=1"
    assert samplers.row_name("teacher", "ddim", steps=8, guidance=0.0) == "teacher ddim 8"  # plain conditional
    assert samplers.row_name("teacher", "ddim", steps=8) == "teacher ddim 8"
    assert samplers.row_name("teacher", "olss", steps=4, artifact="olss-4.json", guidance=2.5) == "teacher olss-4 w=2.5"
    assert samplers.nfe("ddim", 8, guidance=1.0) == 16 and samplers.nfe("ddim", 8, guidance=0.0) == 8


def test_the_new_evaluate_keys_leave_the_default_params_dump_unchanged():
    p = validate(tiny_params())
    assert p.evaluate.guidance == [0.0] and p.evaluate.per_class is True
    assert "guidance" not in p.evaluate.model_dump() and "per_class" not in p.evaluate.model_dump()


def test_a_null_in_a_profile_removes_a_named_entry_and_nothing_else():
    base = {"rounds": {"a": {"steps": 8}, "b": {"steps": 4}}, "x": 1, "c": {"k": 1}}
    assert deep_merge(base, {"rounds": {"b": None}, "x": None}) == {"rounds": {"a": {"steps": 8}}, "x": None,
                                                                   "c": {"k": 1}}


def test_the_class_conditional_cpu_profile_is_the_cpu_default_made_conditional_and_lean():
    from fewstep import budget

    p = load_params(ROOT / "params.yaml", "cpu-cond")
    assert p.teacher.conditioning is not None and p.teacher.conditioning.p_uncond == 0.1
    assert p.teacher.sample.guidance == p.trajectories.guidance > 0
    assert p.evaluate.guidance == [0.0, p.trajectories.guidance] and p.evaluate.per_class
    assert sorted(p.distill.round(r).steps for r in p.distill.rounds) == [4, 8]
    assert p.evaluate.ddim_steps == [4, 8, 64] and p.olss.steps == [4, 8] and not p.evaluate.peers
    assert not p.study.patch_sizes and not p.split.models and not p.objective.variants
    default = load_params(ROOT / "params.yaml")
    assert p.base == default.base and p.prepare == default.prepare and p.teacher.net == default.teacher.net
    # guided rows are counted in the budget: each w > 0 row costs two evaluations a step
    one = validate(deep_merge(p.model_dump(), {"evaluate": {"guidance": [0.0]}}))
    def ev(q) -> int:
        return sum(w.forward for w in budget.project(q) if w.stage == "evaluate" and w.net == "teacher rows")

    plain = ev(one) - 500 * 6 * (4 + 8) * 2  # the OLSS rows (6 files per step count) are guided at w=1 in both
    assert ev(p) - 500 * 6 * (4 + 8) * 2 == 3 * plain


def test_the_readme_block_shows_the_conditional_rows_at_4_and_8_steps_with_their_per_class_scores():
    from benchmarks.readme import per_class_table

    def row(family, steps, w, fd, acc, **kw):
        per = {c: {"fd": fd + i, "accuracy": acc} for i, c in enumerate(("cat", "dog"))}
        return {"family": family, "steps": steps, "guidance": w, "nfe": steps * (2 if w else 1), "fd": fd,
                "fd_lo": fd - 1, "fd_hi": fd + 1, "kid": 0.01, "kid_se": 0.001, "n": 100, "accuracy": acc,
                "accuracy_se": 0.02, "per_class": per, **kw}

    ev = {"n_samples": 100, "class_names": ["cat", "dog"], "rows": {
        "teacher ddim 4 w=1": row("ddim", 4, 1.0, 5.0, 0.9),
        "teacher ddim 4": row("ddim", 4, 0.0, 7.0, 0.7),
        "teacher olss-4 w=1": row("olss", 4, 1.0, 4.0, 0.9),
        "teacher olss-open-4 w=1": row("olss-open", 4, 1.0, 4.0, 0.9),  # a variant: in reports/evaluation.md only
        "student-8 ddim 8": row("student", 8, 0.0, 6.0, 0.8, distilled_guidance=1.0),
        "teacher ddim 64": row("ddim", 64, 0.0, 3.0, 0.95),
        "teacher ddim 2": {"family": "ddim", "nfe": 2, "fd": 9.0},  # unconditional: no accuracy, not shown
    }}
    lines = per_class_table(ev).splitlines()
    table = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| row")]
    assert [ln.split(" | ")[0] for ln in table] == ["| teacher ddim 4", "| teacher ddim 4 w=1", "| teacher olss-4 w=1",
                                                    "| student-8 ddim 8 (distilled at w=1)"]
    assert "| row | w | NFE | FD [95% CI] | KID x1e3 | acc | cat: FD / acc | dog: FD / acc |" in lines
    assert table[1].endswith("| 0.90 ± 0.02 | 5.00 / 0.90 | 6.00 / 0.90 |")
    assert "| 1 | 8 | 5.00 [4.00, 6.00] |" in table[1]
    assert "50 per class" in lines[0] and "chance 0.50" in lines[0]


def test_which_scales_a_model_is_sampled_at_and_what_the_evaluator_must_match():
    from types import SimpleNamespace as NS

    from fewstep.config import EvaluateParams
    from fewstep.evaluation import _class_reference, row_scales

    ep = EvaluateParams(guidance=[0.0, 2.0], n_samples=10)
    assert row_scales(NS(conditioning=NS(kind="none")), ep) == [None]  # unconditional: rows as ever
    assert row_scales(NS(conditioning=NS(kind="class")), ep) == [0.0, 2.0]
    assert row_scales(NS(conditioning=NS(kind="class"), guidance=2.0), ep) == [0.0]  # guided-distilled student
    ev = NS(cfg=NS(num_classes=3))
    with pytest.raises(ClassEvaluationError, match="evaluator classifies 3 classes but .* have 2"):
        _class_reference(ev, ep, None, 2, None, None)
    with pytest.raises(ClassEvaluationError, match="needs the test split's images and labels"):
        _class_reference(ev, ep, None, 3, None, None)
    with pytest.raises(ClassEvaluationError, match="10 samples give fewer than 3 per class for 6"):
        _class_reference(NS(cfg=NS(num_classes=6)), ep, None, 6, None, None)
    off = _class_reference(ev, EvaluateParams(per_class=False, n_samples=10), None, 3, ["a", "b", "c"], None)
    assert off.names == ("a", "b", "c") and off.stats is None


def test_guided_rows_of_a_conditional_only_model_are_refused_before_any_sampling():
    from types import SimpleNamespace as NS

    from fewstep.config import EvaluateParams
    from fewstep.evaluation import row_scales
    from fewstep.math.guidance import ClassGuidance, GuidanceError

    only = NS(conditioning=NS(kind="class"), arch=NS(has_null_label=False))  # imported without null_label
    with pytest.raises(GuidanceError, match="conditional-only model"):
        row_scales(only, EvaluateParams(guidance=[0.0, 1.0], n_samples=12))
    assert row_scales(only, EvaluateParams(guidance=[0.0], n_samples=12)) == [0.0]
    # a guided-distilled student in trajectories.models is sampled at w = 0, as its evaluation rows are
    student = NS(num_classes=3, card=NS(guidance=1.0))
    assert ClassGuidance.for_model(student, 2.0, 0).w == 0.0
    assert ClassGuidance.for_model(NS(num_classes=3, card=NS(guidance=None)), 2.0, 0).w == 2.0
