"""Processes that must not outlive the one that started them."""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1  # linux/prctl.h


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
