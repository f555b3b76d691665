"""Which Prefect task runner a stage maps its tasks on (params `compute`)."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner

from alexnet import runtime
from alexnet.errors import AlexnetError
from alexnet.forkserver import forkserver
from alexnet.orphans import die_with

if TYPE_CHECKING:
    from distributed import LocalCluster


# A temporary cluster (`compute.scheduler: local`): one thread a worker, and a scheduler
# with no dashboard whose HTTP routes (health, metrics) take a free port of this host.
# distributed serves them on 8787 even with the dashboard off, and any other cluster on
# the machine (another stage's, a test worker's) holds that port: every start warned.
# Each worker preloads `tasks.quiet` (its `dask_setup`): no traceback when the scheduler
# closes with the stage under a heartbeat.
LOCAL_CLUSTER = {
    "threads_per_worker": 1,
    "dashboard_address": "127.0.0.1:0",
    "scheduler_kwargs": {"dashboard": False},
    "preload": ["tasks.quiet"],
}


def parallelism(workers: int) -> int:
    """How many tasks run at once for params `compute.workers` (0: one per CPU core; a
    stage on a running Dask cluster is given the cluster's threads in its place,
    `flows.stages.run_stage`)."""
    return workers or runtime.cores()


_IN_POOL_WORKER = False  # set by `worker_setup`


def worker_setup(stage: int) -> None:
    """In each pool worker, first: ignore SIGINT, and end with the stage (process
    `stage`). A Ctrl-C at the terminal reaches every process of the stage; a worker it
    killed broke the pool, whose other workers ran on, and the stage hung at exit. Now
    the stage alone stops: it cancels the queued tasks and waits for the running ones
    (DVC and the next run see whole outputs or none). A stage killed outright (SIGKILL,
    the OOM killer) left its workers idle, and their decoder children with them.

    A worker's parent is the stage's forkserver, which it holds open (as every child of
    the server does): it waits on the stage itself."""
    global _IN_POOL_WORKER
    _IN_POOL_WORKER = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not die_with(stage):  # nothing of a worker's is left to save
        os._exit(1)


@contextmanager
def interrupts_ignored() -> Iterator[None]:
    """SIGINT ignored meanwhile, in the main thread (signals are the main thread's; from
    another, nothing changes). A process started meanwhile keeps ignoring it from its
    first instruction: the disposition survives exec, and Python then installs no
    KeyboardInterrupt handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    interrupts = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, interrupts)


class PoolTaskRunner(ProcessPoolTaskRunner):
    """Prefect's process pool, its workers forked from a forkserver that imported Prefect
    and the flow's tasks once (`alexnet.forkserver`; Prefect spawns each, and each
    imported them: ~2.4 s of CPU a worker), every worker started on entry with SIGINT
    ignored. Started on demand, a spawned worker spent seconds importing before its
    initializer ran: a Ctrl-C then printed its traceback and broke the pool. (The
    forkserver, started here, ignores it from its start, and so do its children until
    `worker_setup`, which ignores it too, for a pool entered outside the main thread.)"""

    def __enter__(self) -> PoolTaskRunner:
        super().__enter__()
        if _IN_POOL_WORKER:
            # Prefect enters a copy of the flow's runner around each task a worker runs
            # (to rebuild the flow's context there). Starting its workers spawned two
            # processes a task, and a task cost ~2 s on 2 cores: 100x a thread's task.
            return self
        spawning = self._executor  # Prefect's, none of its workers started yet
        # what a worker runs a task with: Prefect's engine, the installed Prefect
        # collections, which it loads at its first task (prefect-dask: dask and
        # distributed, ~0.5 s), and the flow's tasks (imported here by now)
        tasks = sorted(name for name in sys.modules if name.startswith("tasks."))
        self._executor = ProcessPoolExecutor(
            max_workers=self._max_workers,
            mp_context=forkserver("prefect.task_engine", "prefect_dask", __name__, *tasks),
            initializer=spawning._initializer,  # Prefect's own, which calls ours
            initargs=spawning._initargs,
        )
        spawning.shutdown()
        with interrupts_ignored():  # a submit starts a worker while none is idle
            for _ in range(self._max_workers):
                self._executor.submit(os.getpid)
        return self


def task_runner(scheduler: str | None, workers: int) -> TaskRunner:
    """A process pool by default; Dask when a scheduler is named ('local' starts a
    temporary LocalCluster, anything else is the address of a running one)."""
    workers = parallelism(workers)
    if scheduler is None:
        return PoolTaskRunner(
            max_workers=workers, initializer=worker_setup, initargs=(os.getpid(),)
        )
    from prefect_dask import DaskTaskRunner

    if scheduler == "local":
        cluster = {**LOCAL_CLUSTER, "n_workers": workers}
        return DaskTaskRunner(cluster_class=local_cluster, cluster_kwargs=cluster)
    return DaskTaskRunner(address=scheduler)


def check_scheduler(scheduler: str | None, timeout: float = 10.0) -> None:
    """Fail in one line when params `compute.scheduler` names a cluster that does not
    answer (otherwise distributed fails after its own timeout, in pages of traceback).
    Only TCP addresses (tcp://, tls://, or no scheme) are checked."""
    if scheduler in (None, "local"):
        return
    address = urlsplit(scheduler if "://" in scheduler else f"tcp://{scheduler}")
    if address.scheme not in ("tcp", "tls"):
        return
    try:
        socket.create_connection((address.hostname, address.port), timeout=timeout).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise AlexnetError(
            f"compute.scheduler: no Dask scheduler answers at {scheduler} ({reason}); "
            "start one (`dask scheduler`) or set compute.scheduler to null or 'local'"
        ) from None


def check_lasting_api(scheduler: str | None, configured_api: str | None) -> None:
    """Fail in one line when a running cluster would report to a temporary Prefect
    server: a worker keeps the API it first reported to (Prefect's events client, made
    once a process), so the next stage's task runs went to a server stopped with the
    stage before, and none was recorded."""
    if scheduler in (None, "local") or configured_api:
        return
    raise AlexnetError(
        f"compute.scheduler: the Dask cluster at {scheduler} outlives this stage, its "
        "temporary Prefect server does not (a worker keeps reporting to the first it "
        "reached): start a server the workers reach (`prefect server start --host "
        "0.0.0.0`) and set PREFECT_API_URL to its address"
    )


def local_cluster(**kwargs) -> LocalCluster:
    """A LocalCluster that leaves this process's environment as it found it.

    distributed's nannies give their workers one thread each for OpenMP, MKL and
    OpenBLAS (its `distributed.nanny.pre-spawn-environ`) by writing them into the
    os.environ of the process that starts the cluster, where they stay: every process
    it starts afterwards (the train command, torchrun) would inherit them, train on one
    thread, and compute other bits than a run on all cores. The workers, spawned by
    then, keep theirs. (A worker that a nanny restarts later sets them again.)

    Its worker processes start with SIGINT ignored, as the process pool's workers
    (`worker_setup`): a Ctrl-C stops the stage, not each worker with a traceback."""
    from distributed import LocalCluster

    before = dict(os.environ)
    try:
        with interrupts_ignored():
            return LocalCluster(**kwargs)
    finally:
        for name in set(os.environ) - set(before):
            del os.environ[name]
        os.environ.update(before)
