"""Dataset sources: where the raw images of each split are and which class each one is.

Layouts read (see docs/design.md, "Raw input"):
- ImageFolder: `ROOT/train/<wnid>/*`, `ROOT/val/<wnid>/*`;
- ILSVRC-2012 val as a flat `ROOT/val/` folder, labelled by Kaggle's
  `LOC_val_solution.csv`, or by `ILSVRC2012_validation_ground_truth.txt` (one
  ILSVRC2012_ID per image, in file-name order) with the devkit's `meta.mat` giving the
  ID -> wnid order. `val/` is flat when none of its folders is named after a class;
- Kaggle's download as it unpacks: the images in `ILSVRC/Data/CLS-LOC/{train,val}`, the
  label and name files three levels up. ROOT may be either folder.
Classes are the sorted wnid folders of `train/` (index 0..C-1); names come from a
`LOC_synset_mapping.txt` / `synset_words.txt` / `classes.txt` file when present.

A split is listed one class folder at a time, as its samples are asked for: opening a
source lists the top folders and counts each class folder's entries (which also finds an
empty or unlistable one before any work starts), and never holds ImageNet's 1.28M
samples at once. A flat `val/` is listed whole when opened (its labels come from one
file). Every entry of a class folder (or of a flat `val/`) is accounted for, in one sorted
pass that stats each entry at most once:
- a regular file, or a symlink to one, is a candidate image: its content decides later;
- anything else (a broken symlink, a directory, a FIFO, a socket, a device) becomes a
  `Sample` whose `problem` says why it cannot be an image; `prepare` reports it as
  skipped without opening it (opening a FIFO would block);
- hidden entries (names starting with '.': `.DS_Store`, `._x.JPEG`, `.ipynb_checkpoints`)
  are ignored, as are hidden class folders and non-folder entries beside the class
  folders of `train/` or an ImageFolder `val/`, but for an archive there (a class
  not extracted) or in a flat `val/`, which is an error;
- in a flat `val/`, entries that are neither image files (`IMAGE_SUFFIXES`) nor
  `ILSVRC2012_val_*` nor labelled by `LOC_val_solution.csv` are ignored (`Thumbs.db`,
  `README.txt`, `__MACOSX/`): no label is theirs. An image without a label, or a
  labelled image not there (a partly extracted tar), is an error.
A name that is not valid UTF-8, or holds a character that is not printable, keeps its
real path in `Sample.path` (so it opens) and reads with escapes in `Sample.relpath`
(see `display_name`).
A dataset that cannot be read as a layout (a missing or empty split, an empty class
folder, an unlistable folder, a malformed label or name file) is one `SourceError`
line naming the path, and the line where there is one.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

from alexnet.errors import AlexnetError
from alexnet.shards import SPLITS

NAME_FILES = ("LOC_synset_mapping.txt", "synset_words.txt", "classes.txt")
KAGGLE_CSV = "LOC_val_solution.csv"
KAGGLE_COLUMNS = ("ImageId", "PredictionString")
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
META_MAT = "meta.mat"
# The names of ImageNet's validation images: a flat val/ holds them whatever else is there.
VAL_PREFIX = "ILSVRC2012_val_"
# Where Kaggle's ImageNet download keeps the images, below its LOC_* label and name files.
KAGGLE_DATA = ("ILSVRC", "Data", "CLS-LOC")
DIRECTORY = "a directory, not a file"

_FILE_TYPES = (
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


class SourceError(AlexnetError, ValueError):
    """A raw dataset that cannot be read as any supported layout; one line, naming the path."""


@dataclass(frozen=True)
class ClassInfo:
    index: int
    wnid: str
    name: str


@dataclass(frozen=True)
class Sample:
    path: Path  # absolute; the real name, which may not be valid UTF-8
    relpath: str  # relative to the dataset root, '/'-separated, printable: names it in reports
    label: int
    problem: str | None = None  # why this entry cannot be an image (decided at scan time)


@dataclass(frozen=True)
class ClassFolder:
    """One class folder of a split, listed when its samples are asked for."""

    path: Path
    prefix: str  # of its samples' relpaths: "<split>/<wnid>/"
    label: int
    size: int  # its entries when the source was opened

    def samples(self) -> list[Sample]:
        found = _samples(self.path, self.prefix, self.label)
        if not found:  # emptied since the source was opened
            raise SourceError(f"{display_name(self.path)}: empty class folder")
        return found


@dataclass(frozen=True)
class Listed:
    """A folder whose samples were made when the source was opened (a flat `val/`)."""

    prefix: str
    listed: tuple[Sample, ...]

    @property
    def size(self) -> int:
        return len(self.listed)

    def samples(self) -> list[Sample]:
        return list(self.listed)


@dataclass(frozen=True)
class Split:
    """A split's samples in sorted order, folder by folder; iterating lists each class
    folder anew, so only one folder's samples are held at a time."""

    folders: tuple[ClassFolder | Listed, ...]

    def __iter__(self) -> Iterator[Sample]:
        for folder in self.folders:
            yield from folder.samples()

    def __len__(self) -> int:
        """The number of entries when the source was opened (for progress bars)."""
        return sum(folder.size for folder in self.folders)


