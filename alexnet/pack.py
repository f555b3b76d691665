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
from alexnet.shards import index_shard


class PackError(AlexnetError):
    """Prepared data that cannot be packed; names the shard."""


@dataclass(frozen=True)
class Entry:
    """Where one prepared image lies: a byte range of a shard."""

    shard: str
    offset: int
    size: int
    label: int


def index_shards(folder: str | Path) -> list[Entry]:
    """Every record of a split's shards in source order (shard order, then member order)."""
    shards = sorted(Path(folder).glob("shard-*.tar"))
    if not shards:
        raise PackError(f"{folder}: no shard-*.tar files (run prepare first)")
    entries = []
    for shard in shards:
        try:
            index = index_shard(shard)
        except ValueError as error:
            raise PackError(str(error)) from None
        entries += [Entry(str(shard), offset, size, label) for _, offset, size, label in index]
    return entries


def output_order(count: int, shuffle: bool, seed: int) -> np.ndarray:
    """Source index of each output key: a seeded permutation, or the identity."""
    return np.random.default_rng(seed).permutation(count) if shuffle else np.arange(count)


def chunks(entries: list[Entry], order: np.ndarray, size: int) -> list[list[Entry]]:
    """The entries of output positions [0, size), [size, 2 size), ..."""
    return [
        [entries[i] for i in order[start : start + size]] for start in range(0, len(order), size)
    ]


def payload(jpeg: bytes, encoding: str, size: int) -> bytes:
    if encoding == "jpeg":
        return jpeg
    image = Image.open(io.BytesIO(jpeg))
    if image.size != (size, size):
        raise ValueError(f"image is {image.size[0]}x{image.size[1]}, expected {size}x{size}")
    return image.convert("RGB").tobytes()  # HWC uint8 RGB


def load_chunk(chunk: list[Entry], encoding: str, size: int) -> list[tuple[int, bytes]]:
    """(label, payload) of each entry (size x size images), read by offset from its shard."""
    records = []
    handles: dict[str, io.BufferedReader] = {}
    try:
        for entry in chunk:
            stream = handles.get(entry.shard) or handles.setdefault(
                entry.shard, open(entry.shard, "rb")
            )
            stream.seek(entry.offset)
            data = stream.read(entry.size)
            try:
                records.append((entry.label, payload(data, encoding, size)))
            except (OSError, ValueError) as error:
                raise PackError(f"{entry.shard}: record at byte {entry.offset}: {error}") from None
    finally:
        for stream in handles.values():
            stream.close()
    return records
