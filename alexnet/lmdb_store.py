"""The LMDB store of one split (docs/design.md, "LMDB"): writer and format, no pickle.

- key `__meta__`: UTF-8 JSON {"format": "alexnet-lmdb", "version": 1, "count": N,
  "encoding": "raw"|"jpeg", "height", "width", "channels", "classes": [...]};
- keys `00000000` .. : 8-digit zero-padded ASCII decimal, 0..count-1;
- value: 12-byte little-endian header `struct.pack("<4sIHH", b"AXNT", label, height,
  width)`, then raw HWC uint8 RGB bytes (`raw`) or the JPEG bytes (`jpeg`).

The writer builds the environment in a temporary folder and renames it when complete
(a kill leaves the previous store or nothing); it appends sorted keys in large
transactions, without sync, and grows the map as needed (never a MapFullError). It
creates no lock file, so reading the store never changes its bytes under DVC.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import lmdb

from alexnet.atomic import atomic_output
from alexnet.errors import AlexnetError, one_line

FORMAT = "alexnet-lmdb"
VERSION = 1
MAGIC = b"AXNT"
HEADER = struct.Struct("<4sIHH")
MAX_SIDE = 2**16 - 1  # a record's height and width are uint16 in its header
META_KEY = b"__meta__"
STORE_OWNER = "pack"  # the stage whose output folders the stores are (alexnet/atomic.py)
ENCODINGS = ("raw", "jpeg")


class StoreError(AlexnetError):
    """An LMDB store that is missing or does not follow the format; names file and key."""


KEY_DIGITS = 8


def key(index: int) -> bytes:
    return b"%0*d" % (KEY_DIGITS, index)


class OutOfOrder(StoreError):
    """Records written after a key that sorts later: LMDB would have dropped them."""


def encode_value(label: int, height: int, width: int, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, label, height, width) + payload


def decode_value(value: bytes, where: str, encoding: str) -> tuple[int, int, int, memoryview]:
    """(label, height, width, payload) of a stored value, checked against the format."""
    if len(value) < HEADER.size:
        raise StoreError(f"{where}: value of {len(value)} bytes is shorter than the header")
    magic, label, height, width = HEADER.unpack_from(value)
    if magic != MAGIC:
        raise StoreError(f"{where}: wrong magic {magic!r} (expected {MAGIC!r})")
    payload = memoryview(value)[HEADER.size :]
    if encoding == "raw" and len(payload) != height * width * 3:
        raise StoreError(
            f"{where}: payload of {len(payload)} bytes, expected {height}x{width}x3 = "
            f"{height * width * 3}"
        )
    return label, height, width, payload


def check_meta(raw: bytes | None, path: Path) -> dict:
    """Parse and check `__meta__`."""
    if raw is None:
        raise StoreError(f"{path}: no __meta__ key (not an alexnet LMDB, or incomplete)")
    try:
        meta = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise StoreError(f"{path}: key __meta__ is not UTF-8 JSON") from None
    if not isinstance(meta, dict):
        raise StoreError(f"{path}: key __meta__ is not a JSON object")
    if meta.get("format") != FORMAT:
        raise StoreError(f"{path}: key __meta__: format {meta.get('format')!r}, not {FORMAT!r}")
    if meta.get("version") != VERSION or isinstance(meta.get("version"), bool):
        raise StoreError(f"{path}: key __meta__: version {meta.get('version')!r}, need {VERSION}")
    if meta.get("encoding") not in ENCODINGS:
        raise StoreError(f"{path}: key __meta__: unknown encoding {meta.get('encoding')!r}")
    for name in ("count", "height", "width"):  # what readers size batches by
        if type(meta.get(name)) is not int or meta[name] < 0:  # (a bool is an int)
            raise StoreError(f"{path}: key __meta__: {name} {meta.get(name)!r}, not a count")
    for name in ("height", "width"):  # a record's are uint16 (`HEADER`): a batch of a
        if not 0 < meta[name] <= MAX_SIDE:  # million-pixel side was a MemoryError of TiB
            raise StoreError(f"{path}: key __meta__: {name} {meta[name]}, not 1 to {MAX_SIDE}")
    if not isinstance(meta.get("classes"), list):
        raise StoreError(f"{path}: key __meta__: no list of classes")
    return meta


def _put(env: lmdb.Environment, items: Callable[[], Iterable[tuple[bytes, bytes]]]) -> None:
    """One transaction of sorted appends of `items()`; on a full map, double it and
    retry (calling `items` again)."""
    while True:
        try:
            with env.begin(write=True) as txn:
                consumed, added = txn.cursor().putmulti(items(), append=True)
                # append=True skips, without an error, a key that does not sort last
                if added != consumed:
                    raise OutOfOrder(
                        f"{consumed - added} of {consumed} records out of key order (a store "
                        f"holds at most {10**KEY_DIGITS:,} records)"
                    )
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


def _append(env: lmdb.Environment, start: int, batch: list[tuple[int, bytes]], size: int) -> int:
    # A generator: each value (header + payload) is made, copied into the map and freed
    # before the next. A list of the batch's values would hold a second copy of the
    # batch, whose fresh pages cost more than the copy itself (1.3-1.9x the write's time
    # in `bench/store.py`).
    _put(
        env,
        lambda: (
            (key(start + i), encode_value(label, size, size, payload))
            for i, (label, payload) in enumerate(batch)
        ),
    )
    return len(batch)


# A transaction ends at the record that brings its payloads to this many bytes, whatever
# the batches `write_store` is given (params `pack.batch`: how many records a read task
# takes): where transactions end shapes the pages of data.mdb, so the same records in
# other batches made another file, and training, which digests the file, started afresh.
# Bytes, not records: until its commit a transaction holds its records and its dirty
# pages (~2x this), for raw and jpeg payloads alike.
TRANSACTION_BYTES = 4 * 2**20


def _transactions(batches: Iterable[list[tuple[int, bytes]]]) -> Iterator[list[tuple[int, bytes]]]:
    """The records of `batches`, in order, as lists of about `TRANSACTION_BYTES` of
    payload (the last smaller). A batch is let go once its last record is taken."""
    records: list[tuple[int, bytes]] = []
    size = 0
    for batch in batches:
        for record in batch:
            records.append(record)
            size += len(record[1])
            if size >= TRANSACTION_BYTES:
                yield records
                records, size = [], 0
        del batch  # gone before the next is fetched
    if records:
        yield records


def write_store(
    path: str | Path,
    batches: Iterable[list[tuple[int, bytes]]],
    encoding: str,
    classes: list[dict],
    *,
    size: int,
    pack: str | None = None,
    map_size: int = 1 << 30,
) -> int:
    """Write batches of (label, payload) records as keys 0, 1, 2, ... (transactions of
    `TRANSACTION_BYTES`: the same records make the same file whatever the batches),
    then `__meta__` (with `pack`, the digest of the pack run that wrote the store, where
    given); returns the count. Memory: about a batch and a transaction (its records and
    pages), whatever the count."""
    if encoding not in ENCODINGS:
        raise StoreError(f"unknown encoding {encoding!r} (choose from {', '.join(ENCODINGS)})")
    count = 0
    release(path)  # the store this replaces must not stay mapped here, its disk space held
    with atomic_output(path, folder=STORE_OWNER) as folder:
        # lock=False: no lock.mdb; sync=False: one sync at the end (the rename covers
        # crashes); no writemap: it would make data.mdb a sparse file of map_size; meminit
        # (default) zeroes unused page bytes, so the same records give the same file.
        env = lmdb.open(str(folder), map_size=map_size, lock=False, sync=False)
        try:
            for records in _transactions(batches):
                count += _append(env, count, records, size)
                del records  # gone before the next is gathered
            meta = {
                "format": FORMAT,
                "version": VERSION,
                "count": count,
                "encoding": encoding,
                "height": size,
                "width": size,
                "channels": 3,
                "classes": classes,
                **({"pack": pack} if pack else {}),
            }
            _put(env, lambda: [(META_KEY, json.dumps(meta).encode("utf-8"))])  # sorts after digits
            env.sync(True)
        # a full disk ("mdb_txn_commit: No space left on device"), or keys out of order
        except (lmdb.Error, OutOfOrder) as error:
            raise StoreError(f"{path}: cannot write the store ({one_line(error)})") from None
        finally:
            env.close()
    return count


# What LMDB says when the file itself is damaged (a bad header, a bad page, a format of
# another LMDB version); its other errors at open are the system's (permissions, memory).
DAMAGE = (lmdb.InvalidError, lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.VersionMismatchError)


def _damaged(path: Path, reason: str) -> StoreError:
    return StoreError(f"{path}: damaged LMDB store: {reason}; run pack again to rewrite it")


def get_record(txn: lmdb.Transaction, index: int, path: Path):
    """The stored value of record `index` (None where there is none). A damaged page is
    found only when a read reaches it (opening checks the file's size, not every page):
    a StoreError naming the record, not LMDB's traceback."""
    try:
        return txn.get(key(index))
    except lmdb.Error as error:  # MDB_CORRUPTED: "Located page was wrong type", ...
        raise _damaged(path, f"key {index:0{KEY_DIGITS}d}: {one_line(error)}") from None


def _open_error(path: Path, error: lmdb.Error) -> StoreError:
    """The one line of an error of `lmdb.open`, whose message starts with the path."""
    reason = one_line(error).removeprefix(f"{path}: ")
    if (path / "data.mdb").stat().st_size == 0:  # LMDB says "Bad file descriptor"
        return _damaged(path, "data.mdb is empty")
    if isinstance(error, DAMAGE):
        return _damaged(path, reason)
    return StoreError(f"{path}: cannot open the LMDB store ({reason})")


def check_size(env: lmdb.Environment, path: Path) -> None:
    """Refuse a data.mdb shorter than its used pages. LMDB memory-maps the file: reading
    a page past its end kills the process with SIGBUS, no exception. Opening reads only
    the two meta pages (with read(), which a short file fails cleanly), so this check
    comes before any other page is touched."""
    size = (path / "data.mdb").stat().st_size
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    if size < need:
        raise _damaged(path, f"data.mdb is truncated: {size} bytes where its pages need {need}")


def open_readonly(path: str | Path) -> lmdb.Environment:
    """Read-only, no lock file, readahead on (7-10x faster cold reads of large values).
    Every read of a store opens it here: a damaged one is a StoreError, not a crash."""
    path = Path(path)
    if not (path / "data.mdb").is_file():
        raise StoreError(f"{path}: no LMDB store here (expected {path / 'data.mdb'})")
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, readahead=True, max_readers=512)
    except lmdb.Error as error:
        raise _open_error(path, error) from None
    try:
        check_size(env, path)
    except StoreError:
        env.close()
        raise
    return env


