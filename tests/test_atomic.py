"""Outputs appear whole or not at all, and never in place of the user's files
(alexnet/atomic.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from alexnet.atomic import (
    OWNED,
    OutputError,
    atomic_output,
    claim_folder,
    file_target,
    output_folder,
    owned_text,
    remove_leftovers,
    remove_swept,
    write_bytes,
    write_json,
)
from tests.helpers import DEAD_PID


def folder(path, files: dict[str, bytes]) -> None:
    path.mkdir(exist_ok=True)
    for name, data in files.items():
        (path / name).write_bytes(data)


def contents(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def ours(files: dict[str, bytes], owner: str = "synth") -> dict[str, bytes]:
    """The files of a folder a stage of alexnet wrote: with its mark."""
    return {**files, OWNED: owned_text(owner)}


def test_a_folder_is_replaced_whole_and_nothing_is_left_beside_it(tmp_path):
    target = tmp_path / "raw"
    folder(target, ours({"a": b"old a", "b": b"old b"}))
    with atomic_output(target, folder="synth") as temporary:
        folder(temporary, {"a": b"new a"})
    assert contents(target) == ours({"a": b"new a"})
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


@pytest.mark.parametrize("old", [{"thesis.txt": b"mine"}, {".hidden": b"mine"}])
def test_a_folder_alexnet_did_not_write_is_never_replaced(tmp_path, old):
    # `alexnet synth ~/photos`, or pack's `out` pointing at a raw dataset: refused before
    # the body runs (no work done), the folder as it was, nothing left beside it.
    target = tmp_path / "raw"
    folder(target, old)
    ran = []
    with pytest.raises(
        OutputError, match=f"raw: holds files and not the {OWNED} mark of the output folders"
    ):
        with atomic_output(target, folder="synth"):
            ran.append(True)
    assert not ran and contents(target) == old
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]
    with pytest.raises(OutputError, match="not the"):
        claim_folder(target, "prepare")  # nor filled over time (prepare's)
    assert contents(target) == old


def test_an_empty_folder_is_replaced_and_a_file_output_gets_no_mark(tmp_path):
    (tmp_path / "raw").mkdir()
    with atomic_output(tmp_path / "raw", folder="synth") as temporary:
        folder(temporary, {"a": b"a"})
    assert contents(tmp_path / "raw") == ours({"a": b"a"})
    with atomic_output(tmp_path / "raw" / "a") as temporary:
        temporary.write_bytes(b"new a")
    assert contents(tmp_path / "raw") == ours({"a": b"new a"})


@pytest.mark.parametrize("relative", [False, True])
def test_a_folder_output_at_a_link_is_written_where_the_link_points(tmp_path, relative):
    # data/raw -> /bigdisk/raw: the data stays on the big disk, and the link stays.
    (tmp_path / "big").mkdir()
    (tmp_path / "raw").symlink_to("big/raw" if relative else tmp_path / "big" / "raw")
    for data in (b"first", b"second"):  # the link's target absent, then a marked folder
        with atomic_output(tmp_path / "raw", folder="synth") as temporary:
            folder(temporary, {"a": data})
        assert (tmp_path / "raw").is_symlink()
        assert contents(tmp_path / "big" / "raw") == ours({"a": data})
        assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "raw"]
        assert [p.name for p in (tmp_path / "big").iterdir()] == ["raw"]


def test_only_the_last_part_of_an_output_folders_path_is_followed(tmp_path):
    # The path's prefix stays as given: a Dask worker on another machine reaches the
    # same file system through its own links, not necessarily through this one's targets.
    (tmp_path / "real").mkdir()
    (tmp_path / "via").symlink_to(tmp_path / "real")
    with atomic_output(tmp_path / "via" / "raw", folder="synth") as temporary:
        folder(temporary, {"a": b"a"})
        assert temporary.parent == tmp_path / "via"
    assert contents(tmp_path / "real" / "raw") == ours({"a": b"a"})


def test_a_mount_point_is_refused_before_any_work(tmp_path, monkeypatch):
    # A Docker volume as the output: renaming it fails (EBUSY), after all the work.
    (tmp_path / "volume").mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda path: str(path) == str(tmp_path / "volume"))
    with pytest.raises(OutputError, match="volume: a mount point, which cannot be replaced"):
        with atomic_output(tmp_path / "volume", folder="synth"):
            raise AssertionError("the work ran")
    assert claim_folder(tmp_path / "volume", "prepare") == tmp_path / "volume"  # filled


def test_a_write_error_without_a_file_names_the_output(tmp_path):
    # `write` and `fsync` report a full disk without a file name: the line must say where.
    with pytest.raises(OSError) as caught:
        with atomic_output(tmp_path / "out.json"):
            raise OSError(28, "No space left on device")
    assert caught.value.filename == str(tmp_path / "out.json")
    assert not list(tmp_path.iterdir())


def test_a_file_output_at_a_link_replaces_the_link_not_its_target(tmp_path):
    # DVC's symlink cache: models/alexnet.pt -> .dvc/cache/...; the cache must not change.
    (tmp_path / "cache").write_bytes(b"cached")
    (tmp_path / "model.pt").symlink_to(tmp_path / "cache")
    with atomic_output(tmp_path / "model.pt") as temporary:
        temporary.write_bytes(b"new")
    assert not (tmp_path / "model.pt").is_symlink()
    assert (tmp_path / "model.pt").read_bytes() == b"new"
    assert (tmp_path / "cache").read_bytes() == b"cached"


@pytest.mark.parametrize(
    ("where", "is_folder", "message"),
    [
        ("file", True, "file: a file, where this output is a folder; name a folder"),
        ("folder", False, "folder: a folder, where this output is a file; name the file"),
        ("file/x", False, "file/x: .*file is a file, not a folder"),
        ("file/x/y", True, "file/x/y: .*file is a file, not a folder"),
    ],
)
def test_the_wrong_kind_of_path_is_refused_before_any_work(tmp_path, where, is_folder, message):
    (tmp_path / "file").write_bytes(b"the user's")
    (tmp_path / "folder").mkdir()
    ran = []
    with pytest.raises(OutputError, match=message):
        with atomic_output(tmp_path / where, folder=is_folder):
            ran.append(True)
    assert not ran and (tmp_path / "file").read_bytes() == b"the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]


def test_a_failed_cleanup_does_not_hide_the_error(tmp_path, monkeypatch):
    # On a read-only or vanished disk the cleanup fails too: the user must see why the
    # write failed, not why the cleanup did.
    def unwritable(path, *args, **kwargs):
        raise OSError(30, "Read-only file system", str(path))

    with pytest.raises(ValueError, match="the real error"):
        with atomic_output(tmp_path / "out.json") as temporary:
            temporary.write_bytes(b"x")
            monkeypatch.setattr(os, "unlink", unwritable)
            raise ValueError("the real error")


def test_claiming_a_folder_marks_it_once(tmp_path):
    target = claim_folder(tmp_path / "prepared", "prepare")
    assert contents(target) == ours({}, "prepare")
    folder(target, {"train": b""})
    assert claim_folder(tmp_path / "prepared", "prepare") == target  # a resumed run
    assert contents(target) == ours({"train": b""}, "prepare")


@pytest.mark.parametrize(
    "mark",
    [
        b"alexnet-pipeline output: prepare\r\n",  # edited on Windows
        b"an output folder of alexnet-pipeline, which replaces or updates it when run\n",
        b"",  # `touch`
    ],
)
def test_a_mark_naming_no_other_stage_is_taken_and_rewritten(tmp_path, mark):
    # The second: the marks of this project's first day, which named no stage.
    folder(tmp_path / "prepared", {"train": b"shards", OWNED: mark})
    claim_folder(tmp_path / "prepared", "prepare")
    assert contents(tmp_path / "prepared") == ours({"train": b"shards"}, "prepare")


def test_a_folder_inside_another_output_is_named_as_such(tmp_path):
    # `alexnet pack data/prepared data/prepared`: its train/ holds prepare's shards; the
    # line must not suggest marking it (which would let pack replace them).
    target = claim_folder(tmp_path / "prepared", "prepare")
    folder(target / "train", {"shard-00000.tar": b"shards"})
    with pytest.raises(OutputError) as caught:
        with atomic_output(target / "train", folder="pack"):
            raise AssertionError("the work ran")
    assert str(caught.value) == (
        f"{target / 'train'}: inside {target}, an output of alexnet's prepare; name a "
        "folder outside it"
    )


def test_another_stages_output_is_refused_and_a_mark_made_by_hand_is_any_stages(tmp_path):
    # `alexnet synth data/prepared` would replace hours of ImageNet shards with the demo.
    target = claim_folder(tmp_path / "prepared", "prepare")
    folder(target, {"train": b"shards"})
    with pytest.raises(OutputError, match="prepared: the output of alexnet's prepare, not of"):
        with atomic_output(target, folder="synth"):
            raise AssertionError("the work ran")
    assert contents(target) == ours({"train": b"shards"}, "prepare")
    # `touch OUT/.alexnet-output` (an output from before the marks): taken, then marked
    (target / OWNED).write_bytes(b"")
    with atomic_output(target, folder="synth") as temporary:
        folder(temporary, {"a": b"a"})
    assert contents(target) == ours({"a": b"a"}, "synth")


def test_a_kill_while_the_old_folder_is_deleted_leaves_the_new_one_whole(tmp_path, monkeypatch):
    # The old version is renamed aside before it is deleted: a kill during the deletion
    # (simulated: rmtree removes one file, then the process "dies") cannot leave a
    # half-deleted folder at the target, which the next stage would read as data.
    target = tmp_path / "raw"
    folder(target, ours({"a": b"old a", "b": b"old b"}))

    def killed(path, *args, **kwargs):
        next(p for p in sorted(path.iterdir())).unlink()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), atomic_output(target, folder="synth") as temporary:
        folder(temporary, {"a": b"new a", "c": b"new c"})
        monkeypatch.setattr(shutil, "rmtree", killed)
    monkeypatch.undo()
    assert contents(target) == ours({"a": b"new a", "c": b"new c"})
    remove_leftovers(tmp_path, "raw")  # what the next run does first
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


def test_an_old_version_that_another_node_sweeps_meanwhile_is_still_removed(tmp_path, monkeypatch):
    # A folder swap's old version, renamed aside, is removed; another node's sweep may
    # remove its entries first (each unlink then finds none): gone, as it should be,
    # and no error. Any other error stops it.
    tree = tmp_path / "old"
    folder(tree, {"a": b"a", "b": b"b"})
    folder(tree / "sub", {"c": b"c"})
    unlink = os.unlink

    def swept_first(path, *args, **kwargs):
        unlink(path, *args, **kwargs)  # the other node's
        unlink(path, *args, **kwargs)  # ours: FileNotFoundError

    monkeypatch.setattr(os, "unlink", swept_first)
    remove_swept(tree)
    assert not tree.exists()

    def refused(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    folder(tree, {"a": b"a"})
    monkeypatch.setattr(os, "unlink", refused)
    with pytest.raises(PermissionError):
        remove_swept(tree)
    assert (tree / "a").exists()


def test_leftovers_of_one_target_only(tmp_path):
    dead = DEAD_PID
    for name in (f".raw.tmp-{dead}", f".raw.tmp-{dead}-old", f".prepared.tmp-{dead}", "raw"):
        folder(tmp_path / name, {"x": b"x"})
    remove_leftovers(tmp_path, "raw")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".prepared.tmp-{dead}", "raw"]
    remove_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


def test_leftovers_of_another_machine_stay(tmp_path):
    # On shared storage a PID alone is not a process: another node's writer, alive or
    # not, cannot be told from here (and containers on two nodes share PIDs).
    from alexnet.atomic import HOST, temporary_name

    assert temporary_name(tmp_path / "raw").name == f".raw.tmp-{HOST}-{os.getpid()}"
    mine = [f".raw.tmp-{HOST}-{DEAD_PID}", f".raw.tmp-{HOST}-{DEAD_PID}-old"]
    theirs = [f".raw.tmp-othernode-{DEAD_PID}", f".raw.tmp-othernode-{DEAD_PID}-old"]
    for name in mine + theirs:
        folder(tmp_path / name, {"x": b"x"})
    remove_leftovers(tmp_path, "raw")
    assert hidden(tmp_path) == sorted(theirs)


def test_another_machines_leftovers_go_once_untouched_for_a_day(tmp_path, monkeypatch):
    # A replaced container comes back under a new host name: what its run left (a raw
    # store's ~250 GB) stayed for good. A day passes on this clock; the status change
    # times (ctime: no `touch` sets them back) say what changed when.
    from types import SimpleNamespace

    from alexnet import atomic

    def a_day_after(moment: float) -> None:
        monkeypatch.setattr(atomic, "time", SimpleNamespace(time=lambda: moment + day))

    day = atomic.STALE_ELSEWHERE
    old_file, old_folder, aside, growing, synth = (
        f".{name}.tmp-othernode-{DEAD_PID}" for name in ("a.json", "raw", "kept", "lmdb", "s")
    )
    (tmp_path / old_file).write_bytes(b"{")
    folder(tmp_path / old_folder, {"x": b"x"})
    folder(tmp_path / f"{aside}{atomic.ASIDE}", {"x": b"whole"})  # a swap stopped there
    folder(tmp_path / growing, {"data.mdb": b"x"})
    (tmp_path / synth / "train" / "n01").mkdir(parents=True)
    folder(tmp_path / "live", {"x": b"x"})  # its old version, files of long ago
    for path in (tmp_path / "live" / "x", tmp_path / "live"):
        os.utime(path, (0, 0))
    then = max(os.lstat(path).st_ctime for path in tmp_path.rglob("*"))
    time.sleep(0.05)
    with open(tmp_path / growing / "data.mdb", "ab") as store:  # written in place
        store.write(b"y")
    (tmp_path / synth / "train" / "n01" / "b.jpg").write_bytes(b"x")  # a class folder
    swapping = f".live.tmp-othernode-{DEAD_PID}{atomic.ASIDE}"  # set aside this instant
    os.rename(tmp_path / "live", tmp_path / swapping)
    a_day_after(then + 0.01)  # the first ones a day old, the later changes not
    remove_leftovers(tmp_path)
    assert hidden(tmp_path) == sorted([growing, synth, swapping])
    assert (tmp_path / "kept" / "x").read_bytes() == b"whole"  # the only version: put back
    a_day_after(time.time())
    remove_leftovers(tmp_path)
    assert hidden(tmp_path) == [] and (tmp_path / "live" / "x").exists()


def test_a_folder_swap_stopped_between_its_renames_loses_no_version(tmp_path, monkeypatch):
    # Killed (or failing) between setting the old version aside and renaming the new one
    # into place: the next run removed both, and the target was gone.
    from alexnet import atomic

    folder(tmp_path / "raw", ours({"a": b"old a"}))
    real, calls = os.replace, []

    def second_fails(source, target):
        calls.append(source)
        if len(calls) == 2:
            raise OSError(16, "Device or resource busy")
        return real(source, target)

    monkeypatch.setattr(atomic.os, "replace", second_fails)
    with pytest.raises(OSError, match="busy"):
        with atomic_output(tmp_path / "raw", folder="synth") as temporary:
            folder(temporary, {"a": b"new a"})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]
    assert contents(tmp_path / "raw") == ours({"a": b"old a"})
    # a kill there: the set-aside version is put back, the other leftover removed
    os.rename(tmp_path / "raw", tmp_path / f".raw.tmp-{DEAD_PID}-old")
    folder(tmp_path / f".raw.tmp-{DEAD_PID}", {"a": b"new a"})
    remove_leftovers(tmp_path, "raw")
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]
    assert contents(tmp_path / "raw") == ours({"a": b"old a"})


def hidden(path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith("."))


# Names like a target's temporaries, of other targets (each written by the tests below
# with a dead PID): `.NAME.tmp-PID` is target NAME's leftover, and no other's.
def others(target: str) -> list[str]:
    return [
        f".other.json.tmp-{DEAD_PID}",  # another target's
        f".{target}.bak.tmp-{DEAD_PID}",  # `TARGET.bak`'s
        f".{target}.tmp-{DEAD_PID}.tmp-{DEAD_PID}",  # `TARGET.tmp-N`'s
        f".{target}.tmp-{DEAD_PID}x",  # not a temporary's name
        f"{target}.tmp-{DEAD_PID}",  # not hidden: the user's
    ]


def test_the_next_write_of_a_file_removes_what_killed_writes_of_it_left(tmp_path):
    # Any output, not only the large ones: evaluate's per_class.csv, prepare's report.json
    # (hashed by DVC with its folder), each written with write_bytes / write_json.
    killed = [f".report.json.tmp-{DEAD_PID}", f".report.json.tmp-{DEAD_PID - 1}-old"]
    for name in killed + others("report.json"):
        (tmp_path / name).write_bytes(b"half a report")
    write_json(tmp_path / "report.json", {"files": 1})
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["report.json", *others("report.json")])


def test_the_next_write_of_a_folder_removes_what_killed_writes_of_it_left(tmp_path):
    # stats killed in the middle: data/.stats.tmp-PID/ with a mean and half a pca.json.
    killed = tmp_path / f".stats.tmp-{DEAD_PID}"
    folder(killed, {"mean.npy": b"mean", f".pca.json.tmp-{DEAD_PID}": b"{"})
    folder(tmp_path / f".stats.tmp-{DEAD_PID - 1}-old", {"mean.npy": b"old mean"})
    for name in others("stats"):
        folder(tmp_path / name, {"x": b"x"})
    with atomic_output(tmp_path / "stats", folder="stats") as temporary:
        folder(temporary, {"pca.json": b"{}"})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["stats", *others("stats")])
    assert contents(tmp_path / "stats") == ours({"pca.json": b"{}"}, "stats")


def test_a_leftover_of_this_processs_pid_is_a_dead_runs(tmp_path):
    # In a container the same command often gets the same PID as the killed run: its
    # temporary folder has this process's name, and must not stop the write.
    folder(tmp_path / f".raw.tmp-{os.getpid()}", {"half": b"x"})
    with atomic_output(tmp_path / "raw", folder="synth") as temporary:
        folder(temporary, {"a": b"a"})
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


def test_a_live_writers_temporary_stays(tmp_path):
    # A concurrent run (its process alive) may be writing its temporary now: not even
    # the writers that removed every temporary of their target (the model file and the
    # checkpoint, a store) remove it.
    from alexnet.lmdb_store import write_store
    from alexnet.modelfile import save_tensors

    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        live = [f".model.pt.tmp-{writer.pid}", f".store.tmp-{writer.pid}"]
        (tmp_path / live[0]).write_bytes(b"half a model")
        folder(tmp_path / live[1], {"data.mdb": b"half a store"})
        folder(tmp_path / f".store.tmp-{writer.pid}-old", {"data.mdb": b"set aside"})
        save_tensors({"weights": [1.0]}, tmp_path / "model.pt")
        write_store(tmp_path / "store", [], "raw", [], size=32)
        write_bytes(tmp_path / "report.json", b"{}")
        (tmp_path / f".report.json.tmp-{writer.pid}").write_bytes(b"{")
        write_bytes(tmp_path / "report.json", b"{}")
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted(
            [
                *live,
                f".store.tmp-{writer.pid}-old",
                f".report.json.tmp-{writer.pid}",
                "model.pt",
                "store",
                "report.json",
            ]
        )
        assert (tmp_path / live[0]).read_bytes() == b"half a model"
        assert contents(tmp_path / live[1]) == {"data.mdb": b"half a store"}
    finally:
        writer.kill()
        writer.wait()


FULL_DISK = """
import resource, signal, sys
from pathlib import Path
import numpy as np, torch
from alexnet.errors import is_user_error, user_line
from alexnet.lmdb_store import write_store
from alexnet.modelfile import save_model

