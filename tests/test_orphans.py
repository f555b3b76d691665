"""Processes that end with another: die_with."""

import signal
import subprocess
import sys

from tests.helpers import REPO

WAITER = """
import sys, time
from alexnet.orphans import die_with
print(die_with(int(sys.argv[1])), flush=True)
time.sleep(60)
"""


def waiter(pid: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WAITER, str(pid)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )


def test_a_process_ends_when_the_one_it_waits_on_ends():
    # Not its parent: the process it waits on is its sibling here.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    process = waiter(other.pid)
    try:
        assert process.stdout.readline() == "True\n"
        assert process.poll() is None
        other.kill()
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        for started in (other, process):
            started.kill()
            started.wait()


def test_waiting_on_a_process_that_ended_is_refused():
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    process = waiter(ended.pid)
    try:
        assert process.stdout.readline() == "False\n"
    finally:
        process.kill()
        process.wait()
