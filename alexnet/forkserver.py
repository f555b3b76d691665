"""The forkserver a process's worker processes are forked from, their imports done once.

A worker started by spawn imports everything it runs afresh: Prefect for a pool worker,
torch for a loader worker, ~1.5-2.5 s of CPU each (bench/tasks.py). multiprocessing's
forkserver is one process per process that uses it, started with the first worker and
forked for each: what it imported first (`preload`) each worker has at once. A fork of
the server, not of the caller: the caller's threads (Prefect's, CUDA's) are not copied
into a child that cannot run them.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from multiprocessing import forkserver as _server
from multiprocessing.context import ForkServerContext

_PRELOADED: set[str] = {"__main__"}  # multiprocessing's own default


def forkserver(*modules: str) -> ForkServerContext:
    """The forkserver context, its server to import `modules` when it starts. Once it
    runs (this process's first worker started it), later `modules` are imported by each
    worker itself, as by spawn: what a worker runs is the same either way."""
    _PRELOADED.update(modules)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(sorted(_PRELOADED))
    return context


def start_ignoring(*signals: signal.Signals) -> None:
    """Start this process's forkserver now (if it is not running), with `signals` ignored:
    it and every worker forked from it keep ignoring them (an ignored signal stays ignored
    across exec and fork). For a stop sent to the whole process group (torchrun's SIGTERM
    to its workers' groups, a stage's group stopped): the process that owns the workers
    acts on it, at its next step, and they end with it. Only the main thread may set a
    handler; elsewhere the server starts as it is."""
    if threading.current_thread() is not threading.main_thread():
        _server.ensure_running()
        return
    handlers = {number: signal.signal(number, signal.SIG_IGN) for number in signals}
    try:
        _server.ensure_running()
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
