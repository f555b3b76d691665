"""Processes that must not outlive the one that started them."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(signum: signal.Signals, parent: int) -> bool:
    """Ask Linux to send `signum` to this process when its parent (process `parent`)
    dies, however it died (SIGKILL, the OOM killer), which no handler of the parent's
    can do; elsewhere than Linux nothing is asked. False when the parent is gone already
    (before the request: no signal will come), for the caller to stop now."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    return os.getppid() == parent
