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
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from alexnet.atomic import atomic_output, remove_leftovers
from alexnet.errors import AlexnetError, one_line

# A dataset's splits, at every stage: raw/<split>/, prepared/<split>/, lmdb/<split>/
SPLITS = ("train", "val")
SHARD_PATTERN = "shard-{:05d}.tar"
SHARD_GLOB = SHARD_PATTERN.replace("{:05d}", "*")
FILES_MEMO = ".files.json"  # `files_memo`: shard-NNNNN.files.json
CLASSES_FILE = "classes.json"  # of a prepared folder: [{index, wnid, name}]
REPORT_FILE = "report.json"  # of a prepared folder: counts, shards per split, skips
PREPARE_OWNER = "prepare"  # the stage named in a prepared folder's mark (alexnet.atomic.OWNED)
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


def unique_keys(relpaths: Iterable[str], used: set[str] | None = None) -> list[str]:
    """Keys for a whole split, made unique with a `_N` suffix where sanitizing collided
    (with each other, or with the keys already in `used`, which gets the new ones)."""
    used = set() if used is None else used
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


class SplitKeys:
    """`unique_keys` of a split given folder by folder, in order, without holding every
    key of the split: a key keeps its folder's (sanitized) name, so keys of two folders
    can only collide where their names sanitize alike. The keys given so far are kept
    per sanitized folder name, and dropped once no folder of that name is left."""

    def __init__(self, prefixes: Iterable[str]):
        """`prefixes`: the relpath prefix ("<split>/<folder>/") of each folder to come."""
        self._left = Counter(_folder_key(prefix) for prefix in prefixes)
        self._used: dict[str, set[str]] = {}

    def folder(self, prefix: str, relpaths: Iterable[str]) -> list[str]:
        """The keys of one folder's files (relpaths starting with `prefix`), in order."""
        name = _folder_key(prefix)
        keys = unique_keys(relpaths, self._used.setdefault(name, set()))
        self._left[name] -= 1
        if not self._left[name]:
            del self._used[name]
        return keys


def _folder_key(prefix: str) -> str:
    """The part of its files' keys that a folder's relpath prefix makes."""
    return key_for(prefix + "_").rpartition("/")[0]


def _member(name: str, payload: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o644
    info.mtime = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(payload)


def write_shard(path: Path, records: Iterable[Record], description: dict) -> None:
    """Write a shard atomically (`atomic_output`: temporary name, fsync, rename)."""
    comment = json.dumps(description, sort_keys=True, separators=(",", ":"))
    with atomic_output(path) as temporary, open(temporary, "wb") as raw:
        pax = {"comment": comment}
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT, pax_headers=pax) as tar:
            empty = True
            for record in records:
                tar.addfile(*_member(f"{record.key}.jpg", record.jpeg))
                tar.addfile(*_member(f"{record.key}.cls", str(record.label).encode()))
                empty = False
            if empty:  # every file skipped: see `EMPTY`
                tar.addfile(_folder(EMPTY))


# The one member of a shard without records. Python's tarfile cannot open a tar whose only
# header is the description's (ReadError "end of file header"); a folder carries no
# record for our readers, nor for WebDataset's.
EMPTY = "no-records"


def _folder(name: str) -> tarfile.TarInfo:
    info, _ = _member(name, b"")
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info


def read_description(path: Path) -> dict | None:
    """The description stored in a shard, or None when the file is missing, unreadable,
    cut short or damaged (prepare then makes it again rather than reuse it). Its members
    are walked (`index_shard`): a copy zero-filled from some member on keeps its size and
    its zero end, and would read as a shard of the members before the zeros."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            if not _ends_whole(tar.fileobj):
                return None
            description = _description(tar)
        index_shard(path)  # every member whole, as many records as the description says
    except (OSError, tarfile.TarError, json.JSONDecodeError, ShardError):
        return None
    return description


def _description(tar: tarfile.TarFile) -> dict | None:
    """The description a shard's pax header holds (`write_shard`), JSON."""
    return json.loads(tar.pax_headers.get("comment", "null"))


