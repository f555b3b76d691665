"""What a training run is made of, as digests: its data files and its code.

A checkpoint records both. Data (the LMDB and the mean image) that differ make it
another run, never resumed; code that differs is told to the user (see `Trainer.resume`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from alexnet.atomic import write_json
from alexnet.imports import closure

# The training entry: every process that trains runs `alexnet.fit.fit`.
TRAINING_ENTRY = "alexnet.fit"


def sha16(path: Path) -> str:
    """sha256 of a file, streamed: ImageNet's train LMDB is ~250 GB, more than memory."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()[:16]


def file_digest(path: Path, memo: Path) -> str:
    """`sha16(path)`, remembered in the JSON file `memo` under the file's identity.

    Hashing ImageNet's LMDB reads it whole (minutes, on every rank); a restart with the
    same file reuses the digest. The identity (device, inode, size, mtime) changes
    whenever the bytes can have: the stores are written once, into a new file renamed
    into place, and `dvc checkout` writes a new file too."""
    path = Path(path).resolve()
    stat = path.stat()
    identity = [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns]
    try:
        known = json.loads(Path(memo).read_text())
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):  # absent or damaged: only a lost shortcut
        known = {}
    entry = known.get(str(path))
    if isinstance(entry, dict) and entry.get("identity") == identity:
        return str(entry["sha"])
    digest = sha16(path)
    known[str(path)] = {"identity": identity, "sha": digest}
    try:
        write_json(memo, known)
    except OSError:  # a read-only checkpoint folder only costs the next start a re-read
        pass
    return digest


def training_code() -> list[Path]:
    """The files whose code decides the trained weights: the import closure of the
    training entry, derived from the installed sources (never a hand-kept list)."""
    root = Path(__file__).resolve().parents[1]
    return sorted(closure(root, TRAINING_ENTRY))


def code_digests() -> dict[str, str]:
    """{path relative to the package's parent: sha16} of `training_code()`."""
    root = Path(__file__).resolve().parents[1]
    return {path.relative_to(root).as_posix(): sha16(path) for path in training_code()}


def changed_code(recorded: object, current: dict[str, str]) -> list[str]:
    """The files of `current` whose digest differs from `recorded` (all, if none was)."""
    recorded = recorded if isinstance(recorded, dict) else {}
    return sorted(name for name, digest in current.items() if recorded.get(name) != digest)
