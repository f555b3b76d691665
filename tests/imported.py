"""A module that records the process that imported it (tests/test_forkserver.py)."""

import os

BY = os.getpid()


def by() -> tuple[int, int]:
    """(the process that imported this module, this process)"""
    return BY, os.getpid()
