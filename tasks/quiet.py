"""User errors (`alexnet.errors.is_user_error`) on the console as the CLI's one line, without the
traceback Prefect's console handler would add, in whichever process raised them: the
CLI's own, or a worker of the task runner (the Prefect API still gets the whole record
for the UI)."""

from __future__ import annotations

import functools
import logging
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import ParamSpec, TypeVar

from alexnet.errors import Interrupted, is_user_error

P = ParamSpec("P")
R = TypeVar("R")


# Set when this process gets a Ctrl-C (`note_interrupts`). Prefect or pydantic may turn
# the KeyboardInterrupt into an error of their own (a serializer wraps it as
# PydanticSerializationError): whatever a run raises after one is the interruption.
INTERRUPTED = threading.Event()


def note_interrupts() -> None:
    """Remember a Ctrl-C in INTERRUPTED, then raise KeyboardInterrupt as Python does.
    One that Python drops (raised while a weakref callback or a finalizer runs) is not
    printed as "Exception ignored" and its traceback: INTERRUPTED stops the stage (the
    waits of `flows.progress` read it), which says so in one line."""

    def interrupted(signum: int, frame: FrameType | None) -> None:
        INTERRUPTED.set()
        signal.default_int_handler(signum, frame)

    if threading.current_thread() is threading.main_thread():  # signals: main only
        signal.signal(signal.SIGINT, interrupted)
        if sys.unraisablehook is not _quiet_dropped_interrupt:
            global _unraisable
            _unraisable, sys.unraisablehook = sys.unraisablehook, _quiet_dropped_interrupt


_unraisable = sys.unraisablehook  # the hook before `note_interrupts`, for all the rest


def _quiet_dropped_interrupt(report) -> None:
    """`sys.unraisablehook`: a KeyboardInterrupt after a Ctrl-C is not reported."""
    if not (issubclass(report.exc_type, KeyboardInterrupt) and INTERRUPTED.is_set()):
        _unraisable(report)


class NoUserErrorTracebacks(logging.Filter):
    """Drop console records that carry a user error, a stop that was asked for (SIGTERM:
    the CLI says where the run stopped, in one line) or any error after a Ctrl-C."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info and record.exc_info[1]
        quiet = is_user_error(error) or isinstance(error, Interrupted) or INTERRUPTED.is_set()
        return not (error and quiet)


def quiet_console_tracebacks() -> None:
    """Filter every Prefect console handler of this process."""
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *map(logging.getLogger, logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler):
                handler.addFilter(NoUserErrorTracebacks())


# What a Dask worker logs, with its traceback, when its heartbeat finds the scheduler's
# stream closed (distributed's worker.py; dask/distributed#7891, open)
HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat."


class NoHeartbeatToAClosedScheduler(logging.Filter):
    """Drop a worker's report that its heartbeat met a closed stream. A temporary
    cluster's scheduler lives in the stage's process and closes with it: a heartbeat
    under way then printed a page of traceback beside the stage's last line, at a
    Ctrl-C or at a normal end (a race in distributed's shutdown)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info and record.exc_info[1]
        closed = type(error).__name__ == "CommClosedError"  # (not imported: distributed's)
        return not (record.msg == HEARTBEAT_FAILED and closed)


def dask_setup(worker: object) -> None:
    """distributed's preload hook, run in each worker of a temporary cluster as it
    starts (`flows.runners.LOCAL_CLUSTER`)."""
    logging.getLogger("distributed.worker").addFilter(NoHeartbeatToAClosedScheduler())


def quiet_user_errors(function: Callable[P, R]) -> Callable[P, R]:
    """For a task's function: when it raises a user error, quiet this (worker) process's
    console before the task engine logs it."""

    @functools.wraps(function)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        except Exception as error:
            if is_user_error(error):
                quiet_console_tracebacks()
            raise

    return run
