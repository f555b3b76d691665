"""Which Prefect task runner a stage maps its tasks on (params `compute`)."""

from __future__ import annotations

import os

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner


def parallelism(workers: int) -> int:
    """How many tasks run at once for params `compute.workers` (0: one per CPU core; on
    a running Dask cluster, set it to the cluster's worker count)."""
    return workers or os.cpu_count() or 1


def task_runner(scheduler: str | None, workers: int) -> TaskRunner:
    """A process pool by default; Dask when a scheduler is named ('local' starts a
    temporary LocalCluster, anything else is the address of a running one)."""
    workers = parallelism(workers)
    if scheduler is None:
        return ProcessPoolTaskRunner(max_workers=workers)
    from prefect_dask import DaskTaskRunner

    if scheduler == "local":
        cluster = {"n_workers": workers, "threads_per_worker": 1, "dashboard_address": None}
        return DaskTaskRunner(cluster_kwargs=cluster)
    return DaskTaskRunner(address=scheduler)
