"""Prepare logic without Prefect: planning, shard reuse by fingerprint, the report."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from alexnet.atomic import write_json
from alexnet.imageops import prepare_image
from alexnet.params import PrepareParams
from alexnet.prepare import (
    PrepareError,
    ShardReport,
    Summary,
    _digest,
    check_skipped,
    fingerprint,
    make_shard,
    max_file_bytes,
    plan_shards,
    prepare_shard,
)
from alexnet.shards import FILES_MEMO, index_shard, iter_shard
from alexnet.sources import open_source
from alexnet.stats import shard_moments
from tests.helpers import REPO, encode, jpeg, make_imagefolder, photo


@pytest.fixture
def source(tmp_path):
    root = make_imagefolder(tmp_path / "raw", classes=2, train=3, val=1)
    (root / "train" / "n00000001" / "broken.JPEG").write_bytes(b"")
    return open_source(root)


def summarize(reports) -> dict:
    """The stage report of shard reports given in shard order, as the flow sums them."""
    summary = Summary()
    for report in reports:
        summary.add(report)
    return summary.report()


def test_plan_keeps_sorted_order_and_fixed_shard_contents(source):
    plans = list(plan_shards(source, shard_size=4))
    assert [(p.split, p.index, len(p.items)) for p in plans] == [
        ("train", 0, 4),
        ("train", 1, 3),
        ("val", 0, 2),
    ]
    relpaths = [i.relpath for p in plans if p.split == "train" for i in p.items]
    assert relpaths == sorted(relpaths)


def test_shard_contents_labels_and_skips(source, tmp_path):
    plan = next(plan_shards(source, shard_size=4))  # n00000000 x3, then n00000001/broken.JPEG
    report = prepare_shard(plan, tmp_path / "out", PrepareParams())
    assert report.skipped == [{"path": "train/n00000001/broken.JPEG", "reason": "empty file"}]
    records = list(iter_shard(tmp_path / "out" / "train" / "shard-00000.tar"))
    assert [r.label for r in records] == [0, 0, 0] and report.kept == 3
    assert [r.key for r in records] == [i.key for i in plan.items if "broken" not in i.key]


def test_current_shard_is_reused_and_a_changed_input_rebuilds_it(source, tmp_path):
    plan = next(plan_shards(source, shard_size=4))
    out = tmp_path / "out"
    first = prepare_shard(plan, out, PrepareParams())
    shard = out / "train" / "shard-00000.tar"
    made = shard.stat().st_mtime_ns
    again = prepare_shard(plan, out, PrepareParams())
    assert again.reused and not first.reused and shard.stat().st_mtime_ns == made
    assert again.kept == first.kept

    # Other options or other content: the shard is rebuilt, not wrongly reused.
    assert not prepare_shard(plan, out, PrepareParams(quality=70)).reused
    changed = plan.items[0].path
    with open(changed, "wb") as stream:
        stream.write(jpeg(320, 300, seed=99))
    assert not prepare_shard(plan, out, PrepareParams(quality=70)).reused


def test_a_shard_of_unchanged_files_is_reused_without_reading_them(source, tmp_path, monkeypatch):
    # A re-run read and hashed every file (ImageNet: ~150 GB) to find the shards it could
    # keep; the files' inode, size and mtime, recorded beside the shard, now answer.
    from alexnet import prepare

    plan = next(plan_shards(source, shard_size=4))  # with an empty file, skipped
    out, params = tmp_path / "out", PrepareParams()
    memo = out / plan.name.replace(".tar", FILES_MEMO)
    # A file changed within the last seconds is not vouched for by its times (a second
    # change in the same tick of a coarse clock would not show): no memo yet.
    os.utime(plan.items[0].path)
    first = make_shard(plan, out, params)
    assert not memo.exists()
    monkeypatch.setattr(prepare, "RECENT_NS", 0)  # from here, any change is vouched for
    assert make_shard(plan, out, params).reused and memo.exists()
    real, reads = prepare._read, []

    def counted(item, limit):
        reads.append(item.relpath)
        return real(item, limit)

    monkeypatch.setattr(prepare, "_read", counted)
    again = make_shard(plan, out, params)
    assert again.reused and reads == [] and asdict(again) == {**asdict(first), "reused": True}
    # The memo lies beside the shard, not in it: a copy of the same images elsewhere
    # (other inodes and mtimes) makes the same shard bytes, and DVC ignores the memo.
    assert b"digests" not in (out / plan.name).read_bytes()
    for name in (memo.name, f".{memo.name}.tmp-node1-812"):  # and a killed write's
        ignored = subprocess.run(
            [sys.executable, "-m", "dvc", "check-ignore", f"data/prepared/train/{name}"],
            cwd=REPO,
            capture_output=True,
        )
        assert ignored.returncode == 0, ignored
    before = memo.read_bytes()
    assert not make_shard(plan, out, PrepareParams(quality=70)).reused  # other options
    assert len(reads) == len(plan.items)
    # A memo of another version of the shard (a run killed between the two writes): read.
    reads.clear()
    memo.write_bytes(before)
    assert make_shard(plan, out, PrepareParams(quality=70)).reused
    assert len(reads) == len(plan.items)
    # A chmod (the user may no longer read the file) moves its ctime: every file read.
    reads.clear()
    assert make_shard(plan, out, PrepareParams(quality=70)).reused and reads == []
    os.chmod(plan.items[1].path, 0o644)  # (the same mode: the ctime moves all the same)
    assert make_shard(plan, out, PrepareParams(quality=70)).reused
    assert len(reads) == len(plan.items)
    # Touched (a new mtime, the same bytes): every file read, and the shard still kept;
    # once: its memo has the new mtime
    reads.clear()
    touched = Path(plan.items[0].path)
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    assert make_shard(plan, out, PrepareParams(quality=70)).reused
    assert len(reads) == len(plan.items)
    reads.clear()
    assert make_shard(plan, out, PrepareParams(quality=70)).reused and reads == []
    # Other bytes of the same size (a new mtime): made again with them.
    data = bytearray(touched.read_bytes())
    data[-3] ^= 0xFF  # inside the entropy-coded data, before the end marker
    touched.write_bytes(bytes(data))
    assert not make_shard(plan, out, PrepareParams(quality=70)).reused


def test_a_shard_whose_every_file_is_skipped_is_read_and_reused(source, tmp_path):
    # shard_size 1 puts the empty file in a shard alone (as 250 bad files in a row do)
    plan = [p for p in plan_shards(source, shard_size=1) if "broken" in p.items[0].key][0]
    out = tmp_path / "out"
    first = prepare_shard(plan, out, PrepareParams())
    assert (first.kept, len(first.skipped)) == (0, 1)
    shard = out / plan.split / f"shard-{plan.index:05d}.tar"
    assert index_shard(shard, classes=2) == [] and list(iter_shard(shard)) == []
    moments = shard_moments(shard, PrepareParams().size, classes=2)
    assert moments.images == 0
    assert prepare_shard(plan, out, PrepareParams()).reused


def test_a_file_changed_between_its_hash_and_its_preparing_is_skipped(
    source, tmp_path, monkeypatch
):
    # Past HOLD_BYTES each file is read and hashed, then read again to be prepared (a
    # shard is never held whole): bytes other than those fingerprinted are not prepared.
    from alexnet import prepare

    monkeypatch.setattr(prepare, "HOLD_BYTES", 0)
    plan = next(plan_shards(source, shard_size=4))
    changed = plan.items[1]

    def at(step: int) -> None:
        if step == len(plan.items):  # all hashed, preparing the first
            Path(changed.path).write_bytes(jpeg(320, 300, seed=99))

    report = make_shard(plan, tmp_path / "out", PrepareParams(), at=at)
    skipped = {entry["path"]: entry["reason"] for entry in report.skipped}
    assert skipped[changed.relpath] == "changed while being read"
    assert changed.key not in [r.key for r in iter_shard(tmp_path / "out" / plan.name)]
    # the next run sees the new bytes: the shard is made again, with the file
    again = make_shard(plan, tmp_path / "out", PrepareParams())
    assert not again.reused and changed.relpath not in {e["path"] for e in again.skipped}


def test_reading_a_shard_holds_at_most_hold_bytes_and_a_file(source, tmp_path, monkeypatch):
    # 250 camera photos of 8 MB were held together (2 GB a worker); each file here is
    # 4 MB (a JPEG, then padding, which decoders ignore), and 5 MB may be held: one file
    import tracemalloc

    from alexnet import prepare

    monkeypatch.setattr(prepare, "HOLD_BYTES", 5 * 2**20)
    plan = next(plan_shards(source, shard_size=4))
    for item in plan.items:
        data = Path(item.path).read_bytes()
        Path(item.path).write_bytes(data + bytes(4 * 2**20 - len(data)))
    tracemalloc.start()
    try:
        make_shard(plan, tmp_path / "out", PrepareParams())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 * 2**20 + 2.2 * 4 * 2**20, peak  # all four: > 16 MB


def test_summary_counts_and_threshold(source, tmp_path):
    reports = [prepare_shard(p, tmp_path, PrepareParams()) for p in plan_shards(source, 4)]
    summary = summarize(reports)
    assert (summary["files"], summary["kept"], summary["skipped"]) == (9, 8, 1)
    assert summary["splits"]["val"] == {"files": 2, "kept": 2, "converted": 0, "skipped": 0}
    check_skipped(summary, 0.2, "report.json")  # 1/9 = 11% is allowed at 20%
    with pytest.raises(
        PrepareError, match=r"1 of 9 files skipped \(11.1% > prepare.max_skipped 10.0%\)"
    ):
        check_skipped(summary, 0.1, "report.json")


def synthetic_report(split: str, index: int, converted: int, skipped: int) -> ShardReport:
    return ShardReport(
        split,
        index,
        converted + skipped,
        kept=converted,
        converted=[
            {"from": "CMYK", "path": f"{split}/n{index}/c{i}.JPEG"} for i in range(converted)
        ],
        skipped=[
            {"path": f"{split}/n{index}/s{i}.JPEG", "reason": "empty file"} for i in range(skipped)
        ],
    )


@pytest.mark.parametrize("entries", [(0, 0), (2, 0), (0, 1), (3, 2)])
def test_the_streamed_report_is_the_bytes_write_json_makes(tmp_path, entries):
    summary = Summary()
    for index in range(2):
        summary.add(synthetic_report("train", index, *entries))
    summary.add(synthetic_report("val", 0, 1, 1))
    summary.write(tmp_path / "streamed.json")
    write_json(tmp_path / "whole.json", summary.report())
    assert (tmp_path / "streamed.json").read_bytes() == (tmp_path / "whole.json").read_bytes()
    # keys in one order whatever the order the shard's stored report had them in
    assert list(summary.report()["converted_files"][0]) == ["path", "from"]


def test_the_reports_lists_are_not_held_in_memory(tmp_path):
    # ImageNet with prepare.icc_to_srgb: ~1.28M converted files, ~280 bytes each held
    import tracemalloc

    summary = Summary()
    tracemalloc.start()
    try:
        for index in range(20):
            summary.add(synthetic_report("train", index, 1000, 10))
        summary.write(tmp_path / "report.json")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary.counts()["converted"] == 20_000
    # the entries alone: ~5.6 MB; streamed, the peak was ~0.5 MB (1 MB for 100,000)
    assert peak < 2 * 2**20, peak


# A value other than the default for each image key (a new key must be added here).
OTHER_VALUES = {
    "size": 200,
    "quality": 70,
    "resample": "bicubic",
    "max_pixels": 10_000_000,
    "exif_orientation": True,
    "icc_to_srgb": True,
    "frames": "skip",
    "plugins": ["tests.decoder_plugin"],
}


def test_image_keys_are_the_options_of_prepare_image():
    parameters = list(inspect.signature(prepare_image).parameters.values())
    assert [p.name for p in parameters[:2]] == ["data", "extension"]
    options = {p.name: p.default for p in parameters[2:]}
    assert tuple(options) == PrepareParams.IMAGE_KEYS
    # and the function's defaults are the params' defaults
    assert PrepareParams().model_dump(include=set(PrepareParams.IMAGE_KEYS)) == options
    params = PrepareParams(**OTHER_VALUES)
    assert params.image_options() == OTHER_VALUES


def test_a_shard_is_prepared_with_every_image_option(source, tmp_path, monkeypatch):
    from alexnet import prepare

    calls = []

    def spy(data, extension, **options):
        calls.append(options)
        return prepare_image(data, extension, **options)

    monkeypatch.setattr(prepare, "prepare_image", spy)
    params = PrepareParams(**OTHER_VALUES)
    plan = next(plan_shards(source, shard_size=4))
    make_shard(plan, tmp_path / "out", params)  # (the child runs it: tests/test_decoder.py)
    assert len(calls) == len(plan.items)
    assert all(options == OTHER_VALUES for options in calls)


def test_fingerprint_follows_every_image_key_and_not_the_sharding(source):
    plan = next(plan_shards(source, shard_size=4))
    contents = [_digest(Path(item.path).read_bytes()) for item in plan.items]
    base = fingerprint(plan.items, contents, PrepareParams())
    assert set(OTHER_VALUES) == set(PrepareParams.IMAGE_KEYS)
    for key, value in OTHER_VALUES.items():
        changed = fingerprint(plan.items, contents, PrepareParams(**{key: value}))
        assert changed != base, key
    # What decides what is kept or how files are grouped, not the bytes of an image:
    for other in ({"shard_size": 7}, {"max_skipped": 0.5}, {"raw": "/somewhere/else"}):
        assert fingerprint(plan.items, contents, PrepareParams(**other)) == base, other
    # the content and the labels count
    assert fingerprint(plan.items, [_digest(b"x"), *contents[1:]], PrepareParams()) != base


def test_fingerprint_of_an_unreadable_file_does_not_follow_where_the_data_is(source):
    plan = next(plan_shards(source, shard_size=4))
    contents = [_digest(Path(item.path).read_bytes()) for item in plan.items]

    def unreadable(error: OSError) -> str:
        return fingerprint(plan.items, [error, *contents[1:]], PrepareParams())

    here = unreadable(PermissionError(13, "Permission denied", plan.items[0].path))
    moved = unreadable(PermissionError(13, "Permission denied", "/mnt/moved/x.JPEG"))
    assert here == moved  # the same shard, made from a folder moved or mounted elsewhere
    assert unreadable(OSError(5, "Input/output error", plan.items[0].path)) != here


def test_fingerprint_follows_the_imaging_code(source, tmp_path, monkeypatch):
    # A shard made by other image code is made again, not reused by a re-run.
    from alexnet import prepare

    plan = next(plan_shards(source, shard_size=4))
    contents = [_digest(Path(item.path).read_bytes()) for item in plan.items]
    base = fingerprint(plan.items, contents, PrepareParams())
    edited = tmp_path / "imageops.py"
    edited.write_bytes(prepare.IMAGE_CODE.read_bytes() + b"\n# a change\n")
    monkeypatch.setattr(prepare, "IMAGE_CODE", edited)
    prepare.image_code.cache_clear()
    try:
        assert fingerprint(plan.items, contents, PrepareParams()) != base
    finally:
        prepare.image_code.cache_clear()


@pytest.mark.parametrize(
    "build", [{"PIL jpg": "no"}, {"libjpeg-turbo": "2.0.0"}], ids=["no jpeg", "libjpeg"]
)
def test_fingerprint_follows_the_pil_build_not_only_its_version(source, monkeypatch, build):
    # pillow-simd of one version built without a codec skips files another build
    # decodes, and another libjpeg encodes other bytes: its shards are made again.
    from alexnet import pilcodecs, prepare

    plan = next(plan_shards(source, shard_size=4))
    contents = [_digest(Path(item.path).read_bytes()) for item in plan.items]
    base = fingerprint(plan.items, contents, PrepareParams())
    live = pilcodecs.pil_build()
    assert set(build) <= set(live) and all(live[k] != v for k, v in build.items())
    monkeypatch.setattr(prepare, "pil_build", lambda: {**live, **build})
    assert fingerprint(plan.items, contents, PrepareParams()) != base


def test_the_report_of_a_reused_shard_is_the_bytes_of_a_made_one(tmp_path):
    # report.json is a DVC output: a re-run that reuses every shard must not change it.
    import json

    from alexnet.prepare import plan_shards, prepare_shard
    from alexnet.sources import open_source

    raw = make_imagefolder(tmp_path / "raw", classes=2, train=2, val=1)
    (raw / "train" / "n00000000" / "grey.JPEG").write_bytes(encode(photo(300, 260).convert("L")))
    (raw / "train" / "n00000001" / "empty.JPEG").write_bytes(b"")
    plans = list(plan_shards(open_source(raw), 4))
    params = PrepareParams()
    made = [prepare_shard(plan, tmp_path / "out", params) for plan in plans]
    reused = [prepare_shard(plan, tmp_path / "out", params) for plan in plans]
    assert all(r.reused for r in reused) and not any(r.reused for r in made)
    report = summarize(made)
    assert report["converted_files"] and report["skipped_files"]
    assert json.dumps(summarize(reused)) == json.dumps(report)


# Issue 14, the file system: each oddity is reported, none stops the shard.


def test_file_system_oddities_are_reported_and_the_rest_prepared(tmp_path, monkeypatch):
    import json
    import os

    root = make_imagefolder(tmp_path / "raw", classes=2, train=2, val=1)
    folder = root / "train" / "n00000000"
    (folder / "gone.JPEG").symlink_to(tmp_path / "nowhere.JPEG")
    os.mkfifo(folder / "pipe.JPEG")  # opening it would block forever
    (folder / "dir.JPEG").mkdir()
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.JPEG"), "wb") as stream:
        stream.write(jpeg(300, 280, seed=7))
    (folder / "vanishes.JPEG").write_bytes(jpeg(300, 280, seed=8))
    (folder / "changes.JPEG").write_bytes(jpeg(300, 280, seed=9))
    (folder / "denied.JPEG").write_bytes(jpeg(300, 280, seed=10))
    plans = list(plan_shards(open_source(root), shard_size=100))
    (folder / "vanishes.JPEG").unlink()  # between the scan and the read

    real_open, real_fstat = open, os.fstat
    growing = {}

    def fake_open(path, *args, **kwargs):  # as root, permission bits do not stop reads
        if str(path).endswith("denied.JPEG"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    def fake_fstat(fd):  # another process appends while the file is read
        result = real_fstat(fd)
        if os.readlink(f"/proc/self/fd/{fd}").endswith("changes.JPEG"):
            growing[fd] = growing.get(fd, 0) + 1
            times = {f"st_{t}time_ns": getattr(result, f"st_{t}time_ns") for t in "amc"}
            return os.stat_result((*result[:6], result.st_size + growing[fd], *result[7:]), times)
        return result

    from alexnet import prepare

    monkeypatch.setattr(prepare, "open", fake_open, raising=False)
    monkeypatch.setattr(prepare.os, "fstat", fake_fstat)
    # in this process, where the fakes apply (the child reads the same way)
    reports = [make_shard(plan, tmp_path / "out", PrepareParams()) for plan in plans]
    summary = summarize(reports)
    reasons = {s["path"].rsplit("/", 1)[1]: s["reason"] for s in summary["skipped_files"]}
    assert reasons == {
        "changes.JPEG": "changed while being read",
        "denied.JPEG": "unreadable: Permission denied",
        "dir.JPEG": "a directory, not a file",
        "gone.JPEG": f"broken symlink -> {tmp_path / 'nowhere.JPEG'}",
        "pipe.JPEG": "not a regular file (fifo)",
        "vanishes.JPEG": "unreadable: No such file or directory",
    }
    kept = [r.key for p in plans for r in iter_shard(tmp_path / "out" / p.name)]
    assert "n00000000/caf_xe9" in kept  # a name that is not UTF-8 is still an image
    assert summary["files"] == summary["kept"] + summary["skipped"] == 6 + 7
    json.dumps(summary, ensure_ascii=False).encode()  # the report is valid UTF-8


def test_a_file_larger_than_any_image_is_skipped_unread(tmp_path):
    # A 1 TB file (a disk image, a video named .JPEG) was read whole: MemoryError, and
    # the stage stopped with a traceback naming no file.
    root = make_imagefolder(tmp_path / "raw", classes=1, train=2, val=1)
    with open(root / "train" / "n00000000" / "video.JPEG", "wb") as stream:
        stream.truncate(2**40)  # sparse: no disk used
    (plan,) = [p for p in plan_shards(open_source(root), shard_size=100) if p.split == "train"]
    report = prepare_shard(plan, tmp_path / "out", PrepareParams())
    limit = max_file_bytes(PrepareParams().max_pixels)
    assert report.skipped == [
        {
            "path": "train/n00000000/video.JPEG",
            "reason": f"too large: {2**40:,} bytes, more than any image of "
            f"prepare.max_pixels can be ({limit:,})",
        }
    ]
    assert report.kept == 2


def test_a_file_the_memory_cannot_hold_is_skipped_not_fatal(tmp_path, monkeypatch):
    # Under a memory limit (ulimit -v, a batch system's), a file within max_file_bytes
    # can still be more than the process may hold: its read raised MemoryError, which
    # failed the shard, and the stage.
    from alexnet import prepare

    root = make_imagefolder(tmp_path / "raw", classes=1, train=2, val=1)
    (root / "train" / "n00000000" / "huge.JPEG").write_bytes(jpeg(300, 280, seed=3))
    (plan,) = [p for p in plan_shards(open_source(root), shard_size=100) if p.split == "train"]
    real_open = open

    class Hungry:  # the file's read runs out of memory
        def __init__(self, path, mode):
            self.stream = real_open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

        def fileno(self):
            return self.stream.fileno()

        def read(self):
            if self.stream.name.endswith("huge.JPEG"):
                raise MemoryError
            return self.stream.read()

    monkeypatch.setattr(prepare, "open", Hungry, raising=False)
    report = make_shard(plan, tmp_path / "out", PrepareParams())  # in this process
    size = (root / "train" / "n00000000" / "huge.JPEG").stat().st_size
    assert report.skipped == [
        {
            "path": "train/n00000000/huge.JPEG",
            "reason": f"out of memory while reading it ({size:,} bytes)",
        }
    ]
    assert report.kept == 2


def test_a_class_whose_every_file_is_skipped_stops_the_stage(tmp_path):
    from alexnet.prepare import check_classes

    def usable(root):
        summary = Summary()
        for plan in plan_shards(open_source(root), shard_size=2):
            summary.add(prepare_shard(plan, tmp_path / "out", PrepareParams()), plan)
        return summary.usable

    root = make_imagefolder(tmp_path / "raw", classes=3, train=2, val=1)
    for path in (root / "train" / "n00000001").iterdir():
        path.write_bytes(b"not an image")
    (root / "train" / "n00000002" / "bad.JPEG").write_bytes(b"")
    counts = usable(root)
    assert counts == {0: 2, 2: 2}  # n00000002's third file skipped, n00000001's both
    classes = open_source(root).classes
    with pytest.raises(PrepareError, match=r"raw/train/n00000001: no usable image in this class"):
        check_classes(counts, classes, root)
    (root / "train" / "n00000001" / "good.JPEG").write_bytes(jpeg(300, 280))
    check_classes(usable(root), classes, root)
