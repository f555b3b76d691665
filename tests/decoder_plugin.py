"""A test-only PIL format whose decoder crashes or hangs on purpose (params
prepare.plugins: `decoder_plugin`), to test that such a file costs only itself."""

from __future__ import annotations

import ctypes
import time

from PIL import Image, ImageFile

CRASH = b"CRASHME!"  # a file starting so segfaults its decoder
HANG = b"HANGME!!"  # a file starting so never finishes decoding
ABORT = b"ABORTME!"  # a file starting so aborts (SIGABRT) its decoder
# A file starting so, then a marker's path (`MARKER` bytes), then 64x48 RGB pixels: its
# decoder is SIGKILLed (as by the OOM killer) unless the marker exists, made on the way.
KILL_ONCE = b"KILLONCE"
MARKER = 200
SIZE = (64, 48)


def kill_once(marker: str, pixels: bytes) -> bytes:
    """A file whose first decode is SIGKILLed, whose next decodes give `pixels`."""
    return KILL_ONCE + marker.encode().ljust(MARKER) + pixels


class Misbehaving(ImageFile.ImageFile):
    format = "MISBEHAVING"
    format_description = "test-only: crashes or hangs its decoder"

    def _open(self) -> None:
        magic = self.fp.read(len(CRASH))
        self._size = (64, 48)
        self._mode = "RGB"
        if magic == CRASH:
            ctypes.string_at(0)  # reads address 0: SIGSEGV in C
        elif magic == ABORT:
            import os

            os.abort()
        elif magic == HANG:
            time.sleep(3600)
        elif magic == KILL_ONCE:
            import os
            import signal

            marker = self.fp.read(MARKER).decode().strip()
            if not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            self._size = SIZE
            offset = len(KILL_ONCE) + MARKER
            self.tile = [ImageFile._Tile("raw", (0, 0, *SIZE), offset, ("RGB", 0, 1))]


def _accept(prefix: bytes) -> bool:
    return prefix[: len(CRASH)] in (CRASH, HANG, ABORT, KILL_ONCE)


Image.register_open(Misbehaving.format, Misbehaving, _accept)


# Targets of `alexnet.decoder.Isolated.call` that fail outside any file.


def crash_outside_files(request, skip, at) -> None:
    at(-1)
    ctypes.string_at(0)


def fail(request, skip, at) -> None:
    raise OSError(28, "No space left on device")


def slow_outside_files(request, skip, at) -> str:
    at(-1)  # on no file (writing a shard to a slow disk): a longer limit
    time.sleep(request)
    return "written"