folder = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
classes = [{"index": 0, "wnid": "n0", "name": "c"}]
writes = {
    "model.pt": lambda path: save_model(path, {"weights": torch.zeros(100_000)}),
    "store": lambda path: write_store(path, [[(0, bytes(12288))] * 50], "raw", classes, size=64),
}
for name, write in writes.items():
    try:
        write(folder / name)
    except Exception as error:
        print(is_user_error(error), user_line(error))
print(sorted(p.name for p in folder.iterdir()))
"""


def test_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(tmp_path):
    # The model file and the checkpoint (torch's writer raised a RuntimeError naming
    # neither the file nor the cause) and a store (LMDB's own error), past a file size
    # limit: what a full disk does to them.
    from tests.helpers import run_python

    done = run_python(FULL_DISK.replace("sys.argv[1]", repr(str(tmp_path))))
    assert done.returncode == 0, done.stderr[-2000:]
    model, store, left = done.stdout.splitlines()
    assert model.startswith(f"True {tmp_path / 'model.pt'}: torch could not write it (")
    assert model.endswith(" GB free on its disk")
    # (LMDB reports the refused write as EIO)
    assert store.startswith(f"True {tmp_path / 'store'}: cannot write the store (mdb_txn_commit")
    assert left == "[]"


@pytest.mark.parametrize("check", [file_target, output_folder], ids=["file", "folder"])
def test_an_output_where_nothing_can_be_written_is_refused_before_any_work(tmp_path, check):
    # An immutable folder (or a read-only mount; root's permission bits show neither):
    # evaluate ran its whole 10-crop pass, then failed naming a hidden temporary.
    frozen = tmp_path / "frozen"
    (frozen / "eval").mkdir(parents=True)
    # the output's folder, or the nearest that exists; for a folder written into, itself
    cases = [(frozen, frozen / "x.json"), (frozen, frozen / "new" / "x")]
    if check is output_folder:
        cases.append((frozen / "eval", frozen / "eval"))
    for probed, path in cases:
        subprocess.run(["chattr", "+i", str(probed)], check=True)
        try:
            with pytest.raises(OutputError) as refused:
                check(path)
        finally:
            subprocess.run(["chattr", "-i", str(probed)], check=True)
        assert str(refused.value) == f"{path}: cannot write in {probed} (Operation not permitted)"
        assert check(path) == path
    assert sorted(p.name for p in frozen.rglob("*")) == ["eval"]  # no probe left
    # a folder that is filled is probed itself, not the folder it is in (a writable
    # volume mounted under a read-only root)
    subprocess.run(["chattr", "+i", str(frozen)], check=True)
    try:
        assert output_folder(frozen / "eval") == frozen / "eval"
        assert claim_folder(frozen / "eval", "prepare") == frozen / "eval"
    finally:
        subprocess.run(["chattr", "-i", str(frozen)], check=True)


@pytest.mark.parametrize("folder", [None, "synth"])
def test_what_is_written_reaches_the_disk_before_its_rename_and_the_rename_after(
    tmp_path, monkeypatch, folder
):
    # A machine's crash soon after an unsynced rename can leave the output's name on an
    # empty file (a checkpoint lost): every file written, and its folder, is fsynced
    # first, then the folder that holds the output, for the rename.
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(handle: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{handle}")))
        fsync(handle)

    def recorded_replace(source, target) -> None:
        events.append(("replace", str(target)))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    target = tmp_path / "out"
    with atomic_output(target, folder=folder) as temporary:
        written = temporary / "data.bin" if folder else temporary
        written.write_bytes(b"weights")
    synced = [path for kind, path in events if kind == "fsync"]
    renamed = events.index(("replace", str(target)))
    assert ("fsync", str(written)) in events[:renamed]  # the data, under its temporary name
    if folder:
        assert ("fsync", str(temporary)) in events[:renamed]  # the names in the folder
        assert ("fsync", str(temporary / OWNED)) in events[:renamed]
    assert events[renamed + 1 :] == [("fsync", str(tmp_path))]  # the rename
    assert len(synced) == (4 if folder else 2)
