"""Images are prepared in a child process, so that a file that crashes its decoder (a
segfault or abort in C code) or hangs it costs that file alone.

`Isolated.prepare_all` hands a shard's files to a long-lived child (`python -m
alexnet.decoder`) and waits for each answer at most `timeout` seconds. A child that dies
while preparing a file, or answers too late, is killed; that file becomes a `BadImage`
("decoder crashed (SIGSEGV)", "timed out after 60 s") and the rest go to a fresh child.
Nothing else changes: the child runs the same `prepare_image` on the same bytes, so a
shard is the same whichever files crashed.

What it costs when nothing crashes is kept small (`bench/prepare.py` measures it): one
child per thread for the whole run; no file's bytes cross a pipe (on a VM, 100 KB
through a pipe costs ~160 us, a twentieth of a decode): the parent copies a shard's files
into one shared memory file the child maps and the child writes the JPEGs into another,
so the pipes carry one request per shard and a short JSON answer per file, which the
parent collects every 50 ms.

Wire format: frames of a 4-byte little-endian length and JSON. The request: {"options",
"files": [[offset, size, extension], ...]} (where each file lies in the shared file);
each answer: {"converted", "offset", "size"} (where its JPEG lies in the child's shared
file) or {"reason"}.
"""

from __future__ import annotations

import atexit
import fcntl
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
import warnings
from collections.abc import Sequence
from typing import BinaryIO

from alexnet.imageops import BadImage, Prepared, prepare_image, reason_for

LENGTH = struct.Struct("<I")
READY = b"alexnet-decoder ready\n"
PIPE_SIZE = 1 << 20  # Linux's default /proc/sys/fs/pipe-max-size
BATCH_WAIT = 0.05  # s the reader sleeps before it looks for more answers
START_TIMEOUT = 120.0  # s for a fresh child to import PIL, numpy and the plugins
# Where the shared file lives: memory (tmpfs) where there is one.
_SHM = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class DecoderDied(Exception):
    """The child ended or stopped answering; `str()` is the file's reason."""


class _SharedFile:
    """A file in memory (tmpfs) that both processes map: the files' bytes one way, the
    prepared JPEGs the other. Unlinked once both have it open, so a kill leaves nothing."""

    def __init__(self, path: str, writable: bool) -> None:
        self.fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        self.writable = writable
        self.map: mmap.mmap | None = None

    def ensure(self, size: int) -> mmap.mmap:
        """The mapping, grown (the file too, when writable) to hold `size` bytes."""
        if self.map is None or len(self.map) < size:
            if self.writable and os.fstat(self.fd).st_size < size:
                os.ftruncate(self.fd, max(size, 2 * (len(self.map) if self.map else 0)))
            length = os.fstat(self.fd).st_size
            if self.map is not None:
                self.map.close()
            access = mmap.ACCESS_WRITE if self.writable else mmap.ACCESS_READ
            self.map = mmap.mmap(self.fd, length, access=access)
        return self.map

    def read(self, offset: int, size: int) -> bytes:
        return self.ensure(offset + size)[offset : offset + size] if size else b""

    def write(self, offset: int, data: bytes) -> None:
        if data:
            self.ensure(offset + len(data))[offset : offset + len(data)] = data

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
        os.close(self.fd)


