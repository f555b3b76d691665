"""The Dask task runner of a stage (params `compute.scheduler`), which checks every
worker once before any task: the same files at the same paths, the same code
(alexnet/cluster.py says why). Apart from flows/runners.py, which imports it only for a
Dask stage: prefect-dask and distributed take a third of a second to import."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from prefect_dask import DaskTaskRunner

from alexnet.cluster import WorkerCheck, markers, problem, stage_view, worker_view
from alexnet.errors import AlexnetError, one_line

if TYPE_CHECKING:
    from distributed import Client


class CheckedDaskTaskRunner(DaskTaskRunner):
    """prefect-dask's runner; on entry, with `check`, the workers are checked (the
    cluster is then started or reached: prefect-dask would do it at the first task)."""

    def __init__(self, *args: Any, check: WorkerCheck | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.check = check

    def duplicate(self) -> CheckedDaskTaskRunner:
        runner = super().duplicate()  # the flow engine enters a duplicate
        runner.check = self.check
        return runner

    def __enter__(self) -> CheckedDaskTaskRunner:
        super().__enter__()
        if self.check is not None:
            try:
                check_workers(self.client, self.check)
            except BaseException:  # a `with` does not exit what failed to enter
                self.__exit__(*sys.exc_info())
                raise
        return self


def check_workers(client: Client, check: WorkerCheck) -> None:
    """Fail in one line, naming the first worker that does not see the stage's files
    at the same paths or runs other code or libraries."""
    with markers(check.outputs) as tokens:
        views = client.run(worker_view, list(tokens), check.present_inputs(), on_error="return")
    stage, code = stage_view(tokens), check.code_files()
    for address, view in sorted(views.items()):
        if isinstance(view, BaseException):  # no such module there, or no such library
            reason = f"cannot run the check ({type(view).__name__}: {one_line(view)})"
            line = f"{reason}: the workers need the stage's code and libraries"
        else:
            line = problem(view, stage, code)
        if line:
            raise AlexnetError(f"compute.scheduler: Dask worker {address} {line}")
