"""params teacher.source: the switch that imports a pretrained (diffusers) teacher instead of training one."""

from __future__ import annotations

import pytest

from fewstep.config import ParamsError, load_params, validate
from fewstep.train.teacher import run_hash
from tests.helpers import ROOT, tiny_params

SHA = "ab" * 32


def _with(source) -> dict:
    p = tiny_params()
    p["teacher"]["source"] = source
    return p


def test_the_default_trains_and_the_switch_parses():
    assert load_params(ROOT / "params.yaml").teacher.source is None
    assert validate(_with(None)).teacher.source is None
    src = validate(_with({"kind": "diffusers", "path": "s3://bucket/ddpm", "sha256": SHA})).teacher.source
    assert (src.kind, src.path, src.sha256) == ("diffusers", "s3://bucket/ddpm", SHA)


@pytest.mark.parametrize("source, field, words", [
    ({"kind": "onnx", "path": "d"}, "teacher.source.kind", "'diffusers'"),
    ({"kind": "diffusers"}, "teacher.source.path", "Field required"),
    ({"path": "d"}, "teacher.source.kind", "Field required"),
    ({"kind": "diffusers", "path": ""}, "teacher.source.path", "at least 1"),
    ({"kind": "diffusers", "path": "d", "sha256": "XYZ"}, "teacher.source.sha256", "pattern"),
    ({"kind": "diffusers", "path": "d", "revision": "main"}, "teacher.source.revision", "unknown key"),
    ("data/ddpm", "teacher.source", "valid dictionary"),
])
def test_a_bad_source_is_one_clear_params_error(source, field, words):
    with pytest.raises(ParamsError) as e:
        validate(_with(source))
    lines = str(e.value).splitlines()
    assert len(lines) == 2 and lines[1].strip().startswith(field + ":") and words in lines[1], lines


def test_the_path_expands_environment_variables(monkeypatch):
    src = validate(_with({"kind": "diffusers", "path": "${FEWSTEP_DDPM_SOURCE}/snap"})).teacher.source
    monkeypatch.setenv("FEWSTEP_DDPM_SOURCE", "/data/ddpm")
    assert src.resolved_path() == "/data/ddpm/snap"
    monkeypatch.delenv("FEWSTEP_DDPM_SOURCE")
    with pytest.raises(ParamsError, match="FEWSTEP_DDPM_SOURCE"):
        src.resolved_path()


def test_the_switch_is_not_a_training_hyperparameter():
    """A trained teacher's hashes (its card, its checkpoints' resume key) and the study teachers
    derived from the teacher section do not see the key; DVC does (it is in params.yaml)."""
    plain, switched = validate(_with(None)), validate(_with({"kind": "diffusers", "path": "d"}))
    assert plain.teacher.model_dump() == switched.teacher.model_dump()
    assert run_hash(plain, "data") == run_hash(switched, "data")
    raw = _with({"kind": "diffusers", "path": "d"})
    raw["study"]["patch_sizes"] = [1]
    assert validate(raw).study.teacher_for(switched.teacher, 1).source is None


def test_an_imported_teacher_brings_its_own_T_for_the_rounds():
    """schedule.T is the trained teacher's grid; an import's T (1000) is checked when a round starts."""
    p = tiny_params()  # schedule.T = 64
    p["distill"]["rounds"] = {"student-40": {"parent": "teacher", "steps": 40}}
    with pytest.raises(ParamsError, match="exceed schedule.T=64"):
        validate(p)
    p["teacher"]["source"] = {"kind": "diffusers", "path": "d"}
    validate(p)


def test_the_ddpm_profile_imports_and_halves_on_1000():
    p = load_params(ROOT / "params.yaml", "ddpm-cifar10")
    assert p.teacher.source.kind == "diffusers" and p.base.image_size == 32
    from fewstep.train.distill import teacher_grid

    for name in p.distill.rounds:
        r = p.distill.round(name)
        assert r.weighting != "snr_trunc"  # an eps student: PD Table 1's diverging pair
        teacher_grid(1000, 2 * r.steps)  # every round's teacher grid exists on T = 1000
    assert {p.distill.round(n).steps for n in p.distill.rounds} >= {4, 5, 8, 10}
    assert set(p.olss.steps) == {4, 5, 8, 10} and set(p.evaluate.peer_steps) == {4, 5, 8, 10}


def test_the_import_checks_the_pin_and_the_image_size_and_writes_nothing_on_a_mismatch(tmp_path):
    pytest.importorskip("diffusers")
    from fewstep import models
    from fewstep.interop.standin import write_standin
    from fewstep.teacher_source import SourceMismatchError, card_source_sha256, import_source

    src = write_standin(tmp_path / "src", image_size=8, channels=8)
    p = tiny_params()  # base.image_size 8
    p["teacher"]["source"] = {"kind": "diffusers", "path": str(src)}
    card = import_source(validate(p), tmp_path / "models" / "teacher")
    digest = card_source_sha256(card)
    assert card.family == "diffusers-unet2d" and card.schedule.T == 1000 and card.lineage.dataset == "cifar10"
    assert models.load_card(tmp_path / "models" / "teacher") == card and len(digest) == 64

    bad = [({"sha256": "0" * 64}, "not the pinned"), ({}, "base.image_size is 16")]
    for extra, words in bad:
        q = tiny_params()
        q["teacher"]["source"] = {"kind": "diffusers", "path": str(src), **extra}
        if not extra:
            q["base"]["image_size"] = 16
            q["teacher"]["net"]["attn_resolutions"] = []
        with pytest.raises(SourceMismatchError, match=words):
            import_source(validate(q), tmp_path / "other" / "teacher")
        assert not (tmp_path / "other" / "teacher").exists()
    p["teacher"]["source"]["sha256"] = digest  # the right pin imports
    assert card_source_sha256(import_source(validate(p), tmp_path / "pinned")) == digest
