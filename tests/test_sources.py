"""Dataset sources: the three layouts of docs/design.md, and their errors."""

from __future__ import annotations

import codecs
import errno
import json
import os
import re
import shutil
import socket

import numpy as np
import pytest
from scipy.io import savemat

from alexnet import sources
from alexnet.sources import SourceError, display_name, open_source, read_devkit_order
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
    assert next(iter(source.splits["val"])).relpath == "val/n00000000/n00000000_0.JPEG"


def test_class_index_is_sorted_wnid_order_not_creation_order(tmp_path):
    _train(tmp_path, ["n3", "n1", "n2"])
    (tmp_path / "val" / "n2").mkdir(parents=True)
    (tmp_path / "val" / "n2" / "a.JPEG").write_bytes(jpeg(32, 32))
    source = open_source(tmp_path)
    assert [c.wnid for c in source.classes] == ["n1", "n2", "n3"]
    assert next(iter(source.splits["val"])).label == 1
    assert source.classes[0].name == "n1"  # no mapping file: the wnid is the name


def test_flat_val_with_kaggle_csv(tmp_path):
    _train(tmp_path)
    labels = [WNIDS[2], WNIDS[0], WNIDS[1]]
    _flat_val(tmp_path, labels)
    rows = [f"ILSVRC2012_val_{i:08d},{w} 1 2 3 4 {w} 5 6 7 8" for i, w in enumerate(labels, 1)]
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows))
    source = open_source(tmp_path)
    assert [s.label for s in source.splits["val"]] == [2, 0, 1]


def test_kaggles_download_opens_at_its_top_or_at_its_image_folder(tmp_path):
    # As Kaggle's ImageNet download unpacks: the LOC_* files three levels above the
    # images (and folders beside them that are not splits: test/, Annotations/).
    images = tmp_path.joinpath(*sources.KAGGLE_DATA)
    _train(images)
    labels = [WNIDS[1], WNIDS[2], WNIDS[0]]
    _flat_val(images, labels)
    (images / "test").mkdir()
    (tmp_path / "ILSVRC" / "Annotations" / "CLS-LOC").mkdir(parents=True)
    rows = [f"ILSVRC2012_val_{i:08d},{w} 1 2 3 4" for i, w in enumerate(labels, 1)]
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows))
    (tmp_path / "LOC_synset_mapping.txt").write_text(f"{WNIDS[0]} tench, Tinca tinca\n")
    for root in (tmp_path, images):
        source = open_source(root)
        assert source.root == images
        assert [c.name for c in source.classes] == ["tench, Tinca tinca", *WNIDS[1:]]
        assert [s.label for s in source.splits["val"]] == [1, 2, 0]
        assert [s.relpath for s in source.splits["train"]][
            0
        ] == f"train/{WNIDS[0]}/{WNIDS[0]}_1.JPEG"
    # the image folder a link to another disk: the label files are still three levels up
    (tmp_path / "disk").mkdir()
    images.rename(tmp_path / "disk" / "CLS-LOC")
    images.symlink_to(tmp_path / "disk" / "CLS-LOC")
    assert [s.label for s in open_source(images).splits["val"]] == [1, 2, 0]


def test_images_beside_the_class_folders_are_refused_not_left_out(tmp_path):
    # ImageNet's val/ half sorted into class folders (valprep.sh stopped), labels at hand
    _train(tmp_path)
    (tmp_path / "val" / WNIDS[0]).mkdir(parents=True)
    (tmp_path / "val" / WNIDS[0] / "ILSVRC2012_val_00000001.JPEG").write_bytes(jpeg(32, 32))
    for i in (2, 3):
        (tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(jpeg(32, 32))
    (tmp_path / "val" / "README.txt").write_text("not an image: ignored")
    with pytest.raises(SourceError, match=r"val_0000000[23]\.JPEG: one of 2 images beside"):
        open_source(tmp_path)


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
    (tmp_path / "a.JPEG").write_bytes(b"")  # one image named as the dataset
    with pytest.raises(SourceError, match=r"a.JPEG: a file, not a dataset folder \(train/"):
        open_source(tmp_path / "a.JPEG")


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


def _strays(val) -> None:
    """What a copy from Windows or macOS, or a hand, leaves among the images."""
    (val / "Thumbs.db").write_bytes(b"thumbnails")
    (val / "desktop.ini").write_text("[.ShellClassInfo]")
    (val / "README.txt").write_text("the val images")
    (val / "__MACOSX").mkdir()
    (val / "__MACOSX" / "._ILSVRC2012_val_00000001.JPEG").write_bytes(b"resource fork")


def _labelled_csv(tmp_path, images) -> None:
    rows = [f"ILSVRC2012_val_{i:08d},{WNIDS[i % 3]} 1 2 3 4" for i in images]
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows))


