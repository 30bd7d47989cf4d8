"""Promotion under concurrency: real processes racing for the champion alias of one registry
(SQLite store in a temp dir). Moved from tests/unit: it starts processes."""

import pytest

from tests.mlflow_helpers import model_versions, race

tracking = pytest.importorskip("fewstep.tracking")


def test_racing_promotions_end_with_one_consistent_champion(store, tmp_path):
    t, name = store, "race-student-4step"
    v1, v2, v3 = model_versions(t, name, 3)
    tracking.promote(name, v1, 10.0, "e1", margin=0.01)
    res = race(name, [(v2, 8.0), (v3, 6.0)], tmp_path)
    rm = t.client.get_registered_model(name)
    assert str(rm.aliases["champion"]) == v3  # the best candidate wins whatever the order
    assert (rm.tags["champion.version"], rm.tags["champion.fd"]) == (v3, "6.0")
    tv2, tv3 = (t.client.get_model_version(name, v).tags for v in (v2, v3))
    assert tv3["promotion.decision"] == "promoted" and tv3["fd"] == "6.0"
    # v2 either went first (beat v1, then lost to v3) or second (compared with v3 and kept it)
    assert (tv2["promotion.decision"], tv2["promotion.champion_version"]) in {("promoted", v1), ("kept", v3)}
    assert tv3["promotion.champion_version"] == (v2 if tv2["promotion.decision"] == "promoted" else v1)

