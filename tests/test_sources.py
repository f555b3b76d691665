"""Dataset sources: the three layouts of docs/design.md, and their errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.io import savemat

from alexnet.sources import SourceError, open_source, read_devkit_order
from tests.helpers import jpeg, make_imagefolder

WNIDS = ["n01440764", "n01443537", "n01484850"]


def _flat_val(root, labels):
    (root / "val").mkdir(parents=True)
    for i, _ in enumerate(labels, start=1):
        (root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(jpeg(64, 64, i))


def _train(root, wnids=WNIDS):
    for wnid in wnids:
        (root / "train" / wnid).mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_1.JPEG").write_bytes(jpeg(64, 64))


def test_imagefolder_classes_sorted_and_named(tmp_path):
    source = open_source(make_imagefolder(tmp_path, classes=3, train=2, val=1))
    assert [c.wnid for c in source.classes] == ["n00000000", "n00000001", "n00000002"]
    assert source.classes[1].name == "class 1, thing"
    assert [s.label for s in source.splits["train"]] == [0, 0, 1, 1, 2, 2]
    assert source.splits["val"][0].relpath == "val/n00000000/n00000000_0.JPEG"


def test_class_index_is_sorted_wnid_order_not_creation_order(tmp_path):
    _train(tmp_path, ["n3", "n1", "n2"])
    (tmp_path / "val" / "n2").mkdir(parents=True)
    (tmp_path / "val" / "n2" / "a.JPEG").write_bytes(jpeg(32, 32))
    source = open_source(tmp_path)
    assert [c.wnid for c in source.classes] == ["n1", "n2", "n3"]
    assert source.splits["val"][0].label == 1
    assert source.classes[0].name == "n1"  # no mapping file: the wnid is the name


def test_flat_val_with_kaggle_csv(tmp_path):
    _train(tmp_path)
    labels = [WNIDS[2], WNIDS[0], WNIDS[1]]
    _flat_val(tmp_path, labels)
    rows = [f"ILSVRC2012_val_{i:08d},{w} 1 2 3 4 {w} 5 6 7 8" for i, w in enumerate(labels, 1)]
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows))
    source = open_source(tmp_path)
    assert [s.label for s in source.splits["val"]] == [2, 0, 1]


def _meta_mat(path, order):
    """The devkit's meta.mat: a struct array `synsets`; leaves have num_children == 0."""
    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    records = np.zeros((len(order) + 1,), dtype=[(f, object) for f in fields])
    for i, wnid in enumerate(order):
        records[i] = (i + 1, wnid, f"words {wnid}", "gloss", 0, np.array([]), 0, 1300)
    records[-1] = (len(order) + 1, "n00001740", "entity", "gloss", 3, np.array([1, 2, 3]), 19, 0)
    savemat(str(path), {"synsets": records})


def test_flat_val_with_ground_truth_and_devkit_order(tmp_path):
    _train(tmp_path)
    devkit = [WNIDS[1], WNIDS[2], WNIDS[0]]  # ILSVRC2012_ID 1, 2, 3 (not sorted order)
    data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    _meta_mat(data / "meta.mat", devkit)
    assert read_devkit_order(data / "meta.mat") == devkit
    _flat_val(tmp_path, [1, 2, 3])
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("3\n1\n2\n")
    source = open_source(tmp_path)
    # ID 3 -> WNIDS[0] -> index 0; ID 1 -> WNIDS[1] -> 1; ID 2 -> WNIDS[2] -> 2
    assert [s.label for s in source.splits["val"]] == [0, 1, 2]


def test_missing_split_is_one_clear_error(tmp_path):
    _train(tmp_path)
    with pytest.raises(SourceError, match="no 'val' split"):
        open_source(tmp_path)
    with pytest.raises(SourceError, match="no such dataset folder"):
        open_source(tmp_path / "nowhere")


def test_empty_class_is_an_error(tmp_path):
    make_imagefolder(tmp_path, classes=2, train=1, val=1)
    (tmp_path / "train" / "n00000009").mkdir()
    with pytest.raises(SourceError, match="n00000009: empty class folder"):
        open_source(tmp_path)


def test_unknown_label_in_csv_names_line_and_label(tmp_path):
    _train(tmp_path)
    _flat_val(tmp_path, [1])
    csv = "ImageId,PredictionString\nILSVRC2012_val_00000001,n99999999 1 2 3 4\n"
    (tmp_path / "LOC_val_solution.csv").write_text(csv)
    with pytest.raises(SourceError, match=r"LOC_val_solution.csv:2: unknown label 'n99999999'"):
        open_source(tmp_path)


def test_flat_val_image_without_label_is_an_error(tmp_path):
    _train(tmp_path)
    _flat_val(tmp_path, [1, 2])
    csv = f"ImageId,PredictionString\nILSVRC2012_val_00000001,{WNIDS[0]} 1 2 3 4\n"
    (tmp_path / "LOC_val_solution.csv").write_text(csv)
    with pytest.raises(SourceError, match="no label for ILSVRC2012_val_00000002.JPEG"):
        open_source(tmp_path)


def test_val_class_not_in_train_is_an_error(tmp_path):
    make_imagefolder(tmp_path, classes=2, train=1, val=1)
    (tmp_path / "val" / "n55555555").mkdir()
    (tmp_path / "val" / "n55555555" / "x.JPEG").write_bytes(jpeg(32, 32))
    with pytest.raises(SourceError, match="not a training class"):
        open_source(tmp_path)


def test_hidden_files_are_ignored_other_files_are_candidates(tmp_path):
    make_imagefolder(tmp_path, classes=1, train=1, val=1)
    (tmp_path / "train" / "n00000000" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "train" / "n00000000" / "notes.txt").write_text("not an image")
    relpaths = [s.relpath for s in open_source(tmp_path).splits["train"]]
    assert "train/n00000000/notes.txt" in relpaths
    assert not any(".DS_Store" in p for p in relpaths)
