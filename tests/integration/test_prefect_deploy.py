"""The product end to end on all four real services at once: prefect.yaml on a Prefect server (work
pools, `prefect deploy --all`, a process worker, `prefect deployment run --watch` of the whole micro
pipeline in a temp DVC repo), its data read from S3 (moto), every stage recorded as an MLflow run on
a tracking server that stores artifacts in S3, then registration with lineage and promotion."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime

import boto3
import yaml

from infra.local import services
from tests.helpers import ROOT
from tests.integration.conftest import MICRO_STAGES, image_tar, micro, run
from tests.integration.servers import MLFLOW_BUCKET, http_json, start_worker, stop_and_check, wait_for

DATA_BUCKET, DATASET, EXPERIMENT = "fewstep-deploy-data", "deploytest", "deploy-test"


def _deployment(api: str, name: str) -> dict:
    return http_json(f"{api}/deployments/name/fewstep-pipeline/{name}")


def _s3_micro(p: dict) -> None:
    micro(p)
    p["base"]["dataset"] = DATASET  # registered names of their own on the shared tracking server
    p["prepare"].update(train_source=f"s3://{DATA_BUCKET}/train.tar.gz", test_source=f"s3://{DATA_BUCKET}/test.tar.gz")


def test_deploy_worker_runs_pipeline(make_tiny_repo, prefect_server, mlflow_server, moto_server, state_dir, tmp_path):
    server, client = prefect_server
    api = client["PREFECT_API_URL"]
    services.create_bucket(moto_server.base, DATA_BUCKET)
    s3 = boto3.client("s3", endpoint_url=moto_server.base)
    for split, n, seed in (("train", 48, 0), ("test", 16, 1)):
        s3.upload_file(str(image_tar(tmp_path / f"{split}.tar.gz", n, seed)), DATA_BUCKET, f"{split}.tar.gz")
    repo = make_tiny_repo(extra=("flows", "prefect.yaml"), tweak=_s3_micro)
    env = dict(client, FEWSTEP_ROOT=str(repo))  # resolved into the pull step at deploy time
    # what the worker's flow runs (and their stage processes) inherit: the services
    worker_env = dict(env, MLFLOW_TRACKING_URI=mlflow_server.base, FEWSTEP_EXPERIMENT=EXPERIMENT,
                      AWS_ENDPOINT_URL=moto_server.base, FEWSTEP_TRACKING="required", OMP_NUM_THREADS="1")
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

    worker = start_worker(state_dir, worker_env, "local")
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

    _check_tracking_and_registry(mlflow_server.base, moto_server.base, runs[0]["id"], repo)

    # the scheduler turned nightly's active cron into Scheduled runs at 03:00 UTC (not local's paused one)
    def scheduled():
        return http_json(f"{api}/flow_runs/filter", {"deployments": {"id": {"any_": [nightly["id"]]}},
                                                     "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})
    sched = wait_for(scheduled, 30, what="scheduled runs of nightly")
    start = datetime.fromisoformat(sched[0]["expected_start_time"].replace("Z", "+00:00"))
    assert (start.hour, start.minute, start.utcoffset().total_seconds()) == (3, 0, 0)
    times["total"] = time.monotonic() - t0
    print("timings (s, cumulative): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))


def _check_tracking_and_registry(tracking_uri: str, s3_endpoint: str, flow_run_id: str, repo) -> None:
    """Every stage a FINISHED MLflow run nested under the flow's pipeline run; the models, the
    evaluator and the OLSS scheduler registered with lineage; the first champion; artifacts in S3."""
    from mlflow.tracking import MlflowClient

    from fewstep import models, storage

    c = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    exp = c.get_experiment_by_name(EXPERIMENT)
    runs = c.search_runs([exp.experiment_id])
    by_stage = {r.data.tags["fewstep.stage"]: r for r in runs}
    parent = by_stage.pop("pipeline")
    assert parent.data.tags["prefect.flow_run_id"] == flow_run_id and parent.info.status == "FINISHED"
    expected = set(MICRO_STAGES) | {"train_evaluator", "evaluate", "register", "promote"}
    assert expected <= set(by_stage), sorted(by_stage)
    for stage, r in by_stage.items():
        assert r.info.status == "FINISHED", (stage, r.info.status)
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id, stage
    teacher_run = by_stage["train_teacher"]
    assert teacher_run.data.params["teacher.steps"] == "10"
    assert len(c.get_metric_history(teacher_run.info.run_id, "loss")) >= 2
    assert by_stage["fit_olss@teacher-2"].data.metrics["rmse_vs_full_step/olss"] >= 0

    manifest = storage.read_json(repo / "data/prepared/manifest.json")
    v = {n: c.search_model_versions(f"name = '{DATASET}-{n}'") for n in
         ("teacher", "student-1step", "evaluator", "olss-teacher-2step")}
    assert all(v.values()), {n: len(x) for n, x in v.items()}
    (teacher,), (student,), (evaluator,) = v["teacher"], v["student-1step"], v["evaluator"]
    assert teacher.tags["data_hash"] == evaluator.tags["data_hash"] == manifest["content_hash"]
    assert teacher.tags["weights_sha256"] == models.load_card(repo / "models/teacher").weights_sha256
    assert (student.tags["parent_model"], student.tags["parent_version"]) == (f"{DATASET}-teacher", teacher.version)
    assert all(o.tags["parent_version"] == teacher.version for o in v["olss-teacher-2step"])
    assert teacher.run_id == by_stage["register"].info.run_id
    assert c.get_model_version_by_alias(f"{DATASET}-teacher", "champion").version == teacher.version

    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(
        Bucket=MLFLOW_BUCKET, Prefix="mlflow/", MaxKeys=1000).get("Contents", [])]
    assert any(k.endswith(f"{teacher_run.info.run_id}/artifacts/teacher.png") for k in keys), keys[:20]
    assert sum(k.endswith("artifacts/model.safetensors") for k in keys) >= 3  # teacher, student, evaluator