@dataclass(frozen=True)
class Source:
    root: Path
    classes: list[ClassInfo]
    splits: dict[str, Split]


def display_name(path: str | bytes | os.PathLike) -> str:
    """A file name or path as reports, JSON and keys show it: valid, printable text.

    On POSIX, `os` hands a name that is not valid UTF-8 over with its odd bytes as lone
    surrogates (PEP 383), which `.encode()` and JSON output reject; here they become
    `\\xNN` escapes (Latin-1 `café` reads `caf\\xe9`), as does every character that is
    not printable (controls, line and paragraph separators, bidi overrides): `\\xNN`,
    `\\uNNNN` or `\\UNNNNNNNN`, as Python's `backslashreplace` writes them. Only for
    showing: the file opens by its real path. (A name holding a literal `\\xNN` reads
    the same as the escaped one.)"""
    name = os.fsdecode(path)
    if name.isprintable():  # nearly every name: nothing to escape
        return name
    try:
        raw = name.encode("utf-8", "surrogateescape")  # the bytes the OS gave
    except UnicodeEncodeError:  # a lone surrogate no POSIX listing makes: show its code
        raw = name.encode("utf-8", "backslashreplace")
    text = raw.decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() else _escaped(ch) for ch in text)


def _escaped(ch: str) -> str:
    # Not only C0/C1 controls: U+2028 splits a report's line (str.splitlines), U+202E
    # shows the rest of a line reversed.
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _strerror(error: OSError) -> str:
    return error.strerror or str(error)


def _scan(folder: str | os.PathLike) -> list[os.DirEntry]:
    """The non-hidden entries of a folder, sorted by name, in one listing."""
    try:
        with os.scandir(folder) as listing:
            entries = [e for e in listing if not e.name.startswith(".")]
    except OSError as error:
        raise SourceError(f"{display_name(folder)}: cannot list ({_strerror(error)})") from None
    return sorted(entries, key=attrgetter("name"))


def _is_dir(entry: os.DirEntry) -> bool:
    """A folder, or a symlink to one (a symlinked class folder is read as a class)."""
    try:
        return entry.is_dir()
    except OSError:  # a symlink loop, an unreachable target: not a folder
        return False


def _broken_link(entry: os.DirEntry, error: OSError) -> str | None:
    """The problem of a symlink whose target cannot be reached; None if not a symlink."""
    try:
        if not entry.is_symlink():
            return None
        target = display_name(os.readlink(entry.path))
    except OSError:  # gone meanwhile
        return None
    if isinstance(error, FileNotFoundError):
        return f"broken symlink -> {target}"
    return f"broken symlink -> {target} ({_strerror(error)})"  # a loop, a denied target


