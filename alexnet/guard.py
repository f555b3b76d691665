"""`python -m alexnet.guard PARENT GRACE COMMAND...`: run COMMAND in this process group
and stop the whole group when process PARENT dies, however it died.

`alexnet.repro` starts `dvc repro` in a session of its own, so that stopping a run can
signal its stage too (dvc exits on SIGTERM, the stage it started does not). A caller that
is stopped gets an exception and stops the group itself; a caller that is killed outright
(SIGKILL, the OOM killer) runs nothing, and dvc and its stage would go on, orphaned,
writing outputs while the next run takes the repository's turn. This guard is the
group's leader: Linux tells it of its parent's death (`PR_SET_PDEATHSIG`), and it stops
the group as a cancel does: SIGTERM, GRACE seconds (train saves a checkpoint), SIGKILL.
Elsewhere than Linux it only runs COMMAND.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class ParentDied(Exception):
    pass


def _parent_died(*_) -> None:
    raise ParentDied


def others_in_group(group: int) -> bool:
    """Whether a process other than this one is in process group `group` (/proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold ")"
        if int(fields[2]) == group and fields[0] != "Z":  # pgrp; a zombie has exited
            return True
    return False


def stop_group(grace: float) -> None:
    """SIGTERM to every process of this group, then SIGKILL to what is left after `grace`."""
    group = os.getpgrp()
    os.killpg(group, signal.SIGTERM)  # this process's own handler ignores it
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and others_in_group(group):
        time.sleep(0.2)
    os.killpg(group, signal.SIGKILL)  # this process too


def main(argv: list[str]) -> int:
    parent, grace, command = int(argv[0]), float(argv[1]), argv[2:]
    # A group SIGTERM (the caller's own stop) is for dvc and the stage: a handler, not
    # SIG_IGN, which COMMAND would inherit. This process ends when COMMAND does.
    signal.signal(signal.SIGTERM, lambda *_: None)
    if sys.platform.startswith("linux"):
        signal.signal(signal.SIGUSR1, _parent_died)
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGUSR1)
    try:
        if os.getppid() != parent:  # died before the request above: nobody to run for
            raise ParentDied
        child = subprocess.Popen(command)
        code = child.wait()
    except ParentDied:
        stop_group(grace)
        return 128 + signal.SIGKILL  # not reached: stop_group kills this process too
    return 128 - code if code < 0 else code  # a signal's death as a shell reports it


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
