"""Mean image and RGB PCA: against a direct numpy computation over all pixels."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alexnet.atomic import claim_folder
from alexnet.shards import PREPARE_OWNER, Record, ShardError, write_shard
from alexnet.stats import (
    StatsError,
    class_count,
    decode_rgb,
    fix_signs,
    image_moments,
    load_stats,
    mean_image,
    reduce_moments,
    rgb_pca,
    save_stats,
    shard_moments,
)
from tests.helpers import encode, photo, run_python


def make_shards(folder, per_shard=(3, 2, 4), size=32):
    """Shards of random-ish JPEGs, and the decoded pixels a direct computation uses."""
    pixels, paths, n = [], [], 0
    for index, count in enumerate(per_shard):
        records = []
        for _ in range(count):
            data = encode(photo(size, size, seed=n), "JPEG", quality=85)
            records.append(Record(f"k{n}", data, n % 3))
            pixels.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
            n += 1
        path = folder / f"shard-{index:05d}.tar"
        write_shard(path, records, {})
        paths.append(path)
    return paths, np.stack(pixels)


def test_a_training_split_of_no_images_is_one_error_line(tmp_path):
    # shards of no records (every file skipped): 0/0, then numpy's LinAlgError traceback
    paths = [tmp_path / f"shard-0000{i}.tar" for i in range(2)]
    for path in paths:
        write_shard(path, [], {})
    with pytest.raises(StatsError, match=r"^prep/train: no images in its 2 shards \(run prepare"):
        reduce_moments([shard_moments(p, size=32) for p in paths], "prep/train")


def test_mean_and_covariance_equal_direct_numpy(tmp_path):
    paths, pixels = make_shards(tmp_path)
    moments = reduce_moments([shard_moments(p, size=32) for p in paths])
    assert np.array_equal(mean_image(moments), pixels.astype(np.float64).mean(0).astype(np.float32))

    pca = rgb_pca(moments)
    flat = pixels.reshape(-1, 3).astype(np.float64)
    direct = np.cov(flat.T, bias=True)
    assert np.allclose(pca["covariance"], direct, rtol=1e-9, atol=0)
    assert np.allclose(pca["rgb_mean"], flat.mean(0), rtol=1e-12)
    assert pca["pixels"] == flat.shape[0] and pca["images"] == len(pixels)

    values, vectors = np.array(pca["eigenvalues"]), np.array(pca["eigenvectors"])
    assert list(values) == sorted(values, reverse=True)
    assert np.allclose(direct @ vectors, vectors * values, rtol=1e-9, atol=1e-7)
    assert np.allclose(vectors.T @ vectors, np.eye(3), atol=1e-12)
    assert np.allclose(values, np.sort(np.linalg.eigvalsh(direct))[::-1], rtol=1e-9)


@pytest.mark.parametrize(
    ("size", "fill"),
    [(31, None), (1, None), (520, 255)],  # odd sizes end mid-block; 520**2 saturated
)  # pixels overflow int32 lanes unless they are flushed to int64 in time
def test_moments_are_the_exact_integer_sums(size, fill):
    rng = np.random.default_rng(size)
    images = rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    if fill is not None:
        images[:] = fill
    moments = image_moments(iter(images), size)
    flat = images.reshape(-1, 3).astype(np.int64)
    assert np.array_equal(moments.rgb_outer, (flat.T @ flat).astype(np.float64))
    assert np.array_equal(moments.image_sum, images.astype(np.int64).sum(0))
    assert moments.images == 3


def test_same_bits_whatever_the_grouping_of_shards(tmp_path):
    paths, _ = make_shards(tmp_path, per_shard=(2, 2, 2, 2))
    parts = [shard_moments(p, size=32) for p in paths]
    in_order = reduce_moments(parts)
    pairs = reduce_moments([parts[0] + parts[1], parts[2] + parts[3]])
    for a, b in ((in_order, pairs),):
        assert a.image_sum.tobytes() == b.image_sum.tobytes()
        assert a.rgb_outer.tobytes() == b.rgb_outer.tobytes()
        assert rgb_pca(a) == rgb_pca(b)


def test_sign_rule_makes_largest_component_positive():
    vectors = np.array([[0.1, -0.9], [-0.8, 0.2]])
    fixed = fix_signs(vectors)
    assert np.array_equal(fixed, [[-0.1, 0.9], [0.8, -0.2]])
    assert np.array_equal(fix_signs(-vectors), fixed)  # either sign in, the same out


GOOD = encode(photo(32, 32, seed=9), "JPEG")


@pytest.mark.parametrize(
    ("jpeg", "problem"),
    [
        (b"\xff\xd8\xff not really", "cannot be decoded (not an image)"),
        (GOOD[: len(GOOD) // 2], "cannot be decoded ("),  # Pillow refuses a truncated file
        (encode(photo(40, 32), "JPEG"), "is 40x32, expected 32x32"),
    ],
)
def test_an_image_that_does_not_decode_is_named_with_its_member(tmp_path, jpeg, problem):
    path = tmp_path / "shard-00000.tar"
    write_shard(path, [Record("n01/ok", GOOD, 0), Record("n01/img_3", jpeg, 0)], {})
    with pytest.raises(StatsError) as caught:
        shard_moments(path, size=32)
    assert str(caught.value).startswith(f"{path}: member n01/img_3.jpg {problem}")


def test_any_decoder_exception_becomes_the_members_line(tmp_path, monkeypatch):
    write_shard(tmp_path / "s.tar", [Record("a/b", GOOD, 0)], {})

    def decoder_bug(jpeg, size):
        raise IndexError("list index\nout of range")  # not a type the code expects

    monkeypatch.setattr("alexnet.stats.decode_rgb", decoder_bug)
    with pytest.raises(StatsError) as caught:
        shard_moments(tmp_path / "s.tar", size=32)
    line = f"{tmp_path / 's.tar'}: member a/b.jpg cannot be decoded (list index out of range)"
    assert str(caught.value) == line


def test_damaged_shards_stop_stats_naming_the_member(tmp_path):
    path = tmp_path / "shard-00000.tar"
    write_shard(path, [Record("n01/img_3", b"GIF89a", 0)], {})
    with pytest.raises(ShardError, match=r"shard-00000.tar: member n01/img_3.jpg is not a JPEG"):
        shard_moments(path, size=32)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ShardError, match="shard-00000.tar: truncated tar"):
        shard_moments(path, size=32)


def test_labels_are_checked_against_classes_json_beside_the_train_folder(tmp_path):
    train = tmp_path / "prepared" / "train"
    train.mkdir(parents=True)
    path = train / "shard-00000.tar"
    write_shard(path, [Record("n01/a", GOOD, 1), Record("n01/b", GOOD, 3)], {})
    assert class_count(train) is None  # shards on their own: labels only >= 0
    assert shard_moments(path, 32, class_count(train)).images == 2
    classes = [{"index": i, "wnid": f"n{i}", "name": str(i)} for i in range(3)]
    (tmp_path / "prepared" / "classes.json").write_text(json.dumps(classes))
    assert class_count(train) == 3
    with pytest.raises(ShardError) as caught:
        shard_moments(path, 32, class_count(train))
    assert (
        str(caught.value) == f"{path}: member n01/b.cls: label 3 is out of range (3 classes: 0..2)"
    )


def test_a_prepared_folder_that_prepare_did_not_finish_is_refused(tmp_path):
    # Its mark says prepare made it, and classes.json (written last) is missing: a stopped
    # or failed prepare, whose shards are any part of the data.
    train = claim_folder(tmp_path / "prepared", PREPARE_OWNER) / "train"
    train.mkdir()
    write_shard(train / "shard-00000.tar", [Record("n01/a", GOOD, 0)], {})
    with pytest.raises(ShardError, match=r"classes.json: no such file \(prepare writes it when"):
        class_count(train)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_the_mean_is_of_the_pixels_pack_stores(mode):
    # stats' decode and pack's `raw` records: the mean image is subtracted from what the
    # network trains on, so the two must be the same pixels (a greyscale or CMYK JPEG in
    # a store another tool wrote too)
    from alexnet.pack import payload

    data = encode(photo(24, 24).convert(mode), "JPEG", quality=90)
    assert payload(data, "raw", 24) == decode_rgb(data, 24).tobytes()
    assert decode_rgb(data, 24).shape == (24, 24, 3)


def test_load_stats_gives_the_mean_image_channels_first_and_the_pca(tmp_path):
    # as the stats stage writes them: mean.npy (H, W, 3) float32 and pca.json
    paths, _ = make_shards(tmp_path, per_shard=(2, 3))
    moments = reduce_moments([shard_moments(p, size=32) for p in paths])
    mean, pca = mean_image(moments), rgb_pca(moments)
    folder = tmp_path / "stats"
    save_stats(folder, mean, pca)
    assert sorted(p.name for p in folder.iterdir()) == [".alexnet-output", "mean.npy", "pca.json"]
    loaded, loaded_pca = load_stats(folder)
    assert loaded.shape == (3, 32, 32) and loaded.dtype.is_floating_point
    assert loaded.is_contiguous()
    assert np.array_equal(loaded.numpy(), mean.transpose(2, 0, 1))  # channel c = mean[..., c]
    assert loaded_pca == pca


def test_a_save_stopped_between_the_two_files_keeps_the_previous_pair(tmp_path, monkeypatch):
    # mean.npy and pca.json are one output: a new mean beside the old PCA would train
    # with a mixed pair and no error
    folder = tmp_path / "stats"
    save_stats(folder, np.full((4, 4, 3), 1, np.float32), {"images": 1})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill between the two writes

    monkeypatch.setattr("alexnet.stats.write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        save_stats(folder, np.full((4, 4, 3), 2, np.float32), {"images": 2})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["stats"]  # no temporary left


def test_missing_or_corrupt_stats_are_one_clear_error(tmp_path):
    def refused(folder: Path) -> str:
        with pytest.raises(StatsError) as raised:
            load_stats(folder)
        line = str(raised.value)
        assert "\n" not in line and "Errno" not in line, line  # ours, not the OS's words
        return line

    run = "; run stats (it writes mean.npy, pca.json)"
    assert refused(tmp_path / "none") == f"{tmp_path / 'none'}: no such stats folder{run}"
    (tmp_path / "file").write_text("")
    assert refused(tmp_path / "file") == f"{tmp_path / 'file'}: not a folder{run}"
    assert refused(tmp_path) == f"{tmp_path}: no mean.npy{run}"
    (tmp_path / "mean.npy").write_bytes(b"")  # cut short to nothing
    assert refused(tmp_path).startswith(f"{tmp_path}: corrupt stats: mean.npy (")
    np.save(tmp_path / "mean.npy", np.zeros((4, 4, 3), np.float32))
    assert refused(tmp_path) == f"{tmp_path}: no pca.json{run}"
    (tmp_path / "pca.json").write_text("{not json")
    assert refused(tmp_path).startswith(f"{tmp_path}: corrupt stats: pca.json (")
    assert refused(tmp_path).endswith("; run stats")
    (tmp_path / "pca.json").write_text(json.dumps(GOOD_PCA))
    with open(tmp_path / "mean.npy", "wb") as archive:  # np.savez's, under the name
        np.savez(archive, mean=np.zeros((4, 4, 3), np.float32))
    assert refused(tmp_path).startswith(f"{tmp_path}: corrupt stats: mean.npy (an .npz")


GOOD_PCA = {"eigenvalues": [900.0, 90.0, 0.0], "eigenvectors": np.eye(3).tolist()}


@pytest.mark.parametrize(
    "mean, pca, problem",
    [
        (np.full((4, 4, 3), np.nan, np.float32), GOOD_PCA, "mean.npy has values outside 0-255"),
        (np.full((4, 4, 3), 300, np.float32), GOOD_PCA, "mean.npy has values outside 0-255"),
        (np.zeros((4, 4), np.float32), GOOD_PCA, r"mean.npy is float32 \(4, 4\), not an"),
        (np.zeros((4, 4, 3), np.uint8), GOOD_PCA, r"mean.npy is uint8 \(4, 4, 3\)"),
        (np.zeros((4, 4, 3), np.float32), {}, "pca.json: no numeric eigenvalues"),
        (np.zeros((4, 4, 3), np.float32), [], "pca.json is not a JSON object"),
        (
            np.zeros((4, 4, 3), np.float32),
            {**GOOD_PCA, "eigenvalues": [1.0, 2.0]},
            r"pca.json: eigenvalues \(2,\), eigenvectors \(3, 3\), not 3, 3x3",
        ),
        (
            np.zeros((4, 4, 3), np.float32),
            {**GOOD_PCA, "eigenvalues": [1.0, "x", 2.0]},
            "pca.json: no numeric eigenvalues",
        ),
        (
            np.zeros((4, 4, 3), np.float32),
            {**GOOD_PCA, "eigenvalues": [1.0, -5.0, 2.0]},
            "pca.json: a negative eigenvalue -5.0",
        ),
    ],
    ids=["nan", "above-255", "2d", "uint8", "empty", "list", "two-values", "text", "negative"],
)
def test_stats_that_would_train_wrong_or_fail_mid_step_are_refused(tmp_path, mean, pca, problem):
    # A NaN in the mean trained a model without error, whose evaluation then said top-5
    # error 1.0 of 4 classes; a malformed pca.json failed in the first step, as a page of
    # traceback.
    np.save(tmp_path / "mean.npy", mean)
    (tmp_path / "pca.json").write_text(json.dumps(pca))
    with pytest.raises(StatsError, match=f"{tmp_path}: corrupt stats: {problem}.*; run stats"):
        load_stats(tmp_path)


def test_an_eigenvalue_below_zero_by_rounding_is_accepted(tmp_path):
    # a covariance of grey images has two zero eigenvalues, which eigh may give as -1e-13
    np.save(tmp_path / "mean.npy", np.full((4, 4, 3), 128, np.float32))
    pca = {**GOOD_PCA, "eigenvalues": [900.0, 1e-12, -1e-13]}
    (tmp_path / "pca.json").write_text(json.dumps(pca))
    assert load_stats(tmp_path)[1] == pca


def test_the_stats_module_runs_without_torch():
    # the stats stage's workers import alexnet.stats; torch is imported only by load_stats
    code = "import sys, alexnet.stats\nassert 'torch' not in sys.modules, 'torch imported'\n"
    done = run_python(code)
    assert done.returncode == 0, done.stderr[-2000:]
