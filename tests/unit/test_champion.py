"""fewstep.champion: which evaluation row each registered version is judged by, and the candidates
handed to the promotion decision (tracking.promote is passed in, so no MLflow here)."""

from __future__ import annotations

from types import SimpleNamespace

from fewstep import storage
from fewstep.champion import evaluation_id, promote_versions
from fewstep.samplers import row_for_version as row_for


def test_every_registered_role_finds_its_row():
    assert row_for({"name": "c-teacher", "role": "teacher", "nfe": "8"}) == "teacher ddim 8"
    assert row_for({"name": "c-teacher-p4", "role": "teacher", "nfe": "16", "model": "teacher-p4"}) == "teacher-p4 ddim 16"
    assert row_for({"name": "c-student-4step", "role": "student", "nfe": "4"}) == "student-4 ddim 4"
    assert row_for({"name": "c-olss-teacher-4step", "role": "olss", "model": "teacher",
                    "scheduler_file": "schedulers/teacher/olss-open-4.json"}) == "teacher olss-open-4"
    assert row_for({"name": "c-evaluator", "role": "evaluator"}) is None


def test_candidates_oldest_first_with_their_fd_and_the_evaluator_skipped():
    calls = []

    def promote(name, version, fd, eval_id, *, margin, remeasured, partial):
        calls.append((name, version, fd, dict(remeasured), margin, partial))
        return SimpleNamespace(decision="promoted" if fd is not None else "kept", reason="r", champion_version=version)

    versions = [{"name": "c-olss-teacher-4step", "version": "2", "role": "olss", "model": "teacher",
                 "scheduler_file": "schedulers/teacher/olss-open-4.json"},
                {"name": "c-olss-teacher-4step", "version": "1", "role": "olss", "model": "teacher",
                 "scheduler_file": "schedulers/teacher/olss-4.json"},
                {"name": "c-evaluator", "version": "1", "role": "evaluator"},
                {"name": "c-student-2step", "version": "1", "role": "student", "nfe": "2"}]
    rows = {"teacher olss-4": {"fd": 3.0}, "teacher olss-open-4": {"fd": 2.5}}
    out = promote_versions(versions, rows, "ev1", 0.01, False, promote, log=lambda s: None)
    assert [(c[0], c[1], c[2]) for c in calls] == [("c-olss-teacher-4step", "1", 3.0), ("c-olss-teacher-4step", "2", 2.5),
                                                   ("c-student-2step", "1", None)]
    assert calls[0][3] == {"1": 3.0, "2": 2.5} and calls[2][3] == {} and calls[0][4:] == (0.01, False)
    assert [d["decision"] for d in out] == ["promoted", "promoted", "kept"] and out[2]["candidate_fd"] is None


def test_the_evaluation_id_follows_params_rows_and_evaluator_weights(tmp_path):
    cfg = tmp_path / "config.json"
    storage.write_json(cfg, {"weights_sha256": "a"})
    base = evaluation_id({"n_samples": 500}, {"x": {}}, cfg)
    assert len(base) == 16 and base == evaluation_id({"n_samples": 500}, {"x": {}}, cfg)
    assert base != evaluation_id({"n_samples": 100}, {"x": {}}, cfg)
    assert base != evaluation_id({"n_samples": 500}, {"x": {}, "y": {}}, cfg)
    storage.write_json(cfg, {"weights_sha256": "b"})
    assert base != evaluation_id({"n_samples": 500}, {"x": {}}, cfg)
