"""`python -m alexnet.guard PARENT COMMAND...`: run COMMAND in a process group of its own,
and stop that group when this process is asked to (SIGTERM) or when process PARENT dies,
however it died.

`alexnet.repro` starts `dvc repro` through it. dvc runs in a session of its own so that
a stop reaches its stage too (dvc exits on SIGTERM, the stage it started does not). A
caller that is stopped gets an exception and asks the guard to stop; a caller that is
killed outright (SIGKILL, the OOM killer) runs nothing, and without the guard dvc and
its stage would go on, orphaned, writing outputs while the next run takes the
repository's turn. Linux tells the guard of its parent's death (`PR_SET_PDEATHSIG`);
either way it stops the group with `alexnet.repro.stop_group`: SIGTERM, a grace for the
stage to exit (train saves a checkpoint), SIGKILL; then it waits for the processes of
the tree that run in sessions of their own (torchrun's workers), which it adopts as they
lose their parents. Elsewhere than Linux only the caller's own stop is heard.
"""

from __future__ import annotations

import signal
import subprocess
import sys

from alexnet.orphans import WORKER_GRACE_S, adopt_orphans, die_with_parent, wait_for_children
from alexnet.repro import stop_group


class Stop(Exception):
    pass


def _stop(*_) -> None:
    raise Stop


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
        child = subprocess.Popen(command, start_new_session=True)
        code = child.wait()
    except Stop:
        for number in (signal.SIGTERM, signal.SIGUSR1):  # one stop, not interrupted
            signal.signal(number, signal.SIG_IGN)
        if child is not None:
            stop_group(child)
        # What the tree left running in sessions of its own (torchrun's workers, which
        # torchrun passed the stop on to, then left at a second SIGTERM or at the group's
        # SIGKILL): the turn is not over until they have checkpointed and exited.
        wait_for_children(WORKER_GRACE_S + 30)
        return 128 + signal.SIGTERM
    return 128 - code if code < 0 else code  # a signal's death as a shell reports it


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