def test_stray_files_in_a_flat_val_folder_are_ignored_with_the_kaggle_csv(tmp_path):
    # Stopped the run: "no label for Thumbs.db"
    _train(tmp_path)
    _flat_val(tmp_path, [1, 2])
    _strays(tmp_path / "val")
    _labelled_csv(tmp_path, [1, 2])
    val = open_source(tmp_path).splits["val"]
    assert [(s.relpath, s.label) for s in val] == [
        ("val/ILSVRC2012_val_00000001.JPEG", 1),
        ("val/ILSVRC2012_val_00000002.JPEG", 2),
    ]
    # an image file is one whatever its name: without a label, still refused
    (tmp_path / "val" / "holiday.png").write_bytes(jpeg(32, 32))
    with pytest.raises(SourceError, match=r"LOC_val_solution.csv: no label for holiday.png$"):
        open_source(tmp_path)
    # and a file the CSV labels is one of the images, whatever its suffix
    (tmp_path / "val" / "scan.pgm").write_bytes(b"P5 1 1 255 x")
    with open(tmp_path / "LOC_val_solution.csv", "a") as csv:
        csv.write(f"\nholiday,{WNIDS[0]} 1 2 3 4\nscan,{WNIDS[1]} 1 2 3 4\n")
    val = open_source(tmp_path).splits["val"]
    assert [s.relpath for s in val][2:] == ["val/holiday.png", "val/scan.pgm"]


def test_stray_files_in_a_flat_val_folder_are_ignored_with_the_ground_truth(tmp_path):
    # Stopped the run: "3 labels for 7 entries in val/"
    _ground_truth(tmp_path, "3\n1\n2\n")
    _strays(tmp_path / "val")
    assert [s.label for s in open_source(tmp_path).splits["val"]] == [2, 0, 1]
    (tmp_path / "val" / "ILSVRC2012_val_00000004.JPEG").write_bytes(jpeg(32, 32))
    with pytest.raises(SourceError, match=r": 3 labels for 4 entries in val/$"):
        open_source(tmp_path)


def test_a_flat_val_folder_with_only_stray_files_is_an_empty_split(tmp_path):
    _train(tmp_path)
    (tmp_path / "val").mkdir()
    _strays(tmp_path / "val")
    _labelled_csv(tmp_path, [1])
    val = re.escape(str(tmp_path / "val"))
    with pytest.raises(SourceError, match=rf"^{val}: empty split \(no images, nor any ILSVRC"):
        open_source(tmp_path)


def test_labelled_images_missing_from_a_flat_val_folder_stop_the_scan(tmp_path):
    # A partly extracted val tar: the error rates would be taken on a subset, silently.
    _train(tmp_path)
    _flat_val(tmp_path, [1, 2])
    _labelled_csv(tmp_path, [1, 2, 3, 4, 5])
    csv = re.escape(str(tmp_path / "LOC_val_solution.csv"))
    expected = (
        rf"^{csv}: 3 of 5 labelled images not in val/ \(the first: ILSVRC2012_val_00000003\)$"
    )
    with pytest.raises(SourceError, match=expected):
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


# --- The file system: every entry accounted for, no oddity stops the scan -------------


def _only(source, split="train"):
    """The samples of a split by relpath."""
    return {s.relpath: s for s in source.splits[split]}


def test_broken_symlink_is_a_sample_with_its_problem(tmp_path):
    make_imagefolder(tmp_path, classes=1, train=1, val=1)
    (tmp_path / "train" / "n00000000" / "gone.JPEG").symlink_to("/nowhere/gone.JPEG")
    (tmp_path / "train" / "n00000000" / "loop.JPEG").symlink_to("loop.JPEG")
    samples = _only(open_source(tmp_path))
    assert samples["train/n00000000/gone.JPEG"].problem == "broken symlink -> /nowhere/gone.JPEG"
    loop = samples["train/n00000000/loop.JPEG"].problem
    assert loop == f"broken symlink -> loop.JPEG ({os.strerror(errno.ELOOP)})"
    assert samples["train/n00000000/n00000000_0.JPEG"].problem is None


