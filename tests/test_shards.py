"""Tar shards: WebDataset layout, determinism, atomic writes, stored description."""

from __future__ import annotations

import io
import re
import tarfile

import pytest

from alexnet.errors import AlexnetError
from alexnet.shards import (
    JPEG_START,
    Record,
    ShardError,
    SplitKeys,
    index_shard,
    iter_shard,
    key_for,
    load_classes,
    read_description,
    remove_stale,
    unique_keys,
    write_shard,
)
from tests.helpers import DEAD_PID

RECORDS = [
    Record("n01/n01_1", b"\xff\xd8\xffjpeg-one", 0),
    Record("n02/n02_7", b"\xff\xd8\xfftwo", 12),
]


def test_webdataset_members_readable_with_plain_tarfile(tmp_path):
    path = tmp_path / "shard-00000.tar"
    write_shard(path, RECORDS, {"fingerprint": "abc"})
    with tarfile.open(path) as tar:
        names = tar.getnames()
        assert names == ["n01/n01_1.jpg", "n01/n01_1.cls", "n02/n02_7.jpg", "n02/n02_7.cls"]
        assert tar.extractfile("n02/n02_7.cls").read() == b"12"
        assert tar.extractfile("n01/n01_1.jpg").read() == b"\xff\xd8\xffjpeg-one"
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


@pytest.mark.parametrize("cut", [0.5, 0.9, -tarfile.RECORDSIZE, -1])
def test_a_shard_cut_short_has_no_description_so_prepare_makes_it_again(tmp_path, cut):
    # prepare reused a truncated shard (its header intact), and stats and pack failed on
    # it at every run until the user deleted it
    path = tmp_path / "shard-00000.tar"
    jpeg = JPEG_START + bytes(range(256)) * 100  # members longer than a tar record
    write_shard(path, [Record(f"n01/n01_{i}", jpeg, 1) for i in range(8)], {"fingerprint": "a"})
    assert read_description(path) == {"fingerprint": "a"}
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut) if isinstance(cut, float) else cut])
    assert read_description(path) is None


def test_a_shard_zero_filled_from_a_member_on_is_damaged_not_shorter(tmp_path):
    # A copy that preallocates its file and stops part way keeps the size and the zero
    # end: tarfile lists the members before the zeros and stops there without a word.
    path = tmp_path / "shard-00000.tar"
    records = [Record(f"n01/n01_{i}", JPEG_START + bytes(3000), 1) for i in range(6)]
    write_shard(path, records, {"fingerprint": "a", "report": {"kept": 6}})
    assert read_description(path) == {"fingerprint": "a", "report": {"kept": 6}}
    data = path.read_bytes()
    start = member_at(path, "n01/n01_3.jpg").offset
    path.write_bytes(data[:start] + bytes(len(data) - start))
    assert read_description(path) is None  # so prepare makes it again
    with pytest.raises(ShardError, match="shard-00000.tar: damaged tar: 3 records where"):
        index_shard(path)  # and stats and pack do not read half of it


def test_damaged_shard_is_reported_by_name(tmp_path):
    path = tmp_path / "shard-00003.tar"
    write_shard(path, RECORDS, {})
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(
        ShardError, match=r"shard-00003.tar: not a readable tar \(truncated"
    ) as caught:
        list(iter_shard(path))
    assert isinstance(caught.value, AlexnetError)  # the CLI prints it as one line
    assert read_description(tmp_path / "missing.tar") is None


