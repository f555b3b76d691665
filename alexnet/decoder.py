"""Work on users' files runs in a child process, so that a file that crashes its decoder
(a segfault or abort in C code) or hangs it costs that file alone.

`Isolated.call(target, request)` runs `target(request, skip, at)` in a long-lived child
(`python -m alexnet.decoder`) and returns its answer. The target calls `at(i)` as it
starts on its i-th file; the child writes that into a few bytes of shared memory, so
the parent knows which file the child was on when it died, and how long it has been on
it. A child that dies, or stays on one file longer than `timeout` seconds, is killed;
the call is made again in a fresh child with that file in `skip` ({index: "decoder
crashed (SIGSEGV)" or "timed out after 60 s"}), which the target treats as a file it
could not use (after a SIGKILL or a timeout, which the machine's load can cause, only
once the file has done it twice). The target computes the same thing either way, so
what it makes is what it would make had that file been absent.

Why a whole call (the prepare stage: a whole shard) and not each file: when nothing
crashes, the parent only sleeps in `select`, waking once a second to look at the child's
progress; no file's bytes, and no message per file, cross between the processes. What
isolation costs is then one request and one answer per call (`bench/prepare.py`
measures it next to the same work done in-process).

Wire format: frames of a 4-byte little-endian length and JSON. The request: {"target":
"module:function", "request": ..., "skip": {index: reason}}; the answer: {"result": ...}
or {"error": one line} (a failure of the call itself, e.g. a full disk).
"""

from __future__ import annotations

import atexit
import importlib
import json
import mmap
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any, BinaryIO

from alexnet.errors import AlexnetError, is_user_error, user_line

LENGTH = struct.Struct("<I")
PROGRESS = struct.Struct("<qq")  # steps taken (each at()), index of the current file
READY = b"alexnet-decoder ready\n"
START_TIMEOUT = 120.0  # s for a fresh child to import PIL, numpy and the plugins
KILL_WAIT = 10.0  # s for a killed child to end; one still there is stuck in the kernel
NO_FILE_TIMES = 10  # the timeout on no file (writing a shard), in files' timeouts
# Where the progress file lives: memory (tmpfs) where there is one.
_SHM = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None

At = Callable[[int], None]  # at(i): the target starts on its i-th file (-1: on none)


class DecoderDied(Exception):
    """The child ended or stopped making progress; `str()` is the file's reason;
    `transient`: a death the machine's load may have caused (SIGKILL, a timeout)."""

    def __init__(self, reason: str, transient: bool = False, index: int | None = None) -> None:
        super().__init__(reason)
        self.transient = transient
        self.index = index  # the step it stopped on, where read with the decision


# Ends the reason of a file skipped for a death the machine's load may have caused (its
# second): `alexnet.prepare` makes such a shard again at the next run rather than reuse
# it, so that what is skipped depends on the files, not on how busy the machine was.
AGAIN_NEXT_RUN = " (twice: perhaps the machine's load; tried again at the next run)"


class DecoderFailed(AlexnetError):
    """The child died on no file (between files: writing the shard), or twice on one."""


class CallFailed(AlexnetError):
    """The target raised (not on a file: e.g. its output could not be written)."""


