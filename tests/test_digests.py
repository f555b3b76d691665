"""Digests that decide whether a checkpoint belongs to a run: data and training code."""

import hashlib
import json
import os
from pathlib import Path

import yaml

from alexnet import digests
from alexnet.digests import (
    TRAINING_ENTRY,
    changed_code,
    code_digests,
    file_digest,
    recipe_changes,
    training_code,
    with_defaults,
)
from alexnet.imports import closure
from tests.helpers import run_python

ROOT = Path(__file__).resolve().parents[1]


def sha16(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def test_file_digest_is_the_sha256_and_remembers_the_same_file(tmp_path):
    path, memo = tmp_path / "data.mdb", tmp_path / "memo.json"
    content = os.urandom(3_000_000)
    path.write_bytes(content)
    assert file_digest(path, memo) == sha16(content)
    # The same file again: the memo answers, without reading (a planted value proves it).
    known = json.loads(memo.read_text())
    [identity] = known[str(path.resolve())]
    known[str(path.resolve())][identity] = "planted"
    memo.write_text(json.dumps(known))
    assert file_digest(path, memo) == "planted"
    # A new file renamed into place, as pack and `dvc checkout` make: read again.
    (tmp_path / "new").write_bytes(b"other bytes")
    os.replace(tmp_path / "new", path)
    assert file_digest(path, memo) == sha16(b"other bytes")
    memo.write_text("{damaged")  # a damaged memo costs a re-read, nothing else
    assert file_digest(path, memo) == sha16(b"other bytes")


def test_the_memo_keeps_the_files_hashed_last(tmp_path):
    # A worker's run reads the data in a temporary clone: a new path at every run.
    memo = tmp_path / "memo.json"
    paths = [tmp_path / f"clone-{i}" / "data.mdb" for i in range(digests.MEMO_FILES + 5)]
    for path in paths:
        path.parent.mkdir()
        path.write_bytes(path.parent.name.encode())
        assert file_digest(path, memo) == sha16(path.parent.name.encode())
    kept = [str(path.resolve()) for path in paths[-digests.MEMO_FILES :]]
    assert list(json.loads(memo.read_text())) == kept
    # one hashed again (a new file there) is the newest, not dropped next
    paths[-digests.MEMO_FILES].write_bytes(b"new")
    file_digest(paths[-digests.MEMO_FILES], memo)
    assert list(json.loads(memo.read_text()))[-1] == kept[0]
    # and so is one used again (the repository's own data, between the clones' runs)
    used = paths[-digests.MEMO_FILES + 1]
    assert file_digest(used, memo) == sha16(used.parent.name.encode())
    assert list(json.loads(memo.read_text()))[-1] == kept[1]


def test_nodes_sharing_the_memo_hash_the_data_once_each(tmp_path, monkeypatch):
    # The memo lies next to the checkpoint, on the filesystem all nodes share; each node
    # sees the data under its own device number (an NFS mount's is the client's own).
    path, memo = tmp_path / "data.mdb", tmp_path / "memo.json"
    path.write_bytes(b"the store")
    hashed, real_sha16, real_stat = [], digests.sha16, Path.stat
    monkeypatch.setattr(digests, "sha16", lambda p: hashed.append(p) or real_sha16(p))

    def seen_from(node: int):
        def stat(self, *, follow_symlinks=True):
            fields = list(real_stat(self, follow_symlinks=follow_symlinks))
            fields[2] += node  # st_dev
            return os.stat_result(fields, {"st_mtime_ns": real_stat(self).st_mtime_ns})

        return stat

    for node in (0, 1, 0, 1, 2, 0):  # restarts, each node hashing at once
        with monkeypatch.context() as patch:
            patch.setattr(Path, "stat", seen_from(node))
            assert file_digest(path, memo) == sha16(b"the store")
    assert len(hashed) == 3  # once per node


def test_code_digests_are_the_sha256_of_each_training_file_by_path():
    current = code_digests()
    files = training_code()
    assert list(current) == sorted(current)
    assert set(current) == {path.relative_to(ROOT).as_posix() for path in files}
    for name, digest in current.items():
        assert digest == sha16((ROOT / name).read_bytes()), name
    # the files that decide the weights, and no orchestration
    for name in ("fit", "train", "model", "lrn", "lrn_cpu", "augment", "augment_cpu", "crops"):
        assert f"alexnet/{name}.py" in current, name
    assert not any(name.startswith(("flows/", "tasks/", "tests/")) for name in current)


def test_changed_code_names_the_files_that_differ():
    current = code_digests()
    assert changed_code(current, current) == []
    edited = {**current, "alexnet/model.py": "0" * 16}
    assert changed_code(edited, current) == ["alexnet/model.py"]
    assert changed_code(None, current) == sorted(current)  # a checkpoint from before
    assert changed_code("garbage", current) == sorted(current)
    # a file the recording run did not have counts as changed; one it had and we lost not
    fewer = {k: v for k, v in current.items() if k != "alexnet/lrn.py"}
    assert changed_code(fewer, current) == ["alexnet/lrn.py"]
    assert changed_code(current, fewer) == []


def test_recipe_changes_name_each_changed_key_and_one_that_is_gone_or_new():
    before = {"train": {"lr": 0.01, "every": 25, "rate_cap": None}, "data": {"lmdb/train": "a"}}
    after = {"train": {"lr": 0.02, "minutes": 10, "rate_cap": None}, "data": {"lmdb/train": "b"}}
    assert recipe_changes(before, after) == (
        "train.every 25 -> (no such param), train.lr 0.01 -> 0.02, "
        "train.minutes (no such param) -> 10, data.lmdb/train changed"
    )
    # a null param is a value: not the same as one the other side lacks
    assert recipe_changes({"train": {}}, {"train": {"rate_cap": None}}) == (
        "train.rate_cap (no such param) -> None"
    )
    assert recipe_changes(before, before) == "other params or data"
    assert recipe_changes(None, after) == "other params or data"


def test_training_code_is_the_import_closure_of_the_training_entry():
    assert TRAINING_ENTRY == "alexnet.fit"
    assert set(training_code()) == closure(ROOT, TRAINING_ENTRY)
    # Independently of the AST reading: every project module that importing the entry
    # loads is in it (imports inside functions are in it too, but load later).
    code = (
        f"import sys, {TRAINING_ENTRY}\n"
        "for name, module in sorted(sys.modules.items()):\n"
        "    if name.split('.')[0] in ('alexnet', 'flows', 'tasks'):\n"
        "        print(module.__file__)\n"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = {Path(line).resolve() for line in done.stdout.splitlines()}
    assert ROOT / "alexnet" / "fit.py" in loaded
    assert loaded <= set(training_code()), loaded - set(training_code())


def test_training_code_is_in_the_train_stage_deps_of_dvc_yaml():
    # a change to any file of the training code re-runs the train stage
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["deps"]
    assert set(code_digests()) <= set(deps)


def test_a_recorded_recipe_takes_the_params_it_lacks_at_their_defaults():
    defaults = {"model": {"width": 1.0, "lrn": True}, "train": {"lr": 0.01}}
    current = {"model": {"width": 1.0, "lrn": False}, "train": {"lr": 0.02}, "data": {"a": "x"}}
    recorded = {"model": {"lrn": False}, "train": {"lr": 0.02, "every": 25}, "data": {"a": "x"}}
    # width, added since: its default; every, gone since: kept, so still a change
    assert with_defaults(recorded, current, defaults) == {
        "model": {"lrn": False, "width": 1.0},
        "train": {"lr": 0.02, "every": 25},
        "data": {"a": "x"},
    }
    # a recorded value is never replaced, nor a param without a default filled in
    assert with_defaults({"model": {"width": 0.5}}, current, {}) == {"model": {"width": 0.5}}
    assert with_defaults(None, current, defaults) is None  # from before recipes
