"""Decoding a JPEG store's batches (alexnet/jpeg.py): on a pool of threads, what one
thread gives, bit for bit; like PIL within libjpeg's IDCT differences; left encoded for a
GPU; a damaged payload named. The CUDA decode is in tests/test_gpu.py."""

from __future__ import annotations

import os
import subprocess
import sys
from io import BytesIO

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.jpeg import Encoded, decode_threads, to_device
from alexnet.lmdb_store import StoreError, write_store
from alexnet.reader import Batches, LmdbSplit, batch_loader, encoded_for, in_order
from tests.helpers import REPO, encode, photo

SIZE = 48
CLASSES = [{"index": i, "wnid": f"n{i}", "name": f"class {i}"} for i in range(3)]


def jpeg_store(tmp_path, count: int = 12, damaged: int | None = None):
    """A `jpeg` store of `count` photos (one cut short: `damaged`), and their JPEGs."""
    jpegs = [encode(photo(SIZE, SIZE, seed=i), "JPEG", quality=90) for i in range(count)]
    if damaged is not None:
        jpegs[damaged] = jpegs[damaged][: len(jpegs[damaged]) // 3]  # cut short
    records = [(i % 3, data) for i, data in enumerate(jpegs)]
    write_store(tmp_path / "jpeg", [records[:5], records[5:]], "jpeg", CLASSES, size=SIZE)
    return LmdbSplit(tmp_path / "jpeg"), jpegs


def test_threads_decode_what_one_thread_does_and_pil_within_one_idct_step(tmp_path):
    (split, jpegs), rows = jpeg_store(tmp_path), [11, 0, 7, 3, 3, 9]
    split.threads = 1
    one, labels = split.read_batch(rows, channels_last=True)
    split.threads = 3
    many, same = split.read_batch(rows, channels_last=True)
    assert torch.equal(many, one) and torch.equal(same, labels) and labels.tolist()[:2] == [2, 0]
    assert many.is_contiguous(memory_format=torch.channels_last)
    for row, index in enumerate(rows):
        reference = np.asarray(Image.open(BytesIO(jpegs[index])).convert("RGB")).astype(int)
        ours = many[row].permute(1, 2, 0).numpy().astype(int)
        # both libjpeg-turbo; its integer IDCT builds may round a sample differently
        assert np.abs(ours - reference).max() <= 2, index


def test_encoded_batches_decode_on_the_device_to_the_loaders_pixels(tmp_path):
    split, _ = jpeg_store(tmp_path)
    cpu = torch.device("cpu")
    assert not encoded_for(split, cpu) and encoded_for(split, torch.device("cuda"))
    # compute.jpeg_decoder: cpu, the loader's threads decode for a CUDA device too
    assert not encoded_for(split, torch.device("cuda"), "cpu")
    encoded = split.read_encoded([4, 1, 8])
    assert isinstance(encoded, Encoded) and encoded.labels.tolist() == [1, 1, 2]
    assert encoded.where[0].endswith("key 00000004")
    pixels, _ = split.read_batch([4, 1, 8])
    assert torch.equal(to_device(encoded, cpu, split.shape), pixels)
    batches = in_order(split, 5, encoded=True)
    images, labels = batches[1]
    assert isinstance(images, Encoded) and len(images.sizes) == 5
    assert torch.equal(labels, split.read_batch(range(5, 10))[1])


def test_an_encoded_batch_leaves_a_loader_worker_as_one_buffer(tmp_path):
    # A tensor an image went to the main process as a file descriptor each (~0.6 ms
    # apiece: ~150 ms for a batch of 256); the payloads now travel as views of one buffer.
    split, jpegs = jpeg_store(tmp_path)
    rows = [[3, 0, 11], [7]]
    loader = batch_loader(Batches(split, rows, encoded=True), range(len(rows)), workers=1)
    for (batch, labels), keys in zip(loader, rows, strict=True):
        assert [bytes(payload.numpy()) for payload in batch.payloads()] == [jpegs[k] for k in keys]
        assert labels.tolist() == [k % 3 for k in keys]
        # one tensor crossed (in shared memory), beside plain ints and strings
        assert batch.data.is_shared() and all(type(size) is int for size in batch.sizes)


def test_a_ranks_empty_share_of_a_batch_decodes_to_no_images_with_dali(tmp_path):
    # torchrun: a short last batch can leave a rank no rows; DALI's batch takes none (the
    # CUDA decoders: test_gpu.py; our threads always took it)
    split, _ = jpeg_store(tmp_path)
    images = to_device(split.read_encoded([]), torch.device("cpu"), split.shape, "dali")
    assert images.shape == (0, *split.shape) and images.dtype == torch.uint8


@pytest.mark.parametrize("threads", [1, 2])
def test_a_damaged_payload_is_named_by_its_key(tmp_path, threads):
    split, _ = jpeg_store(tmp_path, damaged=6)
    split.threads = threads
    split.read_batch([0, 5, 7])  # the others decode
    with pytest.raises(StoreError, match=r"jpeg: key 00000006: cannot decode JPEG payload"):
        split.read_batch([5, 6, 7])
    with pytest.raises(StoreError, match=r"key 00000006"):
        to_device(split.read_encoded([6]), torch.device("cpu"), split.shape)


def test_a_raw_store_has_no_payloads_to_leave_encoded(tmp_path):
    records = [(0, np.zeros((SIZE, SIZE, 3), np.uint8).tobytes())]
    write_store(tmp_path / "raw", [records], "raw", CLASSES, size=SIZE)
    split = LmdbSplit(tmp_path / "raw")
    assert not encoded_for(split, torch.device("cuda"))
    with pytest.raises(StoreError, match="a raw store has no JPEG payloads"):
        split.read_encoded([0])


def test_decode_threads_share_the_cores_among_loader_processes(monkeypatch):
    monkeypatch.setattr("alexnet.runtime.cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert [decode_threads(w) for w in (0, 1, 4, 8, 32)] == [16, 16, 4, 2, 1]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's 4 ranks on this node
    assert [decode_threads(w) for w in (0, 1, 2, 8)] == [4, 4, 2, 1]


def test_cores_are_this_processes_share_not_the_hosts():
    # a container's or a batch job's CPU set, where os.cpu_count() says the host's
    from alexnet.runtime import cores

    assert cores() == len(os.sched_getaffinity(0)) <= (os.cpu_count() or 1)
    code = (
        "import os; os.sched_setaffinity(0, {0}); from alexnet.runtime import cores; print(cores())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert done.stdout.strip() == "1"


# -- NVIDIA DALI (compute.jpeg_decoder: dali); its CUDA decode is in tests/test_gpu.py


@pytest.fixture
def dali_only(monkeypatch):
    """DALI decodes, or the test fails: it must import here, and our threads' decode
    raises should `to_device` ever fall back to it. (torchvision still names a damaged
    payload, one at a time.)"""
    from alexnet import jpeg

    assert jpeg.usable("dali") == "dali"  # the test environment has DALI (the [dali] extra)

    def not_dali(*_):
        raise AssertionError("decoded by our threads, not DALI")

    monkeypatch.setattr(jpeg, "decode_into", not_dali)


def test_dali_decodes_what_our_threads_do(tmp_path, dali_only):
    split, _ = jpeg_store(tmp_path)
    rows = [11, 0, 7, 3, 3, 9]
    ours, _ = split.read_batch(rows)
    theirs = to_device(split.read_encoded(rows), torch.device("cpu"), split.shape, "dali")
    # both libjpeg-turbo's integer IDCT: the same pixels
    assert theirs.shape == ours.shape and torch.equal(theirs, ours)
    assert theirs.is_contiguous(memory_format=torch.channels_last)  # DALI's HWC, not copied


def test_dali_names_a_damaged_payload_and_decodes_on(tmp_path, dali_only):
    split, _ = jpeg_store(tmp_path, damaged=6)
    cpu = torch.device("cpu")
    with pytest.raises(StoreError, match=r"jpeg: key 00000006: cannot decode JPEG payload"):
        to_device(split.read_encoded([5, 6, 7]), cpu, split.shape, "dali")
    pixels, _ = split.read_batch([5, 7])
    assert torch.equal(to_device(split.read_encoded([5, 7]), cpu, split.shape, "dali"), pixels)


def test_dali_gives_the_pixels_as_stored_whatever_the_exif_orientation(tmp_path, dali_only):
    # A store another tool wrote may keep the photos' EXIF tags. torchvision and PIL's
    # `convert` give the pixels as stored; DALI turned them by the tag (a tag of 5-8
    # swaps height and width: the run stopped on a batch every other decoder reads).
    buffer = BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: "rotate 90 clockwise to display"
    photo(SIZE, SIZE, seed=1).save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    write_store(tmp_path / "jpeg", [[(0, buffer.getvalue())]], "jpeg", CLASSES, size=SIZE)
    split = LmdbSplit(tmp_path / "jpeg")
    ours, _ = split.read_batch([0])
    theirs = to_device(split.read_encoded([0]), torch.device("cpu"), split.shape, "dali")
    assert torch.equal(theirs, ours)


def test_dali_names_a_payload_of_another_size(tmp_path, dali_only):
    jpegs = [encode(photo(SIZE, SIZE, seed=i), "JPEG", quality=90) for i in range(3)]
    jpegs[1] = encode(photo(SIZE, SIZE // 2, seed=1), "JPEG", quality=90)
    write_store(tmp_path / "jpeg", [[(0, data) for data in jpegs]], "jpeg", CLASSES, size=SIZE)
    split = LmdbSplit(tmp_path / "jpeg")
    with pytest.raises(StoreError, match=r"key 00000001: JPEG is \(3, 24, 48\), store says"):
        to_device(split.read_encoded([0, 1, 2]), torch.device("cpu"), split.shape, "dali")


def test_without_dali_torchvision_decodes_after_a_warning(tmp_path, monkeypatch):
    from alexnet import jpeg, jpeg_dali

    split, _ = jpeg_store(tmp_path)
    monkeypatch.setattr(jpeg_dali, "missing", lambda: "NVIDIA DALI does not import (test)")
    monkeypatch.setattr(jpeg_dali, "decode", None)  # would fail if it were called
    jpeg.usable.cache_clear()
    try:
        with pytest.warns(UserWarning, match=r"does not import \(test\): JPEG batches decode"):
            images = to_device(split.read_encoded([2, 4]), torch.device("cpu"), split.shape, "dali")
        assert torch.equal(images, split.read_batch([2, 4])[0])
    finally:
        jpeg.usable.cache_clear()