def test_symlink_to_a_file_is_followed(tmp_path):
    make_imagefolder(tmp_path, classes=1, train=1, val=1)
    target = tmp_path / "elsewhere.JPEG"
    target.write_bytes(jpeg(32, 32))
    link = tmp_path / "train" / "n00000000" / "linked.JPEG"
    link.symlink_to(target)
    sample = _only(open_source(tmp_path))["train/n00000000/linked.JPEG"]
    assert sample.problem is None and sample.path == link and sample.label == 0


def test_directory_in_a_class_folder_is_a_sample_with_its_problem(tmp_path):
    make_imagefolder(tmp_path, classes=2, train=1, val=1)
    (tmp_path / "train" / "n00000001" / "x.jpg").mkdir()
    (tmp_path / "train" / "n00000001" / "x.jpg" / "inner.JPEG").write_bytes(jpeg(32, 32))
    samples = _only(open_source(tmp_path))
    assert samples["train/n00000001/x.jpg"].problem == "a directory, not a file"
    assert samples["train/n00000001/x.jpg"].label == 1
    assert not any("inner" in relpath for relpath in samples)  # not descended into


@pytest.mark.timeout(60)  # opening the FIFO would block forever
def test_fifo_and_socket_are_samples_never_opened(tmp_path, monkeypatch):
    make_imagefolder(tmp_path, classes=1, train=1, val=1)
    folder = tmp_path / "train" / "n00000000"
    os.mkfifo(folder / "pipe.JPEG")
    monkeypatch.chdir(folder)  # a socket's path must fit in 108 bytes: bind a relative one
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("sock.JPEG")
        samples = _only(open_source(tmp_path))
    assert samples["train/n00000000/pipe.JPEG"].problem == "not a regular file (fifo)"
    assert samples["train/n00000000/sock.JPEG"].problem == "not a regular file (socket)"
    (folder / "dev.JPEG").symlink_to("/dev/null")  # a symlink to a device
    samples = _only(open_source(tmp_path))
    assert samples["train/n00000000/dev.JPEG"].problem == "not a regular file (character device)"


def test_hidden_entries_of_any_kind_are_ignored(tmp_path):
    make_imagefolder(tmp_path, classes=1, train=1, val=1)
    folder = tmp_path / "train" / "n00000000"
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".gone.JPEG").symlink_to("/nowhere")
    (tmp_path / "train" / ".cache").mkdir()  # a hidden folder is not a class
    source = open_source(tmp_path)
    assert [c.wnid for c in source.classes] == ["n00000000"]
    assert list(_only(source)) == ["train/n00000000/n00000000_0.JPEG"]


def test_class_folder_with_only_problems_is_not_a_scan_error(tmp_path):
    make_imagefolder(tmp_path, classes=2, train=1, val=1)
    folder = tmp_path / "val" / "n00000001"
    (folder / "n00000001_0.JPEG").unlink()
    (folder / "gone.JPEG").symlink_to("/nowhere/gone.JPEG")
    samples = _only(open_source(tmp_path), "val")
    assert samples["val/n00000001/gone.JPEG"].problem == "broken symlink -> /nowhere/gone.JPEG"


def test_directory_in_a_flat_val_folder_is_a_sample_with_its_problem(tmp_path):
    _train(tmp_path)
    _flat_val(tmp_path, [1, 2])
    (tmp_path / "val" / "ILSVRC2012_val_00000003.JPEG").mkdir()
    rows = [f"ILSVRC2012_val_{i:08d},{WNIDS[i - 1]} 1 2 3 4" for i in (1, 2, 3)]
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows))
    val = open_source(tmp_path).splits["val"]
    assert [(s.relpath, s.label, s.problem) for s in val] == [
        ("val/ILSVRC2012_val_00000001.JPEG", 0, None),
        ("val/ILSVRC2012_val_00000002.JPEG", 1, None),
        ("val/ILSVRC2012_val_00000003.JPEG", 2, "a directory, not a file"),
    ]


