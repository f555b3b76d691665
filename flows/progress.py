"""Progress bars over mapped Prefect tasks, and results in order within a memory window."""

from __future__ import annotations

import gc
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from prefect.futures import PrefectFuture, as_completed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

W = TypeVar("W")
_END: Any = object()  # the end of the works
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


@dataclass(frozen=True)
class Bar:
    """A progress bar over work items: its label, its total, and each item's share."""

    label: str
    total: int
    weight: Callable[[Any], int] = lambda work: 1


def in_order(
    works: Iterable[W],
    submit: Callable[[W], PrefectFuture],
    window: int,
    bar: Bar,
    size: Callable[[W], int] = lambda work: 1,
) -> Iterator[tuple[W, Any]]:
    """(work, result) for each of `works` in order, `submit(work)` starting its task,
    holding at most `window` of them: a work is taken from `works` (which may be a
    generator) and submitted only while the `size`s (e.g. bytes of its result; 1 counts
    tasks) of those submitted and not yet consumed stay within it (the next one to
    consume is always submitted). A result is released as soon as the caller asks for
    the next, so memory stays flat whatever the number of works."""
    works = iter(works)
    pending: deque[tuple[W, int, PrefectFuture]] = deque()
    held = 0
    following = next(works, _END)
    # Prefect's futures reference themselves (their done callbacks), so a finished one
    # and its result live until the cycle collector runs, which, with few container
    # objects allocated per result, is rarely: every result would stay in memory.
    # Collecting after each result frees it; freezing what exists now keeps each
    # collection to the objects made since (a millisecond, not a full heap scan).
    gc.freeze()
    try:
        with Progress(*COLUMNS, transient=False) as progress:
            task = progress.add_task(bar.label, total=bar.total)
            while True:
                while following is not _END and (not pending or held + size(following) <= window):
                    pending.append((following, size(following), submit(following)))
                    held += pending[-1][1]
                    following = next(works, _END)
                if not pending:
                    return
                work, work_size, future = pending.popleft()
                result = future.result()
                del future
                progress.advance(task, bar.weight(work))
                yield work, result
                del work, result
                held -= work_size
                gc.collect()
    finally:
        gc.unfreeze()
