"""Processes that must not outlive the one that started them."""

from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(signum: signal.Signals) -> bool:
    """Ask Linux to send `signum` to this process when its parent dies, however it died
    (SIGKILL, the OOM killer), which no handler of the parent's can do. False elsewhere
    than Linux: nothing is asked."""
    if not sys.platform.startswith("linux"):
        return False
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    return True