def test_display_name_escapes_undecodable_bytes_and_controls():
    assert display_name("n01440764_10026.JPEG") == "n01440764_10026.JPEG"
    assert display_name(os.fsdecode(b"caf\xe9.jpg")) == "caf\\xe9.jpg"
    assert display_name(b"caf\xe9.jpg") == "caf\\xe9.jpg"
    assert display_name("café.jpg") == "café.jpg"  # valid UTF-8 stays as it is
    assert display_name("a\nb\x85.jpg") == "a\\x0ab\\x85.jpg"
    assert display_name("\ud800.jpg") == "\\ud800.jpg"  # a surrogate no listing makes
    # every character that is not printable, not only C0/C1: a line separator split a
    # report's line (str.splitlines), a bidi override showed the name reversed
    assert display_name("a\u2028b\u2029c.jpg") == "a\\u2028b\\u2029c.jpg"
    assert display_name("gnp.\u202eexe.jpg") == "gnp.\\u202eexe.jpg"
    assert display_name("x\U000e0001 y.jpg") == "x\\U000e0001 y.jpg"  # a space is printable


def _bytes_file(folder, name: bytes, data: bytes):
    with open(os.path.join(os.fsencode(folder), name), "wb") as stream:
        stream.write(data)


def test_non_utf8_name_keeps_its_path_and_reads_escaped(tmp_path):
    make_imagefolder(tmp_path, classes=1, train=1, val=1)
    _bytes_file(tmp_path / "train" / "n00000000", b"caf\xe9.jpg", jpeg(32, 32, 7))
    sample = _only(open_source(tmp_path))["train/n00000000/caf\\xe9.jpg"]
    assert sample.problem is None
    assert os.fsencode(sample.path).endswith(b"/train/n00000000/caf\xe9.jpg")
    assert sample.path.read_bytes() == jpeg(32, 32, 7)  # the real path opens
    json.dumps(sample.relpath, ensure_ascii=False).encode("utf-8")  # no lone surrogate


def test_non_utf8_names_in_a_flat_val_folder(tmp_path):
    _train(tmp_path)
    _flat_val(tmp_path, [1])
    _bytes_file(tmp_path / "val", b"caf\xe9.JPEG", jpeg(32, 32))
    csv = f"ImageId,PredictionString\nILSVRC2012_val_00000001,{WNIDS[0]} 1 2 3 4\n"
    (tmp_path / "LOC_val_solution.csv").write_text(csv)
    with pytest.raises(SourceError) as caught:
        open_source(tmp_path)
    message = str(caught.value)
    assert message.endswith("LOC_val_solution.csv: no label for caf\\xe9.JPEG")
    message.encode("utf-8")  # printable: no lone surrogate
    # The ImageId is the name as reports show it.
    (tmp_path / "LOC_val_solution.csv").write_text(csv + f"caf\\xe9,{WNIDS[2]} 1 2 3 4\n")
    samples = _only(open_source(tmp_path), "val")
    assert samples["val/caf\\xe9.JPEG"].label == 2


def test_non_utf8_control_character_name(tmp_path):
    make_imagefolder(tmp_path, classes=1, train=1, val=1)
    (tmp_path / "train" / "n00000000" / "a\nb.JPEG").write_bytes(jpeg(32, 32))
    assert "train/n00000000/a\\x0ab.JPEG" in _only(open_source(tmp_path))


def test_a_name_with_a_line_separator_or_bidi_override_reads_escaped(tmp_path):
    make_imagefolder(tmp_path, classes=1, train=1, val=1)
    folder = tmp_path / "train" / "n00000000"
    (folder / "a\u2028b.JPEG").write_bytes(jpeg(32, 32))
    (folder / "gnp\u202e.JPEG").write_bytes(jpeg(32, 32))
    relpaths = list(_only(open_source(tmp_path)))
    assert "train/n00000000/a\\u2028b.JPEG" in relpaths
    assert "train/n00000000/gnp\\u202e.JPEG" in relpaths
    assert all(relpath.isprintable() and len(relpath.splitlines()) == 1 for relpath in relpaths)


