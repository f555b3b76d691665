"""Benchmark of pack's first pass, the index of a split's shards (every tar header: ~2.6M
members on ImageNet), in one run: tasks of a few shards on the stage's process pool
(`flows.pack.index_split`, ours) vs the same shards indexed in the flow's own process
(`alexnet.pack.index_shards`, what pack did before), on shards of `--records` records
each (a `.jpg` and a `.cls` member; tiny payloads: the index reads no image). The two
are timed in turns, best of `--repeats` each, after a first round that starts the pool,
and must give the same index. Target: ours <= 0.75x the one process's seconds on 2
workers.

    python bench/index.py [--shards 48] [--records 1000] [--workers 2] [--repeats 3]
    (run by `make bench`)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from common import cpu_model, photo_like, print_ms_ratio  # noqa: E402
from prefect import flow  # noqa: E402

from alexnet.pack import SplitIndex, index_shards  # noqa: E402
from alexnet.params import ComputeParams  # noqa: E402
from alexnet.shards import Record, shard_name, write_shard  # noqa: E402
from flows.pack import SHARDS_PER_INDEX_TASK, index_split  # noqa: E402
from flows.runners import task_runner  # noqa: E402
from flows.server import prefect_api  # noqa: E402

CLASSES = 1000


def make_split(folder: Path, shards: int, records: int) -> None:
    """`shards` shards of `records` records (one small JPEG each, labels 0..999)."""
    jpeg = photo_like(64, 64, seed=0)
    folder.mkdir(parents=True)
    for number in range(shards):
        members = (
            Record(f"train/n{i % CLASSES:08d}/{number}_{i}", jpeg, i % CLASSES)
            for i in range(records)
        )
        write_shard(folder / shard_name(number), members, {"records": records})


def same(a: SplitIndex, b: SplitIndex) -> bool:
    columns = ("shard", "offset", "size", "label")
    return a.shards == b.shards and all(
        np.array_equal(getattr(a, c), getattr(b, c)) for c in columns
    )


def timed(work) -> tuple[float, SplitIndex]:
    start = time.perf_counter()
    index = work()
    return time.perf_counter() - start, index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=48)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    compute = ComputeParams(workers=args.workers)
    with tempfile.TemporaryDirectory() as temporary, prefect_api():
        split = Path(temporary) / "train"
        make_split(split, args.shards, args.records)

        @flow(task_runner=task_runner(None, args.workers))
        def rounds() -> tuple[list[float], list[float]]:
            index_split(split, CLASSES, compute)  # starts the pool's workers
            ours, alone = [], []
            for turn in range(args.repeats):  # in turns, each first every other time
                pair = [
                    (ours, lambda: index_split(split, CLASSES, compute)),
                    (alone, lambda: index_shards(split, CLASSES)),
                ]
                results = []
                for times, work in pair if turn % 2 == 0 else pair[::-1]:
                    seconds, index = timed(work)
                    times.append(seconds)
                    results.append(index)
                assert same(*results), "the two indexes differ"
            return ours, alone

        ours, alone = rounds()
    records = args.shards * args.records
    print(
        f"pack's index of {args.shards} shards x {args.records} records, best of "
        f"{args.repeats} ({cpu_model()}):"
    )
    print_ms_ratio(
        (f"tasks of {SHARDS_PER_INDEX_TASK} shards, {args.workers} workers", min(ours)),
        ("one process", min(alone)),
        0.75,
    )
    per_record = min(alone) / records
    print(f"  one process: {per_record * 1e6:.1f} us a record; ImageNet's 1,331,167 records:")
    print(
        f"  ~{per_record * 1_331_167:.0f} s in one process, "
        f"~{min(ours) / records * 1_331_167:.0f} s as tasks on {args.workers} workers"
    )


if __name__ == "__main__":
    main()
