"""Outputs appear whole or not at all (alexnet/atomic.py)."""

from __future__ import annotations

import shutil

import pytest

from alexnet.atomic import OWNED, OWNED_TEXT, OutputError, atomic_output, remove_leftovers


def folder(path, files: dict[str, bytes]) -> None:
    path.mkdir()
    for name, data in files.items():
        (path / name).write_bytes(data)


def contents(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def ours(files: dict[str, bytes]) -> dict[str, bytes]:
    """The files of a folder alexnet wrote: with its mark."""
    return {**files, OWNED: OWNED_TEXT}


def test_a_folder_is_replaced_whole_and_nothing_is_left_beside_it(tmp_path):
    target = tmp_path / "raw"
    folder(target, ours({"a": b"old a", "b": b"old b"}))
    with atomic_output(target) as temporary:
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
    with pytest.raises(OutputError, match=f"raw: a folder with files and without the {OWNED} mark"):
        with atomic_output(target, sole_writer=True):
            ran.append(True)
    assert not ran and contents(target) == old
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


def test_an_empty_folder_is_replaced_and_a_file_output_gets_no_mark(tmp_path):
    (tmp_path / "raw").mkdir()
    with atomic_output(tmp_path / "raw") as temporary:
        folder(temporary, {"a": b"a"})
    assert contents(tmp_path / "raw") == ours({"a": b"a"})
    with atomic_output(tmp_path / "raw" / "a") as temporary:
        temporary.write_bytes(b"new a")
    assert contents(tmp_path / "raw") == ours({"a": b"new a"})


def test_a_kill_while_the_old_folder_is_deleted_leaves_the_new_one_whole(tmp_path, monkeypatch):
    # The old version is renamed aside before it is deleted: a kill during the deletion
    # (simulated: rmtree removes one file, then the process "dies") cannot leave a
    # half-deleted folder at the target, which the next stage would read as data.
    target = tmp_path / "raw"
    folder(target, ours({"a": b"old a", "b": b"old b"}))

    def killed(path, *args, **kwargs):
        next(p for p in sorted(path.iterdir())).unlink()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), atomic_output(target) as temporary:
        folder(temporary, {"a": b"new a", "c": b"new c"})
        monkeypatch.setattr(shutil, "rmtree", killed)
    monkeypatch.undo()
    assert contents(target) == ours({"a": b"new a", "c": b"new c"})
    remove_leftovers(tmp_path, "raw")  # what the next run does first
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


def test_leftovers_of_one_target_only(tmp_path):
    for name in (".raw.tmp-11", ".raw.tmp-12-old", ".prepared.tmp-13", "raw"):
        folder(tmp_path / name, {"x": b"x"})
    remove_leftovers(tmp_path, "raw")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".prepared.tmp-13", "raw"]
    remove_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]
