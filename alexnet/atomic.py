"""Outputs appear whole or not at all: write under a temporary name, then rename.

A killed process leaves at most a hidden `.NAME.tmp-PID` beside the target, which the
next run removes (`remove_leftovers`); the target itself is either the previous complete
version or the new complete one (a folder is swapped by two renames, the old one set
aside as a leftover first, so a kill between them leaves no target, never part of one).

A folder is replaced whole only when it is empty or alexnet wrote it (the `OWNED` file in
it says so): a folder of the user's files named as an output by mistake (`alexnet synth
~/photos`) is refused before any work, and loses nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alexnet.errors import AlexnetError

# Written into every folder alexnet writes whole: the mark that it may replace it. Fixed
# bytes, so a folder's content (and DVC's hash of it) depends only on its data.
OWNED = ".alexnet-output"
OWNED_TEXT = b"written whole by alexnet-pipeline, which replaces it whole when run again\n"


class OutputError(AlexnetError):
    """An output path whose present content alexnet must not replace."""


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_output(path: str | Path, sole_writer: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write (a file or a folder); on success it replaces `path`.
    `sole_writer`: no other process writes `path` now, so what killed writers of it left
    goes first (a large output's temporary is as large as the output). A folder written
    gets the `OWNED` mark; an existing folder at `path` must be empty or have it."""
    path = Path(path)
    check_replaceable(path)
    if sole_writer:
        remove_leftovers(path.parent, path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    try:
        yield temporary
        if temporary.is_dir():
            (temporary / OWNED).write_bytes(OWNED_TEXT)
        if path.is_dir() and temporary.is_dir():
            aside = path.with_name(f"{temporary.name}-old")
            os.replace(path, aside)
            os.replace(temporary, path)
            shutil.rmtree(aside)
        else:
            os.replace(temporary, path)
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)


def check_replaceable(path: Path) -> None:
    """Refuse (one line) to replace a folder that holds files and not the `OWNED` mark."""
    if path.is_dir() and not (path / OWNED).is_file() and next(path.iterdir(), None):
        raise OutputError(
            f"{path}: a folder with files and without the {OWNED} mark of alexnet's "
            "output folders, which this output would replace whole; name a new or empty "
            "folder, or remove this one"
        )


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_output(path) as temporary:
        with open(temporary, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())


def write_json(path: str | Path, value: object) -> None:
    write_bytes(path, (json.dumps(value, indent=2, sort_keys=False) + "\n").encode())


def remove_leftovers(folder: str | Path, name: str = "*") -> None:
    """Delete what killed runs left behind in `folder` (hidden `.*.tmp-*` entries; those
    of the target `name` only, when given). Only for a target one process writes at a
    time: a live writer's temporary would go too."""
    for path in Path(folder).glob(f".{name}.tmp-*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