def _problem(entry: os.DirEntry) -> str | None:
    """Why a folder entry cannot be an image, or None for a regular file or a symlink to
    one. At most one stat: the listing already tells a plain file's type, and DirEntry
    caches the stat it makes."""
    try:
        if entry.is_file(follow_symlinks=False):
            return None
        mode = entry.stat().st_mode  # follows a symlink
    except OSError as error:
        return _broken_link(entry, error) or f"unreadable: {_strerror(error)}"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return DIRECTORY
    kind = next((name for test, name in _FILE_TYPES if test(mode)), None)
    return f"not a regular file ({kind or f'type {stat.S_IFMT(mode):#o}'})"


def _read_text(path: Path) -> str:
    """A metadata file's UTF-8 text (a byte-order mark dropped); a SourceError naming the
    file, and the line of the first bad byte, if it cannot be read or is not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SourceError(f"{display_name(path)}: cannot read ({_strerror(error)})") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise SourceError(f"{display_name(path)}:{line}: not valid UTF-8 text") from None


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines of a metadata file."""
    lines = enumerate(_read_text(path).split("\n"), start=1)
    return [(number, text.strip()) for number, text in lines if text.strip()]


def _find(root: Path, name: str) -> Path | None:
    """A metadata file at the root, in `val/`, in the devkit's `data/` folder or, where
    the root is Kaggle's image folder, at the top of Kaggle's download."""
    folders = [root, root / "val", root / "ILSVRC2012_devkit_t12" / "data"]
    if root.parts[-len(KAGGLE_DATA) :] == KAGGLE_DATA:
        folders.append(root.parents[len(KAGGLE_DATA) - 1])
    return next((folder / name for folder in folders if (folder / name).is_file()), None)


def read_names(root: Path) -> dict[str, str]:
    """wnid -> human name from a synset mapping file (`n01440764 tench, Tinca tinca`;
    the wnid ends at its first whitespace: hand-made files use spaces or tabs)."""
    for filename in NAME_FILES:
        path = _find(root, filename)
        if path is not None:
            names = {}
            for _, line in _lines(path):
                wnid, *name = line.split(maxsplit=1)
                names[wnid] = name[0] if name else wnid
            return names
    return {}


def _split_dir(root: Path, split: str) -> Path:
    folder = root / split
    if not folder.is_dir():
        shown = display_name(root)
        raise SourceError(f"{shown}: no '{split}' split (expected the folder {shown}/{split})")
    return folder


def _count(folder: str | os.PathLike) -> int:
    """The non-hidden entries of a folder, counted without keeping or stating them."""
    try:
        with os.scandir(folder) as listing:
            return sum(not e.name.startswith(".") for e in listing)
    except OSError as error:
        raise SourceError(f"{display_name(folder)}: cannot list ({_strerror(error)})") from None


def _samples(folder: Path, prefix: str, label: int) -> list[Sample]:
    """Every non-hidden entry of a class folder, its problem (if any) decided now."""
    # `folder / name`: parsing only the name is 2-3x faster than `Path(entry.path)`.
    return [
        Sample(folder / e.name, prefix + display_name(e.name), label, _problem(e))
        for e in _scan(folder)
    ]


def _image_folder(split: str, class_dirs: list[os.DirEntry], index: dict[str, int]) -> Split:
    folders = []
    for class_dir in class_dirs:
        wnid = display_name(class_dir.name)
        if wnid not in index:
            shown = display_name(class_dir.path)
            raise SourceError(f"{shown}: class '{wnid}' is not a training class")
        size = _count(class_dir.path)
        if not size:
            raise SourceError(f"{display_name(class_dir.path)}: empty class folder")
        folders.append(ClassFolder(Path(class_dir.path), f"{split}/{wnid}/", index[wnid], size))
    return Split(tuple(folders))


