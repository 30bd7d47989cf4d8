"""infra/local/start.sh's command (`services.py start`): the Prefect server comes up with its web UI
and the Prefect and MLflow UI URLs are printed; `stop` leaves nothing running."""

from __future__ import annotations

import json
import re
import urllib.request

from fewstep import processes
from infra.local import services
from tests.helpers import ROOT


def test_start_prints_both_uis_and_serves_them(tmp_path, capsys):
    state = tmp_path / "services"
    argv = ["--state-dir", str(state)]
    pgids: list[int] = []
    try:
        assert services.main([*argv, "start", "--services", "moto,mlflow,prefect"]) == 0
        pgids = [s["pid"] for s in json.loads((state / "services.json").read_text()).values()]
        out = capsys.readouterr().out
        urls = dict(re.findall(r"^(Prefect|MLflow) UI: +(http://\S+)$", out, re.M))
        assert set(urls) == {"Prefect", "MLflow"}, out
        for name, url in urls.items():
            with urllib.request.urlopen(url, timeout=30) as r:
                assert r.status == 200 and r.headers.get_content_type() == "text/html", name
                assert b"<html" in r.read(2000).lower(), name
    finally:
        services.main([*argv, "stop"])
    assert len(pgids) == 3 and not any(processes.group_alive(g) for g in pgids)  # nothing left running
    assert "start --ui" in (ROOT / "infra/local/start.sh").read_text()  # the script asks for the UI