class Isolated:
    """One child process that prepares images; restarted after a crash or a hang."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._child: subprocess.Popen | None = None
        self._pending = bytearray()  # bytes read from the child, from offset `_start` on
        self._start = 0
        self._chunk = bytearray(PIPE_SIZE)
        self._files: _SharedFile | None = None  # the files' bytes, for the child
        self._jpegs: _SharedFile | None = None  # the child's prepared JPEGs

    def prepare(self, data: bytes, extension: str, options: dict) -> Prepared:
        """`prepare_image(data, extension, **options)`, computed in the child."""
        (result,) = self.prepare_all([(data, extension)], options)
        if isinstance(result, BadImage):
            raise result
        return result

    def prepare_all(
        self, files: Sequence[tuple[bytes, str]], options: dict
    ) -> list[Prepared | BadImage]:
        """`prepare_image` of each (bytes, extension), in order. The child gets them all
        in one request and answers file by file; each answer is waited for at most
        `timeout` seconds after the one before it. After a crash or a hang, the rest go
        to a new child."""
        results: list[Prepared | BadImage] = []
        while len(results) < len(files):
            child = self._running()
            rest = files[len(results) :]
            try:
                # The child reads the whole request before it starts on a file, so this
                # write cannot wait on it; failing, it blames no file (a new child retries).
                _send(child.stdin, self._share(rest, options))
            except DecoderDied:
                self.close()
                continue
            try:
                for _ in rest:
                    results.append(self._answer(child))
            except DecoderDied as died:
                results.append(BadImage(str(died)))  # the file the child was on
                self.close()
        return results

    def close(self) -> None:
        """Stop the child (killed: it may be stuck in C code)."""
        if self._child is not None:
            self._child.kill()
            self._child.wait()
            self._child.stdin.close()
            self._child.stdout.close()
        for shared in (self._files, self._jpegs):
            if shared is not None:
                shared.close()
        self._child, self._files, self._jpegs = None, None, None
        self._pending, self._start = bytearray(), 0

    def _answer(self, child: subprocess.Popen) -> Prepared | BadImage:
        answer = json.loads(self._frame(child, time.monotonic() + self.timeout))
        if "reason" in answer:
            return BadImage(answer["reason"])
        return Prepared(self._jpegs.read(answer["offset"], answer["size"]), answer["converted"])

    def _running(self) -> subprocess.Popen:
        # A child that ended between files (killed from outside) is replaced, so that its
        # death is not put on the next file.
        if self._child is not None and self._child.poll() is not None:
            self.close()
        if self._child is None:
            paths = [tempfile.mkstemp(prefix="alexnet-decoder-", dir=_SHM) for _ in range(2)]
            for fd, _ in paths:
                os.close(fd)
            # The child imports from where this process does (params prepare.plugins).
            path = os.pathsep.join(entry for entry in sys.path if entry)
            self._child = subprocess.Popen(
                [sys.executable, "-m", "alexnet.decoder", str(os.getpid())]
                + [name for _, name in paths],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": path},
            )
            self._files = _SharedFile(paths[0][1], writable=True)
            self._jpegs = _SharedFile(paths[1][1], writable=False)
            _widen(self._child.stdin.fileno(), self._child.stdout.fileno())
            try:
                ready = self._read(self._child, len(READY), time.monotonic() + START_TIMEOUT)
            except DecoderDied as died:
                self.close()
                raise RuntimeError(f"the image decoder process did not start: {died}") from None
            finally:
                for _, name in paths:  # both sides hold them open now
                    os.unlink(name)
            assert ready == READY, ready
        return self._child

    def _share(self, files: Sequence[tuple[bytes, str]], options: dict) -> bytes:
        """Copy the files' bytes into the shared file; the request that points at them."""
        entries, offset = [], 0
        self._files.ensure(max(sum(len(data) for data, _ in files), 1))
        for data, extension in files:
            self._files.write(offset, data)
            entries.append((offset, len(data), extension))
            offset += len(data)
        return json.dumps({"options": options, "files": entries}).encode()

    def _frame(self, child: subprocess.Popen, deadline: float) -> bytes:
        (size,) = LENGTH.unpack(self._read(child, LENGTH.size, deadline))
        return self._read(child, size, deadline)

    def _read(self, child: subprocess.Popen, size: int, deadline: float) -> bytes:
        """Exactly `size` bytes from the child, or `DecoderDied` when it ends first or
        the deadline passes without them."""
        fd = child.stdout.fileno()
        while len(self._pending) - self._start < size:
            left = deadline - time.monotonic()
            # Let a few answers pile up: waking up for each one costs CPU next to the
            # child's (a tenth of a decode on a VM), and the pipe holds ~40 of them.
            time.sleep(min(BATCH_WAIT, max(left, 0)))
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise DecoderDied(f"timed out after {self.timeout:g} s")
            # All the answers that are there, into one reused buffer (a fresh 1 MB
            # bytes object per read would cost more than the answer's copy).
            count = os.readv(fd, [self._chunk])
            if not count:
                raise DecoderDied(_death(child))
            if self._start:  # drop what was consumed before growing the buffer
                del self._pending[: self._start]
                self._start = 0
            self._pending += memoryview(self._chunk)[:count]
        frame = bytes(self._pending[self._start : self._start + size])
        self._start += size
        return frame


