"""Dataset sources: where the raw images of each split are and which class each one is.

Layouts read (see docs/design.md, "Raw input"):
- ImageFolder: `ROOT/train/<wnid>/*`, `ROOT/val/<wnid>/*`;
- ILSVRC-2012 val as a flat `ROOT/val/` folder, labelled by Kaggle's
  `LOC_val_solution.csv`, or by `ILSVRC2012_validation_ground_truth.txt` (one
  ILSVRC2012_ID per image, in file-name order) with the devkit's `meta.mat` giving the
  ID -> wnid order.
Classes are the sorted wnid folders of `train/` (index 0..C-1); names come from a
`LOC_synset_mapping.txt` / `synset_words.txt` / `classes.txt` file when present.
Every regular, non-hidden file is a candidate image: its content decides later.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from alexnet.errors import AlexnetError

SPLITS = ("train", "val")
NAME_FILES = ("LOC_synset_mapping.txt", "synset_words.txt", "classes.txt")
KAGGLE_CSV = "LOC_val_solution.csv"
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
META_MAT = "meta.mat"


class SourceError(AlexnetError, ValueError):
    """A raw dataset that cannot be read as any supported layout; one line, naming the path."""


@dataclass(frozen=True)
class ClassInfo:
    index: int
    wnid: str
    name: str


@dataclass(frozen=True)
class Sample:
    path: Path  # absolute
    relpath: str  # relative to the dataset root, '/'-separated: names the image in reports
    label: int


@dataclass(frozen=True)
class Source:
    root: Path
    classes: list[ClassInfo]
    splits: dict[str, list[Sample]]


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _find(root: Path, name: str) -> Path | None:
    """A metadata file at the root, in `val/`, or in the devkit's `data/` folder."""
    for folder in (root, root / "val", root / "ILSVRC2012_devkit_t12" / "data"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_names(root: Path) -> dict[str, str]:
    """wnid -> human name from a synset mapping file (`n01440764 tench, Tinca tinca`)."""
    for filename in NAME_FILES:
        path = root / filename
        if path.is_file():
            names = {}
            for line in path.read_text(encoding="utf-8").splitlines():
                wnid, _, name = line.strip().partition(" ")
                if wnid:
                    names[wnid] = name.strip() or wnid
            return names
    return {}


def _split_dir(root: Path, split: str) -> Path:
    folder = root / split
    if not folder.is_dir():
        raise SourceError(f"{root}: no '{split}' split (expected the folder {folder})")
    return folder


def _image_folder(folder: Path, root: Path, index: dict[str, int]) -> list[Sample]:
    samples = []
    for class_dir in _dirs(folder):
        if class_dir.name not in index:
            raise SourceError(f"{class_dir}: class '{class_dir.name}' is not a training class")
        files = _files(class_dir)
        if not files:
            raise SourceError(f"{class_dir}: empty class folder")
        label = index[class_dir.name]
        samples += [Sample(f, f.relative_to(root).as_posix(), label) for f in files]
    return samples


def _kaggle_labels(csv_path: Path, index: dict[str, int]) -> dict[str, int]:
    """ImageId -> label from `LOC_val_solution.csv` (`ImageId,PredictionString`; the
    first token of the prediction string is the wnid)."""
    labels = {}
    with csv_path.open(newline="", encoding="utf-8") as stream:
        for line_no, row in enumerate(csv.DictReader(stream), start=2):
            try:
                wnid = row["PredictionString"].split()[0]
                image_id = row["ImageId"]
            except (KeyError, IndexError, AttributeError):
                raise SourceError(f"{csv_path}:{line_no}: malformed row") from None
            if wnid not in index:
                raise SourceError(f"{csv_path}:{line_no}: unknown label '{wnid}' for {image_id}")
            labels[image_id] = index[wnid]
    return labels


def read_devkit_order(meta_path: Path) -> list[str]:
    """The wnids of ILSVRC2012_ID 1..1000 from the devkit's `meta.mat` (leaf synsets)."""
    from scipy.io import loadmat  # only this layout needs scipy

    synsets = loadmat(str(meta_path), squeeze_me=True)["synsets"]
    leaves = [s for s in synsets if int(s["num_children"]) == 0]
    leaves.sort(key=lambda s: int(s["ILSVRC2012_ID"]))
    return [str(s["WNID"]) for s in leaves]


def _ground_truth_labels(gt_path: Path, root: Path, files: list[Path], index: dict[str, int]):
    meta = _find(root, META_MAT)
    if meta is None:
        raise SourceError(f"{gt_path}: needs the devkit's {META_MAT} for the class order")
    order = read_devkit_order(meta)
    ids = [line.strip() for line in gt_path.read_text().splitlines() if line.strip()]
    if len(ids) != len(files):
        raise SourceError(f"{gt_path}: {len(ids)} labels for {len(files)} files in val/")
    labels = {}
    for line_no, (path, raw_id) in enumerate(zip(files, ids, strict=True), start=1):
        try:
            wnid = order[int(raw_id) - 1]
        except (ValueError, IndexError):
            raise SourceError(f"{gt_path}:{line_no}: unknown label '{raw_id}'") from None
        if wnid not in index:
            raise SourceError(f"{gt_path}:{line_no}: unknown label '{wnid}' for {path.name}")
        labels[path.stem] = index[wnid]
    return labels


def _flat_val(folder: Path, root: Path, index: dict[str, int]) -> list[Sample]:
    files = _files(folder)
    files = [f for f in files if f.name not in (KAGGLE_CSV, GROUND_TRUTH, META_MAT)]
    if (csv_path := _find(root, KAGGLE_CSV)) is not None:
        labels = _kaggle_labels(csv_path, index)
        where = csv_path
    elif (gt_path := _find(root, GROUND_TRUTH)) is not None:
        labels = _ground_truth_labels(gt_path, root, files, index)
        where = gt_path
    else:
        raise SourceError(f"{folder}: flat val folder without {KAGGLE_CSV} or {GROUND_TRUTH}")
    samples = []
    for path in files:
        stem = path.name.split(".")[0]
        if stem not in labels:
            raise SourceError(f"{where}: no label for {path.name}")
        samples.append(Sample(path, path.relative_to(root).as_posix(), labels[stem]))
    return samples


def open_source(root: str | Path, splits: tuple[str, ...] = SPLITS) -> Source:
    """Scan a raw dataset: classes from `train/`, samples of each split in sorted order."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise SourceError(f"{root}: no such dataset folder")
    wnids = [d.name for d in _dirs(_split_dir(root, "train"))]
    if not wnids:
        raise SourceError(f"{root / 'train'}: no class folders")
    names = read_names(root)
    classes = [ClassInfo(i, w, names.get(w, w)) for i, w in enumerate(wnids)]
    index = {c.wnid: c.index for c in classes}
    result = {}
    for split in splits:
        folder = _split_dir(root, split)
        flat = not _dirs(folder) and split != "train"
        result[split] = (_flat_val if flat else _image_folder)(folder, root, index)
    return Source(root, classes, result)
