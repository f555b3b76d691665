"""The chain through DVC end to end, and the Prefect UI path: a real `prefect server`,
`alexnet serve`, the REST API the UI calls, a deployment run to Completed."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from alexnet.figures import FIGURES
from alexnet.imports import closure
from alexnet.report import render
from alexnet.repro import STAGES, repro, stage_environment, status_clean
from flows.pipeline import retrain_flow
from tests.helpers import TINY_CHAIN, free_port, repo_copy

pytestmark = pytest.mark.usefixtures("own_temporary_folder")


def dvc_repro(repo: Path) -> list[str]:
    return repro(repo, log=lambda line: None)


def dvc_status(repo: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


@pytest.mark.long
def test_dvc_repro_runs_the_chain_and_reruns_only_what_changed(tmp_path, prefect_server):
    # The stages report to the session's Prefect server (PREFECT_API_URL is inherited),
    # so none of the stage runs starts a temporary server of its own.
    repo = repo_copy(
        tmp_path / "repo", {**TINY_CHAIN, "prepare": {**TINY_CHAIN["prepare"], "raw": "../raw"}}
    )
    synth = [sys.executable, "-m", "flows.cli", "synth", str(tmp_path / "raw")]
    subprocess.run(
        [*synth, "-p", str(repo / "params.yaml")], cwd=repo, check=True, capture_output=True
    )
    assert dvc_repro(repo) == list(STAGES)
    metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    assert metrics["images"] == 4 and set(metrics) >= {"top1_error", "center_top5_error"}
    # Section 6.1's figures are DVC plots, and the report page holds them and the curves.
    shown = dvc_json(repo, "plots", "show", "--json")["data"]
    for name in FIGURES:
        [image] = shown[f"metrics/eval/{name}.png"]
        figure = (repo / "metrics" / "eval" / f"{name}.png").read_bytes()
        assert image["type"] == "image" and Path(image["url"]).read_bytes() == figure
    assert render(repo / "metrics").count('src="data:image/png;base64,') == 1 + len(FIGURES)
    # A scheduled retrain with nothing new does nothing.
    assert retrain_flow(repo=str(repo))["ran"] == [] and status_clean(repo)

    def edit(section: str, **values) -> None:
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params[section] = {**params.get(section, {}), **values}
        (repo / "params.yaml").write_text(yaml.safe_dump(params))

    # DVC sees the stages whose params changed, or whose data changed, and nothing else
    # (the stages after them run once their outputs change: the retrain below shows it).
    # prepare.quality: prepare makes the images with it, train records it in the model.
    edit("prepare", quality=80)
    assert sorted(dvc_status(repo)) == ["prepare", "train"]
    edit("prepare", quality=90)
    # A one-line code edit marks exactly the stages whose code imports the file.
    for name in ("alexnet/imageops.py", "alexnet/lrn.py"):
        source = repo / name
        original = source.read_bytes()
        source.write_bytes(original + b"# an edit\n")
        # from the code itself, not from dvc.yaml: the import closure of each stage's flow
        importers = [s for s in STAGES if repo / name in closure(repo, f"flows.{s}")]
        assert importers and sorted(dvc_status(repo)) == sorted(importers), name
        source.write_bytes(original)
    assert dvc_status(repo) == {}
    # New images in the raw folder (outside the repo, as ImageNet's) change prepare.
    extra = next((tmp_path / "raw" / "train").iterdir())
    first = next(extra.iterdir())
    added = extra / f"added{first.suffix}"
    added.write_bytes(first.read_bytes())
    assert list(dvc_status(repo)) == ["prepare"]
    added.unlink()
    # A retrain after a changed train param runs train and evaluate only, and reports
    # the metrics of the new model.
    edit("train", lr=0.02)
    state = retrain_flow(repo=str(repo), return_state=True)
    retrained = state.result()
    assert retrained["ran"] == ["train", "evaluate"]
    # The run as the UI shows it: a task per stage in chain order, each marked, and the
    # stages that ran have their own flow run as a child of their task.
    tasks, children = stage_tasks(state.state_details.flow_run_id)
    assert [t.name for t in tasks] == list(STAGES)
    assert [t.state.name for t in tasks] == ["Up to date"] * 4 + ["Ran", "Ran"]
    assert {name: run.state.type.value for name, run in children.items()} == {
        "train": "COMPLETED",
        "evaluate": "COMPLETED",
    }
    assert all(run.parent_task_run_id in {t.id for t in tasks} for run in children.values())
    assert retrained["metrics"]["metrics/eval.json:images"] == 4 and status_clean(repo)
    # It pushed to the default remote (next to the repository): a second clone pulls
    # every output back, and nothing is left to run.
    assert retrained["pushed"]
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "retrained"], cwd=repo, check=True)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    pulled = subprocess.run(
        [sys.executable, "-m", "dvc", "pull"], cwd=clone, capture_output=True, text=True
    )
    assert pulled.returncode == 0, pulled.stderr
    assert dvc_status(clone) == {}
    assert (clone / "models" / "alexnet.pt").read_bytes() == (
        repo / "models" / "alexnet.pt"
    ).read_bytes()
    # An experiment: a param set on the command line runs the stages it affects, `dvc exp
    # show` lists its params and metrics beside the commit's, `dvc plots diff` draws both.
    # (An evaluate param: the retrain above ran train after a train param already.)
    identity = {
        f"GIT_{who}_{what}": value
        for who in ("AUTHOR", "COMMITTER")
        for what, value in (("NAME", "test"), ("EMAIL", "test@localhost"))
    }
    ran = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "run", "-n", "seed-1", "-S", "evaluate.seed=1"],
        cwd=repo,
        capture_output=True,
        text=True,
        env={**stage_environment(), **identity},  # the stages' python: this one
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert re.findall(r"Running stage '(\w+)'", ran.stdout + ran.stderr) == ["evaluate"]
    experiment = named(dvc_json(repo, "exp", "show", "--json"), "seed-1")
    assert experiment["params"]["params.yaml"]["data"]["evaluate"]["seed"] == 1
    assert experiment["metrics"]["metrics/eval.json"]["data"]["images"] == 4
    diff = dvc_json(repo, "plots", "diff", "HEAD", "seed-1", "--json")["data"]
    assert diff["metrics/train/plots/metrics/val_loss.tsv"][0]["revisions"] == ["HEAD", "seed-1"]
    assert [e["revisions"] for e in diff["metrics/eval/kernels.png"]] == [["HEAD"], ["seed-1"]]


def dvc_json(repo: Path, *args: str) -> object:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def named(node: object, name: str) -> dict | None:
    """The `data` of the entry called `name` anywhere in `dvc exp show --json`."""
    if isinstance(node, dict) and node.get("name") == name and "data" in node:
        return node["data"]
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    return next((found for c in children if (found := named(c, name)) is not None), None)


def stage_tasks(flow_run_id) -> tuple[list, dict]:
    """A pipeline run's task runs in start order, and its child flow runs by flow name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentTaskRunId,
    )
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
        )
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[t.id for t in tasks])
            )
        )
        names = {f.id: f.name for f in client.read_flows()}
    return tasks, {names[run.flow_id]: run for run in children}