def test_empty_split_is_one_clear_error(tmp_path):
    make_imagefolder(tmp_path, classes=1, train=1, val=1)
    for entry in (tmp_path / "val" / "n00000000").iterdir():
        entry.unlink()
    (tmp_path / "val" / "n00000000").rmdir()
    (tmp_path / "val" / ".DS_Store").write_bytes(b"junk")  # hidden: not an entry
    with pytest.raises(SourceError, match=rf"^{re.escape(str(tmp_path / 'val'))}: empty split"):
        open_source(tmp_path)
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n")
    (tmp_path / "val" / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n")
    with pytest.raises(SourceError, match="val: empty split"):  # metadata is not a sample
        open_source(tmp_path)


def test_train_without_class_folders_is_an_empty_split_or_says_where_images_go(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    train = re.escape(str(tmp_path / "train"))
    with pytest.raises(SourceError, match=rf"^{train}: empty split \(no class folders\)$"):
        open_source(tmp_path)
    (tmp_path / "train" / "stray.JPEG").write_bytes(jpeg(32, 32))  # not an empty split
    with pytest.raises(SourceError, match=rf"^{train}: images but no class folders; put each"):
        open_source(tmp_path)


def test_class_folder_with_only_hidden_files_is_empty(tmp_path):
    make_imagefolder(tmp_path, classes=2, train=1, val=1)
    (tmp_path / "train" / "n00000001" / "n00000001_0.JPEG").unlink()
    (tmp_path / "train" / "n00000001" / "._n00000001_0.JPEG").write_bytes(b"resource fork")
    folder = re.escape(str(tmp_path / "train" / "n00000001"))
    with pytest.raises(SourceError, match=rf"^{folder}: empty class folder$"):
        open_source(tmp_path)


def test_unlistable_folder_is_one_error_naming_it(tmp_path, monkeypatch):
    make_imagefolder(tmp_path, classes=2, train=1, val=1)
    scandir = os.scandir

    def denied(path):
        if os.fspath(path).endswith(("n00000001", "val")):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(sources.os, "scandir", denied)
    denial = os.strerror(errno.EACCES)
    val = re.escape(str(tmp_path / "val"))
    with pytest.raises(SourceError, match=rf"^{val}: cannot list \({denial}\)$"):
        open_source(tmp_path)
    folder = re.escape(str(tmp_path / "train" / "n00000001"))
    with pytest.raises(SourceError, match=rf"^{folder}: cannot list \({denial}\)$"):
        open_source(tmp_path, splits=("train",))


def _kaggle(tmp_path, text: str | bytes):
    _train(tmp_path)
    _flat_val(tmp_path, [1, 2])
    path = tmp_path / "LOC_val_solution.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return re.escape(str(path))


GOOD_ROW = f"ILSVRC2012_val_00000001,{WNIDS[0]} 1 2 3 4\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "ImageId,PredictionString\n" + GOOD_ROW + "ILSVRC2012_val_00000002\n",
            r":3: malformed row \(1 columns, expected 2: ImageId,PredictionString\)$",
        ),
        (
            "ImageId,PredictionString\nILSVRC2012_val_00000001,  \n",
            r":2: empty PredictionString for 'ILSVRC2012_val_00000001'$",
        ),
        (
            b"ImageId,PredictionString\n" + GOOD_ROW.encode() + b"caf\xe9,n0 1 2 3 4\n",
            r":3: not valid UTF-8 text$",
        ),
        ("ImageId;PredictionString\n" + GOOD_ROW, r":1: header 'ImageId;PredictionString', "),
        ("", r":1: header '', expected 'ImageId,PredictionString'$"),
        (
            "ImageId,PredictionString\n" + GOOD_ROW + 'x,"n0\n',
            r":3: malformed CSV \(unexpected end of data\)$",
        ),
    ],
    ids=["few-columns", "empty-prediction", "not-utf8", "wrong-header", "empty", "open-quote"],
)
def test_malformed_kaggle_csv_names_file_and_line(tmp_path, text, expected):
    path = _kaggle(tmp_path, text)
    with pytest.raises(SourceError, match=f"^{path}{expected}"):
        open_source(tmp_path)


