"""`alexnet serve`: the deployments the Prefect UI runs, served from this process.

One deployment per stage (`stage/<name>`), `pipeline/pipeline` (the whole chain) and
`retrain/retrain` (the pipeline on the cron schedule of params `serve`). Each runs
`dvc repro` in the repository `alexnet serve` was started in.
"""

from __future__ import annotations

from pathlib import Path

from prefect import serve
from prefect.schedules import Cron

from alexnet.params import ServeParams
from alexnet.repro import STAGES
from flows.pipeline import pipeline_flow, retrain_flow, stage_flow


def deployments(repo: Path, params: ServeParams) -> list:
    where = {"repo": str(Path(repo).resolve())}
    stages = [
        stage_flow.to_deployment(
            name=stage,
            parameters={"stage": stage, **where},
            description=f"dvc repro {stage}",
            tags=["stage"],
        )
        for stage in STAGES
    ]
    return [
        *stages,
        pipeline_flow.to_deployment(
            name="pipeline", parameters=where, description="dvc repro: the whole chain"
        ),
        retrain_flow.to_deployment(
            name="retrain",
            parameters=where,
            schedules=[Cron(params.retrain_cron, timezone=params.timezone)],
            description="dvc repro on a schedule",
        ),
    ]


def serve_all(repo: Path, params: ServeParams) -> None:
    """Register the deployments and run their flow runs until interrupted (Ctrl-C)."""
    serve(*deployments(repo, params))
