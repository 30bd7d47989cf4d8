"""prefect.yaml end to end on a real Prefect server: work pools, `prefect deploy --all`, a process
worker, `prefect deployment run --watch` of the whole (micro) pipeline in a temp DVC repo."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime

import yaml

from infra.local import services
from tests.helpers import ROOT
from tests.integration.conftest import micro, run
from tests.integration.servers import http_json, start_worker, stop_and_check, wait_for


def _deployment(api: str, name: str) -> dict:
    return http_json(f"{api}/deployments/name/fewstep-pipeline/{name}")


def test_deploy_worker_runs_pipeline(make_tiny_repo, prefect_server, state_dir):
    server, client = prefect_server
    api = client["PREFECT_API_URL"]
    repo = make_tiny_repo(extra=("flows", "prefect.yaml"), tweak=micro)
    env = dict(client, FEWSTEP_ROOT=str(repo))  # resolved into the pull step at deploy time
    times = {}
    t0 = time.monotonic()

    # the two pools prefect.yaml names: `local` (process) and `gpu` (kubernetes, GPU job template)
    services.create_work_pool("local", env)
    services.create_work_pool("gpu", env, "kubernetes", ROOT / "infra/k8s/gpu-work-pool-job-template.json")
    times["pools"] = time.monotonic() - t0
    services.prefect_cli(["deploy", "--all"], env, cwd=repo)
    times["deploy"] = time.monotonic() - t0

    nightly, local = _deployment(api, "nightly"), _deployment(api, "local")
    assert nightly["work_pool_name"] == "gpu" and local["work_pool_name"] == "local"
    (sn,), (sl,) = nightly["schedules"], local["schedules"]
    assert (sn["schedule"]["cron"], sn["schedule"]["timezone"], sn["active"]) == ("0 3 * * *", "UTC", True)
    assert (sl["schedule"]["cron"], sl["active"]) == ("0 2 * * *", False)
    assert nightly["parameters"]["profile"] == "gpu"
    assert nightly["global_concurrency_limit"]["limit"] == 1  # one run per repo: DVC's lock
    assert nightly["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    assert local["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(repo)
    pool = http_json(f"{api}/work_pools/gpu")
    res = pool["base_job_template"]["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert res["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"

    worker = start_worker(state_dir, env, "local")
    times["worker"] = time.monotonic() - t0
    try:
        r = services.prefect_cli(["deployment", "run", "fewstep-pipeline/local", "--watch", "--watch-interval", "2",
                                  "--watch-timeout", "300"], env, timeout=330, check=False)
        times["run"] = time.monotonic() - t0
        assert r.returncode == 0, (f"deployment run: rc {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}\n"
                                   f"worker log:\n{worker.log.read_text()[-4000:]}")
    finally:
        stop_and_check(worker)
    print(worker.log.read_text()[-1500:])

    runs = http_json(f"{api}/flow_runs/filter", {"deployments": {"id": {"any_": [local["id"]]}}})
    assert [fr["state_type"] for fr in runs] == ["COMPLETED"]
    tasks = http_json(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [runs[0]["id"]]}}})
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    names = {t["name"].rsplit("-", 1)[0] for t in tasks}
    dag = run([sys.executable, "-m", "dvc", "stage", "list", "--name-only"], repo).stdout.split()
    assert set(dag) <= set(lock["stages"]), "every stage of dvc.yaml ran"
    assert {f"repro {s}" for s in dag} | {"list-stages"} <= names, names
    assert "register" in dag or "register" in names  # as a DVC stage, or as python -m stages.register
    assert all(t["state_type"] == "COMPLETED" for t in tasks)

    # the DVC outputs of every stage, made by the worker's flow run in the temp repo
    assert {"prepare_data", "train_teacher", "distill@student-1", "collect_trajectories@teacher",
            "fit_olss@teacher-2"} <= set(lock["stages"])
    for out in ("data/prepared/manifest.json", "models/teacher/config.json", "models/student-1/config.json",
                "schedulers/teacher/olss-2.json", "metrics/olss/teacher-2.json"):
        assert (repo / out).is_file(), out
    status = json.loads(run([sys.executable, "-m", "dvc", "status", "--json"], repo).stdout)
    assert all(v == ["always changed"] for v in status.values()), status  # nothing left to reproduce

    # the scheduler turned nightly's active cron into Scheduled runs at 03:00 UTC (not local's paused one)
    def scheduled():
        return http_json(f"{api}/flow_runs/filter", {"deployments": {"id": {"any_": [nightly["id"]]}},
                                                     "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})
    sched = wait_for(scheduled, 30, what="scheduled runs of nightly")
    start = datetime.fromisoformat(sched[0]["expected_start_time"].replace("Z", "+00:00"))
    assert (start.hour, start.minute, start.utcoffset().total_seconds()) == (3, 0, 0)
    times["total"] = time.monotonic() - t0
    print("timings (s, cumulative): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
