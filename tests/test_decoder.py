"""The isolated shard: what the child makes is what this process makes, and a file that
crashes or hangs the decoder costs that file alone."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from alexnet.decoder import AGAIN_NEXT_RUN, CallFailed, DecoderFailed, Isolated, isolated
from alexnet.params import PrepareParams
from alexnet.prepare import (
    Item,
    PrepareError,
    ShardPlan,
    make_shard,
    plan_shards,
    prepare_shard,
)
from alexnet.shards import iter_shard
from alexnet.sources import open_source
from tests.decoder_plugin import ABORT, CRASH, HANG, SIZE, kill_once
from tests.helpers import encode, jpeg, photo

TIMEOUT = 3.0
PARAMS = PrepareParams(plugins=("tests.decoder_plugin",), file_timeout=TIMEOUT)
FILES = {
    "plain.JPEG": jpeg(320, 240, seed=1),
    "grey.JPEG": encode(photo(300, 280, seed=2).convert("L")),
    "png.JPEG": encode(photo(260, 300, seed=3), "PNG"),
    "empty.JPEG": b"",
    "text.JPEG": b"hello, not an image",
    "truncated.JPEG": jpeg(400, 300, seed=4)[:900],
}
BAD = {"crash.JPEG": CRASH, "hang.JPEG": HANG, "abort.JPEG": ABORT}
REASONS = {
    "crash.JPEG": "decoder crashed (SIGSEGV)",
    "abort.JPEG": "decoder crashed (SIGABRT)",
    "hang.JPEG": f"timed out after {TIMEOUT:g} s{AGAIN_NEXT_RUN}",
}


def folder_plan(root: Path, files: dict[str, bytes]) -> ShardPlan:
    folder = root / "train" / "n00000000"
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (root / "val" / "n00000000").mkdir(parents=True)
    (root / "val" / "n00000000" / "v.JPEG").write_bytes(FILES["plain.JPEG"])
    return next(plan_shards(open_source(root), shard_size=100))


def made_here(plan: ShardPlan, out: Path, params: PrepareParams = PARAMS, drop=()) -> Path:
    """The shard this process makes of the plan, less the files named in `drop`."""
    items = [item for item in plan.items if Path(item.relpath).name not in drop]
    make_shard(ShardPlan(plan.split, plan.index, items), out, params)
    return out / plan.name


@pytest.fixture
def decoder():
    yield isolated(TIMEOUT)
    isolated(TIMEOUT).close()


def test_the_child_makes_the_shard_this_process_makes(tmp_path, decoder):
    root = tmp_path / "raw"
    folder_plan(root, FILES)
    folder = root / "train" / "n00000000"
    os.mkfifo(folder / "pipe.JPEG")  # never opened: it would block
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.JPEG"), "wb") as stream:
        stream.write(jpeg(300, 280, seed=7))  # a name that is not UTF-8 crosses to the child
    plan = next(plan_shards(open_source(root), shard_size=100))
    for options in ({}, {"size": 64, "quality": 50, "resample": "bicubic"}):
        params = PARAMS.model_copy(update=options)
        report = prepare_shard(plan, tmp_path / "there", params)
        assert report == make_shard(plan, tmp_path / "here", params)
        there = (tmp_path / "there" / plan.name).read_bytes()
        assert there == (tmp_path / "here" / plan.name).read_bytes(), options
        assert report.kept == 4 and len(report.skipped) == 4
    assert "n00000000/caf_xe9" in [r.key for r in iter_shard(tmp_path / "there" / plan.name)]


def test_crashes_and_hangs_cost_only_their_files(tmp_path, decoder):
    # The bad files among good ones, each of the three in one shard.
    files = {**FILES, **BAD, "zlast.JPEG": jpeg(280, 300, seed=5)}
    plan = folder_plan(tmp_path / "raw", files)
    first = decoder._running().pid
    report = prepare_shard(plan, tmp_path / "out", PARAMS)  # the hang: "timed out" below
    reasons = {Path(s["path"]).name: s["reason"] for s in report.skipped}
    assert {name: reasons[name] for name in BAD} == REASONS
    assert decoder._child.pid != first
    # byte-identical, member by member, to the shard of the folder without them
    expected = made_here(plan, tmp_path / "here", drop=BAD)
    assert list(iter_shard(tmp_path / "out" / plan.name)) == list(iter_shard(expected))
    # (A second run reuses a shard that skipped a crash, not one that skipped a hang:
    # test_a_shard_that_skipped_a_file_for_the_machines_load_is_made_again.)


def test_a_child_killed_between_shards_is_replaced_without_blaming_the_next(tmp_path, decoder):
    plan = folder_plan(tmp_path / "raw", {"plain.JPEG": FILES["plain.JPEG"]})
    prepare_shard(plan, tmp_path / "a", PARAMS)
    decoder._child.kill()
    decoder._child.wait()
    assert prepare_shard(plan, tmp_path / "b", PARAMS).kept == 1


def test_a_child_a_kill_cannot_end_is_left_behind_not_waited_for(tmp_path, decoder, monkeypatch):
    # A read on a hung NFS mount holds a process in the kernel, where SIGKILL waits too;
    # here the kill is not sent at all, which the parent cannot tell apart.
    from alexnet import decoder as module

    monkeypatch.setattr(module, "KILL_WAIT", 0.5)
    plan = folder_plan(tmp_path / "raw", {"plain.JPEG": FILES["plain.JPEG"]})
    prepare_shard(plan, tmp_path / "a", PARAMS)
    stuck = decoder._child
    monkeypatch.setattr(stuck, "kill", lambda: None)
    started = time.monotonic()
    with pytest.warns(UserWarning, match=rf"process {stuck.pid} did not end when killed"):
        decoder.close()
    assert time.monotonic() - started < 5
    assert prepare_shard(plan, tmp_path / "b", PARAMS).kept == 1  # in a new child
    assert decoder._child.pid != stuck.pid
    stuck.wait(timeout=30)  # its input closed, the idle child ends by itself


def test_a_step_in_skip_is_not_taken_and_its_file_gets_the_reason(tmp_path, monkeypatch):
    from alexnet import prepare

    plan = folder_plan(tmp_path / "raw", {"a.JPEG": FILES["plain.JPEG"], "b.JPEG": b"x"})
    opened = []
    real_open = open
    monkeypatch.setattr(prepare, "open", lambda p, *a: opened.append(p) or real_open(p, *a), False)
    steps = []
    # step 0: reading a.JPEG; step 2 + 1: preparing b.JPEG
    skip = {0: "timed out after 9 s", 3: "decoder crashed (SIGBUS)"}
    report = make_shard(plan, tmp_path / "out", PARAMS, skip, steps.append)
    assert report.skipped == [
        {"path": "train/n00000000/a.JPEG", "reason": "timed out after 9 s"},
        {"path": "train/n00000000/b.JPEG", "reason": "decoder crashed (SIGBUS)"},
    ]
    assert [Path(p).name for p in opened] == ["b.JPEG"]
    assert steps == [-1, 0, 1, -1, 2, 3, -1]  # -1: the stored shard's description read


@pytest.mark.parametrize(
    ("reason", "reused"),
    [("decoder crashed (SIGSEGV)", True), (f"timed out after 9 s{AGAIN_NEXT_RUN}", False)],
    ids=["the file's", "the load's"],
)
def test_a_shard_that_skipped_a_file_for_the_machines_load_is_made_again(tmp_path, reason, reused):
    # A file timed out (or was SIGKILLed) twice on a busy machine: the shard was reused
    # by every later run, the image lost for good where an idle machine keeps it.
    plan = folder_plan(
        tmp_path / "raw", {"a.JPEG": FILES["plain.JPEG"], "b.JPEG": FILES["grey.JPEG"]}
    )
    first = make_shard(plan, tmp_path / "out", PARAMS, {3: reason}, lambda step: None)
    assert first.skipped == [{"path": "train/n00000000/b.JPEG", "reason": reason}]
    again = make_shard(plan, tmp_path / "out", PARAMS, {}, lambda step: None)
    assert again.reused == reused and again.kept == (1 if reused else 2)


def test_a_failure_outside_any_file_is_the_calls_error(decoder, monkeypatch):
    from alexnet import decoder as module

    line = r"^the image decoder died between files \(decoder crashed \(SIGSEGV\)\)$"
    with pytest.raises(DecoderFailed, match=line):
        decoder.call("tests.decoder_plugin:crash_outside_files", {})
    with pytest.raises(CallFailed, match=r"^No space left on device$"):
        decoder.call("tests.decoder_plugin:fail", {})
    # work on no file (the shard's write) has a longer limit than a file's, not none
    monkeypatch.setattr(module, "NO_FILE_TIMES", 2)
    assert decoder.call("tests.decoder_plugin:slow_outside_files", 1.5 * TIMEOUT) == "written"
    with pytest.raises(DecoderFailed, match=rf"between files \(timed out after {2 * TIMEOUT:g} s"):
        decoder.call("tests.decoder_plugin:slow_outside_files", 3 * TIMEOUT)


def test_a_death_between_files_names_the_shard(tmp_path, decoder, monkeypatch):
    plan = folder_plan(tmp_path / "raw", {"plain.JPEG": FILES["plain.JPEG"]})

    def died(target, request):
        raise DecoderFailed("the image decoder died between files (decoder crashed (SIGBUS))")

    monkeypatch.setattr(decoder, "call", died)
    with pytest.raises(DecoderFailed) as caught:
        prepare_shard(plan, tmp_path / "out", PARAMS)
    shard = tmp_path / "out" / plan.name
    assert str(caught.value) == f"{shard}: the image decoder died between files (decoder " + (
        "crashed (SIGBUS))"
    )


def test_a_file_killed_once_is_tried_again_and_kept(tmp_path, decoder):
    # SIGKILL (the OOM killer's, while other work held the memory) and timeouts may be the
    # machine's, not the file's: such a file is tried once more before it is skipped.
    pixels = photo(*SIZE, seed=8).tobytes()
    files = {
        "plain.JPEG": FILES["plain.JPEG"],
        "once.JPEG": kill_once(str(tmp_path / "killed"), pixels),
        "hang.JPEG": HANG,  # twice: skipped
    }
    plan = folder_plan(tmp_path / "raw", files)
    report = prepare_shard(plan, tmp_path / "out", PARAMS)
    assert (tmp_path / "killed").exists()  # it was killed once
    reasons = {Path(s["path"]).name: s["reason"] for s in report.skipped}
    assert reasons == {"hang.JPEG": REASONS["hang.JPEG"]} and report.kept == 2


def test_a_plugin_that_cannot_be_imported_stops_the_stage_in_one_line(tmp_path):
    plan = ShardPlan("train", 0, [Item(str(tmp_path / "a.JPEG"), "a.JPEG", 0, "a")])
    params = PrepareParams(plugins=("no_such_plugin",))
    with pytest.raises(PrepareError, match=r"^params prepare.plugins: cannot import it \(No"):
        prepare_shard(plan, tmp_path / "out", params)


def test_each_thread_has_its_own_child():
    mine = isolated(5.0)
    assert isolated(5.0) is mine
    others = []
    thread = threading.Thread(target=lambda: others.append(isolated(5.0)))
    thread.start()
    thread.join()
    assert others[0] is not mine and isinstance(mine, Isolated)
