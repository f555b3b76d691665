"""Which Prefect task runner a stage maps its tasks on (params `compute`)."""

from __future__ import annotations

import os

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner


def task_runner(scheduler: str | None, workers: int) -> TaskRunner:
    """A process pool by default; Dask when a scheduler is named ('local' starts a
    temporary LocalCluster, anything else is the address of a running one)."""
    workers = workers or os.cpu_count() or 1
    if scheduler is None:
        return ProcessPoolTaskRunner(max_workers=workers)
    from prefect_dask import DaskTaskRunner

    if scheduler == "local":
        cluster = {"n_workers": workers, "threads_per_worker": 1, "dashboard_address": None}
        return DaskTaskRunner(cluster_kwargs=cluster)
    return DaskTaskRunner(address=scheduler)
