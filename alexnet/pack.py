"""The pack stage's logic: which prepared record goes to which LMDB key, and its payload.

Train records are stored in a seeded shuffled order (so a sequential read is already a
random sample), val records in source order. Output positions are cut into chunks; a
chunk reads its records straight from the shards by offset and, for the `raw` encoding,
decodes them to HWC RGB bytes. The single LMDB writer then appends the chunks in order.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from alexnet.atomic import folder_target
from alexnet.errors import AlexnetError
from alexnet.lmdb_store import STORE_OWNER, StoreError, read_meta
from alexnet.shards import (
    SPLITS,
    ShardError,
    bad_image,
    check_image,
    check_size,
    index_shard,
    load_classes,
    open_rgb,
    reported_shards,
    shard_files,
)


class PackError(AlexnetError):
    """Prepared data that cannot be packed; names the shard."""


@dataclass(frozen=True)
class Entry:
    """Where one prepared image lies: a byte range of a shard. Its member's name is not
    kept (ImageNet has 1.28M): `member_key` finds it to name it in an error line."""

    shard: str
    offset: int
    size: int
    label: int


@dataclass(frozen=True)
class SplitIndex:
    """Every record of a split's shards in source order, as arrays: ~27 bytes a record
    (ImageNet's 1.28M in ~35 MB, where `Entry` objects took ~300 bytes each). Indexing
    with an int gives an `Entry`, with a slice or an array of rows a list of them."""

    shards: tuple[str, ...]
    shard: np.ndarray  # int32: which of `shards`
    offset: np.ndarray  # int64
    size: np.ndarray  # int64
    label: np.ndarray  # int32

    def __len__(self) -> int:
        return len(self.offset)

    def __getitem__(self, rows):
        if isinstance(rows, (int, np.integer)):
            return self._entry(int(rows))
        # a slice's rows without an arange of the whole split (pack asks once per chunk)
        rows = range(len(self))[rows] if isinstance(rows, slice) else rows
        return [self._entry(int(row)) for row in rows]

    def __iter__(self):
        return iter(self[:])

    def _entry(self, row: int) -> Entry:
        return Entry(
            self.shards[self.shard[row]],
            int(self.offset[row]),
            int(self.size[row]),
            int(self.label[row]),
        )


def shard_table(shard: str | Path, classes: int | None = None) -> np.ndarray:
    """(offset, size, label) of each record of one shard, in stored order, as int64 rows
    (24 bytes a record: a task's result); `index_shard` checks the shard, and a label out
    of range of `classes` (the number in classes.json), raising `ShardError`."""
    records = index_shard(Path(shard), classes)
    return np.array([entry[1:] for entry in records], dtype=np.int64).reshape(-1, 3)


def split_index(shards: Sequence[str | Path], tables: Sequence[np.ndarray]) -> SplitIndex:
    """The `SplitIndex` of a split's `shards` (in order) from their `shard_table`s."""
    table = np.concatenate(tables)
    numbers = np.arange(len(shards), dtype=np.int32).repeat([len(part) for part in tables])
    return SplitIndex(
        tuple(map(str, shards)),
        numbers,
        table[:, 0].copy(),
        table[:, 1].copy(),
        table[:, 2].astype(np.int32),
    )


def index_shards(folder: str | Path, classes: int | None = None) -> SplitIndex:
    """Every record of a split's shards in source order (shard order, then member order),
    indexed in this process (the pack flow's tasks index a few shards each); a damaged shard
    or a label out of range raises `ShardError` naming the shard and the member."""
    shards = split_shards(folder)
    return split_index(shards, [shard_table(shard, classes) for shard in shards])


def split_shards(folder: str | Path) -> list[Path]:
    """A split's shards in order, as many as prepare's report says it made."""
    return shard_files(folder, reported_shards(folder))


def check_indexes(prepared: str | Path, indexes: dict[str, SplitIndex], classes: list[dict]):
    """Refuse a split of no records, and a class of no training record (an output of the
    model that no image targets): prepare refuses both, and pack trusts nothing of a
    prepared folder it reads (its shards or classes.json may be another tool's)."""
    for split, index in indexes.items():
        if not len(index):
            raise PackError(f"{Path(prepared) / split}: no records in its shards (run prepare)")
    counts = np.bincount(indexes["train"].label, minlength=len(classes))
    if empty := np.flatnonzero(counts == 0).tolist():
        first = classes[empty[0]]
        more = f" and {len(empty) - 1} more classes" if len(empty) > 1 else ""
        raise PackError(
            f"{Path(prepared) / 'train'}: no record of class {first['index']} "
            f"({first['wnid']}){more} of classes.json; run prepare again"
        )


def pack_digest(indexes: dict[str, SplitIndex], options: dict) -> str:
    """The digest of one pack run, which both its stores keep (`pack` in `__meta__`):
    of every split's records (shard names, byte ranges, labels) and the options that
    shape the stores. A pack stopped between its splits leaves stores of two runs, told
    apart by it; the same run again gives the same digest, and so the same bytes."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for split, index in sorted(indexes.items()):
        names = [Path(shard).name for shard in index.shards]
        digest.update(json.dumps([split, names]).encode())
        for column in (index.shard, index.offset, index.size, index.label):
            digest.update(np.ascontiguousarray(column).tobytes())
    return digest.hexdigest()[:16]


def packed_count(path: Path, digest: str, index: SplitIndex) -> int | None:
    """The record count of the store at `path` where this pack run (`digest`) wrote it,
    whole, after the last change to its shards; else None. A run stopped after its first
    split then writes only the second when run again (raw ImageNet's train store: ~250 GB
    and an hour). The digest is the guard (the records' shards, byte ranges and labels,
    and the options); the mtimes only add a rewrite where a shard was made again since."""
    try:
        meta = read_meta(path)
    except StoreError:
        return None  # none there, or not a whole one: written again
    written = (path / "data.mdb").stat().st_mtime_ns
    changed = max((Path(shard).stat().st_mtime_ns for shard in index.shards), default=0)
    current = meta.get("pack") == digest and meta["count"] == len(index) and written > changed
    return meta["count"] if current else None


def member_key(entry: Entry) -> str:
    """The key of the member an entry points at, read again from its shard's headers (a
    shard replaced since it was indexed may have none there: then its byte offset)."""
    keys = (key for key, offset, *_ in index_shard(Path(entry.shard)) if offset == entry.offset)
    return next(keys, f"the member at byte {entry.offset}")


JPEG_END = b"\xff\xd9"  # the end-of-image marker


def output_order(count: int, shuffle: bool, seed: int) -> np.ndarray:
    """Source index of each output key: a seeded permutation, or the identity."""
    return np.random.default_rng(seed).permutation(count) if shuffle else np.arange(count)


def chunks(index: SplitIndex, order: np.ndarray, size: int) -> Iterator[list[Entry]]:
    """The entries of output positions [0, size), [size, 2 size), ..., each chunk made
    when it is asked for."""
    for start in range(0, len(order), size):
        yield index[order[start : start + size]]


def chunk_bytes(chunk: list[Entry], encoding: str, size: int) -> int:
    """The bytes of a chunk's payloads (what its read task sends back)."""
    if encoding == "jpeg":
        return sum(entry.size for entry in chunk)
    return len(chunk) * size * size * 3


def payload(jpeg: bytes, encoding: str, size: int) -> bytes:
    """The stored bytes of a prepared image: as is (`jpeg`), or decoded to HWC uint8 RGB
    (`raw`). Either way an image that is not size x size raises `WrongSize`, read from its
    header before any decoding, and a `jpeg` one cut short (no end-of-image marker) is
    refused: in a `jpeg` store either would stop training or evaluation later, naming a
    record, not the shard's member."""
    if encoding == "jpeg":
        check_size(Image.open(io.BytesIO(jpeg)), size)
        if not jpeg.rstrip(b"\0").endswith(JPEG_END):
            raise ValueError("no end-of-image marker at its end: cut short?")
        return jpeg
    return open_rgb(jpeg, size).tobytes()


def load_chunk(chunk: list[Entry], encoding: str, size: int) -> list[tuple[int, bytes]]:
    """(label, payload) of each entry (size x size images), in the chunk's order; a
    member cut short, not a JPEG or not decodable raises one line naming it. Each shard
    is read in offset order with one file open at a time: a shuffled chunk of ImageNet's
    train split touches ~700 of its ~1,300 shards, near the usual limit of 1,024 open files."""
    records: list = [None] * len(chunk)
    by_shard = sorted(range(len(chunk)), key=lambda i: (chunk[i].shard, chunk[i].offset))
    for shard, positions in itertools.groupby(by_shard, key=lambda i: chunk[i].shard):
        with open(shard, "rb") as stream:
            for i in positions:
                records[i] = _load(chunk[i], stream, encoding, size)
    return records


def _load(entry: Entry, stream: io.BufferedReader, encoding: str, size: int) -> tuple[int, bytes]:
    stream.seek(entry.offset)
    data = stream.read(entry.size)
    _check(entry, data)
    try:
        return entry.label, payload(data, encoding, size)
    except Exception as error:  # whatever the decoder raises, the line names the member
        raise PackError(bad_image(entry.shard, member_key(entry), error)) from None


def _check(entry: Entry, data: bytes) -> None:
    """`check_image` of an entry's bytes; the member's key is looked up only to name it
    when the check fails (then the second call raises, with it)."""
    try:
        check_image(entry.shard, "", data, entry.size)
    except ShardError:
        check_image(entry.shard, member_key(entry), data, entry.size)
        raise


def refuse(prepared: str, out: str, **_: object) -> None:
    """What stops the stage before any work, as one line (`flows.stages.Stage.refusal`)."""
    for split in SPLITS:  # both, not val after train is written
        folder_target(Path(out) / split, STORE_OWNER)
    load_classes(prepared)