_SHARED: dict[str, tuple[int, tuple[int, int], lmdb.Environment]] = {}


def store_version(path: str | Path) -> tuple[int, int]:
    """Which write of the store is there now: its data file's inode and mtime (a pack
    writes a new file and renames it into place)."""
    path = Path(path)
    try:
        stat = (path / "data.mdb").stat()
    except OSError:
        raise StoreError(f"{path}: no LMDB store here (expected {path / 'data.mdb'})") from None
    return stat.st_ino, stat.st_mtime_ns


def release(path: str | Path) -> None:
    """Close this process's shared environment of the store at `path`, if any (a reader
    of it then finds it replaced: `shared_readonly`'s check)."""
    _, _, env = _SHARED.pop(str(Path(path).resolve()), (None, None, None))
    if env is not None:
        env.close()


def shared_readonly(path: str | Path, expected: tuple[int, int] | None = None) -> lmdb.Environment:
    """One read-only environment per store and process (py-lmdb refuses to open a path
    twice in a process). Reopened in a forked child, whose copy of the parent's handle
    must not be used, and when the store's file was replaced by a newer pack; where the
    reader `expected` another `store_version` (the one it counted and checked when it
    opened the store), a StoreError: a run's data must not change under it."""
    path = Path(path)
    version = store_version(path)
    if expected is not None and version != expected:
        raise StoreError(
            f"{path}: the store was replaced while this run read it (a pack ran?); run "
            "again to start from the new store"
        )
    key = str(path.resolve())
    pid, seen, env = _SHARED.get(key, (None, None, None))
    if env is None or pid != os.getpid() or seen != version:
        if env is not None:
            del _SHARED[key]  # not left closed in the table if the reopen fails
            env.close()
        env = open_readonly(path)
        _SHARED[key] = (os.getpid(), version, env)
    return env


def read_meta(path: str | Path) -> dict:
    """The store's checked `__meta__`. The first read of a store: a damaged page on the
    way to the key is named here (the reads of records are not checked, being the hot path)."""
    path = Path(path)
    try:
        with shared_readonly(path).begin() as txn:
            raw = txn.get(META_KEY)
    except DAMAGE as error:
        raise _damaged(path, one_line(error)) from None
    return check_meta(raw, path)
