"""Processes that must not outlive the one that started them."""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36  # linux/prctl.h
# How long a stopped training worker gets to write its checkpoint (torchrun's shutdown
# timeout, `flows.train`), and so how long a stop waits for such workers.
WORKER_GRACE_S = 300


def die_with_parent(signum: signal.Signals, parent: int) -> bool:
    """Ask Linux to send `signum` to this process when its parent (process `parent`)
    dies, however it died (SIGKILL, the OOM killer), which no handler of the parent's
    can do; elsewhere than Linux nothing is asked. False when the parent is gone already
    (before the request: no signal will come), for the caller to stop now."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    return os.getppid() == parent


def die_with(process: int, signum: signal.Signals = signal.SIGKILL) -> bool:
    """Send `signum` to this process when process `process` ends, however it ends: a
    thread waits on a pidfd of it (Linux 5.3+; elsewhere nothing is asked). Unlike
    `die_with_parent`, `process` need not be the parent: a pool worker's parent is the
    stage's forkserver, which the worker holds open (every child of the server holds its
    pipe), so that neither would end with the stage. False when it has ended already."""
    try:
        handle = os.pidfd_open(process)
    except ProcessLookupError:
        return False
    except (AttributeError, OSError):  # not Linux, or an older kernel
        return True

    def wait() -> None:
        select.select([handle], [], [])  # readable once the process has ended
        os.kill(os.getpid(), signum)

    threading.Thread(target=wait, name=f"die-with-{process}", daemon=True).start()
    return True


def adopt_orphans() -> None:
    """Make this process the parent of its descendants that lose theirs (Linux's child
    subreaper), for `wait_for_children` to wait for them; elsewhere nothing is asked."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)


def _children() -> list[int]:
    """This process's children (Linux's /proc; none where it cannot say)."""
    found: list[int] = []
    for task in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        try:
            found += [int(pid) for pid in task.read_text().split()]
        except OSError:
            continue
    return found


def reap_children() -> bool:
    """Reap the children that have exited, adopted orphans included (a zombie still counts
    in its process group); whether any child is left."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if not pid:
            return True


def wait_for_children(timeout: float) -> None:
    """Reap every child, adopted orphans included, until none is left; SIGKILL those
    still there after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while reap_children():
        if time.monotonic() > deadline:
            left = _children()
            if not left:
                return
            for child in left:
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.2)
