"""prefect.yaml, the one list of deployments: a deployment per stage on the pool of its
kind of work, forms that explain themselves, and `alexnet serve` serving the same list."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from alexnet.params import parse_params
from alexnet.repro import STAGES
from flows.pipeline import STAGE_FLOWS
from flows.serve import deployments, flow_at, param_outputs

REPO = Path(__file__).resolve().parents[1]
SPEC = yaml.safe_load((REPO / "prefect.yaml").read_text())
DATA_STAGES = ("synth", "prepare", "stats", "pack")


def test_one_deployment_per_stage_on_its_pool_then_pipeline_and_retrain():
    entries = {entry["name"]: entry for entry in SPEC["deployments"]}
    assert list(entries) == [*STAGES, "pipeline", "retrain"]
    for stage in STAGES:
        assert flow_at(entries[stage]["entrypoint"]) is STAGE_FLOWS[stage]
        pool = "alexnet-data" if stage in DATA_STAGES else "alexnet-gpu"
        assert entries[stage]["work_pool"]["name"] == pool, stage
    assert flow_at(entries["retrain"]["entrypoint"]).name == "retrain"


def test_every_field_of_every_run_form_says_what_it_does():
    for entry in SPEC["deployments"]:
        form = flow_at(entry["entrypoint"]).parameters.properties
        assert form and all(field.get("description") for field in form.values()), entry["name"]
        assert "stage" not in form  # a stage's deployment runs that stage
    until = flow_at("flows/pipeline.py:pipeline_flow").parameters.properties["until"]
    assert "the whole chain" in until["description"]


def test_serve_serves_the_same_deployments_with_the_cron_from_params(tmp_path):
    params = parse_params({"serve": {"retrain_cron": "15 4 * * 2", "timezone": "Europe/Paris"}})
    served = {d.name: d for d in deployments(REPO, params)}
    assert list(served) == [entry["name"] for entry in SPEC["deployments"]]
    assert all(d.parameters == {"repo": str(REPO)} for d in served.values())
    (schedule,) = served["retrain"].schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("15 4 * * 2", "Europe/Paris")
    assert not served["train"].schedules


def test_only_a_deployment_whose_schedule_reads_params_runs_alexnet_param():
    # `prefect deploy --all` runs a deployment's build steps (the file's, unless it has
    # its own) once for each deployment: the file's reading the cron ran `alexnet param`
    # 16 times (~2 s each), for the one deployment that uses it.
    params = parse_params({})
    assert not param_outputs(SPEC["build"], params)
    for entry in SPEC["deployments"]:
        read = param_outputs(entry.get("build", SPEC["build"]), params)
        used = yaml.safe_dump(entry.get("schedules"))
        assert all(f"{{{{ {step}.stdout }}}}" in used for step in read), entry["name"]
    (retrain,) = [entry for entry in SPEC["deployments"] if entry["name"] == "retrain"]
    assert sorted(param_outputs(retrain["build"], params)) == ["cron", "timezone"]


def test_serve_reads_a_build_steps_value_as_alexnet_param_prints_it(tmp_path):
    # `prefect deploy` runs the step; `alexnet serve` computes its stdout: not a string
    # value (a list, a bool) was Python's repr in one and JSON in the other
    (tmp_path / "params.yaml").write_text("{}\n")
    params = parse_params({})
    for key in ("train.device", "train.amp", "serve.retrain_cron"):
        steps = [{"step": {"id": "value", "script": f"alexnet param {key}"}}]
        command = [sys.executable, "-m", "flows.cli", "param", key, "-p", "params.yaml"]
        printed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
        assert param_outputs(steps, params) == {"value": {"stdout": printed.stdout.strip()}}, key


def test_serve_refuses_to_take_over_a_work_pools_deployment(prefect_server):
    # Served under prefect.yaml's names, it replaced the work pools' deployments of the
    # same names (no pull steps, this repository's path): their workers' runs failed.
    import uuid
    from types import SimpleNamespace

    import pytest
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from alexnet.errors import AlexnetError
    from flows.serve import check_no_pool_deployments

    name, pool = f"train-{uuid.uuid4().hex[:8]}", f"pool-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        flow_id = client.create_flow_from_name("stage")
        client.create_deployment(flow_id=flow_id, name=name, work_pool_name=pool)
        client.create_deployment(flow_id=flow_id, name=f"{name}-served")  # serve's own
    check_no_pool_deployments([SimpleNamespace(full_name=f"stage/{name}-served")])
    check_no_pool_deployments([SimpleNamespace(full_name=f"stage/{name}-none")])
    with pytest.raises(AlexnetError) as refused:
        check_no_pool_deployments([SimpleNamespace(full_name=f"stage/{name}")])
    assert str(refused.value) == (
        f"deployment stage/{name} is work pool {pool}'s on this Prefect server (`prefect "
        "deploy`), and serving would replace it: serve on a server of its own, or delete it "
        f"(`prefect deployment delete stage/{name}`)"
    )