def _described_records(tar: tarfile.TarFile) -> int | None:
    """The number of records prepare's description of a shard says it kept, if it has
    one (a shard made by another tool need not)."""
    try:
        kept = _description(tar)["report"]["kept"]
    except (json.JSONDecodeError, TypeError, KeyError):
        return None
    return kept if isinstance(kept, int) else None


def _ends_whole(stream) -> bool:
    """Whether a tar that `write_shard` made still has its end: a whole number of
    tarfile's records, the last 1,024 bytes the end-of-archive zeros. A file cut short
    (a copy, a full disk) has neither, but for a cut just inside that padding, where
    nothing of a member is lost. One read at the end, not a walk of every member."""
    size = stream.seek(0, os.SEEK_END)
    if size < tarfile.RECORDSIZE or size % tarfile.RECORDSIZE:
        return False
    stream.seek(size - 2 * tarfile.BLOCKSIZE)
    return not any(stream.read(2 * tarfile.BLOCKSIZE))


class ShardError(AlexnetError):
    """A damaged shard; `str()` names the file and, where one is at fault, the member."""


# JPEG's start-of-image marker and the first byte of the next marker: every JPEG starts
# so, and checking three bytes is free where a record's bytes are read anyway.
JPEG_START = b"\xff\xd8\xff"
_LABEL = re.compile(rb"\s*-?[0-9]+\s*")
_LABEL_BYTES = 32  # a .cls member holds a few digits; more is not a label


def shard_files(folder: str | Path, reported: int | None = None) -> list[Path]:
    """A split's shards in order; none is an error (the split was not prepared). Shorter
    names first: past 99,999 shards, `shard-100000` follows `shard-99999`. They must be
    `shard-00000` on without a gap, and `reported` many where given (`reported_shards`):
    a shard lost in a copy dropped its images without a word."""
    shards = sorted(Path(folder).glob(SHARD_GLOB), key=shard_order)
    if not shards:
        # a prepared folder named where one of its splits is meant (stats's input)
        inner = [Path(folder) / s for s in SPLITS if any((Path(folder) / s).glob(SHARD_GLOB))]
        hint = f"; a prepared folder: name a split of it, {inner[0]}" if inner else ""
        raise ShardError(f"{folder}: no {SHARD_GLOB} files{hint or ' (run prepare first)'}")
    wanted = [shard_name(i) for i in range(len(shards) if reported is None else reported)]
    names = [path.name for path in shards]
    if names != wanted:
        where = f"the {len(wanted)} of its {REPORT_FILE}" if reported is not None else "from 0"
        present, expected = set(names), set(wanted)
        if missing := [name for name in wanted if name not in present]:
            raise ShardError(f"{folder}: {missing[0]} is missing ({where}); run prepare again")
        extra = next(name for name in names if name not in expected)
        raise ShardError(f"{folder}: {extra} is not one of {where}; run prepare again")
    return shards


def shard_order(path: Path) -> tuple[int, str]:
    """The sort key of shards in number order (shorter names first)."""
    return len(path.name), path.name


def reported_shards(folder: str | Path) -> int | None:
    """How many shards prepare made of split `folder` (its folder's report.json), None
    where no report says (shards on their own). Pack checks it (its dep is the whole
    prepared folder); stats does not read the report: a change of val's lists in it
    would run a pass over the training images again."""
    path = Path(folder).parent / REPORT_FILE
    if not path.is_file():
        return None
    try:
        count = json.loads(path.read_text()).get("shards", {}).get(Path(folder).name)
    except (UnicodeDecodeError, ValueError, AttributeError) as error:
        raise ShardError(
            f"{path}: not prepare's report ({one_line(error)}); run prepare again"
        ) from None
    return count if type(count) is int else None


