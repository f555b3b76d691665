"""A progress bar over mapped Prefect tasks, advanced as each one finishes."""

from __future__ import annotations

from collections.abc import Sequence

from prefect.futures import PrefectFuture, as_completed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def gather(futures: Sequence[PrefectFuture], label: str, weights: Sequence[int]) -> list:
    """Results of `futures` in submission order; the bar counts `weights` (e.g. images)."""
    weight_of = {
        future.task_run_id: weight for future, weight in zip(futures, weights, strict=True)
    }
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        bar = progress.add_task(label, total=sum(weights))
        for future in as_completed(list(futures)):
            future.result()  # raise a task's error as soon as it happens
            progress.advance(bar, weight_of[future.task_run_id])
    return [future.result() for future in futures]
