"""The prepare stage's logic: plan shards over a source, prepare one shard, sum the report.

Shard k of a split always holds the same images (the split's sorted samples, chunked by
`shard_size`, planned as the split's folders are listed: the plan is never held whole),
and its bytes depend only on those images and the parameters, never on which worker
made it or when. A shard whose stored fingerprint matches what it would be
made from is reused as is, which is how a killed run continues.

No file can stop a shard: the bytes prepared are the bytes fingerprinted (a file is read
and hashed, and kept, or, past `HOLD_BYTES` of a shard, read again where the shard is made
and checked against its digest: one that changed in between is skipped), and a shard is
made in a child process (`alexnet.decoder`); whatever goes wrong with a file, from a
missing codec to a segfault or a hang, makes it a skipped file with a one-line reason.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import PIL

from alexnet import imageops
from alexnet.atomic import OutputError, atomic_output, folder_target, write_json
from alexnet.decoder import AGAIN_NEXT_RUN, At, DecoderFailed, isolated
from alexnet.digests import sha16
from alexnet.errors import AlexnetError
from alexnet.imageops import BadImage, Prepared, load_plugins, prepare_image
from alexnet.params import PrepareParams
from alexnet.pilcodecs import pil_build
from alexnet.shards import (
    PREPARE_OWNER,
    Record,
    SplitKeys,
    files_memo,
    read_description,
    shard_name,
    write_shard,
)
from alexnet.sources import ClassInfo, Source, open_source

FORMAT_VERSION = 1
# The code that turns a file into its prepared bytes: a shard made by another version of
# it is made again (`dvc repro` re-runs prepare after a change, and must not reuse them).
IMAGE_CODE = Path(imageops.__file__)


@functools.cache
def image_code() -> str:
    return sha16(IMAGE_CODE)


class PrepareError(AlexnetError):
    """The stage cannot produce a trustworthy output (e.g. too many files skipped)."""


@dataclass(frozen=True)
class Item:
    path: str  # absolute path of the raw file
    relpath: str  # relative to the dataset root, for reports
    label: int
    key: str  # WebDataset key inside the shard
    problem: str | None = None  # why the scan found it unusable (a broken symlink, ...)


@dataclass(frozen=True)
class ShardPlan:
    split: str
    index: int
    items: list[Item]

    @property
    def name(self) -> str:
        return f"{self.split}/{shard_name(self.index)}"


@dataclass
class ShardReport:
    split: str
    index: int
    images: int  # files planned into this shard
    kept: int = 0
    converted: list[dict] = field(default_factory=list)  # {"path", "from"}
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}
    reused: bool = False  # found complete and current from an earlier run


def plan_shards(source: Source, shard_size: int) -> Iterator[ShardPlan]:
    """Every split's samples in sorted order, cut into shards of `shard_size` files, as
    the split's folders are listed: one folder's samples and one shard's items are held
    at a time, whatever the number of files."""
    for name, split in source.splits.items():
        keys = SplitKeys(folder.prefix for folder in split.folders)
        items: list[Item] = []
        index = 0
        for folder in split.folders:
            samples = folder.samples()
            folder_keys = keys.folder(folder.prefix, (s.relpath for s in samples))
            for sample, key in zip(samples, folder_keys, strict=True):
                items.append(
                    Item(str(sample.path), sample.relpath, sample.label, key, sample.problem)
                )
                if len(items) == shard_size:
                    yield ShardPlan(name, index, items)
                    items, index = [], index + 1
        if items:
            yield ShardPlan(name, index, items)


class Changing(OSError):
    """A file that changed while it was read (being written to, replaced)."""


class Unread(OSError):
    """A file whose read crashed or hung the process that read it, or took more memory
    than it could have."""


class TooLarge(OSError):
    """A file larger than any image within params `prepare.max_pixels` can be."""


def max_file_bytes(max_pixels: int) -> int:
    """The largest file prepare reads: a frame within `max_pixels` uncompressed at 8
    bytes a pixel (16-bit RGBA or CMYK, the widest PIL reads), plus 1 GiB for metadata
    and a multi-frame file's other frames (of which `prepare.frames: first` keeps one).
    A larger file (a video named .JPEG, a disk image) is skipped unread: read whole, it
    could exceed the memory and stop the stage."""
    return 8 * max_pixels + 2**30


def too_large(size: int, limit: int) -> str:
    """Why a file of `size` bytes is not read, past `max_file_bytes`' `limit`."""
    return (
        f"too large: {size:,} bytes, more than any image of prepare.max_pixels can be ({limit:,})"
    )