def test_kaggle_csv_with_byte_order_mark_and_blank_lines(tmp_path):
    rows = "ImageId,PredictionString\n\n" + GOOD_ROW + f"ILSVRC2012_val_00000002,{WNIDS[2]}\n"
    _kaggle(tmp_path, codecs.BOM_UTF8 + rows.encode())
    assert [s.label for s in open_source(tmp_path).splits["val"]] == [0, 2]


def _ground_truth(tmp_path, text: str | bytes, images: int = 3):
    _train(tmp_path)
    data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    _meta_mat(data / "meta.mat", WNIDS)
    _flat_val(tmp_path, list(range(images)))
    path = data / "ILSVRC2012_validation_ground_truth.txt"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return re.escape(str(path))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1\n\nthree\n2\n", r":3: unknown label 'three' \(an ILSVRC2012_ID is 1..3\)$"),
        ("1\n0\n2\n", r":2: unknown label '0' \(an ILSVRC2012_ID is 1..3\)$"),
        ("1\n4\n2\n", r":2: unknown label '4' "),
        (b"1\n2\n3\xff\n", r":3: not valid UTF-8 text$"),
        ("1\n2\n", r": 2 labels for 3 entries in val/$"),
    ],
    ids=["not-integer", "zero", "too-large", "not-utf8", "count"],
)
def test_malformed_ground_truth_names_file_and_line(tmp_path, text, expected):
    path = _ground_truth(tmp_path, text)
    with pytest.raises(SourceError, match=f"^{path}{expected}"):
        open_source(tmp_path)


def test_ground_truth_counts_problem_entries_in_file_name_order(tmp_path):
    _ground_truth(tmp_path, "3\n1\n2\n", images=2)
    (tmp_path / "val" / "ILSVRC2012_val_00000003.JPEG").symlink_to("/nowhere")
    val = open_source(tmp_path).splits["val"]
    assert [(s.label, s.problem) for s in val] == [
        (2, None),
        (0, None),
        (1, "broken symlink -> /nowhere"),
    ]


# a MATLAB v7.3 file's header (an HDF5 file follows): 116 bytes of text, the subsystem
# offset, version 0x0200, the endian mark
MAT_73 = b"MATLAB 7.3 MAT-file".ljust(116) + bytes(8) + b"\x00\x02IM" + bytes(400)


@pytest.mark.parametrize("data", [b"not a MATLAB file at all" * 10, MAT_73])
def test_meta_mat_that_is_not_one_is_one_error(tmp_path, data):
    _ground_truth(tmp_path, "1\n2\n3\n")
    meta = tmp_path / "ILSVRC2012_devkit_t12" / "data" / "meta.mat"
    meta.write_bytes(data)
    with pytest.raises(SourceError, match=rf"^{re.escape(str(meta))}: not the devkit's meta.mat"):
        open_source(tmp_path)


def test_names_file_separated_by_tabs_or_spaces_or_without_names(tmp_path):
    make_imagefolder(tmp_path, classes=3, train=1, val=1)
    wnids = [c.wnid for c in open_source(tmp_path).classes]
    lines = [f"{wnids[0]}\ttench, Tinca tinca", f"{wnids[1]}  \t goldfish ", wnids[2]]
    (tmp_path / "LOC_synset_mapping.txt").write_text("\n".join(lines) + "\n")
    names = [c.name for c in open_source(tmp_path).classes]
    assert names == ["tench, Tinca tinca", "goldfish", wnids[2]]


def test_synset_mapping_not_utf8_names_file_and_line(tmp_path):
    make_imagefolder(tmp_path, classes=2, train=1, val=1)
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_bytes(b"n00000000 tench\nn00000001 caf\xe9\n")
    with pytest.raises(SourceError, match=rf"^{re.escape(str(mapping))}:2: not valid UTF-8 text$"):
        open_source(tmp_path)


def test_flat_val_without_labels_or_classes_is_one_error(tmp_path):
    _train(tmp_path)
    (tmp_path / "val" / "n77777777").mkdir(parents=True)  # not a class: val/ reads flat
    (tmp_path / "val" / "n77777777" / "x.JPEG").write_bytes(jpeg(32, 32))
    val = re.escape(str(tmp_path / "val"))
    with pytest.raises(SourceError, match=rf"^{val}: no class folder of train/ in it, and no "):
        open_source(tmp_path)


