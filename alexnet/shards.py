"""WebDataset-style tar shards (docs/design.md, "Prepared shards").

A shard holds, per image, the members `<key>.jpg` (256x256 RGB JPEG) and `<key>.cls`
(decimal class index). Shards are byte-deterministic: fixed member order, mtime 0, no
owner names. The shard's own description (a fingerprint of what produced it and the
per-file report) rides in the tar's POSIX pax global header under the standard `comment`
keyword, which tar tools and WebDataset readers ignore; a shard is therefore
self-describing and a re-run can tell whether it is complete and current. Shards are
written to a temporary name and renamed when whole.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from alexnet.atomic import atomic_output, remove_leftovers

SHARD_PATTERN = "shard-{:05d}.tar"
_UNSAFE = re.compile(r"[^A-Za-z0-9_/-]")


@dataclass(frozen=True)
class Record:
    key: str
    jpeg: bytes
    label: int


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index)


def key_for(relpath: str) -> str:
    """WebDataset key of a source file: its path below the split folder without extension,
    dots and odd characters made `_` (a key must not contain a dot)."""
    inner = relpath.split("/", 1)[-1]
    head, _, name = inner.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return _UNSAFE.sub("_", f"{head}/{stem}" if head else stem)


def unique_keys(relpaths: Iterable[str]) -> list[str]:
    """Keys for a whole split, made unique with a `_N` suffix where sanitizing collided."""
    used: set[str] = set()
    keys = []
    for relpath in relpaths:
        key = base = key_for(relpath)
        suffix = 0
        while key in used:
            suffix += 1
            key = f"{base}_{suffix}"
        used.add(key)
        keys.append(key)
    return keys


def _member(name: str, payload: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o644
    info.mtime = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(payload)


def write_shard(path: Path, records: Iterable[Record], description: dict) -> None:
    """Write a shard atomically (temporary name, fsync, rename)."""
    comment = json.dumps(description, sort_keys=True, separators=(",", ":"))
    with atomic_output(path) as temporary, open(temporary, "wb") as raw:
        pax = {"comment": comment}
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT, pax_headers=pax) as tar:
            for record in records:
                tar.addfile(*_member(f"{record.key}.jpg", record.jpeg))
                tar.addfile(*_member(f"{record.key}.cls", str(record.label).encode()))
        raw.flush()
        os.fsync(raw.fileno())


def read_description(path: Path) -> dict | None:
    """The description stored in a shard, or None when the file is missing or unreadable."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            return json.loads(tar.pax_headers.get("comment", "null"))
    except (OSError, tarfile.TarError, json.JSONDecodeError):
        return None


def index_shard(path: Path) -> list[tuple[str, int, int, int]]:
    """(key, byte offset, size, label) of each image of a shard, in stored order; a
    damaged shard raises naming the file."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            pending: dict[str, tarfile.TarInfo] = {}
            entries = []
            for member in tar:
                key, _, extension = member.name.rpartition(".")
                if extension == "jpg":
                    pending[key] = member
                elif extension == "cls":
                    jpg, label = pending.pop(key), int(tar.extractfile(member).read())
                    entries.append((key, jpg.offset_data, jpg.size, label))
            return entries
    except (OSError, tarfile.TarError, KeyError, ValueError) as error:
        raise ValueError(f"{path}: damaged shard ({error})") from None


def iter_shard(path: Path) -> Iterator[Record]:
    """The records of a shard in stored order; a damaged shard raises naming the file."""
    entries = index_shard(path)
    with open(path, "rb") as stream:
        for key, offset, size, label in entries:
            stream.seek(offset)
            data = stream.read(size)
            if len(data) != size:
                raise ValueError(f"{path}: damaged shard (image {key} is cut short)")
            yield Record(key, data, label)


def remove_stale(folder: Path, keep: int) -> None:
    """Delete leftovers of killed runs and shards numbered `keep` or above (from an
    earlier, larger input)."""
    remove_leftovers(folder)
    for path in folder.glob("shard-*.tar"):
        number = path.stem.removeprefix("shard-")
        if number.isdigit() and int(number) >= keep:
            path.unlink()
