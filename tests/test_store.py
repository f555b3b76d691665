"""The LMDB store: round trip, the format read by an outside reader, DataLoader workers,
atomic writes, and clear errors on corrupted data."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time

import lmdb
import numpy as np
import pytest
import torch

from alexnet.lmdb_store import StoreError, key, read_meta, write_store
from alexnet.pack import PackError, SplitIndex, check_indexes, index_shards, load_chunk, member_key
from alexnet.reader import LmdbSplit, batch_loader
from alexnet.shards import Record, ShardError, write_shard
from tests.helpers import REPO, encode, jpeg, photo, run_python

SIZE = 32
CLASSES = [{"index": i, "wnid": f"n{i}", "name": f"class {i}"} for i in range(3)]


def images(count: int) -> list[np.ndarray]:
    return [np.asarray(photo(SIZE, SIZE, seed=i)) for i in range(count)]


def raw_records(pixels) -> list[tuple[int, bytes]]:
    return [(i % 3, p.tobytes()) for i, p in enumerate(pixels)]


def store(tmp_path, records, encoding="raw", batch=4, **options):
    batches = [records[i : i + batch] for i in range(0, len(records), batch)]
    path = tmp_path / "split"
    assert write_store(path, batches, encoding, CLASSES, size=SIZE, **options) == len(records)
    return path


def test_raw_round_trip_items_and_batches(tmp_path):
    pixels = images(10)
    split = LmdbSplit(store(tmp_path, raw_records(pixels)))
    assert len(split) == 10 and split.classes == CLASSES
    image, label = split[7]
    assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE) and label == 1
    assert np.array_equal(image.permute(1, 2, 0).numpy(), pixels[7])
    batch, labels = split.read_batch([9, 0, 4])
    assert batch.shape == (3, 3, SIZE, SIZE) and batch.is_contiguous()
    assert labels.tolist() == [0, 0, 1]
    assert np.array_equal(batch[0].permute(1, 2, 0).numpy(), pixels[9])
    nhwc, same = split.read_batch([9, 0, 4], channels_last=True)
    assert torch.equal(nhwc, batch) and torch.equal(same, labels)
    assert nhwc.is_contiguous(memory_format=torch.channels_last)


def test_a_store_packed_again_under_a_reader_is_an_error_not_its_new_data(tmp_path):
    # A store replaced while a run reads it (a pack run beside the training) was switched
    # to at the next read: the new records under the old count, classes and digest.
    path = store(tmp_path, raw_records(images(8)))
    split = LmdbSplit(path)
    assert split.read_batch([0, 7])[1].tolist() == [0, 1]
    time.sleep(0.01)  # (another mtime, even where the inode is used again)
    store(tmp_path, [(2, p.tobytes()) for p in images(4)])
    with pytest.raises(StoreError, match=r"split: the store was replaced while this run read"):
        split.read_batch([0, 1])
    assert LmdbSplit(path).read_batch([0, 1])[1].tolist() == [2, 2]  # a new reader: new data


def test_jpeg_payloads_decode_like_pil(tmp_path):
    from io import BytesIO

    from PIL import Image

    jpegs = [encode(photo(SIZE, SIZE, seed=i), "JPEG", quality=90) for i in range(5)]
    split = LmdbSplit(store(tmp_path, [(i % 3, j) for i, j in enumerate(jpegs)], encoding="jpeg"))
    assert split.meta["encoding"] == "jpeg"
    reference = np.asarray(Image.open(BytesIO(jpegs[3])).convert("RGB")).astype(int)
    ours = split[3][0].permute(1, 2, 0).numpy().astype(int)
    assert np.abs(ours - reference).max() <= 2  # both libjpeg-turbo; IDCT may differ by 1-2


def test_outside_reader_with_only_lmdb_struct_json_numpy(tmp_path):
    """Follows docs/design.md's contract with no project code: proves the format."""
    pixels = images(6)
    path = store(tmp_path, raw_records(pixels))
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        meta = json.loads(txn.get(b"__meta__").decode("utf-8"))
        assert meta["format"] == "alexnet-lmdb" and meta["version"] == 1
        assert meta["count"] == 6 and meta["encoding"] == "raw" and meta["channels"] == 3
        assert meta["classes"][2] == {"index": 2, "wnid": "n2", "name": "class 2"}
        for index in range(meta["count"]):
            value = txn.get(f"{index:08d}".encode("ascii"))
            magic, label, height, width = struct.unpack("<4sIHH", value[:12])
            assert (magic, label, height, width) == (b"AXNT", index % 3, SIZE, SIZE)
            image = np.frombuffer(value[12:], np.uint8).reshape(height, width, 3)
            assert np.array_equal(image, pixels[index])
        keys = [k for k, _ in txn.cursor()]
    env.close()
    assert keys == [f"{i:08d}".encode() for i in range(6)] + [b"__meta__"]
    assert not (path / "lock.mdb").exists()  # nothing for DVC to see change


