"""`alexnet serve`: the deployments of prefect.yaml, served from this process.

prefect.yaml declares the deployments once, for `prefect deploy --all` and its workers;
`alexnet serve` reads it and serves the same flows, names, tags and schedules on one
machine, without work pools: each run does `dvc repro` in the repository `alexnet serve`
was started in. The schedules' `{{ step.stdout }}` placeholders are the values of the
build steps `alexnet param KEY`, read here from params.yaml as `prefect deploy` would.
"""

from __future__ import annotations

import importlib
import shlex
from pathlib import Path

import yaml
from prefect import Flow, serve
from prefect.schedules import Cron
from prefect.utilities.templating import apply_values
from pydantic import ValidationError

from alexnet.errors import AlexnetError
from alexnet.params import Params, ParamsError, param_text

SPEC = "prefect.yaml"


def flow_at(entrypoint: str) -> Flow:
    """The flow of an entrypoint `path/to/module.py:name`."""
    path, name = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


def param_outputs(steps: list[dict] | None, params: Params) -> dict[str, dict[str, str]]:
    """{step id: {"stdout": value}} of the build `steps` that print a parameter."""
    outputs = {}
    for step in steps or []:
        (inputs,) = step.values()
        words = shlex.split(inputs.get("script", ""))
        if words[:2] == ["alexnet", "param"] and len(words) == 3:
            outputs[inputs["id"]] = {"stdout": param_text(params, words[2])}
    return outputs


def check_schedule(params: Params, source: str) -> None:
    """params `serve`'s cron and time zone, as Prefect will read them: a wrong one is one
    line naming the file (`source`) and the key now, not a traceback when `serve` or
    `prefect deploy` uses it."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=params.serve.retrain_cron, timezone=params.serve.timezone)
    except ValidationError as error:
        first = error.errors()[0]
        key = {"cron": "retrain_cron"}.get(first["loc"][0], first["loc"][0])
        message = first["msg"].removeprefix("Value error, ")
        raise ParamsError(f"{source}: serve.{key}: {message}") from None


def _cron(schedule: dict) -> Cron:
    """A prefect.yaml schedule (`cron:`, `timezone:`): the only kind the file uses."""
    options = {key: value for key, value in schedule.items() if key != "cron"}
    return Cron(schedule["cron"], **options)


def deployments(repo: Path, params: Params) -> list:
    spec = yaml.safe_load((repo / SPEC).read_text())
    where = {"repo": str(Path(repo).resolve())}
    made = []
    for entry in spec["deployments"]:
        # its own build steps in place of the file's, as `prefect deploy` runs them
        values = param_outputs(entry.get("build", spec.get("build")), params)
        schedules = apply_values(entry.get("schedules") or [], values)
        made.append(
            flow_at(entry["entrypoint"]).to_deployment(
                name=entry["name"],
                parameters={**entry.get("parameters", {}), **where},
                tags=entry.get("tags"),
                schedules=[_cron(schedule) for schedule in schedules],
            )
        )
    return made


def check_no_pool_deployments(served: list) -> None:
    """Refuse, in one line, to take over a deployment of the same name that `prefect
    deploy` made for a work pool on this server: serving replaced it (no pull steps, this
    repository's path), and its workers' runs then failed until it was deployed again."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for deployment in served:
            try:
                existing = client.read_deployment_by_name(deployment.full_name)
            except ObjectNotFound:
                continue
            if existing.work_pool_name:
                raise AlexnetError(
                    f"deployment {deployment.full_name} is work pool "
                    f"{existing.work_pool_name}'s on this Prefect server (`prefect deploy`), "
                    "and serving would replace it: serve on a server of its own, or delete "
                    f"it (`prefect deployment delete {deployment.full_name}`)"
                )


def serve_all(repo: Path, params: Params) -> None:
    """Register the deployments and run their flow runs until interrupted (Ctrl-C)."""
    served = deployments(repo, params)
    check_no_pool_deployments(served)
    serve(*served)