def _kaggle_labels(csv_path: Path, index: dict[str, int]) -> dict[str, int]:
    """ImageId -> label from `LOC_val_solution.csv` (`ImageId,PredictionString`; the
    first token of the prediction string is the wnid)."""
    shown = display_name(csv_path)
    reader = csv.reader(io.StringIO(_read_text(csv_path), newline=""), strict=True)
    labels = {}
    try:
        header = [column.strip() for column in next(reader, [])]
        if not set(KAGGLE_COLUMNS) <= set(header):
            got = ",".join(header)[:80]
            raise SourceError(f"{shown}:1: header '{got}', expected '{','.join(KAGGLE_COLUMNS)}'")
        id_column, wnid_column = (header.index(column) for column in KAGGLE_COLUMNS)
        for row in reader:
            line_no = reader.line_num
            if not row:  # a blank line
                continue
            if len(row) <= max(id_column, wnid_column):
                raise SourceError(
                    f"{shown}:{line_no}: malformed row ({len(row)} columns, expected "
                    f"{len(header)}: {','.join(header)})"
                )
            image_id, prediction = row[id_column].strip(), row[wnid_column].split()
            if not prediction:
                raise SourceError(f"{shown}:{line_no}: empty PredictionString for '{image_id}'")
            if prediction[0] not in index:
                raise SourceError(
                    f"{shown}:{line_no}: unknown label '{prediction[0]}' for {image_id}"
                )
            labels[image_id] = index[prediction[0]]
    except csv.Error as error:  # a NUL byte, an unclosed quote
        raise SourceError(f"{shown}:{reader.line_num}: malformed CSV ({error})") from None
    return labels


def read_devkit_order(meta_path: Path) -> list[str]:
    """The wnids of ILSVRC2012_ID 1..1000 from the devkit's `meta.mat` (leaf synsets)."""
    from scipy.io import loadmat  # only this layout needs scipy
    from scipy.io.matlab import MatReadError

    try:
        synsets = loadmat(str(meta_path), squeeze_me=True)["synsets"]
        leaves = [s for s in synsets if int(s["num_children"]) == 0]
        leaves.sort(key=lambda s: int(s["ILSVRC2012_ID"]))
        return [str(s["WNID"]) for s in leaves]
    except (
        MatReadError,
        NotImplementedError,  # saved as MATLAB v7.3 (HDF5), which loadmat does not read
        OSError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
    ) as error:
        why = (str(error).splitlines() or [""])[0] or type(error).__name__
        raise SourceError(
            f"{display_name(meta_path)}: not the devkit's {META_MAT} ({why})"
        ) from None


def _ground_truth_labels(
    gt_path: Path, root: Path, names: list[str], index: dict[str, int]
) -> list[int]:
    """The label of each of `names` (val/'s entries in sorted order), from its line."""
    shown = display_name(gt_path)
    meta = _find(root, META_MAT)
    if meta is None:
        raise SourceError(f"{shown}: needs the devkit's {META_MAT} for the class order")
    order = read_devkit_order(meta)
    lines = _lines(gt_path)
    if len(lines) != len(names):
        raise SourceError(f"{shown}: {len(lines)} labels for {len(names)} entries in val/")
    labels = []
    for (line_no, raw_id), name in zip(lines, names, strict=True):
        if not raw_id.isdecimal() or not 1 <= int(raw_id) <= len(order):
            raise SourceError(
                f"{shown}:{line_no}: unknown label '{raw_id[:40]}' "
                f"(an ILSVRC2012_ID is 1..{len(order)})"
            )
        wnid = order[int(raw_id) - 1]
        if wnid not in index:
            raise SourceError(f"{shown}:{line_no}: unknown label '{wnid}' for {name}")
        labels.append(index[wnid])
    return labels


