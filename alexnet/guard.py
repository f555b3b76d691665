"""`python -m alexnet.guard PARENT COMMAND...`: run COMMAND in a process group of its own,
and stop that group when this process is asked to (SIGTERM) or when process PARENT dies,
however it died.

`alexnet.repro` starts `dvc repro` through it. dvc runs in a session of its own so that
a stop reaches its stage too (dvc exits on SIGTERM, the stage it started does not). A
caller that is stopped gets an exception and asks the guard to stop; a caller that is
killed outright (SIGKILL, the OOM killer) runs nothing, and without the guard dvc and
its stage would go on, orphaned, writing outputs while the next run takes the
repository's turn. Linux tells the guard of its parent's death (`PR_SET_PDEATHSIG`);
either way it stops the group (`stop_group`): SIGTERM, a grace for the stage to exit
(train saves a checkpoint), SIGKILL; then it waits for the processes of the tree that
run in sessions of their own (torchrun's workers), which it adopts as they lose their
parents. Elsewhere than Linux only the caller's own stop is heard.

Each guard holds the repository's `alexnet.repro.leftovers_lock` from before it starts
COMMAND until it ends: a stopped run's guard may still wait for such workers after
Prefect has killed the run's flow and let go of its turn, and the next run's guard then
waits for it before starting its `dvc repro`.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from alexnet.orphans import (
    WORKER_GRACE_S,
    adopt_orphans,
    die_with_parent,
    reap_children,
    wait_for_children,
)
from alexnet.repro import leftovers_lock

# A stopped run's stages get this long to exit (train checkpoints), then SIGKILL: less
# than the 30 s a Prefect runner gives a cancelled flow's process before it kills it.
STOP_GRACE_S = 20


WAITING = "waiting for an earlier run on this repository (or what a stopped one left) to end"


class Stop(Exception):
    pass


def _stop(*_) -> None:
    raise Stop


def hold(path: Path) -> IO:
    """`path` locked (flock) for this process's life, waiting, with a line that says so,
    while another guard holds it."""
    handle = path.open("a")  # (not inherited: Python opens it close-on-exec)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(WAITING, flush=True)
        fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group of `process` (started in a session of its own), then,
    after `STOP_GRACE_S`, SIGKILL to whatever of it is left: dvc exits at once on SIGTERM,
    while its stage goes on unless signalled itself."""
    group = process.pid
    _signal_group(group, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline:
        process.poll()  # reap dvc, or its zombie keeps the group alive
        reap_children()  # and the adopted orphans of the group (zombies count too)
        if not _signal_group(group, 0):
            return
        time.sleep(0.2)
    _signal_group(group, signal.SIGKILL)
    process.wait()


def _signal_group(group: int, number: int) -> bool:
    """Send `number` to the group; whether any process of it was there."""
    try:
        os.killpg(group, number)
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str]) -> int:
    parent, command = int(argv[0]), argv[1:]
    signal.signal(signal.SIGTERM, _stop)  # reset to the default in COMMAND (exec)
    signal.signal(signal.SIGUSR1, _stop)
    alive = die_with_parent(signal.SIGUSR1, parent)
    adopt_orphans()
    child = None
    try:
        if not alive:  # died before the request above: nobody to run for
            raise Stop
        _lock = hold(leftovers_lock(Path.cwd()))  # held until the guard ends
        child = subprocess.Popen(command, start_new_session=True)
        code = child.wait()
    except Stop:
        for number in (signal.SIGTERM, signal.SIGUSR1):  # one stop, not interrupted
            signal.signal(number, signal.SIG_IGN)
        if child is not None:
            stop_group(child)
        # What the tree left running in sessions of its own (torchrun's workers, which
        # torchrun passed the stop on to, then left at a second SIGTERM or at the group's
        # SIGKILL): they are waited for until they have checkpointed and exited.
        wait_for_children(WORKER_GRACE_S + 30)
        return 128 + signal.SIGTERM
    return 128 - code if code < 0 else code  # a signal's death as a shell reports it


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
