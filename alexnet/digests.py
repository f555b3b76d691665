"""What a training run is made of, as digests: its data files and its code.

A checkpoint records both. Data (the LMDB and the mean image) that differ make it
another run, never resumed (`recipe_changes` names what differs); code that differs is
told to the user (see `Trainer.resume`).
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


# Digests a memo keeps per file: one per node that reads it (see `file_digest`), the
# oldest dropped past this many.
MEMO_ENTRIES = 64
# Files a memo keeps, the least recently used dropped past this many: a worker's run in
# a temporary clone of the repository reads the data under a new path each time.
MEMO_FILES = 32


def file_digest(path: Path, memo: Path) -> str:
    """`sha16(path)`, remembered in the JSON file `memo` under the file's identity.

    Hashing ImageNet's LMDB reads it whole (minutes, on every rank); a restart with the
    same file reuses the digest. The identity (device, inode, size, mtime) changes
    whenever the bytes can have: the stores are written once, into a new file renamed
    into place, and `dvc checkout` writes a new file too. It differs between nodes too
    (an NFS mount's device number is each client's own; a copy per node is another
    inode and mtime), and the memo, next to the checkpoint, is shared by all of them:
    so it keeps a digest per identity, not one per file that each node replaced. (Size
    and mtime alone would agree across NFS clients, but not across copies, and would
    miss a file replaced by one of the same size and mtime, as `cp -p` makes.)"""
    path = Path(path).resolve()
    with open(path, "rb"):  # an NFS client's stat may answer from a cache; an open asks
        stat = path.stat()  # the server (close-to-open), and the stat then has its answer
    identity = f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"
    memos = _read_memo(memo)
    known = _entries(memos, str(path))
    if identity in known:
        if str(path) not in list(memos)[-MEMO_FILES // 2 :]:  # used: not the next to go
            _remember(memo, str(path), identity, known[identity])
        return known[identity]
    digest = sha16(path)
    _remember(memo, str(path), identity, digest)
    return digest


def _remember(memo: Path, key: str, identity: str, digest: str) -> None:
    # Read again: other nodes may have added theirs while this one was hashing.
    memos = _read_memo(memo)
    known = _entries(memos, key)
    known.pop(identity, None)  # the newest last: the oldest is dropped first
    known[identity] = digest
    memos.pop(key, None)  # the same order for the files
    memos[key] = dict(list(known.items())[-MEMO_ENTRIES:])
    memos = dict(list(memos.items())[-MEMO_FILES:])
    try:
        write_json(memo, memos)
    except OSError:  # a read-only checkpoint folder only costs the next start a re-read
        pass


def _read_memo(memo: Path) -> dict:
    try:
        known = json.loads(Path(memo).read_text())
    except (OSError, ValueError):  # absent or damaged: only a lost shortcut
        return {}
    return known if isinstance(known, dict) else {}


def _entries(memos: dict, key: str) -> dict[str, str]:
    """{identity: digest} of one file (a memo of the former format, {identity: [...],
    sha: ...}, or a damaged one gives none)."""
    entries = memos.get(key)
    if not isinstance(entries, dict):
        return {}
    return {name: sha for name, sha in entries.items() if ":" in name and isinstance(sha, str)}


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


def with_defaults(recorded: object, current: dict[str, dict], defaults: dict[str, dict]) -> object:
    """A checkpoint's recorded recipe, each param of `current` it lacks taken at its
    default (`defaults`: params sections as JSON): a param added since the checkpoint was
    written is not a change of recipe, as a new param's default keeps the former
    behaviour. A param it has that no longer exists stays one."""
    if not isinstance(recorded, dict):
        return recorded
    filled = dict(recorded)
    for section, values in current.items():
        before, known = recorded.get(section), defaults.get(section, {})
        if isinstance(before, dict):
            added = {key: known[key] for key in values.keys() - before.keys() if key in known}
            filled[section] = {**before, **added}
    return filled


def recipe_changes(recorded: object, current: dict[str, dict]) -> str:
    """How a checkpoint's recipe (`Trainer.recipe`: sections of params, and data
    digests) differs from this run's, in a few words: `train.lr 0.01 -> 0.02`."""
    if not isinstance(recorded, dict):  # a checkpoint from before recipes were recorded
        return "other params or data"
    changes = []
    for section, values in current.items():
        before = recorded.get(section)
        before = before if isinstance(before, dict) else {}
        for key in sorted(values.keys() | before.keys()):
            # a key one side lacks (a param renamed or dropped since) is not a `None`
            old, new = (side.get(key, "(no such param)") for side in (before, values))
            if old != new:
                change = "changed" if section == "data" else f"{old} -> {new}"
                changes.append(f"{section}.{key} {change}")
    return ", ".join(changes) or "other params or data"
