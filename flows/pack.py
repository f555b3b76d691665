"""Flow of the pack stage: prepared shards -> one LMDB store per split."""

from __future__ import annotations

from operator import itemgetter
from pathlib import Path

from prefect import flow, get_run_logger

from alexnet.lmdb_store import write_store
from alexnet.pack import (
    SplitIndex,
    check_indexes,
    chunk_bytes,
    chunks,
    index_shards,
    output_order,
    pack_digest,
    packed_count,
    refuse,
    split_index,
    split_shards,
)
from alexnet.params import ComputeParams, PackParams, PrepareParams
from alexnet.shards import SPLITS, load_classes
from flows.progress import Bar, in_order
from flows.runners import parallelism
from tasks.pack import index_shards_task, load_chunk_task

# The splits' index: shards a task, so that a task's own cost on the pool (~0.3 s of
# the stage's time on 2 cores, bench/index.py) is small against its work (~0.12 s a
# shard of 1,000 records), and tasks each worker has queued (alike and short: two keep
# it busy).
SHARDS_PER_INDEX_TASK, INDEX_AHEAD_PER_WORKER = 8, 2


@flow(name="pack")
def pack_flow(
    prepared: str, out: str, pack: PackParams, prepare: PrepareParams, compute: ComputeParams
) -> dict:
    """Write `out/train` (seeded shuffled order) and `out/val` (source order); the
    workers read ahead of the single writer by at most params `compute.window_mb`."""
    refuse(prepared, out)
    classes = load_classes(prepared)
    indexes = {
        split: index_split(Path(prepared) / split, len(classes), compute) for split in SPLITS
    }
    check_indexes(prepared, indexes, classes)
    options = {**pack.model_dump(exclude={"batch"}), "size": prepare.size, "classes": classes}
    digest = pack_digest(indexes, options)
    counts = {}
    for split, index in indexes.items():
        if (count := packed_count(Path(out) / split, digest, index)) is not None:
            get_run_logger().info("pack %s: the store of this run is there already: kept", split)
            counts[split] = count
            continue
        order = output_order(len(index), pack.shuffle_train and split == "train", pack.seed)
        results = in_order(
            chunks(index, order, pack.batch),
            lambda part: load_chunk_task.submit(part, pack.encoding, prepare.size),
            compute.window_mb << 20,
            Bar(f"pack {split}", len(index), len),
            size=lambda part: chunk_bytes(part, pack.encoding, prepare.size),
        )
        # (map, not a generator expression: its frame would hold the last batch while
        # the next is fetched, one chunk beyond the window)
        batches = map(itemgetter(1), results)
        counts[split] = write_store(
            Path(out) / split, batches, pack.encoding, classes, size=prepare.size, pack=digest
        )
    get_run_logger().info("packed %s records (%s)", counts, pack.encoding)
    return counts


def index_split(folder: Path, classes: int, compute: ComputeParams) -> SplitIndex:
    """The split's records, indexed by tasks of a few shards: ImageNet's ~1,330 shards
    are ~2.6M tar members, minutes of one core's time, which the workers share."""
    shards = split_shards(folder)
    size = SHARDS_PER_INDEX_TASK
    if len(shards) <= size or parallelism(compute.workers) == 1:  # tasks would add only cost
        return index_shards(folder, classes)
    groups = [
        [str(shard) for shard in shards[start : start + size]]
        for start in range(0, len(shards), size)
    ]
    results = in_order(
        groups,
        lambda group: index_shards_task.submit(group, classes),
        INDEX_AHEAD_PER_WORKER * parallelism(compute.workers),
        Bar(f"index {folder.name}", len(shards), len),
    )
    return split_index(shards, [table for _, tables in results for table in tables])


if __name__ == "__main__":
    from flows.stages import main

    main("pack", pack_flow)
