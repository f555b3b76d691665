"""Digests that decide whether a checkpoint belongs to a run: data and training code."""

import hashlib
import json
import os
from pathlib import Path

import yaml

from alexnet.digests import TRAINING_CODE, changed_code, code_digests, file_digest

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
    known[str(path.resolve())]["sha"] = "planted"
    memo.write_text(json.dumps(known))
    assert file_digest(path, memo) == "planted"
    # A new file renamed into place, as pack and `dvc checkout` make: read again.
    (tmp_path / "new").write_bytes(b"other bytes")
    os.replace(tmp_path / "new", path)
    assert file_digest(path, memo) == sha16(b"other bytes")
    memo.write_text("{damaged")  # a damaged memo costs a re-read, nothing else
    assert file_digest(path, memo) == sha16(b"other bytes")


def test_changed_code_names_the_files_that_differ():
    current = code_digests()
    assert set(current) == {f"{name}.py" for name in TRAINING_CODE}
    assert changed_code(current, current) == []
    assert changed_code({**current, "model.py": "0" * 16}, current) == ["model.py"]
    assert changed_code(None, current) == sorted(current)  # a checkpoint from before


def test_training_code_is_what_dvc_yaml_lists_for_the_train_stage():
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["deps"]
    assert {Path(d).stem for d in deps if d.startswith("alexnet/")} == set(TRAINING_CODE)
