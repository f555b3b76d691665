"""The pack stage's logic: which prepared record goes to which LMDB key, and its payload.

Train records are stored in a seeded shuffled order (so a sequential read is already a
random sample), val records in source order. Output positions are cut into chunks; a
chunk reads its records straight from the shards by offset and, for the `raw` encoding,
decodes them to HWC RGB bytes. The single LMDB writer then appends the chunks in order.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from alexnet.errors import AlexnetError
from alexnet.shards import bad_image, check_image, check_size, index_shard


class PackError(AlexnetError):
    """Prepared data that cannot be packed; names the shard."""


@dataclass(frozen=True)
class Entry:
    """Where one prepared image lies: a byte range of a shard, member `key`.jpg."""

    shard: str
    offset: int
    size: int
    label: int
    key: str  # for the error line of a damaged member


def index_shards(folder: str | Path, classes: int | None = None) -> list[Entry]:
    """Every record of a split's shards in source order (shard order, then member order);
    a damaged shard or a label out of range (of `classes`, the number in classes.json)
    raises `ShardError` naming the shard and the member."""
    shards = sorted(Path(folder).glob("shard-*.tar"))
    if not shards:
        raise PackError(f"{folder}: no shard-*.tar files (run prepare first)")
    entries = []
    for shard in shards:
        index = index_shard(shard, classes)
        entries += [
            Entry(str(shard), offset, size, label, key) for key, offset, size, label in index
        ]
    return entries


def output_order(count: int, shuffle: bool, seed: int) -> np.ndarray:
    """Source index of each output key: a seeded permutation, or the identity."""
    return np.random.default_rng(seed).permutation(count) if shuffle else np.arange(count)


def chunks(entries: list[Entry], order: np.ndarray, size: int) -> list[list[Entry]]:
    """The entries of output positions [0, size), [size, 2 size), ..."""
    return [
        [entries[i] for i in order[start : start + size]] for start in range(0, len(order), size)
    ]


def chunk_bytes(chunk: list[Entry], encoding: str, size: int) -> int:
    """The bytes of a chunk's payloads (what its read task sends back)."""
    if encoding == "jpeg":
        return sum(entry.size for entry in chunk)
    return len(chunk) * size * size * 3


def payload(jpeg: bytes, encoding: str, size: int) -> bytes:
    """The stored bytes of a prepared image: as is (`jpeg`), or decoded to HWC uint8 RGB
    (`raw`; an image that is not size x size raises `WrongSize` before decoding)."""
    if encoding == "jpeg":
        return jpeg
    image = Image.open(io.BytesIO(jpeg))
    check_size(image, size)
    return image.convert("RGB").tobytes()


def load_chunk(chunk: list[Entry], encoding: str, size: int) -> list[tuple[int, bytes]]:
    """(label, payload) of each entry (size x size images), read by offset from its shard;
    a member cut short, not a JPEG or not decodable raises one line naming it."""
    records = []
    handles: dict[str, io.BufferedReader] = {}
    try:
        for entry in chunk:
            stream = handles.get(entry.shard) or handles.setdefault(
                entry.shard, open(entry.shard, "rb")
            )
            stream.seek(entry.offset)
            data = stream.read(entry.size)
            check_image(entry.shard, entry.key, data, entry.size)  # for `jpeg`, the only check
            try:
                records.append((entry.label, payload(data, encoding, size)))
            except Exception as error:  # whatever the decoder raises, the line names the member
                raise PackError(bad_image(entry.shard, entry.key, error)) from None
    finally:
        for stream in handles.values():
            stream.close()
    return records