def _flat_val(folder: Path, entries: list[os.DirEntry], root: Path, index: dict[str, int]) -> Split:
    metadata = (KAGGLE_CSV, GROUND_TRUTH, META_MAT, *NAME_FILES)
    entries = [e for e in entries if e.name not in metadata]
    shown = display_name(folder)
    if not entries:
        raise SourceError(f"{shown}: empty split (no class folders, no files)")
    _check_archives(entries, "among the images of a flat val folder")
    csv_path, gt_path = _find(root, KAGGLE_CSV), _find(root, GROUND_TRUTH)
    if csv_path is None and gt_path is None:
        raise SourceError(
            f"{shown}: no class folder of train/ in it, and no {KAGGLE_CSV} or "
            f"{GROUND_TRUTH} to label it as a flat val folder"
        )
    by_id = _kaggle_labels(csv_path, index) if csv_path is not None else {}
    named = [(e, name) for e in entries if _val_image(name := display_name(e.name), by_id)]
    if not named:
        raise SourceError(f"{shown}: empty split (no images, nor any {VAL_PREFIX}* file)")
    entries, names = (list(column) for column in zip(*named, strict=True))
    if csv_path is not None:
        labels = _kaggle_val_labels(csv_path, by_id, names)
    else:
        labels = _ground_truth_labels(gt_path, root, names, index)
    prefix = f"{folder.name}/"
    samples = (
        Sample(folder / e.name, prefix + name, label, _problem(e))
        for e, name, label in zip(entries, names, labels, strict=True)
    )
    return Split((Listed(prefix, tuple(samples)),))


def _image_id(name: str) -> str:
    """A flat val/ entry's ImageId in LOC_val_solution.csv: its name up to the first dot,
    as reports show it."""
    return name.split(".")[0]


def _val_image(name: str, by_id: dict[str, int]) -> bool:
    """Whether a flat val/ entry is one of its images: an ImageNet validation file, an
    image file, or one LOC_val_solution.csv labels. Anything else beside them (Thumbs.db,
    desktop.ini, README.txt, __MACOSX/) is ignored, as beside an ImageFolder's classes:
    it would have no label, and stop the run."""
    return (
        name.startswith(VAL_PREFIX)
        or name.lower().endswith(IMAGE_SUFFIXES)
        or _image_id(name) in by_id
    )


def _kaggle_val_labels(csv_path: Path, by_id: dict[str, int], names: list[str]) -> list[int]:
    """The label of each of `names` (val/'s images); every image must have one, and every
    labelled image be there: one missing (a partly extracted val tar) would leave the
    error rates taken on a subset."""
    shown = display_name(csv_path)
    labels = []
    for name in names:
        if (label := by_id.get(_image_id(name))) is None:
            raise SourceError(f"{shown}: no label for {name}")
        labels.append(label)
    if missing := sorted(by_id.keys() - {_image_id(name) for name in names}):
        raise SourceError(
            f"{shown}: {len(missing)} of {len(by_id)} labelled images not in val/ "
            f"(the first: {missing[0]})"
        )
    return labels


def _check_class_links(entries: list[os.DirEntry]) -> None:
    # A class folder that is a broken symlink (an unmounted disk) would drop that class
    # and shift the index of every class after it: the class list must not depend on it.
    for entry in entries:
        if entry.is_symlink() and not _is_dir(entry) and _problem(entry) is not None:
            raise SourceError(f"{display_name(entry.path)}: {_problem(entry)} (a class folder?)")


def _check_distinct(wnids: list[str], train: Path) -> None:
    # Two folder names that read the same (a newline in one, a literal `\x0a` in the
    # other) would be one class: the first folder's images labelled as the second's.
    seen = set()
    for wnid in wnids:
        if wnid in seen:
            raise SourceError(
                f"{display_name(train)}: two class folders read '{wnid}' (one name holds a "
                "character shown escaped): rename one"
            )
        seen.add(wnid)


ARCHIVES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip", ".7z", ".rar")


def _files_ending(entries: list[os.DirEntry], suffixes: tuple[str, ...]) -> list[os.DirEntry]:
    """The entries that are not folders nor hidden and whose names end in `suffixes`."""
    return [
        entry
        for entry in entries
        if (name := os.fsdecode(entry.name).lower()).endswith(suffixes)
        and not name.startswith(".")
        and not _is_dir(entry)
    ]