def api(url: str, path: str, body: dict | None = None, patience: float = 60) -> object:
    """One REST call as the UI makes it; a busy server's 503 is retried for `patience` s."""
    deadline = time.monotonic() + patience
    while True:
        request = urllib.request.Request(
            url + path,
            method="GET" if body is None else "POST",
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            if error.code != 503 or time.monotonic() > deadline:
                raise
            time.sleep(1)


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextmanager
def real_server(tmp_path: Path, **settings: str) -> Iterator[tuple[str, dict]]:
    """A `prefect server start` on 127.0.0.1 (Prefect `settings` as environment variables)
    with a home of its own; yields its API URL and the environment of its clients."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": url,
        **settings,
    }
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    with background([*command, "--port", str(port)], env, tmp_path / "server.log"):
        wait_for(lambda: api(url, "/health") is True, 150, "the Prefect server")
        yield url, env


@contextmanager
def background(command: list[str], env: dict, log: Path, cwd: Path | None = None):
    """A process of its own session, its output in `log`; stopped (its whole group) on
    leaving, as a terminal's Ctrl-C would."""
    with open(log, "w") as output:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def finished(url: str, run_id: str) -> str | None:
    state = api(url, f"/flow_runs/{run_id}")["state"]["type"]
    return state if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None


@pytest.mark.long
def test_prefect_ui_path_serve_deployments_and_a_triggered_stage(tmp_path):
    repo = repo_copy(tmp_path / "repo", {**TINY_CHAIN, "serve": {"retrain_cron": "15 4 * * 2"}})
    with (
        # `serve` looks for runs to start every second, not every 10 s
        real_server(tmp_path, PREFECT_RUNNER_POLL_FREQUENCY="1") as (url, env),
        background(
            [sys.executable, "-m", "flows.cli", "serve"], env, tmp_path / "serve.log", cwd=repo
        ),
    ):
        names = [*STAGES, "pipeline", "retrain"]
        deployments = wait_for(
            lambda: (
                (found := api(url, "/deployments/filter", {}))
                and len(found) >= len(names)
                and found
            ),
            120,
            "the served deployments",
        )
        by_name = {d["name"]: d for d in deployments}
        assert sorted(by_name) == sorted(names)
        crons = [s["schedule"].get("cron") for s in by_name["retrain"]["schedules"]]
        assert crons == ["15 4 * * 2"]
        # The run form: every field says what it does, and a stage's has no stage to edit.
        form = by_name["prepare"]["parameter_openapi_schema"]["properties"]
        assert sorted(form) == ["force", "push", "repo"] and form["force"]["type"] == "boolean"
        assert all(field.get("description") for field in form.values())
        run = api(url, f"/deployments/{by_name['prepare']['id']}/create_flow_run", {})
        state = wait_for(lambda: finished(url, run["id"]), 300, "the flow run")
        assert state == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
        assert (repo / "data" / "prepared" / "report.json").exists()
        status = subprocess.run(
            [sys.executable, "-m", "dvc", "status", "prepare"],
            cwd=repo,
            capture_output=True,
            text=True,
        )
        assert "up to date" in status.stdout, status.stdout


def shared_repository(tmp_path: Path) -> Path:
    """A clone of the project whose `origin` (a bare repository) and DVC remote are
    absolute paths, as a team's are: what every worker's fresh clone fetches from."""
    repo = repo_copy(tmp_path / "repo", TINY_CHAIN)
    dvc = [sys.executable, "-m", "dvc", "remote", "modify", "shared", "url"]
    subprocess.run([*dvc, str(tmp_path / "dvc-remote")], cwd=repo, check=True)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run([*git, "commit", "-qam", "the team's remote"], cwd=repo, check=True)
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(origin)], check=True)
    subprocess.run(["git", "remote", "add", "origin", str(origin)], cwd=repo, check=True)
    return repo