class Isolated:
    """One child process that runs calls; restarted after a crash or a hang."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._child: subprocess.Popen | None = None
        self._progress: mmap.mmap | None = None

    def call(self, target: str, request: Any) -> Any:
        """`target(request, skip, at)` ("module:function"), run in the child. Each file
        the child dies or hangs on is put in `skip` and the call made again; one it was
        killed or timed out on (which the machine's load can do: the OOM killer, a busy
        disk) is tried once more first, so that what is skipped depends on the files."""
        skip: dict[int, str] = {}
        retried: set[int] = set()
        while True:
            child = self._running()
            # The child reads the whole request before it starts, so this write cannot
            # wait on it; failing, it blames no file (the call goes to a new child).
            message = {"target": target, "request": request, "skip": skip}
            try:
                _send(child.stdin, json.dumps(message).encode())
                answer = self._answer(child)
            except DecoderDied as died:
                index = self._current() if died.index is None else died.index
                self.close()
                if index < 0:
                    raise DecoderFailed(f"the image decoder died between files ({died})") from None
                if index in skip:  # a step it was told to skip (not taken): not the file's
                    raise DecoderFailed(
                        f"the image decoder died on a step it skips ({died})"
                    ) from None
                if died.transient and index not in retried:
                    retried.add(index)
                    continue
                skip[index] = str(died) + (AGAIN_NEXT_RUN if died.transient else "")
                continue
            if "error" in answer:
                raise CallFailed(answer["error"])
            return answer["result"]

    def close(self) -> None:
        """Stop the child (killed: it may be stuck in C code). One that a kill does not
        end within `KILL_WAIT` is left behind with a warning: it is stuck in the kernel
        (a read on a hung network file system cannot be interrupted), and waiting for it
        would hang the stage with it."""
        if self._child is not None:
            child = self._child
            child.kill()
            try:
                child.wait(timeout=KILL_WAIT)
            except subprocess.TimeoutExpired:
                warnings.warn(
                    f"the image decoder process {child.pid} did not end when killed (stuck "
                    "in the kernel: a hung network file system?); going on without it",
                    stacklevel=2,
                )
            child.stdin.close()
            child.stdout.close()
        if self._progress is not None:
            self._progress.close()
        self._child, self._progress = None, None

    def _steps(self) -> int:
        return PROGRESS.unpack_from(self._progress)[0]

    def _current(self) -> int:
        return PROGRESS.unpack_from(self._progress)[1]

    def _answer(self, child: subprocess.Popen) -> dict:
        """The child's answer; `DecoderDied` when it ends first or spends longer than
        `timeout` on one file. Sleeps in between: nothing here costs the child CPU."""
        fd = child.stdout.fileno()
        poll = min(1.0, self.timeout / 10)
        steps, since = self._steps(), time.monotonic()
        while not select.select([fd], [], [], poll)[0]:
            # both numbers at once: the step that is judged is the step that is blamed
            now, index = PROGRESS.unpack_from(self._progress)
            if now != steps:
                steps, since = now, time.monotonic()
            elif time.monotonic() - since > (limit := self._limit(index)):
                raise DecoderDied(f"timed out after {limit:g} s", transient=True, index=index)
        frame = _read_frame(child.stdout)  # written in one piece: here whole, or never
        if frame is None:
            reason = _death(child)  # the OOM killer's SIGKILL: maybe the load's doing
            raise DecoderDied(reason, transient=child.returncode == -signal.SIGKILL)
        return json.loads(frame)

    def _limit(self, index: int) -> float:
        """How long the child may stay on step `index`: `timeout` on a file; on none
        (writing the shard: the disk's time, not a file's) `NO_FILE_TIMES` that."""
        return self.timeout * (1 if index >= 0 else NO_FILE_TIMES)

    def _running(self) -> subprocess.Popen:
        # A child that ended between calls (killed from outside) is replaced, so that
        # its death is not put on the next call's first file.
        if self._child is not None and self._child.poll() is not None:
            self.close()
        if self._child is None:
            # Already unlinked: a kill of either process leaves nothing behind.
            with tempfile.TemporaryFile(prefix="alexnet-decoder-", dir=_SHM) as shared:
                shared.truncate(PROGRESS.size)
                self._progress = mmap.mmap(shared.fileno(), PROGRESS.size)
                # The child imports from where this process does (params prepare.plugins).
                path = os.pathsep.join(entry for entry in sys.path if entry)
                self._child = subprocess.Popen(
                    [sys.executable, "-m", "alexnet.decoder", str(os.getpid())]
                    + [str(shared.fileno())],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    pass_fds=[shared.fileno()],
                    env={**os.environ, "PYTHONPATH": path},
                )
            PROGRESS.pack_into(self._progress, 0, 0, -1)
            ready = _read_exactly(self._child.stdout, len(READY), START_TIMEOUT)
            if ready != READY:
                self.close()
                raise RuntimeError("the image decoder process did not start")
        return self._child


def _read_exactly(stream: BinaryIO, size: int, timeout: float) -> bytes:
    if not select.select([stream.fileno()], [], [], timeout)[0]:
        return b""
    return stream.read(size)


def _death(child: subprocess.Popen) -> str:
    try:
        code = child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        return "decoder crashed (closed its output)"
    if code < 0:
        return f"decoder crashed ({signal.Signals(-code).name})"
    return f"decoder crashed (exit status {code})"


def _send(stream: BinaryIO, frame: bytes) -> None:
    # One write per message: the reader wakes once for it, not once per piece.
    try:
        stream.write(LENGTH.pack(len(frame)) + frame)
        stream.flush()
    except (BrokenPipeError, ValueError):  # the child is gone
        raise DecoderDied("decoder crashed (stopped reading)") from None


def _read_frame(stream: BinaryIO) -> bytes | None:
    head = stream.read(LENGTH.size)
    if len(head) < LENGTH.size:
        return None  # the other side closed the pipe
    (size,) = LENGTH.unpack(head)
    frame = stream.read(size)
    return frame if len(frame) == size else None


_local = threading.local()


def isolated(timeout: float) -> Isolated:
    """This thread's child (threads of one Dask worker each get their own)."""
    children: dict[float, Isolated] = _local.__dict__.setdefault("children", {})
    if timeout not in children:
        children[timeout] = child = Isolated(timeout)
        atexit.register(child.close)
    return children[timeout]


# The child.


def _watch_parent(parent: int) -> None:
    # A child stuck in C code never reads the closed pipe; it must not outlive its parent.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _run(message: dict, at: At) -> dict:
    module, name = message["target"].split(":")
    target = getattr(importlib.import_module(module), name)
    skip = {int(index): reason for index, reason in message["skip"].items()}
    try:
        result = target(message["request"], skip, at)
    except Exception as error:
        if not is_user_error(error):
            traceback.print_exc()  # to stderr, the parent's: the whole story for a bug
        return {"error": user_line(error)}
    finally:
        at(-1)
    return {"result": result}


def serve(parent: int, progress_fd: int) -> None:
    """The child's loop: answer requests until the parent closes the pipe."""
    from alexnet.runtime import configure

    configure()
    # PIL warns about what it tolerates in a file (corrupt EXIF, ...): thousands of lines
    # on a real folder, while each file's result already says what happened to it.
    warnings.simplefilter("ignore")
    progress = mmap.mmap(progress_fd, PROGRESS.size)
    steps = 0

    def at(index: int) -> None:
        nonlocal steps
        steps += 1
        PROGRESS.pack_into(progress, 0, steps, index)

    requests = os.fdopen(os.dup(0), "rb")
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the answers
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    answers.write(READY)
    answers.flush()
    while (request := _read_frame(requests)) is not None:
        _send(answers, json.dumps(_run(json.loads(request), at)).encode())


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
