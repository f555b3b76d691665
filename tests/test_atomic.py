"""Outputs appear whole or not at all (alexnet/atomic.py)."""

from __future__ import annotations

import shutil

import pytest

from alexnet.atomic import atomic_output, remove_leftovers


def folder(path, files: dict[str, bytes]) -> None:
    path.mkdir()
    for name, data in files.items():
        (path / name).write_bytes(data)


def contents(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_a_folder_is_replaced_whole_and_nothing_is_left_beside_it(tmp_path):
    target = tmp_path / "raw"
    folder(target, {"a": b"old a", "b": b"old b"})
    with atomic_output(target) as temporary:
        folder(temporary, {"a": b"new a"})
    assert contents(target) == {"a": b"new a"} and [p.name for p in tmp_path.iterdir()] == ["raw"]


def test_a_kill_while_the_old_folder_is_deleted_leaves_the_new_one_whole(tmp_path, monkeypatch):
    # The old version is renamed aside before it is deleted: a kill during the deletion
    # (simulated: rmtree removes one file, then the process "dies") cannot leave a
    # half-deleted folder at the target, which the next stage would read as data.
    target = tmp_path / "raw"
    folder(target, {"a": b"old a", "b": b"old b"})

    def killed(path, *args, **kwargs):
        next(p for p in sorted(path.iterdir())).unlink()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), atomic_output(target) as temporary:
        folder(temporary, {"a": b"new a", "c": b"new c"})
        monkeypatch.setattr(shutil, "rmtree", killed)
    monkeypatch.undo()
    assert contents(target) == {"a": b"new a", "c": b"new c"}
    remove_leftovers(tmp_path, "raw")  # what the next run does first
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


def test_leftovers_of_one_target_only(tmp_path):
    for name in (".raw.tmp-11", ".raw.tmp-12-old", ".prepared.tmp-13", "raw"):
        folder(tmp_path / name, {"x": b"x"})
    remove_leftovers(tmp_path, "raw")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".prepared.tmp-13", "raw"]
    remove_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]
