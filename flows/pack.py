"""Flow of the pack stage: prepared shards -> one LMDB store per split."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from prefect import flow, get_run_logger
from rich.progress import Progress

from alexnet.lmdb_store import write_store
from alexnet.pack import chunks, index_shards, output_order
from alexnet.params import ComputeParams, PackParams, PrepareParams
from alexnet.shards import load_classes
from tasks.pack import load_chunk_task

SPLITS = ("train", "val")


def _ordered_results(futures_of, count: int, window: int, progress, bar) -> Iterator[list]:
    """Chunk results in output order, keeping at most `window` chunks in flight (the
    single LMDB writer consumes them while the workers read ahead)."""
    pending = {}
    for index in range(count):
        for ahead in range(index, min(index + window, count)):
            if ahead not in pending:
                pending[ahead] = futures_of(ahead)
        batch = pending.pop(index).result()
        progress.advance(bar, len(batch))
        yield batch


@flow(name="pack")
def pack_flow(
    prepared: str, out: str, pack: PackParams, prepare: PrepareParams, compute: ComputeParams
) -> dict:
    """Write `out/train` (seeded shuffled order) and `out/val` (source order); the
    workers read ahead by two chunks each."""
    workers = compute.workers or os.cpu_count() or 1
    classes = load_classes(prepared)
    counts = {}
    with Progress() as progress:
        for split in SPLITS:
            entries = index_shards(Path(prepared) / split, len(classes))
            order = output_order(len(entries), pack.shuffle_train and split == "train", pack.seed)
            parts = chunks(entries, order, pack.batch)
            bar = progress.add_task(f"pack {split}", total=len(entries))

            def submit(i: int, parts=parts):
                return load_chunk_task.submit(parts[i], pack.encoding, prepare.size)

            batches = _ordered_results(submit, len(parts), 2 * workers, progress, bar)
            counts[split] = write_store(Path(out) / split, batches, pack.encoding, classes)
    get_run_logger().info("packed %s records (%s)", counts, pack.encoding)
    return counts


if __name__ == "__main__":
    from flows.stages import main

    main("pack", pack_flow)
