"""Progress bars over mapped Prefect tasks, and results in order within a memory window."""

from __future__ import annotations

import gc
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, TypeVar

from prefect.futures import PrefectFuture
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tasks.quiet import INTERRUPTED

W = TypeVar("W")
_END: Any = object()  # the end of the works
COLUMNS = (
    TextColumn("{task.description}"),
    BarColumn(),
    MofNCompleteColumn(),
    TimeRemainingColumn(),
)


# How often a wait for a task looks for a Ctrl-C that Python dropped (`result`).
POLL_S = 0.25


def result(future: PrefectFuture) -> Any:
    """`future.result()`, stopped by a Ctrl-C even where Python dropped its
    KeyboardInterrupt: one that arrives while a weakref callback or a finalizer runs is
    printed ("Exception ignored") and lost, and the stage ran on to its end. The handler
    notes it in `INTERRUPTED` all the same, which this wait reads every `POLL_S`."""
    while not _done(future):
        _wait_a_little(future)
    return future.result()


def _wait_a_little(future: PrefectFuture) -> None:
    """Wait up to `POLL_S` for `future`, unless this process had a Ctrl-C (see `result`)."""
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt
    future.wait(POLL_S)


def _done(future: PrefectFuture) -> bool:
    """Whether the task has ended, from its runner's own future (every runner's Prefect
    future wraps one; asking Prefect for its state would be a call to its API)."""
    wrapped = getattr(future, "wrapped_future", None)
    return wrapped is None or wrapped.done()


def settle(futures: Iterable[PrefectFuture]) -> None:
    """When a stage stops early (a task's error, a Ctrl-C): cancel its tasks not yet
    started and wait for those running, so that none writes into an output the stage is
    removing on its way out (a second Ctrl-C stops the wait)."""
    futures = list(futures)
    for future in futures:
        if (wrapped := getattr(future, "wrapped_future", None)) is not None:
            wrapped.cancel()  # only a task not started: a running one cannot be
    for future in futures:
        with suppress(Exception):  # its error, or its cancellation: the first one counts
            future.wait()


def gather(futures: Sequence[PrefectFuture], label: str, weights: Sequence[int]) -> list:
    """Results of `futures` in submission order; the bar counts `weights` (e.g. images).
    For small results (all are kept): larger ones go through `in_order`."""
    weight_of = {
        future.task_run_id: weight for future, weight in zip(futures, weights, strict=True)
    }
    try:
        with Progress(*COLUMNS, transient=False) as progress:
            bar = progress.add_task(label, total=sum(weights))
            pending = list(futures)
            while pending:
                running = []
                for future in pending:  # one pass: a list less the ended is O(P * E)
                    if not _done(future):
                        running.append(future)
                        continue
                    future.result()  # raise a task's error as soon as it happens
                    progress.advance(bar, weight_of[future.task_run_id])
                if len(running) == len(pending):  # none ended: wait for the first
                    _wait_a_little(running[0])
                pending = running
    except BaseException:
        settle(futures)
        raise
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
    tasks) of those submitted and of those consumed but not yet freed stay within it
    (the next one to consume is always submitted). Memory stays flat, whatever the
    number of works."""
    works = iter(works)
    pending: deque[tuple[W, int, PrefectFuture]] = deque()
    held = 0  # submitted, not yet consumed
    released = 0  # consumed, until the next collection frees them
    following = next(works, _END)
    # Prefect's futures reference themselves (their done callbacks), so a consumed one
    # and its result live until the cycle collector runs, which, with few container
    # objects allocated per result, is rarely: every result would stay in memory. So
    # `in_order` collects, with what exists now frozen (a scan of only the objects made
    # since). Not after every result: Prefect's events client keeps up to 700 events (3
    # a task) until the server confirms them, and a collection walking them costs ~13 ms,
    # a per-task cost that grew with the run's length until the buffer was full (jpeg
    # pack on 2 cores: 1.3x the marginal cost per image at 16k images as at 4k). It
    # collects once the released results reach a quarter of the window: every ~5 chunks
    # of jpeg pack with the defaults (128 MB; 256 JPEGs of ~25 KB), every chunk of raw.
    gc.freeze()
    try:
        with Progress(*COLUMNS, transient=False) as progress:
            task = progress.add_task(bar.label, total=bar.total)
            while True:
                while following is not _END and (
                    not pending or held + released + size(following) <= window
                ):
                    pending.append((following, size(following), submit(following)))
                    held += pending[-1][1]
                    following = next(works, _END)
                if not pending:
                    return
                work, work_size, future = pending[0]  # still pending while it runs: settled
                done = result(future)
                pending.popleft()
                del future
                progress.advance(task, bar.weight(work))
                yield work, done
                del work, done
                held -= work_size
                released += work_size
                if released * 4 >= window or not pending:
                    gc.collect()
                    released = 0
    except BaseException:  # also the consumer's (GeneratorExit when it is closed)
        settle(future for _, _, future in pending)
        raise
    finally:
        gc.unfreeze()
