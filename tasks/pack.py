"""Prefect tasks of the pack stage: index a few shards; read (and for `raw`, decode) one chunk
of records."""

from __future__ import annotations

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from alexnet.pack import Entry, load_chunk, shard_table
from tasks.quiet import quiet_user_errors


@task(name="index-shards", cache_policy=NO_CACHE)
@quiet_user_errors
def index_shards_task(shards: list[str], classes: int) -> list[np.ndarray]:
    return [shard_table(shard, classes) for shard in shards]


@task(name="load-chunk", cache_policy=NO_CACHE)
@quiet_user_errors
def load_chunk_task(chunk: list[Entry], encoding: str, size: int) -> list[tuple[int, bytes]]:
    return load_chunk(chunk, encoding, size)
