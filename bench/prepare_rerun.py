"""Benchmark of a re-run of prepare with nothing changed: how long its shards take to be
found current. Ours: each file's identity (inode, size, mtime, ctime of the open file)
against the memo beside its shard (`alexnet.prepare._unchanged`); the baseline: every
file read and hashed (the fingerprint's path, as every run did before the memo, and
as it still runs where a memo is missing). Both in one process, the page cache warm for
both (the baseline's best case: on ImageNet its ~150 GB come from the disk), best of
`--repeats`, taking turns.

    python bench/prepare_rerun.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import cpu_model, photo_like  # noqa: E402

from alexnet.params import PrepareParams  # noqa: E402
from alexnet.prepare import RECENT_NS, make_shard, plan_shards  # noqa: E402
from alexnet.shards import files_memo  # noqa: E402
from alexnet.sources import open_source  # noqa: E402


def make_raw(root: Path, images: int, classes: int) -> float:
    """`images` photo-like JPEGs of ImageNet's size in `classes` class folders (train/) and
    one val image a class; returns the mean file size in KB."""
    total = 0
    for split, count in (("train", images), ("val", classes)):
        for i in range(count):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            data = photo_like(500, 375, i)
            (folder / f"{i:05d}.JPEG").write_bytes(data)
            total += len(data)
    return total / (images + classes) / 1024


def rerun(plans: list, out: Path, params: PrepareParams, memo: bool) -> float:
    """Seconds to find every shard current (all must be reused), with or without memos."""
    if not memo:
        for plan in plans:
            files_memo(out / plan.name).unlink()
    start = time.perf_counter()
    reports = [make_shard(plan, out, params) for plan in plans]
    seconds = time.perf_counter() - start
    assert all(report.reused for report in reports)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root, out, params = Path(folder) / "raw", Path(folder) / "out", PrepareParams()
        size_kb = make_raw(root, args.images, classes=4)
        time.sleep(RECENT_NS / 1e9)  # files changed this recently get no memo
        plans = list(plan_shards(open_source(root), params.shard_size))
        files = sum(len(plan.items) for plan in plans)
        for plan in plans:  # the first run: every shard made
            make_shard(plan, out, params)
        best = {"ours": float("inf"), "baseline": float("inf")}
        for _ in range(args.repeats):  # (the baseline's run writes the memos again)
            best["ours"] = min(best["ours"], rerun(plans, out, params, memo=True))
            best["baseline"] = min(best["baseline"], rerun(plans, out, params, memo=False))
    print(f"{cpu_model()}; {files} files of ~{size_kb:.0f} KB in {len(plans)} shards")
    print("| what | ours (file memo) | baseline (read + sha256) | ratio |")
    print("|---|---|---|---|")
    ours, base = (files / best[side] for side in ("ours", "baseline"))
    print(
        f"| prepare re-run, nothing changed, files/s | {ours:,.0f} | {base:,.0f} | "
        f"{ours / base:.1f}x |"
    )


if __name__ == "__main__":
    main()
