"""The real `alexnet prepare` over a fuzz corpus (tests/corpus.py): every format this PIL
writes, damaged copies, bombs, junk. It must finish, account for every file, keep every
file PIL itself can use, write only 256x256 RGB JPEGs, and do it the same way twice."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from alexnet.shards import unique_keys
from tests.corpus import CLASSES, build_corpus, pil_can_use, write_corpus
from tests.helpers import REPO

SHARD_SIZE = 64  # several shards per split


@dataclass(frozen=True)
class Run:
    raw: Path
    out: Path
    kinds: dict[str, str]  # relpath: kind
    result: subprocess.CompletedProcess

    @property
    def report(self) -> dict:
        return json.loads((self.out / "report.json").read_text())


def prepare(raw: Path, out: Path, params: Path, workers: int, api_url: str):
    command = [sys.executable, "-m", "flows.cli", "prepare", str(raw), str(out), "-p", str(params)]
    command += ["--workers", str(workers)]
    env = {**os.environ, "PREFECT_API_URL": api_url}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)


@pytest.fixture
def run(tmp_path_factory, prefect_server) -> Run:
    """The corpus, and one prepare run over it on two workers."""
    root = tmp_path_factory.mktemp("corpus")
    kinds = write_corpus(root / "raw")
    params = root / "params.yaml"
    params.write_text(f"prepare:\n  max_skipped: 1.0\n  shard_size: {SHARD_SIZE}\n")
    result = prepare(root / "raw", root / "out", params, 2, prefect_server)
    return Run(root / "raw", root / "out", kinds, result)


def finished(run: Run) -> Run:
    assert run.result.returncode == 0, run.result.stderr[-3000:]
    return run


def test_the_corpus_is_deterministic_and_has_every_kind():
    first, second = build_corpus(), build_corpus()
    assert [(e.name, e.kind, e.data) for e in first.entries] == [
        (e.name, e.kind, e.data) for e in second.entries
    ]
    categories = {e.category for e in first.entries}
    expected = {"original", "crafted", "truncated 1/3", "flipped header", "flipped body"}
    assert expected | {"misnamed", "empty", "bomb", "random"} <= categories
    assert 200 <= len(first.entries) <= 600
    # The reference decodes PNG, GIF, BMP and TIFF, so those are in any Pillow.
    formats = {e.kind.split(": ")[1].split()[0] for e in first.entries if e.category == "original"}
    assert {"JPEG", "PNG", "APNG", "GIF", "BMP", "TIFF"} <= formats


def accounts_for_every_file(run: Run) -> None:
    report = run.report
    assert report["files"] == len(run.kinds)
    assert report["kept"] + report["skipped"] == report["files"]
    skipped = report["skipped_files"]
    assert len(skipped) == report["skipped"]
    paths = [s["path"] for s in skipped]
    assert len(set(paths)) == len(paths) and set(paths) <= set(run.kinds)
    for entry in skipped:
        reason = entry["reason"]
        assert isinstance(reason, str) and reason.strip() and "\n" not in reason, entry
    # No class is left without usable images (each folder has plain JPEGs too).
    for split in ("train", "val"):
        assert report["splits"][split]["kept"] >= len(CLASSES)


def shard_members(out: Path) -> dict[str, dict[str, bytes]]:
    """split -> {member name: bytes}, over every shard of the split."""
    members: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("*/shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                members.setdefault(shard.parent.name, {})[member.name] = tar.extractfile(
                    member
                ).read()
    return members


def every_output_is_a_256_rgb_jpeg_of_a_kept_file(run: Run) -> None:
    skipped = {s["path"] for s in run.report["skipped_files"]}
    members = shard_members(run.out)
    jpegs = 0
    for split, files in members.items():
        relpaths = sorted(p for p in run.kinds if p.startswith(f"{split}/"))
        keys = dict(zip(relpaths, unique_keys(relpaths), strict=True))
        expected = {keys[p] for p in relpaths if p not in skipped}
        assert {name.rsplit(".", 1)[0] for name in files} == expected, split
        for relpath in relpaths:
            if relpath in skipped:
                continue
            label = CLASSES.index(relpath.split("/")[1])
            assert files[f"{keys[relpath]}.cls"] == str(label).encode(), relpath
            image = Image.open(io.BytesIO(files[f"{keys[relpath]}.jpg"]))
            image.load()
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (256, 256)), relpath
            jpegs += 1
    assert jpegs == run.report["kept"]


def every_file_pil_can_use_is_kept(run: Run) -> None:
    reasons = {s["path"]: s["reason"] for s in run.report["skipped_files"]}
    wrongly = {
        relpath: (run.kinds[relpath], reasons[relpath])
        for relpath in run.kinds
        if relpath in reasons and pil_can_use((run.raw / relpath).read_bytes())
    }
    assert not wrongly, f"skipped although PIL can use them: {wrongly}"


def digests(out: Path) -> dict[str, str]:
    files = sorted(out.glob("*/shard-*.tar")) + [out / "report.json"]
    return {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
    }


def a_second_run_gives_byte_identical_shards(run: Run, prefect_server: str) -> None:
    out = run.out.parent / "again"
    params = run.out.parent / "params.yaml"
    again = prepare(run.raw, out, params, 1, prefect_server)  # and another worker count
    assert again.returncode == 0, again.stderr[-3000:]
    first = digests(run.out)
    assert len(first) > 2 and digests(out) == first


# One test, so that parallel test workers do not each repeat the prepare run.
def test_prepare_over_the_corpus(run, prefect_server):
    run = finished(run)
    accounts_for_every_file(run)
    every_output_is_a_256_rgb_jpeg_of_a_kept_file(run)
    every_file_pil_can_use_is_kept(run)
    a_second_run_gives_byte_identical_shards(run, prefect_server)


def test_predict_reads_every_corpus_file_or_gives_one_line(tmp_path):
    # `alexnet predict` prepares a file as prepare does (in a decoder's process of its
    # own; here in this one): each file gives the model's input or one line why not.
    from alexnet.params import PrepareParams
    from alexnet.predict import load_file
    from alexnet.user_images import why_unusable

    kinds = write_corpus(tmp_path / "raw")
    options = PrepareParams().image_options()
    read = 0
    for relpath in kinds:
        path = tmp_path / "raw" / relpath
        try:
            image = load_file(path, options)
        except Exception as error:
            reason = why_unusable(path, error)
            assert reason.strip() and "\n" not in reason, (relpath, reason)
            continue
        assert image.shape == (3, 256, 256), relpath
        read += 1
    assert read > len(kinds) / 2
