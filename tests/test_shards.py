"""Tar shards: WebDataset layout, determinism, atomic writes, stored description."""

from __future__ import annotations

import tarfile

import pytest

from alexnet.shards import (
    Record,
    iter_shard,
    key_for,
    read_description,
    remove_stale,
    unique_keys,
    write_shard,
)

RECORDS = [Record("n01/n01_1", b"\xff\xd8jpeg-one", 0), Record("n02/n02_7", b"\xff\xd8two", 12)]


def test_webdataset_members_readable_with_plain_tarfile(tmp_path):
    path = tmp_path / "shard-00000.tar"
    write_shard(path, RECORDS, {"fingerprint": "abc"})
    with tarfile.open(path) as tar:
        names = tar.getnames()
        assert names == ["n01/n01_1.jpg", "n01/n01_1.cls", "n02/n02_7.jpg", "n02/n02_7.cls"]
        assert tar.extractfile("n02/n02_7.cls").read() == b"12"
        assert tar.extractfile("n01/n01_1.jpg").read() == b"\xff\xd8jpeg-one"
        assert all(m.mtime == 0 and m.uname == "" for m in tar.getmembers())
    assert list(iter_shard(path)) == RECORDS
    assert read_description(path) == {"fingerprint": "abc"}


def test_same_records_same_bytes(tmp_path):
    write_shard(tmp_path / "a.tar", RECORDS, {"x": [1, 2]})
    write_shard(tmp_path / "b.tar", RECORDS, {"x": [1, 2]})
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_failed_write_leaves_previous_shard_and_no_temporary(tmp_path):
    path = tmp_path / "shard-00000.tar"
    write_shard(path, RECORDS[:1], {"v": 1})
    before = path.read_bytes()

    def broken():
        yield RECORDS[0]
        raise KeyboardInterrupt  # a kill in the middle of writing

    with pytest.raises(KeyboardInterrupt):
        write_shard(path, broken(), {"v": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["shard-00000.tar"]


def test_damaged_shard_is_reported_by_name(tmp_path):
    path = tmp_path / "shard-00003.tar"
    write_shard(path, RECORDS, {})
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(ValueError, match="shard-00003.tar: damaged shard"):
        list(iter_shard(path))
    assert read_description(tmp_path / "missing.tar") is None


def test_keys_have_no_dots_and_are_unique():
    assert key_for("train/n01440764/n01440764_10026.JPEG") == "n01440764/n01440764_10026"
    assert key_for("val/ILSVRC2012_val_00000001.JPEG") == "ILSVRC2012_val_00000001"
    assert key_for("train/n1/my photo.v2.jpg") == "n1/my_photo_v2"
    assert unique_keys(["train/a/x.y.jpg", "train/a/x_y.jpg", "train/a/x_y_1.png"]) == [
        "a/x_y",
        "a/x_y_1",
        "a/x_y_1_1",
    ]


def test_remove_stale_drops_leftovers_and_extra_shards(tmp_path):
    for i in range(4):
        write_shard(tmp_path / f"shard-{i:05d}.tar", RECORDS, {})
    (tmp_path / ".shard-00001.tar.tmp-123").write_bytes(b"half")
    remove_stale(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.tar", "shard-00001.tar"]
