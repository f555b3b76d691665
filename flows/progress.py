"""Progress bars over mapped Prefect tasks, and results in order within a memory window."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Sequence

from prefect.futures import PrefectFuture, as_completed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

COLUMNS = (
    TextColumn("{task.description}"),
    BarColumn(),
    MofNCompleteColumn(),
    TimeRemainingColumn(),
)


def gather(futures: Sequence[PrefectFuture], label: str, weights: Sequence[int]) -> list:
    """Results of `futures` in submission order; the bar counts `weights` (e.g. images).
    For small results (all are kept): larger ones go through `in_order`."""
    weight_of = {
        future.task_run_id: weight for future, weight in zip(futures, weights, strict=True)
    }
    with Progress(*COLUMNS, transient=False) as progress:
        bar = progress.add_task(label, total=sum(weights))
        for future in as_completed(list(futures)):
            future.result()  # raise a task's error as soon as it happens
            progress.advance(bar, weight_of[future.task_run_id])
    return [future.result() for future in futures]


def in_order(
    submit: Callable[[int], PrefectFuture],
    sizes: Sequence[int],
    window: int,
    label: str,
    weights: Sequence[int],
) -> Iterator:
    """The results of tasks 0, 1, ... (`submit(i)` starts task i) in that order, holding
    at most `window` bytes of them: task i is submitted only while the `sizes` (bytes of
    its result) of the tasks submitted and not yet consumed stay within it (the next
    one to consume is always submitted). A result is released as soon as the caller
    asks for the next, so memory stays flat whatever the number of tasks."""
    ahead = held = 0
    pending: dict[int, PrefectFuture] = {}
    # Prefect's futures reference themselves (their done callbacks), so a finished one
    # and its result live until the cycle collector runs, which, with few container
    # objects allocated per result, is rarely: every result would stay in memory.
    # Collecting after each result frees it; freezing what exists now keeps each
    # collection to the objects made since (a millisecond, not a full heap scan).
    gc.freeze()
    try:
        with Progress(*COLUMNS, transient=False) as progress:
            bar = progress.add_task(label, total=sum(weights))
            for index in range(len(sizes)):
                while ahead < len(sizes) and (ahead == index or held + sizes[ahead] <= window):
                    pending[ahead] = submit(ahead)
                    held += sizes[ahead]
                    ahead += 1
                result = pending.pop(index).result()
                progress.advance(bar, weights[index])
                yield result
                del result
                held -= sizes[index]
                gc.collect()
    finally:
        gc.unfreeze()