@pytest.mark.long
def test_workers_run_the_deployments_of_prefect_yaml(tmp_path):
    # README, "More machines": pools, `prefect deploy --all`, a worker on the data pool.
    repo = shared_repository(tmp_path)
    fast = {  # the scheduler and the worker poll every 2 s, not every minute or 10 s
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        # one scheduled run of a schedule at a time, not the next hundred
        "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS": "1",
        "PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS": "1",
    }
    with real_server(tmp_path, **fast) as (url, env):
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # alexnet, dvc
        prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
        for pool in ("alexnet-data", "alexnet-gpu"):
            command = [*prefect, "work-pool", "create", pool, "--type", "process"]
            subprocess.run(command, env=env, check=True, capture_output=True)
        deployed = subprocess.run(
            [*prefect, "deploy", "--all"], cwd=repo, env=env, capture_output=True, text=True
        )
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
        by_name = {d["name"]: d for d in api(url, "/deployments/filter", {})}
        assert sorted(by_name) == sorted([*STAGES, "pipeline", "retrain"])
        assert by_name["synth"]["work_pool_name"] == "alexnet-data"
        assert by_name["train"]["work_pool_name"] == "alexnet-gpu"
        crons = [s["schedule"].get("cron") for s in by_name["retrain"]["schedules"]]
        assert crons == [
            yaml.safe_load((repo / "params.yaml").read_text())["serve"]["retrain_cron"]
        ]

        synth = by_name["synth"]["id"]
        worker = [*prefect, "worker", "start", "--pool", "alexnet-data"]
        (tmp_path / "node").mkdir()
        with background(worker, env, tmp_path / "worker.log", cwd=tmp_path / "node"):
            # Two runs at once on one repository (as from the UI while the cron retrain
            # runs: in each worker's clone, so they would overlap), and a scheduled run due
            # in seconds (hourly from then: a cron's every minute waited ~30 s for its
            # first); the repository's concurrency limit makes them take turns.
            runs = [
                api(url, f"/deployments/{synth}/create_flow_run", {"parameters": {"force": True}})
                for _ in range(2)
            ]
            soon = (datetime.now(UTC) + timedelta(seconds=5)).isoformat()
            hourly = {"schedule": {"interval": 3600, "anchor_date": soon}, "active": True}
            api(url, f"/deployments/{synth}/schedules", [hourly])
            by_deployment = {"flow_runs": {"deployment_id": {"any_": [synth]}}}
            scheduled = wait_for(
                lambda: sorted(
                    (run["expected_start_time"], run["id"])
                    for run in api(url, "/flow_runs/filter", by_deployment)
                    if run["auto_scheduled"]
                )[:1],
                90,
                "the scheduler to create the scheduled run",
            )
            ids = [run["id"] for run in runs] + [scheduled[0][1]]
            states = [wait_for(lambda i=i: finished(url, i), 240, f"run {i}") for i in ids]
            log = (tmp_path / "worker.log").read_text()[-4000:]
            assert states == ["COMPLETED"] * 3, log
            turns = sorted(repro_span(url, i) for i in ids)
    # Each run's `dvc repro` began after the one before had ended: one at a time.
    assert all(first[1] <= second[0] for first, second in itertools.pairwise(turns)), turns
    assert any((tmp_path / "dvc-remote").rglob("*"))  # the runs pushed what they made


def repro_span(url: str, flow_run_id: str) -> tuple[datetime, datetime]:
    """When the `dvc repro` task of a stage deployment's run started and ended."""
    tasks = api(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    (task,) = [t for t in tasks if t["task_key"].startswith("repro_stage")] or tasks
    return datetime.fromisoformat(task["start_time"]), datetime.fromisoformat(task["end_time"])