def load_classes(prepared: str | Path) -> list[dict]:
    """`classes.json` of a prepared folder (written by prepare): [{index, wnid, name}]."""
    path = Path(prepared) / CLASSES_FILE
    try:
        classes = json.loads(path.read_text())
    except FileNotFoundError:
        parent = Path(prepared).parent  # a split named where its prepared folder is meant
        if (parent / CLASSES_FILE).is_file():
            why = f"a split of a prepared folder: name the folder, {parent}"
        else:
            why = "prepare writes it when it succeeds"
        raise ShardError(f"{path}: no such file ({why})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardError(f"{path}: unreadable ({one_line(error)})") from None
    if not isinstance(classes, list) or not classes:
        raise ShardError(f"{path}: not a list of classes")
    return classes


def _label(path: Path, name: str, data: bytes, classes: int | None) -> int:
    """The class index a `.cls` member holds, checked against the number of classes."""
    if len(data) > _LABEL_BYTES or not _LABEL.fullmatch(data):
        raise ShardError(f"{path}: member {name} is not an integer label ({data[:20]!r})")
    label = int(data)
    if label < 0 or (classes is not None and label >= classes):
        valid = "labels are >= 0" if classes is None else f"{classes} classes: 0..{classes - 1}"
        raise ShardError(f"{path}: member {name}: label {label} is out of range ({valid})")
    return label


def _members(path: Path, tar: tarfile.TarFile, end: int) -> Iterator[tarfile.TarInfo]:
    """The members of an open shard, each checked to lie whole inside the file (`end`
    bytes), then the end of the archive checked."""
    last = None
    try:
        for member in tar:
            if member.offset_data + member.size > end:
                raise ShardError(f"{path}: truncated tar: member {member.name} is cut short")
            last = member.name
            yield member
    except tarfile.TarError as error:  # a bad header, or the file ends before the next one
        where = f"after member {last}" if last else "before its first member"
        if tar.offset + tarfile.BLOCKSIZE > end:
            raise ShardError(f"{path}: truncated tar: it ends {where}") from None
        raise ShardError(f"{path}: damaged tar {where} ({one_line(error)})") from None
    _check_end(path, tar, last)


def _check_end(path: Path, tar: tarfile.TarFile, last: str | None) -> None:
    """tarfile ends its listing quietly at a file cut between members or at a corrupt
    header; a whole tar (ours, any POSIX tar) ends with two zero blocks right there."""
    tar.fileobj.seek(tar.offset)
    tail = tar.fileobj.read(2 * tarfile.BLOCKSIZE)
    where = f"after member {last}" if last else "before its first member"
    if len(tail) < 2 * tarfile.BLOCKSIZE:
        raise ShardError(f"{path}: truncated tar: it ends {where}, without the end blocks")
    if tail.count(0) != len(tail):
        raise ShardError(f"{path}: damaged tar: the header {where} is corrupt")


def index_shard(path: Path, classes: int | None = None) -> list[tuple[str, int, int, int]]:
    """(key, byte offset, size, label) of each image of a shard, in stored order. A damaged
    shard raises `ShardError` naming the file and the member: a truncated tar, a `.cls`
    that is not an integer or (with `classes`, the number of classes) out of range, a
    `.jpg` without its `.cls` or the other way round. The images' bytes are not read
    here: `check_image` checks them where they are read."""
    path = Path(path)
    try:
        end = path.stat().st_size
        tar = tarfile.open(path, mode="r:")
    except (OSError, tarfile.TarError) as error:
        raise ShardError(f"{path}: not a readable tar ({one_line(error)})") from None
    with tar:
        pending: dict[str, tarfile.TarInfo] = {}  # .jpg members waiting for their .cls
        entries = []
        for member in _members(path, tar, end):
            if not member.isfile():  # folders and links carry no record
                continue
            key, _, extension = member.name.rpartition(".")
            if extension == "jpg":
                if key in pending:
                    raise ShardError(f"{path}: member {member.name} appears twice")
                pending[key] = member
            elif extension == "cls":
                jpg = pending.pop(key, None)
                if jpg is None:
                    raise ShardError(f"{path}: member {member.name} has no {key}.jpg before it")
                data = tar.extractfile(member).read(_LABEL_BYTES + 1)  # there: _members checked
                label = _label(path, member.name, data, classes)
                entries.append((key, jpg.offset_data, jpg.size, label))
        described = _described_records(tar)
    if pending:
        key = next(iter(pending))
        raise ShardError(f"{path}: member {key}.jpg has no {key}.cls")
    if described is not None and described != len(entries):
        raise ShardError(
            f"{path}: damaged tar: {len(entries)} records where its description says "
            f"{described} (zeros in place of the rest?)"
        )
    return entries


def check_image(path: str | Path, key: str, data: bytes, size: int) -> None:
    """Raise `ShardError` unless `data`, the `size` bytes of member `key`.jpg just read
    from shard `path`, are whole and start as a JPEG (a cheap check, no decoding)."""
    if len(data) != size:
        raise ShardError(f"{path}: truncated tar: member {key}.jpg is cut short")
    if not data.startswith(JPEG_START):
        raise ShardError(f"{path}: member {key}.jpg is not a JPEG (no JPEG start marker)")


class WrongSize(ValueError):
    """A prepared image that is not size x size; `str()` says what it is."""


def check_size(image: Image.Image, size: int) -> None:
    """Refuse an opened image that is not `size` x `size` (from its header: no decoding)."""
    if image.size != (size, size):
        raise WrongSize(f"is {image.size[0]}x{image.size[1]}, expected {size}x{size}")


def open_rgb(jpeg: bytes, size: int | None = None) -> Image.Image:
    """A prepared image as RGB, the one decode of stats' mean image and of pack's `raw`
    records (so the mean is of the pixels the network trains on); with `size`, an image
    that is not size x size raises `WrongSize` before it is decoded."""
    image = Image.open(io.BytesIO(jpeg))
    if size is not None:
        check_size(image, size)
    return image if image.mode == "RGB" else image.convert("RGB")


def bad_image(path: str | Path, key: str, error: BaseException) -> str:
    """The line for member `key`.jpg of shard `path` that opening, checking or decoding
    raised `error` for (of any type: a corrupt image can make a decoder fail many ways)."""
    if isinstance(error, WrongSize):
        return f"{path}: member {key}.jpg {error}"
    reason = "not an image" if isinstance(error, UnidentifiedImageError) else one_line(error)
    return f"{path}: member {key}.jpg cannot be decoded ({reason})"


def iter_shard(path: Path, classes: int | None = None) -> Iterator[Record]:
    """The records of a shard in stored order; a damaged shard raises `ShardError` naming
    the file and the member (see `index_shard`; also an image that is not a JPEG)."""
    entries = index_shard(path, classes)
    with open(path, "rb") as stream:
        for key, offset, size, label in entries:
            stream.seek(offset)
            data = stream.read(size)
            check_image(path, key, data, size)
            yield Record(key, data, label)


def files_memo(shard: Path) -> Path:
    """Where prepare records a shard's files as it read them (`alexnet.prepare`): beside
    it, `shard-NNNNN.files.json`, which DVC ignores (.dvcignore: not in the output's
    hash, as it tells where and when the files were copied, not what they hold)."""
    return shard.with_name(f"{shard.name.removesuffix('.tar')}{FILES_MEMO}")


def remove_stale(folder: Path, keep: int) -> None:
    """Delete leftovers of killed runs and shards numbered `keep` or above (from an
    earlier, larger input), with their files' memos."""
    remove_leftovers(folder)
    memos = SHARD_GLOB.removesuffix(".tar") + FILES_MEMO
    for path in [*folder.glob(memos), *folder.glob(SHARD_GLOB)]:  # a memo before its shard
        number = path.name.removeprefix("shard-").split(".")[0]
        if number.isdigit() and int(number) >= keep:
            path.unlink()