LOADER_CHECK = """
import sys, numpy as np, torch
from alexnet.reader import LmdbSplit
split = LmdbSplit(sys.argv[1])
split[0]  # the parent's open environment must not leak into the workers
loader = torch.utils.data.DataLoader(split, batch_size=4, num_workers=2,
                                     multiprocessing_context=sys.argv[2])
got = torch.cat([batch for batch, _ in loader])
expected = np.load(sys.argv[3])
assert np.array_equal(got.numpy(), expected), "wrong images"
print("ok", len(got))
"""


@pytest.mark.parametrize("context", ["fork", "forkserver"])
def test_dataloader_with_two_workers(tmp_path, context):
    # In a fresh interpreter: a process that has run a Prefect flow (as this pytest
    # session has) loses forked workers at start-up (Prefect's at-fork handlers).
    pixels = images(12)
    path = store(tmp_path, raw_records(pixels))
    np.save(tmp_path / "expected.npy", np.stack([p.transpose(2, 0, 1) for p in pixels]))
    command = [
        sys.executable,
        "-c",
        LOADER_CHECK,
        str(path),
        context,
        str(tmp_path / "expected.npy"),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok 12", result.stderr[-2000:]


def test_map_grows_instead_of_map_full_error(tmp_path):
    records = raw_records(images(40))  # 40 x 3 KB > the 16 KB initial map
    split = LmdbSplit(store(tmp_path, records, batch=16, map_size=1 << 14))
    assert len(split) == 40 and split[39][1] == 0


def test_the_same_records_make_the_same_file_whatever_the_batches(tmp_path, monkeypatch):
    # params pack.batch (records a read task takes) changed data.mdb's pages: training
    # digests the file, so a memory knob restarted a finished run from scratch.
    from alexnet import lmdb_store

    monkeypatch.setattr(lmdb_store, "TRANSACTION_BYTES", 192 * 64 + 1)  # 11 transactions
    records = [(i % 7, bytes([i % 251]) * 192) for i in range(700)]  # 8x8 raw images

    def packed(name: str, batch: int) -> bytes:
        batches = [records[i : i + batch] for i in range(0, len(records), batch)]
        write_store(tmp_path / name, batches, "raw", [{"index": 0}], size=8)
        return (tmp_path / name / "data.mdb").read_bytes()

    one = packed("one", len(records))
    assert all(packed(str(batch), batch) == one for batch in (1, 100, 256, 300))


def test_failed_pack_leaves_previous_store_and_no_temporary(tmp_path):
    path = store(tmp_path, raw_records(images(3)))
    before = (path / "data.mdb").read_bytes()

    def killed():
        yield raw_records(images(2))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_store(path, killed(), "raw", CLASSES, size=SIZE)
    assert (path / "data.mdb").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split"]


def test_sigkill_during_pack_leaves_no_partial_store(tmp_path):
    script = f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
from alexnet.lmdb_store import write_store
def batches():
    for i in range(1000):
        yield [(0, bytes(3 * 32 * 32))] * 8
        time.sleep(0.01)
write_store({str(tmp_path / "store")!r}, batches(), "raw", [], size=32)
"""
    process = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not any(tmp_path.glob(".store.tmp-*/data.mdb")) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "store").exists()
    # The next write removes the dead run's temporary folder.
    write_store(tmp_path / "store", [[(1, bytes(3 * 32 * 32))]], "raw", [], size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def _corrupt(path, key: bytes, value: bytes):
    env = lmdb.open(str(path), lock=False)
    with env.begin(write=True) as txn:
        txn.put(key, value)
    env.close()


def test_corrupted_value_is_one_clear_error(tmp_path):
    path = store(tmp_path, raw_records(images(4)))
    _corrupt(path, b"00000002", b"JUNK" + bytes(8 + SIZE * SIZE * 3))
    _corrupt(path, b"00000001", struct.pack("<4sIHH", b"AXNT", 0, SIZE, SIZE) + b"short")
    split = LmdbSplit(path)
    with pytest.raises(StoreError, match=r"split: key 00000002: wrong magic b'JUNK'"):
        split[2]
    with pytest.raises(StoreError, match="key 00000001: payload of 5 bytes, expected 32x32x3"):
        split.read_batch([0, 1])


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_a_label_outside_the_stores_classes_is_one_clear_error(tmp_path, encoding):
    # A store another tool wrote: training would otherwise fail inside the loss (on CUDA
    # a device-side assert that takes the process's CUDA context with it).
    records = (
        raw_records(images(4))
        if encoding == "raw"
        else [(i % 3, jpeg(SIZE, SIZE, i)) for i in range(4)]
    )
    records[2] = (3, records[2][1])
    split = LmdbSplit(store(tmp_path, records, encoding))
    assert split.read_batch([0, 1, 3])[1].tolist() == [0, 1, 0]
    message = r"split: key 00000002: label 3 is out of range \(3 classes in __meta__: 0..2\)$"
    with pytest.raises(StoreError, match=message):
        split.read_batch([1, 2])
    with pytest.raises(StoreError, match=message):
        split[2]


def test_wrong_version_or_missing_store_is_named(tmp_path):
    path = store(tmp_path, raw_records(images(1)))
    env = lmdb.open(str(path), lock=False)
    with env.begin(write=True) as txn:
        meta = json.loads(txn.get(b"__meta__"))
        txn.put(b"__meta__", json.dumps({**meta, "version": 7}).encode())
    env.close()
    with pytest.raises(StoreError, match="key __meta__: version 7, need 1"):
        LmdbSplit(path)
    with pytest.raises(StoreError, match="no LMDB store here"):
        LmdbSplit(tmp_path / "missing")
    with pytest.raises(StoreError, match="version 7"):
        read_meta(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"height": None}, "height None, not a count"),
        ({"count": "7"}, "count '7', not a count"),
        ({"classes": {}}, "no list of classes"),
        ({"count": True}, "count True, not a count"),  # JSON's true, which Python calls 1
        ({"version": True}, "version True, need 1"),
        ([], "is not a JSON object"),
        # a batch of these was allocated before any record was read: TiB, a MemoryError
        ({"height": 1_000_000, "width": 1_000_000}, "height 1000000, not 1 to 65535"),
        ({"width": 0}, "width 0, not 1 to 65535"),
    ],
)
def test_a_foreign_stores_meta_is_named_in_one_line(tmp_path, change, message):
    path = store(tmp_path, raw_records(images(1)))
    env = lmdb.open(str(path), lock=False)
    with env.begin(write=True) as txn:
        meta = {**json.loads(txn.get(b"__meta__")), **change} if change != [] else change
        if isinstance(meta, dict):
            meta = {k: v for k, v in meta.items() if v is not None}
        txn.put(b"__meta__", json.dumps(meta).encode())
    env.close()
    with pytest.raises(StoreError, match=f"key __meta__:? {re.escape(message)}$"):
        LmdbSplit(path)


def test_records_lmdb_would_drop_out_of_key_order_stop_the_write(tmp_path, monkeypatch):
    # With appends, LMDB skips a key that sorts before the last without an error: the
    # keys past 99,999,999 would have been lost, and the store said whole.
    from alexnet import lmdb_store

    monkeypatch.setattr(lmdb_store, "key", lambda index: b"%08d" % (9 - index))
    with pytest.raises(StoreError, match=r"1 of 2 records out of key order \(a store holds "):
        write_store(tmp_path / "s", [raw_records(images(2))], "raw", CLASSES, size=SIZE)
    assert not (tmp_path / "s").exists()


# A damaged data.mdb (a copy cut short, overwritten, emptied) is one line that names the
# store and says to pack again, whichever way it is opened, and is left as it was.


PAGE = os.sysconf("SC_PAGESIZE")


def damaged(path, reason: str) -> str:
    return f"{path}: damaged LMDB store: {reason}; run pack again to rewrite it"


def truncated_store(tmp_path, keep: int | None = None):
    """A store whose data.mdb lost its second half (or all but `keep` bytes); returns it
    and its error line."""
    path = store(tmp_path, raw_records(images(10)))
    size = (path / "data.mdb").stat().st_size
    keep = size // 2 if keep is None else keep
    os.truncate(path / "data.mdb", keep)
    return path, damaged(path, f"data.mdb is truncated: {keep} bytes where its pages need {size}")


READ_EVERY_RECORD = """
from alexnet.lmdb_store import read_meta
from alexnet.reader import LmdbSplit

def every_record(path):
    split = LmdbSplit(path)
    split.read_batch(range(len(split)))  # every page, those past the end of the file too

for read in (read_meta, every_record):
    try:
        read(sys.argv[1])
    except Exception as error:
        print(type(error).__name__, error)
"""


def test_a_truncated_store_is_a_store_error_not_a_bus_error(tmp_path):
    # LMDB maps the file: a page past its end is a SIGBUS, so this runs in its own process.
    path, line = truncated_store(tmp_path)
    done = run_python(READ_EVERY_RECORD.replace("sys.argv[1]", repr(str(path))))
    assert done.returncode == 0, f"status {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.splitlines() == [f"StoreError {line}"] * 2


def test_evaluate_of_a_truncated_store_is_one_error_line(tmp_path):
    # Only the meta pages left: the first read, of __meta__, is past the end (before the
    # model file, which is not there, is looked for).
    path, line = truncated_store(tmp_path, keep=2 * PAGE)
    before = (path / "data.mdb").read_bytes()
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    command = [sys.executable, "-m", "flows.cli", "evaluate", str(path), str(tmp_path / "m.pt")]
    command += ["--metrics", str(tmp_path / "metrics")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1, f"status {done.returncode}: {done.stderr[-2000:]}"
    errors = [row for row in done.stderr.splitlines() if row.startswith("error:")]
    assert errors == [f"error: {line}"] and "Traceback" not in done.stderr
    assert (path / "data.mdb").read_bytes() == before


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda data: b"\xab" * len(data), "MDB_INVALID: File is not an LMDB file"),
        (lambda data: b"", "data.mdb is empty"),  # LMDB itself: "Bad file descriptor"
        # The two meta pages kept, the tree's pages zeroed: the size is right. (LMDB's
        # page is the system's.)
        (
            lambda data: data[: 2 * PAGE] + bytes(len(data) - 2 * PAGE),
            "mdb_get: MDB_CORRUPTED: Located page was wrong type",
        ),
    ],
    ids=["garbage", "empty", "zeroed-pages"],
)
def test_a_damaged_store_is_one_line_and_left_as_it_was(tmp_path, damage, reason):
    path = store(tmp_path, raw_records(images(4)))
    (path / "data.mdb").write_bytes(damage((path / "data.mdb").read_bytes()))
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    for read in (LmdbSplit, read_meta):
        with pytest.raises(StoreError) as caught:
            read(path)
        assert str(caught.value) == damaged(path, reason)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # read-only, no lock file


def test_a_damaged_page_among_the_records_is_one_line_naming_the_record(tmp_path):
    # The file's size is right and __meta__ reads: LMDB finds the damage only when a read
    # reaches the page (here the leaf of the first records: tiny images, many leaves).
    side, count = 4, 2000
    path = tmp_path / "split"
    records = [
        (i % 3, bytes([128 + i % 100]) * (3 * side * side)) for i in range(count)
    ]  # no digit
    assert write_store(path, [records], "raw", CLASSES, size=side) == count
    data = bytearray((path / "data.mdb").read_bytes())
    pages = {at // PAGE for at in range(len(data)) if data.startswith(key(0), at)}
    assert pages and len(data) // PAGE > 10 * len(pages)
    for page in pages:  # its header: the page's number and type
        data[page * PAGE : page * PAGE + 16] = b"\xff" * 16
    (path / "data.mdb").write_bytes(bytes(data))
    split = LmdbSplit(path)
    assert split[count - 1][1] == (count - 1) % 3  # another leaf: read as before
    with pytest.raises(StoreError) as caught:
        split.read_batch([5, 0])
    reason = "key 00000005: mdb_get: MDB_CORRUPTED: Located page was wrong type"
    assert str(caught.value) == damaged(path, reason)


# Pack reads the prepared shards: a damaged one stops it with one line naming the shard
# and the member (index_shards, in the flow or its index tasks; load_chunk in the tasks).


def prepared_split(tmp_path, bad: Record | None = None) -> list:
    """Two shards of 32x32 JPEGs (labels 0..2); `bad` replaces the second shard's middle
    record. Returns the index of the split."""
    folder = tmp_path / "train"
    folder.mkdir()
    for s in range(2):
        records = [
            Record(f"n{i}/img_{3 * s + i}", jpeg(SIZE, SIZE, 3 * s + i), i) for i in range(3)
        ]
        if bad is not None and s == 1:
            records[1] = bad
        write_shard(folder / f"shard-{s:05d}.tar", records, {})
    return folder


def test_index_checks_labels_against_the_number_of_classes(tmp_path):
    folder = prepared_split(tmp_path, Record("n01/img_4", jpeg(SIZE, SIZE), 3))
    assert [entry.label for entry in index_shards(folder)] == [0, 1, 2, 0, 3, 2]
    entry = index_shards(folder)[4]
    assert member_key(entry) == "n01/img_4"
    moved = dataclasses.replace(entry, offset=entry.offset + 1)  # its shard made again since
    assert member_key(moved) == f"the member at byte {entry.offset + 1}"
    with pytest.raises(ShardError) as caught:
        index_shards(folder, classes=3)
    shard = folder / "shard-00001.tar"
    assert (
        str(caught.value)
        == f"{shard}: member n01/img_4.cls: label 3 is out of range (3 classes: 0..2)"
    )


def test_a_shuffled_chunk_reads_one_shard_at_a_time_in_the_chunks_order(tmp_path, monkeypatch):
    # A chunk of ImageNet's shuffled train split touches ~700 shards: they are read one
    # after the other, not held open together, and the records still come in its order.
    import alexnet.pack

    entries = index_shards(prepared_split(tmp_path), classes=3)
    chunk = [entries[i] for i in (4, 0, 5, 2, 3, 1)]  # the two shards interleaved
    open_now, most = [], []

    class Counted(io.FileIO):
        def __init__(self, *args):
            super().__init__(*args)
            open_now.append(self)
            most.append(len([f for f in open_now if not f.closed]))

    monkeypatch.setattr(alexnet.pack, "open", Counted, raising=False)
    records = load_chunk(chunk, "jpeg", SIZE)
    assert [label for label, _ in records] == [1, 0, 2, 2, 0, 1]
    expected = [jpeg(SIZE, SIZE, i) for i in (4, 0, 5, 2, 3, 1)]  # as prepared_split made them
    assert [bytes(data) for _, data in records] == expected
    assert len(open_now) == 2 and max(most) == 1 and all(f.closed for f in open_now)


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_a_member_that_is_not_a_jpeg_stops_the_chunk(tmp_path, encoding):
    folder = prepared_split(tmp_path, Record("n01/img_4", encode(photo(SIZE, SIZE), "PNG"), 1))
    entries = index_shards(folder, classes=3)
    assert len(load_chunk(entries[:3], encoding, SIZE)) == 3
    with pytest.raises(ShardError) as caught:
        load_chunk(entries[3:], encoding, SIZE)
    line = (
        f"{folder / 'shard-00001.tar'}: member n01/img_4.jpg is not a JPEG (no JPEG start marker)"
    )
    assert str(caught.value) == line


@pytest.mark.parametrize(
    ("data", "problem", "encoding"),
    [
        (b"\xff\xd8\xff" + bytes(300), "cannot be decoded (not an image)", "raw"),
        (b"\xff\xd8\xff" + bytes(300), "cannot be decoded (not an image)", "jpeg"),
        (jpeg(SIZE, SIZE)[:300], "cannot be decoded (", "raw"),
        # `jpeg` reads headers only: a cut one was stored, to fail when read, as a record
        (
            jpeg(SIZE, SIZE)[:-10],
            "cannot be decoded (no end-of-image marker at its end: cut short?)",
            "jpeg",
        ),
        (jpeg(40, SIZE), "is 40x32, expected 32x32", "raw"),
        (jpeg(40, SIZE), "is 40x32, expected 32x32", "jpeg"),  # else training stops on it
    ],
)
def test_an_image_that_does_not_decode_is_named_with_its_member(tmp_path, data, problem, encoding):
    folder = prepared_split(tmp_path, Record("n01/img_4", data, 1))
    with pytest.raises(PackError) as caught:
        load_chunk(index_shards(folder, classes=3), encoding, SIZE)
    line = str(caught.value)
    assert line.startswith(f"{folder / 'shard-00001.tar'}: member n01/img_4.jpg {problem}"), line
    assert "\n" not in line


def test_a_split_of_no_records_or_a_class_of_no_training_record_is_refused():
    # both were packed without a word: a store training refuses later, and a model with
    # an output that no image targets
    def index(*labels: int) -> SplitIndex:
        n = len(labels)
        rows = np.zeros(n, dtype=np.int64)
        return SplitIndex(
            ("s.tar",), rows.astype(np.int32), rows, rows + 1, np.array(labels, dtype=np.int32)
        )

    check_indexes("prep", {"train": index(0, 1, 2, 2), "val": index(1)}, CLASSES)
    with pytest.raises(PackError, match=r"^prep/val: no records in its shards \(run prepare\)$"):
        check_indexes("prep", {"train": index(0, 1, 2), "val": index()}, CLASSES)
    with pytest.raises(PackError, match=r"^prep/train: no record of class 1 \(n1\) and 1 more"):
        check_indexes("prep", {"train": index(0, 0), "val": index(1)}, CLASSES)


def test_a_shard_cut_short_after_indexing_is_named(tmp_path):
    folder = prepared_split(tmp_path)
    entries = index_shards(folder, classes=3)
    shard = folder / "shard-00001.tar"
    shard.write_bytes(shard.read_bytes()[: entries[5].offset + 10])
    with pytest.raises(ShardError) as caught:
        load_chunk(entries, "jpeg", SIZE)
    assert str(caught.value) == f"{shard}: truncated tar: member n2/img_5.jpg is cut short"


class DiesReading(torch.utils.data.Dataset):
    """Batches of a store whose reading kills the loader worker with `signum`: as a read
    past a damaged store's end does (SIGBUS), or a full /dev/shm, or the OOM killer."""

    def __init__(self, path, signum: int):
        self.split, self.signum = LmdbSplit.__new__(LmdbSplit), signum
        self.split.path = path

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        os.kill(os.getpid(), self.signum)


class RaisesReading(DiesReading):
    """Batches of a store whose reading raises `error` in the loader worker."""

    def __init__(self, path, error: Exception):
        super().__init__(path, 0)
        self.error = error

    def __getitem__(self, index: int):
        raise self.error


def test_a_loader_workers_error_is_its_own_line_not_torchs_traceback(tmp_path):
    # torch re-raises it as "Caught StoreError in DataLoader worker process 0. Original
    # Traceback ...": the one-line error would have been a traceback squashed into a line
    store = tmp_path / "lmdb" / "train"
    damaged = StoreError(f"{store}: key 00000007: missing\n(run pack again)")  # 2 lines
    with pytest.raises(StoreError) as caught:
        list(batch_loader(RaisesReading(store, damaged), range(4), workers=1))
    assert str(caught.value) == str(damaged)
    # a worker's RuntimeError is not a death: it stays itself, with its reason
    full = RuntimeError(f"{store}: No space left on device (28)")
    with pytest.raises(RuntimeError, match="No space left on device") as caught:
        list(batch_loader(RaisesReading(store, full), range(4), workers=1))
    assert "died" not in str(caught.value)


@pytest.mark.parametrize(
    ("signum", "cause"),
    [(signal.SIGBUS, "/dev/shm too small for the batches"), (signal.SIGKILL, "out of memory?")],
)
def test_a_loader_worker_killed_by_a_signal_is_one_line_naming_the_store(tmp_path, signum, cause):
    # torch raised a RuntimeError (a traceback) naming neither the store nor a remedy
    store = tmp_path / "lmdb" / "train"
    loader = batch_loader(DiesReading(store, signum), range(4), workers=1)
    died = rf"^{re.escape(str(store))}: a loader worker died reading it \({signum.name}\)"
    with pytest.raises(StoreError, match=rf"{died}: {re.escape(cause)}"):
        list(loader)


def test_the_signal_named_in_torchs_message_is_the_one_said():
    # torch names it when its SIGCHLD handler saw the death, by strsignal's words
    from alexnet.reader import _killer

    message = "DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible"
    assert _killer(message, iter(())) is signal.SIGBUS
    assert _killer("DataLoader worker (pid(s) 4242) exited unexpectedly", iter(())) is None