def _read(item: Item, limit: int) -> tuple[bytes | OSError | None, list[int] | None]:
    """The file's bytes, an OSError saying why they cannot be read, or None for an entry
    the scan already found unusable (which is never opened: it may be a FIFO); and its
    identity before the read (`_identity`), where it has one."""
    if item.problem:
        return None, None
    try:
        with open(item.path, "rb") as stream:
            before = os.fstat(stream.fileno())
            if before.st_size > limit:
                return TooLarge(too_large(before.st_size, limit)), None
            data = stream.read()
            after = os.fstat(stream.fileno())
    except OSError as error:
        return error, None
    except MemoryError:  # within the limit, but more than this process may hold now
        return Unread(f"out of memory while reading it ({before.st_size:,} bytes)"), None
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or len(
        data
    ) != after.st_size:
        return Changing("changed while being read"), None
    return data, _vouched(before)


# A file changed this recently is not vouched for by its inode, size and times
# (`_identity`): a second write within one tick of a coarse clock (1-2 s on FAT, some NFS
# servers) leaves them as they were. As git's "racily clean" files.
RECENT_NS = 3 * 10**9

# The bytes of a shard's files that `make_shard` keeps between hashing and preparing them;
# the rest it reads again (and checks against their digests).
HOLD_BYTES = 64 * 2**20


def _digest(content: bytes | OSError | None) -> str | OSError | None:
    """A file's content as `fingerprint` takes it: its bytes' sha256, or why none."""
    return hashlib.sha256(content).hexdigest() if isinstance(content, bytes) else content


def _read_again(item: Item, digest: str | OSError | None, limit: int) -> bytes | OSError | None:
    """The bytes of a file that `_digest` hashed before, read again; `Changing` where
    they are not those bytes any more."""
    if not isinstance(digest, str):
        return digest
    content, _ = _read(item, limit)
    if isinstance(content, bytes) and _digest(content) != digest:
        return Changing("changed while being read")
    return content