def plain_tar(path, members: list[tuple[str, bytes]]):
    """A tar of `members` in order, with none of write_shard's guarantees."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def member_at(path, name: str) -> tarfile.TarInfo:
    with tarfile.open(path) as tar:
        return tar.getmember(name)


def cut(path, size: int):
    path.write_bytes(path.read_bytes()[:size])
    return path


def shard(tmp_path):
    path = tmp_path / "shard-00001.tar"
    write_shard(path, RECORDS, {})
    return path


JPG = b"\xff\xd8\xffimage"
DAMAGED = {  # how to damage a shard: the line that names it
    "cut inside an image": (
        lambda p: cut(p, member_at(p, "n02/n02_7.jpg").offset_data + 3),
        "truncated tar: member n02/n02_7.jpg is cut short",
    ),
    "cut in an image's padding": (
        lambda p: cut(p, member_at(p, "n02/n02_7.cls").offset - 10),
        "truncated tar: it ends after member n02/n02_7.jpg",
    ),
    "cut between members": (
        lambda p: cut(p, member_at(p, "n02/n02_7.cls").offset),
        "truncated tar: it ends after member n02/n02_7.jpg, without the end blocks",
    ),
    "cut inside a header": (
        lambda p: cut(p, member_at(p, "n02/n02_7.cls").offset + 100),
        "truncated tar: it ends after member n02/n02_7.jpg, without the end blocks",
    ),
    "no end blocks": (
        lambda p: cut(p, member_at(p, "n02/n02_7.cls").offset_data + 512),
        "truncated tar: it ends after member n02/n02_7.cls, without the end blocks",
    ),
    "corrupt header": (
        lambda p: p.write_bytes(
            p.read_bytes()[: member_at(p, "n02/n02_7.jpg").offset]
            + b"garbage" * 200
            + p.read_bytes()[member_at(p, "n02/n02_7.jpg").offset + 1400 :]
        ),
        "damaged tar: the header after member n01/n01_1.cls is corrupt",
    ),
    "zero-length": (lambda p: p.write_bytes(b""), "not a readable tar (empty file)"),
    "not a tar": (lambda p: p.write_bytes(b"x" * 5000), "not a readable tar ("),
    "label not an integer": (
        lambda p: plain_tar(p, [("a/k.jpg", JPG), ("a/k.cls", b"one")]),
        "member a/k.cls is not an integer label (b'one')",
    ),
    "label too long": (
        lambda p: plain_tar(p, [("a/k.jpg", JPG), ("a/k.cls", b"1" * 40)]),
        "member a/k.cls is not an integer label",
    ),
    "negative label": (
        lambda p: write_shard(p, [Record("a/k", JPG, -2)], {}),
        "member a/k.cls: label -2 is out of range (labels are >= 0)",
    ),
    "jpg without cls": (
        lambda p: plain_tar(p, [("a/k.jpg", JPG), ("a/j.jpg", JPG), ("a/j.cls", b"0")]),
        "member a/k.jpg has no a/k.cls",
    ),
    "cls without jpg": (
        lambda p: plain_tar(p, [("a/k.cls", b"0"), ("a/k.jpg", JPG)]),
        "member a/k.cls has no a/k.jpg before it",
    ),
    "jpg twice": (
        lambda p: plain_tar(p, [("a/k.jpg", JPG), ("a/k.jpg", JPG), ("a/k.cls", b"0")]),
        "member a/k.jpg appears twice",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_shard_is_one_line_naming_the_file_and_member(tmp_path, case):
    damage, message = DAMAGED[case]
    path = shard(tmp_path)
    damage(path)
    for read in (index_shard, lambda p: list(iter_shard(p))):
        with pytest.raises(ShardError) as caught:
            read(path)
        line = str(caught.value)
        assert line.startswith(f"{path}: {message}"), line
        assert "\n" not in line


def test_labels_are_checked_against_the_number_of_classes(tmp_path):
    path = tmp_path / "shard-00000.tar"
    write_shard(path, [Record("a/k", JPG, 2), Record("b/k", JPG, 3)], {})
    assert [label for *_, label in index_shard(path, classes=4)] == [2, 3]
    assert [record.label for record in iter_shard(path)] == [2, 3]  # no range: >= 0 only
    with pytest.raises(ShardError) as caught:
        list(iter_shard(path, classes=3))
    assert str(caught.value) == f"{path}: member b/k.cls: label 3 is out of range (3 classes: 0..2)"


@pytest.mark.parametrize("data", [b"hello", b"", b"\xff\xd8", b"\x89PNG\r\n\x1a\n"])
def test_an_image_that_is_not_a_jpeg_is_named(tmp_path, data):
    path = tmp_path / "shard-00000.tar"
    write_shard(path, [Record("a/good", JPG, 0), Record("n01/img_3", data, 1)], {})
    assert len(index_shard(path)) == 2  # the index reads no image bytes
    with pytest.raises(ShardError) as caught:
        list(iter_shard(path))
    assert str(caught.value) == f"{path}: member n01/img_3.jpg is not a JPEG (no JPEG start marker)"


def test_classes_json_missing_or_corrupt_is_one_line(tmp_path):
    with pytest.raises(ShardError, match=f"{tmp_path / 'classes.json'}: no such file"):
        load_classes(tmp_path)
    (tmp_path / "classes.json").write_text("[{")
    with pytest.raises(ShardError, match="classes.json: unreadable"):
        load_classes(tmp_path)
    (tmp_path / "classes.json").write_text('[{"index": 0, "wnid": "n0", "name": "zero"}]')
    assert len(load_classes(tmp_path)) == 1


def test_keys_have_no_dots_and_are_unique():
    assert key_for("train/n01440764/n01440764_10026.JPEG") == "n01440764/n01440764_10026"
    assert key_for("val/ILSVRC2012_val_00000001.JPEG") == "ILSVRC2012_val_00000001"
    assert key_for("train/n1/my photo.v2.jpg") == "n1/my_photo_v2"
    assert unique_keys(["train/a/x.y.jpg", "train/a/x_y.jpg", "train/a/x_y_1.png"]) == [
        "a/x_y",
        "a/x_y_1",
        "a/x_y_1_1",
    ]


def test_split_keys_given_folder_by_folder_are_the_whole_splits_keys():
    # "a.b" and "a_b" sanitize alike, and "a0" lies between them in sorted order.
    folders = {
        "train/a.b/": ["x.jpg", "x_1.jpg"],
        "train/a0/": ["x.jpg"],
        "train/a_b/": ["x.jpg", "x.png"],
        "train/c/": ["x.jpg", "x.png"],
    }
    relpaths = {prefix: [prefix + name for name in names] for prefix, names in folders.items()}
    keys = SplitKeys(folders)
    given = [key for prefix in folders for key in keys.folder(prefix, relpaths[prefix])]
    assert given == unique_keys(path for paths in relpaths.values() for path in paths)
    assert given[3:5] == ["a_b/x_2", "a_b/x_3"]  # unique across the two folders
    assert keys._used == {}  # nothing kept once every folder is given


def test_remove_stale_drops_leftovers_and_extra_shards(tmp_path):
    for i in range(4):
        write_shard(tmp_path / f"shard-{i:05d}.tar", RECORDS, {})
    (tmp_path / f".shard-00001.tar.tmp-{DEAD_PID}").write_bytes(b"half")
    # prepare's memos of their files, and one whose shard a killed run removed first
    for i in (0, 3, 7):
        (tmp_path / f"shard-{i:05d}.files.json").write_text("{}")
    remove_stale(tmp_path, keep=2)
    kept = ["shard-00000.files.json", "shard-00000.tar", "shard-00001.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == kept


def test_a_split_without_shards_is_named_with_what_to_run(tmp_path):
    from alexnet.shards import ShardError, shard_files

    (tmp_path / "train").mkdir()
    with pytest.raises(ShardError, match=r"train: no shard-\*\.tar files \(run prepare first\)$"):
        shard_files(tmp_path / "train")


def test_a_folder_one_level_off_is_named_with_the_one_meant(tmp_path):
    # stats takes a split (prepared/train), pack the prepared folder: each given the
    # other said "run prepare first" or "prepare writes it", after prepare had run
    from alexnet.shards import CLASSES_FILE, ShardError, load_classes, shard_files

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "shard-00000.tar").write_bytes(b"")
    (tmp_path / CLASSES_FILE).write_text("[]")
    split = re.escape(str(tmp_path / "train"))
    with pytest.raises(
        ShardError, match=rf"files; a prepared folder: name a split of it, {split}$"
    ):
        shard_files(tmp_path)
    folder = re.escape(str(tmp_path))
    with pytest.raises(
        ShardError, match=rf"split of a prepared folder: name the folder, {folder}\)$"
    ):
        load_classes(tmp_path / "train")


def test_shards_are_in_number_order_past_five_digits(tmp_path):
    # ImageNet-21k at 250 a shard: ~57,000 shards; a larger set passes 99,999
    from alexnet.shards import shard_name, shard_order

    paths = [tmp_path / shard_name(index) for index in (100_000, 99_999, 7, 100_001)]
    names = [path.name for path in sorted(paths, key=shard_order)]
    assert names == [shard_name(i) for i in (7, 99_999, 100_000, 100_001)]


def test_a_shard_missing_or_one_too_many_is_named(tmp_path):
    # a shard lost in a copy dropped its images from stats and pack without a word
    import json

    from alexnet.shards import reported_shards, shard_files, shard_name

    split = tmp_path / "prepared" / "train"
    split.mkdir(parents=True)
    for index in (0, 1, 3):
        write_shard(split / shard_name(index), [], {})
    with pytest.raises(ShardError, match=r"train: shard-00002\.tar is missing \(from 0\); run"):
        shard_files(split)  # shards on their own: numbered from 0 without a gap
    write_shard(split / shard_name(2), [], {})
    assert len(shard_files(split)) == 4
    report = tmp_path / "prepared" / "report.json"
    assert reported_shards(split) is None  # shards on their own
    report.write_text(json.dumps({"shards": {"train": 5, "val": 1}}))
    with pytest.raises(ShardError, match=r"shard-00004\.tar is missing \(the 5 of its report"):
        shard_files(split, reported_shards(split))  # the last one, which only it tells
    report.write_text(json.dumps({"shards": {"train": 3}}))
    with pytest.raises(ShardError, match=r"shard-00003\.tar is not one of the 3 of its report"):
        shard_files(split, reported_shards(split))
    report.write_text("{")
    with pytest.raises(ShardError, match=r"report\.json: not prepare's report"):
        reported_shards(split)