def test_non_utf8_folder_names_read_escaped_in_classes_and_errors(tmp_path):
    make_imagefolder(tmp_path, classes=1, train=1, val=1)
    bad = os.path.join(os.fsencode(tmp_path / "train"), b"n\xff")
    os.mkdir(bad)
    with pytest.raises(SourceError) as caught:
        open_source(tmp_path)
    assert str(caught.value) == f"{tmp_path}/train/n\\xff: empty class folder"
    _bytes_file(bad.decode("utf-8", "surrogateescape"), b"a.JPEG", jpeg(32, 32))
    source = open_source(tmp_path)
    assert [c.wnid for c in source.classes] == ["n00000000", "n\\xff"]
    assert "train/n\\xff/a.JPEG" in _only(source)


def test_class_folders_whose_names_read_alike_stop_the_scan(tmp_path):
    # `n1<newline>` and `n1\x0a` (a literal backslash) both read `n1\x0a`: they were
    # one class index, both folders' images labelled as the second's.
    _train(tmp_path, ["n1\n", "n1\\x0a"])
    (tmp_path / "val" / "n1\n").mkdir(parents=True)
    with pytest.raises(SourceError, match=r"train: two class folders read 'n1\\x0a'"):
        open_source(tmp_path)


def test_a_broken_symlink_among_the_class_folders_stops_the_scan(tmp_path):
    # Dropping it would shift the index of every later class: a silent relabelling.
    root = make_imagefolder(tmp_path / "raw", classes=2, train=1, val=1)
    (root / "train" / "n00000005").symlink_to(tmp_path / "unmounted" / "n00000005")
    with pytest.raises(SourceError, match=r"train/n00000005: broken symlink -> .*class folder"):
        open_source(root)


@pytest.mark.parametrize("target", ["unmounted/n00000001", "loop"])
def test_a_val_class_folder_that_is_a_broken_link_stops_the_scan(tmp_path, target):
    # Dropped, that class's validation images would be missing from every report.
    root = make_imagefolder(tmp_path / "raw", classes=2, train=1, val=1)
    shutil.rmtree(root / "val" / "n00000001")
    link = root / "val" / "n00000001"
    link.symlink_to(link if target == "loop" else tmp_path / target)
    with pytest.raises(SourceError, match=r"val/n00000001: .*\(a class folder\?\)$"):
        open_source(root)


def test_a_val_class_left_in_its_archive_stops_the_scan(tmp_path):
    root = make_imagefolder(tmp_path / "raw", classes=2, train=1, val=1)
    shutil.rmtree(root / "val" / "n00000001")
    (root / "val" / "n00000001.tar").write_bytes(b"an archive")
    with pytest.raises(SourceError, match=r"val/n00000001.tar: an archive beside the class"):
        open_source(root)


def test_the_val_tar_left_in_a_flat_val_folder_stops_the_scan_by_name(tmp_path):
    # Downloaded into val/ and extracted there: one entry more than the ground truth's
    # lines, which said only "3 labels for 4 entries".
    _ground_truth(tmp_path, "1\n2\n3\n")
    archive = tmp_path / "val" / "ILSVRC2012_img_val.tar"
    archive.write_bytes(b"an archive")
    shown = re.escape(str(archive))
    with pytest.raises(SourceError, match=rf"^{shown}: an archive among the images of a flat"):
        open_source(tmp_path)
    archive.unlink()
    assert [s.label for s in open_source(tmp_path).splits["val"]] == [0, 1, 2]


@pytest.mark.parametrize("name", ["n00000001.tar", "n00000002.TAR.GZ", "n00000003.zip"])
def test_a_class_left_in_its_archive_stops_the_scan(tmp_path, name):
    # ImageNet's training tar holds one tar per class: one not extracted was ignored as a
    # stray file, dropping its class and shifting the index of every later class.
    root = make_imagefolder(tmp_path / "raw", classes=2, train=1, val=1)
    (root / "train" / name).write_bytes(b"an archive")
    archive = re.escape(str(root / "train" / name))
    with pytest.raises(SourceError, match=rf"^{archive}: an archive beside the class folders"):
        open_source(root)
    (root / "train" / name).unlink()
    (root / "train" / "README.txt").write_text("not an archive: ignored, as documented")
    assert len(open_source(root).classes) == 2