def fingerprint(items: list[Item], contents: list, params: PrepareParams) -> str:
    """What a shard is made from: the files' names, labels and content (each file's
    `_digest`), the options, and the imaging code and library: pillow and pillow-simd
    encode differently, and so do two builds of one pillow-simd version (its codecs and
    libjpeg: `pil_build`)."""
    digest = hashlib.sha256()
    header = {
        "format": FORMAT_VERSION,
        "code": image_code(),
        "pil": {"version": PIL.__version__, **pil_build()},
        "file_timeout": params.file_timeout,
        **params.image_options(),
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for item, content in zip(items, contents, strict=True):
        if isinstance(content, str):
            body = content
        else:  # the reason a report gives: an OSError's own text names the absolute path
            body = f"unusable: {_reason(item, content)}"
        digest.update(f"\n{item.relpath}\t{item.label}\t{item.key}\t{body}".encode())
    return digest.hexdigest()


def _reason(item: Item, content: bytes | OSError | None) -> str | None:
    """Why a file is skipped before decoding: the scan's problem, or the read's error."""
    if content is None:
        return item.problem
    if isinstance(content, (Changing, Unread, TooLarge)):
        return str(content)
    if isinstance(content, OSError):
        return f"unreadable: {content.strerror or content}"
    return None


def prepare_shard(plan: ShardPlan, out_dir: str | Path, params: PrepareParams) -> ShardReport:
    """Make (or reuse) `out_dir/<split>/shard-NNNNN.tar` for one planned shard, in the
    decoder's child process: a file that crashes or hangs it is skipped with the reason
    and the shard made again without it."""
    check_plugins(params.plugins)
    request = {
        "plan": asdict(plan),
        "out": str(out_dir),
        "params": params.model_dump(mode="json"),
    }
    try:
        answer = isolated(params.file_timeout).call(f"{__name__}:{_in_child.__name__}", request)
    except DecoderFailed as error:  # on no file: the shard's, named
        raise DecoderFailed(f"{Path(out_dir) / plan.name}: {error}") from None
    return ShardReport(**answer)


def _in_child(request: dict, skip: dict[int, str], at: At) -> dict:
    """`make_shard` of a request of `prepare_shard`, in the decoder's child."""
    plan = request["plan"]
    items = [Item(**item) for item in plan["items"]]
    params = PrepareParams.model_validate(request["params"])
    report = make_shard(
        ShardPlan(plan["split"], plan["index"], items), request["out"], params, skip, at
    )
    return asdict(report)


def make_shard(
    plan: ShardPlan,
    out_dir: str | Path,
    params: PrepareParams,
    skip: dict[int, str] | None = None,
    at: At = lambda index: None,
) -> ShardReport:
    """`prepare_shard` in this process. The steps that can fail on a file are numbered
    for `at` and `skip`: reading file i is step i, preparing it is step n + i (n files).
    `at(step)` is called as each starts; the steps in `skip` ({step: reason}) are not
    taken and their file is skipped with that reason. The files' bytes are kept from
    their hashing to their preparing up to `HOLD_BYTES` (an ImageNet shard, ~25 MB, is
    read once); past it they are read again, so that a shard of camera photos (250 x
    8 MB) is never held whole."""
    path = Path(out_dir) / plan.name
    path.parent.mkdir(parents=True, exist_ok=True)
    skip, n = skip or {}, len(plan.items)
    at(-1)  # on no file: reading the stored shard's description is the disk's time
    stored = read_description(path)
    if not skip and (unchanged := _unchanged(path, stored, plan.items, params, at)):
        return unchanged
    limit = max_file_bytes(params.max_pixels)
    identities, digests, held, room = [], [], {}, HOLD_BYTES
    for index, item in enumerate(plan.items):
        at(index)
        # (a file in `skip` is not even looked at: its stat may be what hangs)
        content, identity = (Unread(skip[index]), None) if index in skip else _read(item, limit)
        identities.append(identity)
        digests.append(_digest(content))
        if isinstance(content, bytes) and len(content) <= room:
            held[index], room = content, room - len(content)
    at(-1)
    expected = fingerprint(plan.items, digests, params)
    if stored and stored.get("fingerprint") == expected and not _tried_again(stored):
        _remember_files(path, expected, identities, digests)  # (touched files, say)
        return ShardReport(**stored["report"], reused=True)
    report = ShardReport(plan.split, plan.index, len(plan.items))
    records = []
    options = params.image_options()
    for index, (item, digest) in enumerate(zip(plan.items, digests, strict=True)):
        at(n + index)
        if n + index in skip:
            result = BadImage(skip[n + index])
        else:
            content = held.pop(index) if index in held else _read_again(item, digest, limit)
            result = _prepared(item, content, options)
        if isinstance(result, BadImage):
            report.skipped.append({"path": item.relpath, "reason": str(result)})
            continue
        if result.converted:
            report.converted.append({"path": item.relpath, "from": result.converted})
        records.append(Record(item.key, result.jpeg, item.label))
    at(-1)  # on no file while the tar is written: a crash there is the shard's
    report.kept = len(records)
    stored_report = {k: v for k, v in report.__dict__.items() if k != "reused"}
    write_shard(path, records, {"fingerprint": expected, "report": stored_report})
    _remember_files(path, expected, identities, digests)
    return report


def _identity(item: Item) -> list[int] | None:
    """A file's inode, size, mtime and ctime (ns), or None where they cannot be had or
    are too recent to vouch for its bytes. While they stay, the bytes are taken to be
    the same: a write, a `touch -r` or `tar x` restoring an mtime, a chmod all move the
    ctime, which nothing sets back. Not its device: an NFS mount's is each client's
    own, and a Dask worker on another node reads it. Taken from the open file (an NFS
    client's stat may answer from attributes cached for up to a minute; an open asks
    the server)."""
    if item.problem:
        return None
    try:
        descriptor = os.open(item.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _vouched(os.fstat(descriptor))
    except OSError:
        return None
    finally:
        os.close(descriptor)


def _vouched(status: os.stat_result) -> list[int] | None:
    """`_identity` of an open file's status; None where it changed too recently for its
    times to show a second change (`RECENT_NS`): such a file is read at every run."""
    if time.time_ns() - status.st_ctime_ns < RECENT_NS:
        return None
    return [status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns]


def _remember_files(shard: Path, expected: str, identities: list, digests: list) -> None:
    """Record beside the shard its files' identities and digests (`files_memo`), for the
    next run's `_unchanged`; none where a file could not be had (it is read again). Best
    effort: a memo that cannot be written costs the next run a read, never this one."""
    memo = files_memo(shard)
    with suppress(OSError, OutputError):
        if None in identities or not all(isinstance(digest, str) for digest in digests):
            memo.unlink(missing_ok=True)
        else:
            write_json(memo, {"fingerprint": expected, "files": identities, "digests": digests})


def _unchanged(
    shard: Path, stored: dict | None, items: list[Item], params: PrepareParams, at: At
) -> ShardReport | None:
    """The stored shard's report, reused, where its files are those its `files_memo`
    recorded (`_identity`) and the fingerprint of their recorded digests is the shard's:
    no file is read (a re-run on ImageNet read its ~150 GB to find the shards it could
    keep). Else None: the files are read and hashed. (The memo is not in the shard,
    whose bytes must not depend on where and when its files were copied.)"""
    if not stored or _tried_again(stored):
        return None
    try:
        memo = json.loads(files_memo(shard).read_text())
    except (OSError, ValueError):  # none (a file unread, another copy), or damaged
        return None
    if not isinstance(memo, dict) or memo.get("fingerprint") != stored.get("fingerprint"):
        return None  # of another version of the shard
    files, digests = memo.get("files"), memo.get("digests")
    if not isinstance(files, list) or not isinstance(digests, list):
        return None
    if not len(files) == len(digests) == len(items):
        return None
    if not all(isinstance(digest, str) for digest in digests):
        return None
    for index, (item, recorded) in enumerate(zip(items, files, strict=True)):
        at(index)
        if _identity(item) != recorded:
            return None
    if stored.get("fingerprint") != fingerprint(items, digests, params):
        return None  # other options, code or names
    return ShardReport(**stored["report"], reused=True)


def _tried_again(stored: dict) -> bool:
    """Whether a stored shard skipped a file for deaths the machine's load may have
    caused (`AGAIN_NEXT_RUN`): then it is made again, not reused."""
    report = stored.get("report")
    skipped = report.get("skipped", []) if isinstance(report, dict) else []
    return any(str(entry.get("reason", "")).endswith(AGAIN_NEXT_RUN) for entry in skipped)


def _prepared(item: Item, content, options: dict) -> Prepared | BadImage:
    reason = _reason(item, content)
    if reason:
        return BadImage(reason)
    try:
        return prepare_image(content, Path(item.relpath).suffix, **options)
    except BadImage as error:
        return error


def check_plugins(plugins: tuple[str, ...]) -> None:
    """Fail the stage, not every file, when a module of params prepare.plugins is missing."""
    try:
        load_plugins(plugins)
    except Exception as error:
        raise PrepareError(f"params prepare.plugins: cannot import it ({error})") from None


class Summary:
    """The stage report (`report.json`), summed shard by shard as each report comes back,
    in shard order: totals, per split, and every converted or skipped file with what
    happened to it; and how many usable images each training class has left. The files'
    entries wait in temporary files, one JSON line each, not in memory: with
    `prepare.icc_to_srgb` most of ImageNet's 1.28M files are converted (~280 bytes each)."""

    LISTS = ("converted_files", "skipped_files")  # the report's keys of the entries

    def __init__(self) -> None:
        self.splits: dict[str, dict[str, int]] = {}
        self.shards: dict[str, int] = {}
        self.usable: Counter[int] = Counter()  # training class -> images kept
        self.reused = 0  # shards found complete and current
        self._spools = {key: tempfile.TemporaryFile("w+", encoding="utf-8") for key in self.LISTS}

    def add(self, report: ShardReport, plan: ShardPlan | None = None) -> None:
        """Count one shard's report; with its plan, also its training images by class."""
        counts = self.splits.setdefault(
            report.split, {"files": 0, "kept": 0, "converted": 0, "skipped": 0}
        )
        counts["files"] += report.images
        counts["kept"] += report.kept
        counts["converted"] += len(report.converted)
        counts["skipped"] += len(report.skipped)
        self.shards[report.split] = self.shards.get(report.split, 0) + 1
        self.reused += report.reused
        # Each entry's keys in one order, whether the shard was made now or reused (its
        # stored report comes back from the tar header with sorted keys).
        converted = [{"path": c["path"], "from": c["from"]} for c in report.converted]
        skipped = [{"path": s["path"], "reason": s["reason"]} for s in report.skipped]
        for key, entries in (("converted_files", converted), ("skipped_files", skipped)):
            self._spools[key].writelines(json.dumps(entry) + "\n" for entry in entries)
        if plan is not None and plan.split == "train":
            gone = {entry["path"] for entry in skipped}
            self.usable.update(i.label for i in plan.items if i.relpath not in gone)

    def counts(self) -> dict:
        """The totals and the per-split and per-shard counts: the report but its lists."""
        totals = {
            k: sum(s[k] for s in self.splits.values())
            for k in ("files", "kept", "converted", "skipped")
        }
        return {
            **totals,
            "splits": dict(sorted(self.splits.items())),
            "shards": dict(sorted(self.shards.items())),
        }

    def entries(self, key: str) -> Iterator[dict]:
        """The entries of one of `LISTS`, in shard order, read back one at a time."""
        spool = self._spools[key]
        spool.seek(0)
        for line in spool:
            yield json.loads(line)
        spool.seek(0, os.SEEK_END)  # where `add` goes on writing

    def report(self) -> dict:
        """The whole report in memory (for a small one; `write` streams it)."""
        return {**self.counts(), **{key: list(self.entries(key)) for key in self.LISTS}}

    def write(self, path: str | Path) -> None:
        """`report()` written atomically to `path` as `atomic.write_json` writes it (the
        same bytes), with the lists streamed from their temporary files."""
        with atomic_output(path) as temporary, open(temporary, "w", encoding="utf-8") as out:
            counts = self.counts().items()
            out.write(
                "{" + ",".join(f"\n  {json.dumps(k)}: {_indented(v, '  ')}" for k, v in counts)
            )
            for key in self.LISTS:
                out.write(f",\n  {json.dumps(key)}: ")
                _write_list(out, self.entries(key))
            out.write("\n}\n")


def _indented(value: object, margin: str) -> str:
    """`json.dumps(value, indent=2)` as it reads nested at `margin`."""
    return json.dumps(value, indent=2).replace("\n", "\n" + margin)


def _write_list(out: TextIO, values: Iterator[object]) -> None:
    """A list of an object's top level, as `json.dumps(..., indent=2)` writes it."""
    first = True
    for value in values:
        out.write(("[" if first else ",") + "\n    " + _indented(value, "    "))
        first = False
    out.write("[]" if first else "\n  ]")


def check_skipped(report: dict, max_skipped: float, report_path: str | Path) -> None:
    """Fail when more than `max_skipped` of the files were unusable."""
    share = report["skipped"] / max(report["files"], 1)
    if share > max_skipped:
        raise PrepareError(
            f"{report['skipped']} of {report['files']} files skipped ({share:.1%} > "
            f"prepare.max_skipped {max_skipped:.1%}); reasons in {report_path}"
        )


def check_splits(splits: dict[str, dict[str, int]], root) -> None:
    """Fail when a split kept no image (`Summary.splits`): nothing to train on, or to
    evaluate (an error rate of nothing would read as perfect)."""
    for split, counts in splits.items():
        if counts["kept"] == 0:
            raise PrepareError(
                f"{Path(root) / split}: no usable image in this split, all {counts['files']} "
                "files were skipped; reasons in report.json"
            )


def check_classes(usable: Counter[int], classes: list[ClassInfo], root) -> None:
    """Fail when a training class has no usable image left (`usable`: class -> images
    kept, `Summary.usable`): it could not be learned."""
    empty = [c for c in classes if usable[c.index] == 0]
    if empty:
        more = f" (and {len(empty) - 1} more classes)" if len(empty) > 1 else ""
        raise PrepareError(
            f"{Path(root) / 'train' / empty[0].wnid}: no usable image in this class, every "
            f"file was skipped{more}; reasons in report.json"
        )


def refuse(raw: str, out: str, **_: object) -> Source:
    """What stops the stage before any work, as one line (`flows.stages.Stage.refusal`);
    returns the source it opened, which the flow reads."""
    folder_target(out, PREPARE_OWNER, replaced=False)  # not a folder of the user's files
    return open_source(raw)
