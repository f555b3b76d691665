"""The check of a running Dask cluster's workers before a stage maps tasks on it: the
same files at the same paths, the same code (alexnet/cluster.py says why). Imported
only for a cluster named by its address: distributed takes a third of a second to
import. (A LocalCluster, params `compute.scheduler: local`, is this machine's processes
started from this code: nothing to check.)"""

from __future__ import annotations

from typing import TYPE_CHECKING

from alexnet.cluster import WorkerCheck, markers, problem, stage_view, worker_view
from alexnet.errors import AlexnetError, one_line

if TYPE_CHECKING:
    from distributed import Client


def check_cluster(address: str, check: WorkerCheck, api_url: str, timeout: float = 30.0) -> int:
    """Reach the scheduler at `address` and check every worker (`check_workers`,
    `check_reach`), before the stage's flow starts: a refusal leaves no flow run behind,
    Running for ever on a Prefect server (it did when the task runner checked as it was
    entered). Returns how many tasks the cluster runs at once (its workers' threads)."""
    from distributed import Client

    with Client(address, timeout=timeout, set_as_default=False) as client:
        wait_for_a_worker(client, address)
        check_workers(client, check)
        check_reach(client, api_url)
        return sum(client.nthreads().values())


WORKER_WAIT_S = 60.0  # for the first worker of a cluster started with the stage


def wait_for_a_worker(client: Client, address: str) -> None:
    """Fail in one line when no worker joins the scheduler within `WORKER_WAIT_S`: the
    checks below ask every worker, which none is, and the stage's tasks would wait for
    one for ever."""
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except TimeoutError:  # (distributed's TimeoutError is the builtin)
        raise AlexnetError(
            f"compute.scheduler: the Dask scheduler at {address} has no workers (waited "
            f"{WORKER_WAIT_S:g} s): start them (`dask worker {address}` on each machine; "
            "an adaptive cluster needs a minimum of one, which the checks run on)"
        ) from None


def check_reach(client: Client, api_url: str) -> None:
    """Fail in one line, naming the first worker that cannot reach the Prefect API at
    `api_url`: each task reports its run there from its worker. A temporary server
    listens on 127.0.0.1, which a worker on another machine does not reach."""
    from flows.server import unreachable

    answers = client.run(unreachable, api_url, 5.0, on_error="return")
    for address, why in sorted(answers.items()):
        if isinstance(why, BaseException):
            why = f"{type(why).__name__}: {one_line(why)}"
        if why:
            raise AlexnetError(
                f"compute.scheduler: Dask worker {address} cannot reach the Prefect API at "
                f"{api_url} ({why}): start a server the workers reach (`prefect server "
                "start --host 0.0.0.0`) and set PREFECT_API_URL to its address"
            )


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
