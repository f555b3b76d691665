"""Peak anonymous memory of a command and of its largest descendant, sampled from
`/proc/<pid>/status` (RssAnon: the heap, not the files a process maps, such as an LMDB
or the page cache). Used by bench/scale.py and by the tests that hold memory flat."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

INTERVAL = 0.01  # s between samples: a peak that lasts less may be missed
RESCAN = 0.25  # s between looks for new descendants (a scan of /proc: ~10x a sample)


@dataclass(frozen=True)
class Sampled:
    seconds: float
    main_peak: int  # bytes: the command's own process
    worker_peak: int  # bytes: its largest descendant (pool worker, Dask worker, ...)
    returncode: int
    output: str  # stdout and stderr, for an error message


def anon_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):  # the process has just ended
        pass
    return 0


def _descendants(process: psutil.Process) -> list[int]:
    try:
        return [child.pid for child in process.children(recursive=True)]
    except psutil.Error:  # it has just ended
        return []


def run_sampled(command: list[str], **popen) -> Sampled:
    """Run `command` to the end (extra `Popen` keyword arguments: cwd, env) sampling
    the anonymous memory of it and of its descendants."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )
    main = psutil.Process(process.pid)
    main_peak = worker_peak = 0
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.append(process.stdout.read()), daemon=True)
    reader.start()
    children: list[int] = []
    scanned = 0.0
    # The sampler shares the machine with what it measures: on 2 cores, scanning /proc
    # for descendants at every sample took 40% of a core and slowed the stages it timed.
    while process.poll() is None:
        if time.perf_counter() - scanned > RESCAN:
            children = _descendants(main)
            scanned = time.perf_counter()
        main_peak = max(main_peak, anon_bytes(process.pid))
        for child in children:
            worker_peak = max(worker_peak, anon_bytes(child))
        time.sleep(INTERVAL)
    seconds = time.perf_counter() - start
    reader.join()
    return Sampled(seconds, main_peak, worker_peak, process.returncode, "".join(chunks))