def _widen(*pipes: int) -> None:
    # A file (~110 KB on average for ImageNet) then crosses in one write instead of waiting
    # for the reader at every 64 KB: fewer switches between the two processes per file.
    for fd in pipes:
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except (AttributeError, OSError):  # not Linux, or above the system's limit
            pass


def _death(child: subprocess.Popen) -> str:
    try:
        code = child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        return "decoder crashed (closed its output)"
    if code < 0:
        return f"decoder crashed ({signal.Signals(-code).name})"
    return f"decoder crashed (exit status {code})"


def _send(stream: BinaryIO, *frames: bytes) -> None:
    # One write per message: the reader wakes once for it, not once per piece.
    message = b"".join(part for frame in frames for part in (LENGTH.pack(len(frame)), frame))
    try:
        stream.write(message)
        stream.flush()
    except (BrokenPipeError, ValueError):  # the child is gone
        raise DecoderDied("decoder crashed (stopped reading)") from None


_local = threading.local()


def isolated(timeout: float) -> Isolated:
    """This thread's decoder (threads of one Dask worker each get their own child)."""
    decoders: dict[float, Isolated] = _local.__dict__.setdefault("decoders", {})
    if timeout not in decoders:
        decoders[timeout] = decoder = Isolated(timeout)
        atexit.register(decoder.close)
    return decoders[timeout]


# The child.


def _read_frame(stream: BinaryIO) -> bytes | None:
    head = stream.read(LENGTH.size)
    if len(head) < LENGTH.size:
        return None  # the parent closed the pipe: done
    (size,) = LENGTH.unpack(head)
    return stream.read(size)


def _watch_parent(parent: int) -> None:
    # A child stuck in C code never reads the closed pipe; it must not outlive its parent.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def serve(parent: int, files_path: str, jpegs_path: str) -> None:
    """The child's loop: answer requests until the parent closes the pipe."""
    from alexnet.runtime import configure

    configure()
    # PIL warns about what it tolerates in a file (corrupt EXIF, ...): thousands of lines
    # on a real folder, while each file's result already says what happened to it.
    warnings.simplefilter("ignore")
    files = _SharedFile(files_path, writable=False)
    jpegs = _SharedFile(jpegs_path, writable=True)
    requests = os.fdopen(os.dup(0), "rb")
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the answers
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    answers.write(READY)
    answers.flush()
    while (request := _read_frame(requests)) is not None:
        request = json.loads(request)
        written = 0  # the parent has copied out every answer of an earlier request
        for offset, size, extension in request["files"]:
            try:
                prepared = prepare_image(files.read(offset, size), extension, **request["options"])
            except BadImage as error:
                reply = {"reason": str(error)}
            except Exception as error:  # a plugin that failed to import
                reply = {"reason": reason_for(error)}
            else:
                jpegs.write(written, prepared.jpeg)
                reply = {"converted": prepared.converted, "offset": written}
                reply["size"] = len(prepared.jpeg)
                written += len(prepared.jpeg)
            _send(answers, json.dumps(reply).encode())


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2], sys.argv[3])
