"""A test-only PIL format whose decoder crashes or hangs on purpose (params
prepare.plugins: `decoder_plugin`), to test that such a file costs only itself."""

from __future__ import annotations

import ctypes
import time

from PIL import Image, ImageFile

CRASH = b"CRASHME!"  # a file starting so segfaults its decoder
HANG = b"HANGME!!"  # a file starting so never finishes decoding
ABORT = b"ABORTME!"  # a file starting so aborts (SIGABRT) its decoder


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


def _accept(prefix: bytes) -> bool:
    return prefix[: len(CRASH)] in (CRASH, HANG, ABORT)


Image.register_open(Misbehaving.format, Misbehaving, _accept)


# Targets of `alexnet.decoder.Isolated.call` that fail outside any file.


def crash_outside_files(request, skip, at) -> None:
    at(-1)
    ctypes.string_at(0)


def fail(request, skip, at) -> None:
    raise OSError(28, "No space left on device")