def _check_archives(entries: list[os.DirEntry], where: str = "beside the class folders") -> None:
    # A class left in its archive (ImageNet's training tar holds one tar per class) would
    # drop that class and shift the index of every class after it, silently; in a flat
    # val/ (its tar downloaded there, then extracted), one entry more than its labels.
    if archives := _files_ending(entries, ARCHIVES):
        raise SourceError(
            f"{display_name(archives[0].path)}: an archive {where}; extract it into a "
            "folder of its own, or move it out"
        )


# What a photo's file is called: an image beside a split's class folders is one lost
IMAGE_SUFFIXES = (
    ".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".avif",
    ".heic", ".heif", ".jp2", ".ppm", ".pgm", ".pbm", ".pnm",
)  # fmt: skip


def _check_loose_images(entries: list[os.DirEntry]) -> None:
    # ImageNet's val/ half sorted into class folders (valprep.sh stopped): its flat images
    # would be dropped without a word, and the error rates taken on the rest
    if loose := _files_ending(entries, IMAGE_SUFFIXES):
        first = display_name(loose[0].path)
        raise SourceError(
            f"{first}: one of {len(loose)} images beside the class folders, which would be "
            "left out; sort them into their class folders (ImageNet's val: valprep.sh), "
            "or move them out"
        )


def _check_class_folders(entries: list[os.DirEntry]) -> None:
    """The entries beside an ImageFolder split's class folders: none may be a class lost,
    nor an image left out."""
    _check_class_links(entries)
    _check_archives(entries)
    _check_loose_images(entries)


def open_source(root: str | Path, splits: tuple[str, ...] = SPLITS) -> Source:
    """Scan a raw dataset: classes from `train/`, and each split's folders, whose
    samples are listed in sorted order when the split is iterated."""
    # as given, not resolved: Kaggle's image folder through a link to another disk is
    # still three levels below its download's top, where its label files are
    root = Path(root).absolute()
    if root.exists() and not root.is_dir():
        raise SourceError(f"{display_name(root)}: a file, not a dataset folder (train/, val/)")
    if not root.is_dir():
        raise SourceError(
            f"{display_name(root)}: no such dataset folder (`alexnet synth` makes the demo's)"
        )
    if not (root / "train").exists() and (root.joinpath(*KAGGLE_DATA) / "train").is_dir():
        root = root.joinpath(*KAGGLE_DATA)  # Kaggle's download, given at its top
    # Each split's top folder, listed once (train/ also gives the classes).
    tops = {split: _scan(_split_dir(root, split)) for split in dict.fromkeys(("train", *splits))}
    folders = {split: [e for e in entries if _is_dir(e)] for split, entries in tops.items()}
    if not folders["train"] and _files_ending(tops["train"], IMAGE_SUFFIXES):
        raise SourceError(
            f"{display_name(root / 'train')}: images but no class folders; put each class's "
            "images in a folder of its own, train/<class>/"
        )
    if not folders["train"]:
        raise SourceError(f"{display_name(root / 'train')}: empty split (no class folders)")
    _check_class_folders(tops["train"])
    wnids = [display_name(d.name) for d in folders["train"]]
    _check_distinct(wnids, root / "train")
    names = read_names(root)
    classes = [ClassInfo(i, w, names.get(w, w)) for i, w in enumerate(wnids)]
    index = {c.wnid: c.index for c in classes}
    result = {}
    for split in splits:
        if split == "train" or any(display_name(d.name) in index for d in folders[split]):
            if split != "train":  # (train's are checked above, before its classes are read)
                _check_class_folders(tops[split])
            result[split] = _image_folder(split, folders[split], index)
        else:
            result[split] = _flat_val(root / split, tops[split], root, index)
    return Source(root, classes, result)
