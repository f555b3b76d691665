"""Outputs appear whole or not at all: write under a temporary name, then rename.

A killed process leaves at most a hidden `.NAME.tmp-PID` beside the target, which the
next run removes (`remove_leftovers`); the target itself is either the previous complete
version or the new complete one (a folder is swapped by two renames, the old one set
aside as a leftover first, so a kill between them leaves no target, never part of one).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_output(path: str | Path, sole_writer: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write (a file or a folder); on success it replaces `path`.
    `sole_writer`: no other process writes `path` now, so what killed writers of it left
    goes first (a large output's temporary is as large as the output)."""
    path = Path(path)
    if sole_writer:
        remove_leftovers(path.parent, path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    try:
        yield temporary
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
