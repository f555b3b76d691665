"""The prepare stage's logic: plan shards over a source, prepare one shard, sum the report.

Shard k of a split always holds the same images (the split's sorted samples, chunked by
`shard_size`), and its bytes depend only on those images and the parameters, never on
which worker made it or when. A shard whose stored fingerprint matches what it would be
made from is reused as is, which is how a killed run continues.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import PIL

from alexnet.errors import AlexnetError
from alexnet.imageops import BadImage, prepare_image
from alexnet.params import PrepareParams
from alexnet.shards import Record, read_description, shard_name, unique_keys, write_shard
from alexnet.sources import Source

FORMAT_VERSION = 1


class PrepareError(AlexnetError):
    """The stage cannot produce a trustworthy output (e.g. too many files skipped)."""


@dataclass(frozen=True)
class Item:
    path: str  # absolute path of the raw file
    relpath: str  # relative to the dataset root, for reports
    label: int
    key: str  # WebDataset key inside the shard


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


def plan_shards(source: Source, shard_size: int) -> list[ShardPlan]:
    """Every split's samples in sorted order, cut into shards of `shard_size` files."""
    plans = []
    for split, samples in source.splits.items():
        keys = unique_keys(s.relpath for s in samples)
        items = [
            Item(str(s.path), s.relpath, s.label, k) for s, k in zip(samples, keys, strict=True)
        ]
        for start in range(0, len(items), shard_size):
            plans.append(ShardPlan(split, start // shard_size, items[start : start + shard_size]))
    return plans


def _read(path: str) -> bytes | OSError:
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except OSError as error:
        return error


def fingerprint(items: list[Item], contents: list[bytes | OSError], params: PrepareParams) -> str:
    """What a shard is made from: the files' names, labels and content, the options, and
    the imaging library (pillow and pillow-simd encode differently)."""
    digest = hashlib.sha256()
    header = {"format": FORMAT_VERSION, "pil": PIL.__version__, **params.image_options()}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for item, content in zip(items, contents, strict=True):
        body = hashlib.sha256(content).hexdigest() if isinstance(content, bytes) else "unreadable"
        digest.update(f"\n{item.relpath}\t{item.label}\t{item.key}\t{body}".encode())
    return digest.hexdigest()


def _process(plan: ShardPlan, contents: list, params: PrepareParams):
    report = ShardReport(plan.split, plan.index, len(plan.items))
    records = []
    for item, content in zip(plan.items, contents, strict=True):
        try:
            if isinstance(content, OSError):
                raise BadImage(f"unreadable: {content.strerror or content}")
            extension = Path(item.relpath).suffix
            prepared = prepare_image(content, extension, **params.image_options())
        except BadImage as error:
            report.skipped.append({"path": item.relpath, "reason": str(error)})
            continue
        if prepared.converted:
            report.converted.append({"path": item.relpath, "from": prepared.converted})
        records.append(Record(item.key, prepared.jpeg, item.label))
    report.kept = len(records)
    return records, report


def prepare_shard(plan: ShardPlan, out_dir: str | Path, params: PrepareParams) -> ShardReport:
    """Make (or reuse) `out_dir/<split>/shard-NNNNN.tar` for one planned shard."""
    path = Path(out_dir) / plan.name
    path.parent.mkdir(parents=True, exist_ok=True)
    contents = [_read(item.path) for item in plan.items]
    expected = fingerprint(plan.items, contents, params)
    stored = read_description(path)
    if stored and stored.get("fingerprint") == expected:
        return ShardReport(**stored["report"], reused=True)
    records, report = _process(plan, contents, params)
    stored_report = {k: v for k, v in report.__dict__.items() if k != "reused"}
    write_shard(path, records, {"fingerprint": expected, "report": stored_report})
    return report


def summarize(reports: list[ShardReport]) -> dict:
    """The stage report (`report.json`): totals, per split, and every converted or
    skipped file with what happened to it. Independent of the order shards finished."""
    reports = sorted(reports, key=lambda r: (r.split, r.index))
    splits: dict[str, dict] = {}
    for r in reports:
        counts = splits.setdefault(r.split, {"files": 0, "kept": 0, "converted": 0, "skipped": 0})
        counts["files"] += r.images
        counts["kept"] += r.kept
        counts["converted"] += len(r.converted)
        counts["skipped"] += len(r.skipped)
    totals = {
        k: sum(s[k] for s in splits.values()) for k in ("files", "kept", "converted", "skipped")
    }
    return {
        **totals,
        "splits": splits,
        "shards": {split: sum(r.split == split for r in reports) for split in splits},
        # Each entry's keys in one order, whether the shard was made now or reused (its
        # stored report comes back from the tar header with sorted keys).
        "converted_files": [
            {"path": c["path"], "from": c["from"]} for r in reports for c in r.converted
        ],
        "skipped_files": [s for r in reports for s in r.skipped],
    }


def check_skipped(report: dict, max_skipped: float, report_path: str | Path) -> None:
    """Fail when more than `max_skipped` of the files were unusable."""
    share = report["skipped"] / max(report["files"], 1)
    if share > max_skipped:
        raise PrepareError(
            f"{report['skipped']} of {report['files']} files skipped ({share:.1%} > "
            f"max_skipped {max_skipped:.1%}); reasons in {report_path}"
        )
